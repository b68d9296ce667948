"""SBoRALayer against the dense model ``W0 + ΔW`` (ΔW built with an explicit one-hot matrix)."""

from __future__ import annotations

import copy

import pytest
import torch
from tests.sbora.sbora_refs import dense_delta
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode
from transformers.pytorch_utils import Conv1D

from sbora_reg.errors import QuantizationError
from sbora_reg.sbora import SBoRALayer

OUT, IN = 24, 40


def make_layer(
    variant: str, r: int, dtype: torch.dtype = torch.float32, kind: str = "linear", seed: int = 0
) -> tuple[nn.Module, SBoRALayer, torch.Tensor]:
    """(untouched base copy, wrapped layer with random factor, idx)."""
    gen = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    base: nn.Module = nn.Linear(IN, OUT) if kind == "linear" else Conv1D(OUT, IN)
    if kind == "conv1d":
        nn.init.normal_(base.weight, std=0.2)
        nn.init.normal_(base.bias, std=0.2)
    base = base.to(dtype)
    dim = IN if variant == "fa" else OUT
    idx = torch.sort(torch.randperm(dim, generator=gen)[:r])[0]
    layer = SBoRALayer(copy.deepcopy(base), variant, scale=1.7, indices=idx)
    with torch.no_grad():
        factor = layer.sbora_B if variant == "fa" else layer.sbora_A
        factor.copy_(torch.randn(factor.shape, generator=gen) * 0.3)
    return base, layer, idx


def w_out_in(module: nn.Module) -> torch.Tensor:
    """A base layer's weight in the (out, in) frame."""
    return module.weight.T if isinstance(module, Conv1D) else module.weight


def factor_of(layer: SBoRALayer) -> torch.Tensor:
    return layer.sbora_B if layer.variant == "fa" else layer.sbora_A


