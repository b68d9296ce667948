"""inject / extract / merge / unmerge / unload on tiny Llama and GPT-2 models."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Callable

import pytest
import torch
from tests.sbora.sbora_refs import dense_delta, randomise_adapter
from torch import nn

from sbora_reg import sbora
from sbora_reg.errors import (
    ConfigError,
    InvalidIndicesError,
    NoMatchingModulesError,
    SboraRegError,
)
from sbora_reg.sbora import SBoRAConfig, SBoRALayer
from sbora_reg.sbora.fingerprint import module_table

ALL7 = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def cfg(variant: str = "fa", r: int = 4, **kw: object) -> SBoRAConfig:
    return SBoRAConfig(variant=variant, r=r, alpha=2.0 * r, target_modules=kw.pop("t", ALL7), **kw)


def touched_mask(variant: str, idx: torch.Tensor, shape: tuple[int, int]) -> torch.Tensor:
    mask = torch.zeros(shape, dtype=torch.bool)
    if variant == "fa":
        mask[:, idx] = True
    else:
        mask[idx, :] = True
    return mask


def dense_model(make: Callable[[], nn.Module], adapted: nn.Module) -> nn.Module:
    """A plain copy of the base whose weights are W0 + ΔW_ref (one-hot reference)."""
    ref = make()
    params = dict(ref.named_parameters())
    for name, layer in sbora.sbora_layers(adapted):
        factor = layer.sbora_B if layer.variant == "fa" else layer.sbora_A
        d = dense_delta(layer.variant, layer.sbora_idx, factor, layer.scale, layer.shape)
        w = params[f"{name}.weight"]
        with torch.no_grad():
            if layer.kind == "conv1d":
                w.copy_((w.double() + d.T).float())
            else:
                w.copy_((w.double() + d).float())
    return ref


def assert_untouched(model: nn.Module) -> None:
    """Nothing half-applied: no wrapper and every parameter still trainable."""
    assert not list(sbora.sbora_layers(model))
    assert all(p.requires_grad for p in model.parameters())


@pytest.mark.parametrize("variant", ["fa", "fb"])
def test_inject_wraps_targets_freezes_base_and_counts_parameters(variant, make_llama) -> None:
    model = make_llama()
    table = module_table(model)
    sbora.inject(model, cfg(variant, r=4))
    layers = dict(sbora.sbora_layers(model))
    assert set(layers) == {n for n in table if n.rsplit(".", 1)[-1] in ALL7}
    trainable = {n: p for n, p in model.named_parameters() if p.requires_grad}
    assert all(n.rsplit(".", 1)[-1].startswith("sbora_") for n in trainable)
    expected = sum(
        (out * 4 if variant == "fa" else 4 * inp) for _, (out, inp) in (table[n] for n in layers)
    )
    assert sum(p.numel() for p in trainable.values()) == expected
    for name, layer in layers.items():
        idx = layer.sbora_idx
        dim = table[name][1][1] if variant == "fa" else table[name][1][0]
        assert idx.dtype == torch.int64 and idx.numel() == 4
        assert bool((idx[1:] > idx[:-1]).all()) and int(idx[0]) >= 0 and int(idx[-1]) < dim


def test_fresh_injection_leaves_outputs_unchanged(make_llama, token_ids) -> None:
    base, model = make_llama(), make_llama()
    sbora.inject(model, cfg("fb"))
    with torch.no_grad():
        assert torch.equal(model(token_ids).logits, base(token_ids).logits)


@pytest.mark.parametrize("variant", ["fa", "fb"])
def test_llama_logits_match_dense_reference(variant, make_llama, token_ids) -> None:
    model = sbora.inject(make_llama(), cfg(variant, r=8))
    randomise_adapter(model, seed=1)
    ref = dense_model(make_llama, model)
    with torch.no_grad():
        torch.testing.assert_close(
            model(token_ids).logits, ref(token_ids).logits, rtol=1e-4, atol=1e-5
        )


@pytest.mark.parametrize("variant", ["fa", "fb"])
def test_gpt2_conv1d_logits_and_merge_match_dense_reference(variant, make_gpt2, token_ids) -> None:
    base = make_gpt2()
    model = sbora.inject(make_gpt2(), cfg(variant, r=4, t=["c_attn", "c_fc", "c_proj"]))
    layers = dict(sbora.sbora_layers(model))
    assert {lay.kind for lay in layers.values()} == {"conv1d"}
    randomise_adapter(model, seed=2)
    ref = dense_model(make_gpt2, model)
    with torch.no_grad():
        logits = model(token_ids).logits
        torch.testing.assert_close(logits, ref(token_ids).logits, rtol=1e-4, atol=1e-5)
        sbora.merge(model)
        torch.testing.assert_close(model(token_ids).logits, logits, rtol=1e-4, atol=1e-5)
    base_params = dict(base.named_parameters())
    for name, layer in layers.items():
        w0 = base_params[f"{name}.weight"].T  # Conv1D stores (in, out)
        w = layer.base_layer.weight.T
        mask = touched_mask(variant, layer.sbora_idx, layer.shape)
        assert torch.equal(w[~mask], w0[~mask])


def test_default_indices_are_deterministic_across_processes(make_llama) -> None:
    a = dict(sbora.sbora_layers(sbora.inject(make_llama(), cfg("fa", seed=3))))
    b = dict(sbora.sbora_layers(sbora.inject(make_llama(), cfg("fa", seed=3))))
    c = dict(sbora.sbora_layers(sbora.inject(make_llama(), cfg("fa", seed=4))))
    assert all(torch.equal(a[n].sbora_idx, b[n].sbora_idx) for n in a)
    assert any(not torch.equal(a[n].sbora_idx, c[n].sbora_idx) for n in a)
    name = "model.layers.1.mlp.down_proj"
    code = (
        "from sbora_reg.sbora import default_indices;"
        f"print(default_indices(3, {name!r}, {a[name].shape[1]}, 4).tolist())"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == str(a[name].sbora_idx.tolist())


def test_given_indices_are_sorted_and_used(make_llama) -> None:
    model = make_llama()
    names = [n for n in module_table(model) if n.endswith("q_proj")]
    given = {n: [9, 2, 31, 5] for n in names}
    sbora.inject(model, cfg("fa", t=["q_proj"]), indices=given)
    for _, layer in sbora.sbora_layers(model):
        assert layer.sbora_idx.tolist() == [2, 5, 9, 31]


def test_regex_targets(make_llama) -> None:
    model = sbora.inject(make_llama(), cfg("fa", t=r".*layers\.0\.self_attn\.(q|v)_proj"))
    assert sorted(n for n, _ in sbora.sbora_layers(model)) == [
        "model.layers.0.self_attn.q_proj",
        "model.layers.0.self_attn.v_proj",
    ]


def _q_names(model: nn.Module) -> list[str]:
    return [n for n in module_table(model) if n.endswith("q_proj")]


@pytest.mark.parametrize(
    ("make_bad", "error", "words"),
    [
        (lambda ns: {n: [1, 1, 2, 3] for n in ns}, InvalidIndicesError, "more than once"),
        (lambda ns: {n: [1, 2, 3, 64] for n in ns}, InvalidIndicesError, "out of range"),
        (lambda ns: {n: [-1, 2, 3, 4] for n in ns}, InvalidIndicesError, "out of range"),
        (lambda ns: {n: [1, 2, 3] for n in ns}, InvalidIndicesError, "needs 4"),
        (lambda ns: {n: [0.5, 1, 2, 3] for n in ns}, InvalidIndicesError, "integers"),
        (lambda ns: {n: [1, 2, 3, 4] for n in ns[:1]}, InvalidIndicesError, "missing"),
        (
            lambda ns: {**{n: [1, 2, 3, 4] for n in ns}, "model.nope": [1, 2, 3, 4]},
            InvalidIndicesError,
            "not matched model.nope",
        ),
    ],
    ids=["duplicate", "too-large", "negative", "wrong-length", "float", "missing", "extra"],
)
def test_bad_given_indices_raise_and_leave_the_model_alone(make_llama, make_bad, error, words):
    model = make_llama()
    with pytest.raises(error, match=words) as exc:
        sbora.inject(model, cfg("fa", t=["q_proj"]), indices=make_bad(_q_names(model)))
    assert "\n" not in str(exc.value)
    assert_untouched(model)


def test_rank_larger_than_dimension(make_llama) -> None:
    model = make_llama()
    # k_proj has out = 32 (2 kv heads × 16): FB indexes rows, so r = 40 > 32
    with pytest.raises(ConfigError, match="larger than the dimension 32"):
        sbora.inject(model, cfg("fb", r=40, t=["q_proj", "k_proj"]))
    assert_untouched(model)


def test_no_match_lists_existing_modules(make_llama) -> None:
    model = make_llama()
    with pytest.raises(NoMatchingModulesError, match="q_proj"):
        sbora.inject(model, cfg("fa", t=["query_key_value"]))
    with pytest.raises(NoMatchingModulesError, match="unsupported"):
        sbora.inject(model, cfg("fa", t=["embed_tokens"]))
    assert_untouched(model)


def test_inject_twice_is_refused(make_llama) -> None:
    model = sbora.inject(make_llama(), cfg("fa", t=["q_proj"]))
    with pytest.raises(ConfigError, match="already has SBoRA layers"):
        sbora.inject(model, cfg("fb", t=["v_proj"]))


@pytest.mark.parametrize("variant", ["fa", "fb"])
def test_merge_unmerge_unload_on_a_whole_model(variant, make_llama, token_ids) -> None:
    base = make_llama()
    model = sbora.inject(make_llama(), cfg(variant, r=8))
    randomise_adapter(model, seed=5)
    with torch.no_grad():
        logits = model(token_ids).logits
    layers = dict(sbora.sbora_layers(model))
    before = {k: v.clone() for k, v in base.state_dict().items()}
    sbora.merge(model)
    sbora.merge(model)  # idempotent
    merged = sbora.extract(model)  # factors are still there while merged
    with torch.no_grad():
        torch.testing.assert_close(model(token_ids).logits, logits, rtol=1e-4, atol=1e-5)
    for name, layer in layers.items():
        w, w0 = layer.base_layer.weight, before[f"{name}.weight"]
        mask = touched_mask(variant, layer.sbora_idx, layer.shape)
        assert torch.equal(w[~mask], w0[~mask])
        ref = w0.double() + dense_delta(
            variant, layer.sbora_idx, merged.modules[name].factor, layer.scale, layer.shape
        )
        torch.testing.assert_close(w.double(), ref, rtol=1e-6, atol=1e-6)
    sbora.unmerge(model)
    sbora.unmerge(model)
    plain = sbora.unload(model)
    assert not list(sbora.sbora_layers(plain))
    after = plain.state_dict()
    assert after.keys() == before.keys()
    assert all(torch.equal(after[k], before[k]) for k in before)  # bit-identical


def test_merge_and_unload_gives_a_plain_model_with_the_update(make_llama, token_ids) -> None:
    model = sbora.inject(make_llama(), cfg("fa"))
    randomise_adapter(model, seed=6)
    ref = dense_model(make_llama, model)
    plain = sbora.merge_and_unload(model)
    assert not any(isinstance(m, SBoRALayer) for m in plain.modules())
    assert "sbora" not in " ".join(plain.state_dict())
    with torch.no_grad():
        torch.testing.assert_close(
            plain(token_ids).logits, ref(token_ids).logits, rtol=1e-4, atol=1e-5
        )


def test_extract_records_fingerprint_and_dense_deltas(make_llama) -> None:
    base = make_llama()
    model = sbora.inject(make_llama(), cfg("fb"))
    randomise_adapter(model, seed=8)
    adapter = sbora.extract(model)
    assert adapter.base_fingerprint == sbora.model_fingerprint(base)
    assert adapter.config == cfg("fb")
    for name, layer in sbora.sbora_layers(model):
        ref = dense_delta("fb", layer.sbora_idx, layer.sbora_A, layer.scale, layer.shape)
        torch.testing.assert_close(adapter.delta(name).double(), ref, rtol=1e-6, atol=1e-7)
        assert torch.equal(adapter.indices[name], layer.sbora_idx)


def test_operations_on_a_model_without_adapters(make_llama) -> None:
    model = make_llama()
    for op in (sbora.merge, sbora.unmerge, sbora.extract):
        with pytest.raises(SboraRegError, match="no SBoRA layers"):
            op(model)
    assert sbora.unload(model) is model
