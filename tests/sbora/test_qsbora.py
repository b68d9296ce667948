"""QSBoRA: SBoRA on bitsandbytes 4-bit and 8-bit bases, against dense references.

Every numeric claim is checked against ``dequant(W0) x + x (s·B @ one_hot(idx)).T`` (FA) or its
transpose (FB), built here with an explicit one-hot matrix; weights outside an adapter's region
are compared bit for bit.
"""

from __future__ import annotations

import copy
import sys

import pytest
import torch

bnb = pytest.importorskip("bitsandbytes")
transformers = pytest.importorskip("transformers")

import bitsandbytes.functional as bnbf  # noqa: E402
from tests import tiny  # noqa: E402
from transformers import LlamaForCausalLM  # noqa: E402

from sbora_reg import sbora  # noqa: E402
from sbora_reg.errors import ConfigError, QuantizationError  # noqa: E402
from sbora_reg.sbora import quant, requant  # noqa: E402
from sbora_reg.sbora.fingerprint import dir_fingerprint, model_fingerprint  # noqa: E402
from sbora_reg.sbora.layer import SBoRALayer  # noqa: E402

TARGETS = ("q_proj", "v_proj", "down_proj")
# (bits, quant_type, double_quant, compute_dtype)
NF4_DQ_BF16 = (4, "nf4", True, torch.bfloat16)
FP4_FP32 = (4, "fp4", False, torch.float32)
NF4_FP32 = (4, "nf4", False, torch.float32)
INT8 = (8, "nf4", False, torch.float32)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> str:
    """A tiny fp32 Llama saved as a transformers checkpoint (built from a config)."""
    cfg = tiny.llama("l64", vocab_size=97, max_position_embeddings=64)
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("tiny-llama")
    LlamaForCausalLM(cfg).save_pretrained(path)
    return str(path)


def load(checkpoint: str, spec: tuple, dtype: torch.dtype = torch.float32) -> torch.nn.Module:
    bits, qtype, dq, compute = spec
    return quant.load_quantized(
        checkpoint, bits=bits, quant_type=qtype, double_quant=dq, compute_dtype=compute, dtype=dtype
    )


def sbora_layers(model: torch.nn.Module) -> dict[str, SBoRALayer]:
    return {n: m for n, m in model.named_modules() if isinstance(m, SBoRALayer)}


def randomise_factors(model: torch.nn.Module, seed: int = 1) -> None:
    """Give every adapter a non-zero trained factor (they start at zero)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for layer in sbora_layers(model).values():
            factor = layer.sbora_B if layer.variant == "fa" else layer.sbora_A
            factor.copy_(torch.randn(factor.shape, generator=g) * 0.05)


def dense_delta(layer: SBoRALayer) -> torch.Tensor:
    """ΔW (out, in) through an explicit one-hot matrix, independent of the library's code."""
    out, inp = layer.base_layer.out_features, layer.base_layer.in_features
    idx = layer.sbora_idx
    if layer.variant == "fa":
        one_hot = torch.eye(inp)[idx]  # A = I_in[idx]: (r, in)
        return layer.scale * layer.sbora_B.detach().float() @ one_hot
    one_hot = torch.eye(out)[:, idx]  # B = I_out[:, idx]: (out, r)
    return layer.scale * one_hot @ layer.sbora_A.detach().float()


def region(layer: SBoRALayer) -> torch.Tensor:
    out, inp = layer.base_layer.out_features, layer.base_layer.in_features
    mask = torch.zeros(out, inp, dtype=torch.bool)
    if layer.variant == "fa":
        mask[:, layer.sbora_idx] = True
    else:
        mask[layer.sbora_idx, :] = True
    return mask


UNIT_ROUNDOFF = {torch.float32: 2.0**-24, torch.bfloat16: 2.0**-8, torch.float16: 2.0**-11}