def dense_reference(
    base: nn.Module, layer: SBoRALayer, idx: torch.Tensor, x: torch.Tensor, g: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """float64 (y, dL/dx, dL/dfactor) of y = x (W0 + ΔW(factor)).T + b, with L = <y, g>."""
    f = factor_of(layer).detach().double().requires_grad_(True)
    xr = x.detach().double().requires_grad_(True)
    w = w_out_in(base).detach().double() + dense_delta(
        layer.variant, idx, f, layer.scale, (OUT, IN)
    )
    y = xr @ w.T + base.bias.detach().double()
    (y * g.double()).sum().backward()
    assert xr.grad is not None and f.grad is not None
    return y.detach(), xr.grad, f.grad


@pytest.mark.parametrize("kind", ["linear", "conv1d"])
@pytest.mark.parametrize("batch", [(5,), (2, 3)], ids=["2d", "3d"])
@pytest.mark.parametrize("r", [1, 4, 16])
@pytest.mark.parametrize("variant", ["fa", "fb"])
def test_forward_and_grads_match_dense_fp32(variant: str, r: int, batch: tuple, kind: str) -> None:
    base, layer, idx = make_layer(variant, r, kind=kind, seed=r)
    x = torch.randn(*batch, IN, requires_grad=True)
    g = torch.randn(*batch, OUT)
    y = layer(x)
    (y * g).sum().backward()
    y_ref, dx_ref, df_ref = dense_reference(base, layer, idx, x, g)
    torch.testing.assert_close(y.double(), y_ref, rtol=1e-5, atol=1e-5)
    assert x.grad is not None and factor_of(layer).grad is not None
    torch.testing.assert_close(x.grad.double(), dx_ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(factor_of(layer).grad.double(), df_ref, rtol=1e-5, atol=1e-5)
    assert layer.sbora_idx.dtype == torch.int64


@pytest.mark.parametrize("batch", [(5,), (2, 3)], ids=["2d", "3d"])
@pytest.mark.parametrize("variant", ["fa", "fb"])
def test_forward_and_grads_match_dense_bf16(variant: str, batch: tuple) -> None:
    base, layer, idx = make_layer(variant, 4, dtype=torch.bfloat16, seed=3)
    assert factor_of(layer).dtype == torch.bfloat16
    x = torch.randn(*batch, IN).to(torch.bfloat16).requires_grad_(True)
    g = torch.randn(*batch, OUT).to(torch.bfloat16)
    y = layer(x)
    assert y.dtype == torch.bfloat16
    (y * g).sum().backward()
    y_ref, dx_ref, df_ref = dense_reference(base, layer, idx, x, g)
    tol = {"rtol": 3e-2, "atol": 3e-2}
    torch.testing.assert_close(y.double(), y_ref, **tol)
    assert x.grad is not None and factor_of(layer).grad is not None
    torch.testing.assert_close(x.grad.double(), dx_ref, **tol)
    torch.testing.assert_close(factor_of(layer).grad.double(), df_ref, **tol)


@pytest.mark.parametrize("variant", ["fa", "fb"])
def test_fp32_factor_on_bf16_input_keeps_output_dtype(variant: str) -> None:
    base, layer, idx = make_layer(variant, 4, seed=5)
    layer.base_layer.to(torch.bfloat16)
    x = torch.randn(3, IN).to(torch.bfloat16)
    y = layer(x)
    assert y.dtype == torch.bfloat16
    ref = x.double() @ (w_out_in(layer.base_layer).double() + layer.delta_weight().double()).T
    torch.testing.assert_close(
        y.double(), ref + base.bias.to(torch.bfloat16).double(), rtol=3e-2, atol=3e-2
    )


class _LargestOutput(TorchDispatchMode):
    """Records the largest tensor any aten op allocates (views of its inputs do not count)."""

    def __init__(self) -> None:
        super().__init__()
        self.largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # type: ignore[no-untyped-def]
        kwargs = kwargs or {}
        inputs = [a for a in (*args, *kwargs.values()) if isinstance(a, torch.Tensor)]
        seen = {t.untyped_storage().data_ptr() for t in inputs}
        out = func(*args, **kwargs)
        for t in out if isinstance(out, tuple | list) else (out,):
            if isinstance(t, torch.Tensor) and t.untyped_storage().data_ptr() not in seen:
                self.largest = max(self.largest, t.numel())
        return out


@pytest.mark.parametrize("variant", ["fa", "fb"])
def test_no_out_by_in_temporary_in_forward_or_backward(variant: str) -> None:
    # weight 256×256 = 65,536 cells; activations 4×256 = 1,024: any (out, in) temporary shows up
    base = nn.Linear(256, 256).requires_grad_(False)
    layer = SBoRALayer(base, variant, scale=2.0, indices=torch.arange(0, 256, 16))
    x = torch.randn(4, 256, requires_grad=True)
    with _LargestOutput() as mode:
        layer(x).square().sum().backward()
    assert mode.largest < 256 * 256 // 8


@pytest.mark.parametrize("kind", ["linear", "conv1d"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("variant", ["fa", "fb"])
def test_merge_changes_only_the_region_and_unmerge_is_exact(
    variant: str, dtype: torch.dtype, kind: str
) -> None:
    base, layer, idx = make_layer(variant, 4, dtype=dtype, kind=kind, seed=11)
    w0 = w_out_in(base).detach().clone()
    layer.merge()
    w = w_out_in(layer.base_layer).detach()
    touched = torch.zeros(OUT, IN, dtype=torch.bool)
    if variant == "fa":
        touched[:, idx] = True
    else:
        touched[idx, :] = True
    assert torch.equal(w[~touched], w0[~touched])  # bit-identical outside the region
    ref = w0.double() + dense_delta(variant, idx, factor_of(layer), layer.scale, (OUT, IN))
    tol = 1e-6 if dtype == torch.float32 else 1e-2
    torch.testing.assert_close(w.double()[touched], ref[touched], rtol=tol, atol=tol)
    merged = w.clone()
    layer.merge()  # idempotent
    assert torch.equal(w_out_in(layer.base_layer), merged)
    layer.unmerge()
    assert torch.equal(w_out_in(layer.base_layer), w0)
    layer.unmerge()  # idempotent
    assert torch.equal(w_out_in(layer.base_layer), w0)


@pytest.mark.parametrize("mixed", [False, True], ids=["fp32", "bf16-base-fp32-factor"])
@pytest.mark.parametrize("variant", ["fa", "fb"])
def test_no_grad_forward_equals_autograd_forward(variant: str, mixed: bool) -> None:
    # without autograd the update is added in place into the fresh base output
    _, layer, _ = make_layer(variant, 4, seed=8)
    if mixed:
        layer.base_layer.to(torch.bfloat16)
    x = torch.randn(2, 3, IN, dtype=torch.bfloat16 if mixed else torch.float32)
    with_grad = layer(x)
    with torch.no_grad():
        assert torch.equal(layer(x), with_grad)
    with torch.inference_mode():
        assert torch.equal(layer(x), with_grad)


@pytest.mark.parametrize("variant", ["fa", "fb"])
def test_merged_forward_matches_unmerged(variant: str) -> None:
    _, layer, _ = make_layer(variant, 8, seed=2)
    x = torch.randn(2, 3, IN)
    before = layer(x)
    layer.merge()
    torch.testing.assert_close(layer(x), before, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("variant", ["fa", "fb"])
def test_delta_weight_matches_dense_reference(variant: str) -> None:
    _, layer, idx = make_layer(variant, 4, kind="conv1d", seed=4)
    ref = dense_delta(variant, idx, factor_of(layer), layer.scale, (OUT, IN))
    torch.testing.assert_close(layer.delta_weight().double(), ref, rtol=1e-6, atol=1e-7)
    assert layer.region() == ("cols" if variant == "fa" else "rows", layer.sbora_idx)


def test_dropout_is_on_the_adapter_path_only() -> None:
    base = nn.Linear(IN, OUT)
    layer = SBoRALayer(copy.deepcopy(base), "fa", 2.0, torch.arange(4), dropout=0.9).train()
    x = torch.randn(6, IN)
    # zero factor: the output is the base output exactly even with dropout active
    assert torch.equal(layer(x), base(x))
    with torch.no_grad():
        layer.sbora_B.fill_(1.0)
    layer.eval()
    assert torch.equal(layer(x), layer(x))  # no dropout in eval mode


def test_merge_into_integer_weight_refuses_and_leaves_it() -> None:
    base = nn.Linear(IN, OUT)
    layer = SBoRALayer(base, "fa", 2.0, torch.arange(4))
    base.weight = nn.Parameter(torch.ones(OUT, IN, dtype=torch.int8), requires_grad=False)
    with pytest.raises(QuantizationError, match="merge_dequantized"):
        layer.merge()
    assert not layer.merged
    assert torch.equal(base.weight, torch.ones(OUT, IN, dtype=torch.int8))