def matmul_bound(x: torch.Tensor, w: torch.Tensor, bits: int, compute: torch.dtype) -> torch.Tensor:
    """Elementwise bound on ``|layer(x) - x @ w.T|`` from the arithmetic of the layer's path.

    ``w`` is the float32 weight the layer multiplies with. 4-bit: ``x`` and ``w`` are rounded to
    the compute dtype (unit roundoff u each), products summed in float32 in any order (Higham's
    γ_k, on both sides) and the result rounded to the compute dtype. LLM.int8: ``x`` goes to
    float16, is quantised per row to 8 bits (error ≤ half a step max|x_row|/127 per element) and
    the output is float16.
    """
    k = x.shape[-1]
    mag = x.abs() @ w.abs().T  # Σ_j |x_j| |w_ij|
    ref = (x @ w.T).abs()
    accumulate = 2 * k * UNIT_ROUNDOFF[torch.float32] * mag
    if bits == 8:
        u = UNIT_ROUNDOFF[torch.float16]
        half_step = x.abs().amax(-1, keepdim=True) / 254
        return half_step * w.abs().sum(-1) + 2 * u * mag + u * ref + accumulate
    u = UNIT_ROUNDOFF[compute]
    return (2 * u + u * u) * mag + u * ref + accumulate


def within(y: torch.Tensor, ref: torch.Tensor, bound: torch.Tensor) -> bool:
    return bool(((y.float() - ref).abs() <= bound).all())


def inject(model: torch.nn.Module, variant: str, r: int = 8) -> torch.nn.Module:
    config = sbora.SBoRAConfig(variant=variant, r=r, alpha=2.0 * r, target_modules=TARGETS)
    return sbora.inject(model, config)


# ---------------------------------------------------------------------------------- loading


@pytest.mark.parametrize(
    "spec", [NF4_DQ_BF16, FP4_FP32, NF4_FP32, (4, "fp4", True, torch.float32), INT8]
)
def test_load_quantized_gives_bnb_layers_whose_dequant_is_what_they_compute(checkpoint, spec):
    model = load(checkpoint, spec)
    dense = LlamaForCausalLM.from_pretrained(checkpoint)
    layer = model.model.layers[0].self_attn.q_proj
    bits, qtype, _, _ = spec
    assert quant.quant_kind(layer) == ("int8" if bits == 8 else qtype)
    w = quant.dequantize_weight(layer)
    w_dense = dense.model.layers[0].self_attn.q_proj.weight.detach()
    assert w.shape == w_dense.shape and w.dtype == torch.float32
    # close to the original (4-bit: within a block's quantisation step) but not equal to it
    assert 0 < (w - w_dense).abs().max() <= 0.25 * w_dense.abs().max()
    x = torch.randn(5, 64)
    with torch.no_grad():
        y = layer(x).float()
    assert within(y, x @ w.T, matmul_bound(x, w, bits, spec[3]))


def test_load_quantized_rejects_bad_arguments(checkpoint):
    with pytest.raises(ConfigError, match="bits"):
        quant.load_quantized(checkpoint, bits=3)
    with pytest.raises(ConfigError, match="quant_type"):
        quant.load_quantized(checkpoint, quant_type="int4")


def test_quantised_model_without_bitsandbytes_is_a_clear_error(checkpoint, monkeypatch):
    model = inject(load(checkpoint, NF4_FP32), "fa")
    monkeypatch.setitem(sys.modules, "bitsandbytes", None)  # import now raises ImportError
    with pytest.raises(QuantizationError, match="pip install"):
        quant.load_quantized(checkpoint)
    with pytest.raises(QuantizationError, match="pip install"):
        quant.merge_dequantized(model)
    assert quant.has_quantized_layers(model)  # nothing was changed


def test_fingerprint_of_quantised_model_is_the_checkpoints(checkpoint):
    dense = LlamaForCausalLM.from_pretrained(checkpoint)
    fp = model_fingerprint(dense)
    assert dir_fingerprint(checkpoint) == fp
    for spec in (NF4_DQ_BF16, INT8):
        assert model_fingerprint(load(checkpoint, spec)) == fp


# ---------------------------------------------------------------------------------- forward


@pytest.mark.parametrize("variant", ["fa", "fb"])
@pytest.mark.parametrize("spec", [NF4_DQ_BF16, FP4_FP32, INT8], ids=["nf4-dq-bf16", "fp4", "int8"])
def test_layer_output_equals_dequant_plus_dense_delta(checkpoint, variant, spec):
    model = inject(load(checkpoint, spec), variant)
    randomise_factors(model)
    layers = sbora_layers(model)
    assert len(layers) == 2 * len(TARGETS)
    bits, _, _, compute = spec
    x = torch.randn(3, 7, 64)
    for layer in layers.values():
        assert quant.is_quantized(layer.base_layer)
        inp = x if layer.base_layer.in_features == 64 else torch.randn(3, 7, 128)
        with torch.no_grad():
            y = layer(inp).float()
        w0, delta = quant.dequantize_weight(layer.base_layer), dense_delta(layer)
        ref = inp @ (w0 + delta).T
        # the base term on the quantised path, the adapter term and the sum in float32
        fp32 = UNIT_ROUNDOFF[torch.float32]
        bound = (
            matmul_bound(inp, w0, bits, compute)
            + matmul_bound(inp, delta, 4, torch.float32)
            + 2 * fp32 * ref.abs()
        )
        assert within(y, ref, bound)
        # the adapter term matters at this tolerance (the test can fail)
        assert (inp @ delta.T).abs().max() > 10 * bound.max()


def test_fa_adapter_term_is_exact_and_never_dequantises(checkpoint, monkeypatch):
    model = inject(load(checkpoint, FP4_FP32), "fa")
    randomise_factors(model)
    layer = model.model.layers[0].self_attn.q_proj
    calls = {"n": 0}
    real_4bit, real_weight = bnbf.dequantize_4bit, quant.dequantize_weight

    def count(real):
        def wrapped(*args, **kwargs):
            calls["n"] += 1
            return real(*args, **kwargs)

        return wrapped

    monkeypatch.setattr(bnbf, "dequantize_4bit", count(real_4bit))
    monkeypatch.setattr(quant, "dequantize_weight", count(real_weight))

    def run(module):
        calls["n"] = 0
        x = torch.randn(4, 64, requires_grad=True)
        y = module(x)
        y.square().sum().backward()
        return calls["n"], x, y

    base_calls, x, _ = run(layer.base_layer)
    wrapper_calls, _, _ = run(layer)
    assert base_calls > 0  # the counter sees the base's own dequantisation (backward)
    assert wrapper_calls == base_calls  # the adapter term adds none, forward or backward
    with torch.no_grad():
        x = torch.randn(4, 64)
        expected = layer.base_layer(x) + layer.scale * x[:, layer.sbora_idx] @ layer.sbora_B.T
        torch.testing.assert_close(layer(x), expected, rtol=1e-6, atol=1e-6)


# ---------------------------------------------------------------------------------- training


@pytest.mark.parametrize(
    ("variant", "spec", "dtype"),
    [
        ("fa", NF4_DQ_BF16, torch.bfloat16),
        ("fb", NF4_DQ_BF16, torch.float32),
        ("fa", INT8, torch.float32),
    ],
    ids=["fa-nf4-bf16", "fb-nf4", "fa-int8"],
)
def test_training_changes_only_the_adapter_with_gradient_checkpointing(
    checkpoint, variant, spec, dtype
):
    model = quant.prepare_for_training(load(checkpoint, spec, dtype=dtype))
    assert model.model.norm.weight.dtype == torch.float32  # 16-bit norms upcast
    model = inject(model, variant)
    model.train()
    calls = {"n": 0}
    probe = model.model.layers[0].self_attn.q_proj
    probe.register_forward_hook(lambda *_: calls.__setitem__("n", calls["n"] + 1))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    trainable = [p for p in model.parameters() if p.requires_grad]
    trainable_names = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all("sbora_" in n for n in trainable_names)
    opt = torch.optim.Adam(trainable, lr=2e-2)
    torch.manual_seed(0)
    ids = torch.randint(0, 97, (2, 16))
    losses = []
    for _ in range(5):
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < losses[0] - 0.05
    assert calls["n"] == 2 * len(losses)  # checkpointed: each block runs again in backward
    after = model.state_dict()
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed and all(".sbora_" in k for k in changed)
    assert {k for k in changed if k.endswith(("sbora_A", "sbora_B"))} == changed


# ---------------------------------------------------------------------------------- merging


@pytest.mark.parametrize("variant", ["fa", "fb"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_merge_dequantized_changes_only_the_region(checkpoint, variant, dtype):
    model = inject(load(checkpoint, NF4_DQ_BF16, dtype=dtype), variant)
    randomise_factors(model)
    layers = sbora_layers(model)
    base = {n: quant.dequantize_weight(m.base_layer) for n, m in layers.items()}
    deltas = {n: dense_delta(m) for n, m in layers.items()}
    masks = {n: region(m) for n, m in layers.items()}
    ids = torch.randint(0, 97, (2, 9))
    with torch.no_grad():
        unmerged = model(ids).logits
    quant.merge_dequantized(model)  # dtype: the model's (activation) dtype
    for name, layer in sbora_layers(model).items():
        w = layer.base_layer.weight.detach()
        assert type(layer.base_layer) is torch.nn.Linear and w.dtype == dtype
        mask = masks[name]
        assert torch.equal(w[~mask], base[name].to(dtype)[~mask])  # bit-identical outside
        assert not torch.equal(w[mask], base[name].to(dtype)[mask])
        expected = (base[name] + deltas[name])[mask]
        tol = 0 if dtype == torch.float32 else 1e-2 * expected.abs().max().item()
        assert (w[mask].float() - expected).abs().max().item() <= tol + 1e-6
    with torch.no_grad():
        merged = model(ids).logits
    assert (merged.float() - unmerged.float()).abs().max() <= 5e-2 * unmerged.abs().max()


def test_merge_dequantized_everywhere_gives_a_plain_model(checkpoint, tmp_path):
    model = inject(load(checkpoint, NF4_FP32), "fa")
    randomise_factors(model)
    ids = torch.randint(0, 97, (2, 9))
    with torch.no_grad():
        expected = model(ids).logits
    quant.merge_dequantized(model, dtype=torch.float32, everywhere=True)
    plain = sbora.unload(model)
    assert not quant.has_quantized_layers(plain)
    assert not sbora_layers(plain)
    plain.save_pretrained(tmp_path)
    reloaded = LlamaForCausalLM.from_pretrained(tmp_path)
    assert not quant.has_quantized_layers(reloaded)
    with torch.no_grad():
        got = reloaded(ids).logits
    assert (got - expected).abs().max() <= 1e-4 * expected.abs().max()


@pytest.mark.parametrize(
    ("variant", "spec", "leaks"),
    [
        ("fa", NF4_DQ_BF16, True),
        ("fb", NF4_DQ_BF16, True),  # double quantisation re-quantises every block scale
        ("fa", NF4_FP32, True),  # a changed column moves the scale of every row's block
        ("fb", NF4_FP32, False),  # 64-value blocks lie inside rows: untouched rows stay exact
        ("fa", INT8, True),  # int8 scales are per row
        ("fb", INT8, False),
    ],
    ids=["fa-nf4-dq", "fb-nf4-dq", "fa-nf4", "fb-nf4", "fa-int8", "fb-int8"],
)
def test_requantize_reports_weights_changed_outside_the_region(checkpoint, variant, spec, leaks):
    model = inject(load(checkpoint, spec), variant)
    randomise_factors(model)
    layers = sbora_layers(model)
    base = {n: quant.dequantize_weight(m.base_layer) for n, m in layers.items()}
    masks = {n: region(m) for n, m in layers.items()}
    report = requant.requantize(model)
    assert not sbora_layers(model)
    assert set(report.modules) == set(layers)
    for name, stats in report.modules.items():
        new = model.get_submodule(name)
        assert quant.quant_kind(new) == ("int8" if spec[0] == 8 else spec[1])
        mask = masks[name]
        counted = int((quant.dequantize_weight(new) != base[name])[~mask].sum())
        assert stats.changed_outside == counted
        assert stats.outside_cells == int((~mask).sum())
        assert stats.region_cells == int(mask.sum())
    assert (report.changed_outside > 0) == leaks
    assert 0 <= report.fraction_changed_outside <= 1
    with torch.no_grad():
        model(torch.randint(0, 97, (1, 5)))


def test_int8_fb_merge_into_int8_is_refused(checkpoint):
    model = inject(load(checkpoint, INT8), "fb")
    randomise_factors(model)
    with pytest.raises(QuantizationError, match="merge_dequantized"):
        sbora.merge(model)
    quant.merge_dequantized(model, dtype=torch.float32)  # the supported way
    layer = model.model.layers[0].self_attn.q_proj
    assert layer.base_layer.weight.dtype == torch.float32


def test_bad_merge_requests_are_clear_errors(checkpoint):
    model = load(checkpoint, NF4_FP32)
    with pytest.raises(QuantizationError, match="no SBoRA layers"):
        quant.merge_dequantized(model)
    model = inject(model, "fa")
    with pytest.raises(QuantizationError, match="float32, bfloat16 or float16"):
        quant.merge_dequantized(model, dtype=torch.int8)
    dense = inject(LlamaForCausalLM.from_pretrained(checkpoint), "fa")
    with pytest.raises(QuantizationError, match="unquantised base"):
        requant.requantize(dense)


# ---------------------------------------------------------------------------------- adapters


@pytest.mark.parametrize("variant", ["fa", "fb"])
def test_qsbora_adapter_round_trips_and_applies_to_a_fresh_quantised_model(
    checkpoint, tmp_path, variant
):
    model = inject(load(checkpoint, NF4_DQ_BF16), variant)
    randomise_factors(model)
    adapter = sbora.extract(model)
    assert adapter.metadata["quantization"] == "bnb-nf4-dq"
    assert adapter.metadata["compute_dtype"] == "bfloat16"
    assert adapter.base_fingerprint == dir_fingerprint(checkpoint)
    loaded = sbora.Adapter.load(adapter.save(tmp_path / "a"))
    assert loaded.metadata == adapter.metadata
    assert loaded.base_fingerprint == adapter.base_fingerprint
    for name, module in adapter.modules.items():
        assert torch.equal(loaded.delta(name), module.delta())
    fresh = loaded.apply(load(checkpoint, NF4_DQ_BF16))
    ids = torch.randint(0, 97, (2, 11))
    with torch.no_grad():
        assert torch.equal(fresh(ids).logits, model(ids).logits)
    # the same adapter applies to the unquantised checkpoint (the base is the fp32 model)
    dense = loaded.apply(LlamaForCausalLM.from_pretrained(checkpoint))
    with torch.no_grad():
        d, q = dense(ids).logits, model(ids).logits
    assert (d - q).abs().max() <= 0.25 * d.abs().max()


def test_quantization_metadata_labels():
    assert quant.quantization_metadata(torch.nn.Sequential(torch.nn.Linear(4, 4))) == {}


# ------------------------------------------------------------ bitsandbytes' CPU weight layouts
# On CPUs with AVX512-BF16, Linear4bit repacks its weight for a fused bf16 kernel at the first
# eval-mode, no-grad forward (bnbf.has_avx512bf16()). The kernel path can only run on such a CPU;
# the repacked *layout* is made here with bitsandbytes' own converter (what that forward calls),
# so its dequantisation is tested on every machine. tests/conftest.py reports which paths ran.
CPU_4BIT_PATHS = ["standard", *(["repacked"] if bnbf.has_avx512bf16() else [])]
ALL_SPECS = [NF4_DQ_BF16, FP4_FP32, NF4_FP32, INT8]
SPEC_IDS = ["nf4-dq-bf16", "fp4", "nf4", "int8"]
FOUR_BIT = [NF4_DQ_BF16, FP4_FP32, NF4_FP32, (4, "fp4", True, torch.float32)]
FOUR_BIT_IDS = ["nf4-dq-bf16", "fp4", "nf4", "fp4-dq"]


def four_bit_layers(model: torch.nn.Module) -> list[torch.nn.Module]:
    return [m for m in model.modules() if isinstance(m, bnb.nn.Linear4bit)]


def code_times_scale(layer: torch.nn.Module, scale_dtype: torch.dtype) -> torch.Tensor:
    """Dense reference: the 4-bit code table at each weight's index times its block's scale.

    Read from the standard layout (two codes per byte, high nibble first) of a layer that was
    never repacked; the block scales rounded to ``scale_dtype`` (bf16: what the CPU kernel keeps).
    """
    state = layer.weight.quant_state
    packed = layer.weight.data.view(torch.uint8).reshape(-1)
    codes = torch.stack([packed >> 4, packed & 0xF], dim=1).reshape(-1).long()
    absmax = state.absmax
    if state.nested:
        absmax = bnbf.dequantize_blockwise(absmax, state.state2) + state.offset
    scales = absmax.float().to(scale_dtype).float()
    table = bnbf.get_4bit_type(state.quant_type, device="cpu").float()
    return (table[codes].view(-1, state.blocksize) * scales.view(-1, 1)).view(state.shape)


def repack_like_the_cpu_kernel(layer: torch.nn.Module) -> torch.nn.Module:
    """A copy of ``layer`` repacked by bitsandbytes' own converter, as its CPU forward does."""
    packed = copy.deepcopy(layer)
    data, state = bnbf._convert_weight_packed_for_cpu(packed.weight.data, packed.weight.quant_state)
    packed.weight.data, packed.weight.quant_state = data, state
    packed.quant_state = state
    packed.support_avx512bf16_for_cpu = True  # as bitsandbytes would leave it
    return packed


@pytest.mark.parametrize("spec", ALL_SPECS, ids=SPEC_IDS)
def test_dequantise_forward_dequantise_gives_the_same_tensor(checkpoint, spec):
    model = load(checkpoint, spec)
    bits, _, _, compute = spec
    layer = model.model.layers[0].self_attn.q_proj
    w = quant.dequantize_weight(layer)
    # every way a forward runs: inference (where bitsandbytes may repack) and training
    for training, grad in ((False, False), (True, True), (False, False)):
        layer.train(training)
        for shape in ((1, 64), (3, 7, 64)):
            x = torch.randn(*shape, requires_grad=grad)
            with torch.set_grad_enabled(grad):
                y = layer(x)
            assert torch.equal(quant.dequantize_weight(layer), w)
            x = x.detach()
            assert within(y.detach(), x @ w.T, matmul_bound(x, w, bits, compute))


def test_quantised_layers_never_repack_once_loaded_injected_or_requantised(checkpoint):
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    assert all(
        not m.support_avx512bf16_for_cpu for m in four_bit_layers(load(checkpoint, NF4_FP32))
    )
    # a model the user loaded without us: bitsandbytes sets the flag from the CPU
    qconfig = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_compute_dtype=torch.float32)
    raw = AutoModelForCausalLM.from_pretrained(checkpoint, quantization_config=qconfig)
    for m in four_bit_layers(raw):
        m.support_avx512bf16_for_cpu = True  # as on an AVX512-BF16 CPU
    model = inject(raw, "fb")
    assert four_bit_layers(model)
    assert all(not m.support_avx512bf16_for_cpu for m in four_bit_layers(model))
    randomise_factors(model)
    requant.requantize(model)
    assert all(not m.support_avx512bf16_for_cpu for m in four_bit_layers(model))


@pytest.mark.parametrize("spec", FOUR_BIT, ids=FOUR_BIT_IDS)
def test_standard_layout_dequantises_to_code_times_scale(checkpoint, spec):
    layer = load(checkpoint, spec).model.layers[0].mlp.down_proj  # (64, 128)
    assert torch.equal(quant.dequantize_weight(layer), code_times_scale(layer, torch.float32))


@pytest.mark.parametrize("spec", FOUR_BIT, ids=FOUR_BIT_IDS)
def test_repacked_layout_dequantises_to_what_the_cpu_kernel_computes_with(checkpoint, spec):
    bits, _, _, compute = spec
    layer = load(checkpoint, spec).model.layers[0].mlp.down_proj  # (64, 128)
    kernel_weight = code_times_scale(layer, torch.bfloat16)  # the kernel keeps bf16 scales
    packed = repack_like_the_cpu_kernel(layer)
    assert packed.weight.data.shape != layer.weight.data.shape  # really another layout
    assert torch.equal(quant.dequantize_weight(packed), kernel_weight)
    assert quant._repacked_for_cpu(packed.weight.quant_state)  # dequantising changed nothing
    # back to the standard layout with the same values; it never repacks again
    quant.keep_standard_layout(packed)
    assert not quant._repacked_for_cpu(packed.weight.quant_state)
    assert not packed.support_avx512bf16_for_cpu
    for _ in range(2):
        x = torch.randn(5, 128)
        with torch.no_grad():
            y = packed(x)
        assert torch.equal(quant.dequantize_weight(packed), kernel_weight)
        assert within(y, x @ kernel_weight.T, matmul_bound(x, kernel_weight, bits, compute))


@pytest.mark.parametrize("path", CPU_4BIT_PATHS)
@pytest.mark.parametrize("spec", FOUR_BIT, ids=FOUR_BIT_IDS)
def test_each_cpu_path_computes_with_the_dequantised_weight(checkpoint, spec, path):
    bits, _, _, compute = spec
    layer = load(checkpoint, spec).model.layers[0].mlp.down_proj
    layer.support_avx512bf16_for_cpu = path == "repacked"  # bitsandbytes' own switch
    layer.eval()
    x = torch.randn(3, 128)
    with torch.no_grad():
        y = layer(x)
    assert quant._repacked_for_cpu(layer.weight.quant_state) == (path == "repacked")
    w = quant.dequantize_weight(layer)
    # the fused CPU kernel computes in bf16 whatever the compute dtype
    arithmetic = torch.bfloat16 if path == "repacked" else compute
    assert within(y, x @ w.T, matmul_bound(x, w, bits, arithmetic))
