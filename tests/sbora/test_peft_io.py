"""PEFT interop: stock ``peft`` loads our export with equal logits, and we read PEFT files back."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from tests.sbora.sbora_refs import randomise_adapter

from sbora_reg import sbora
from sbora_reg.errors import AdapterFormatError, PickleRefusedError
from sbora_reg.sbora import Adapter, SBoRAConfig

peft = pytest.importorskip("peft")
from peft import LoraConfig, PeftModel, get_peft_model  # noqa: E402

LLAMA_T = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
GPT2_T = ("c_attn", "c_proj", "c_fc")


def trained(make, variant: str, targets: tuple[str, ...], r: int = 4, seed: int = 0):
    model = sbora.inject(
        make(), SBoRAConfig(variant=variant, r=r, alpha=3.0 * r, target_modules=targets)
    )
    randomise_adapter(model, seed=seed)
    return model, sbora.extract(model)


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
@pytest.mark.parametrize("variant", ["fa", "fb"])
def test_stock_peft_loads_the_export_with_equal_logits_and_merge(
    variant, arch, make_llama, make_gpt2, token_ids, tmp_path: Path
) -> None:
    make, targets = (make_llama, LLAMA_T) if arch == "llama" else (make_gpt2, GPT2_T)
    model, adapter = trained(make, variant, targets)
    adapter.to_peft(tmp_path / "peft")
    peft_model = PeftModel.from_pretrained(make(), tmp_path / "peft").eval()
    with torch.no_grad():
        ours = model(token_ids).logits
        torch.testing.assert_close(peft_model(token_ids).logits, ours, rtol=0, atol=1e-6)
    theirs = peft_model.merge_and_unload().state_dict()
    mine = sbora.merge_and_unload(model).state_dict()
    assert theirs.keys() == mine.keys()
    for key in mine:
        torch.testing.assert_close(theirs[key], mine[key], rtol=0, atol=1e-6)


def test_export_uses_stock_keys_and_a_sidecar(make_llama, tmp_path: Path) -> None:
    _, adapter = trained(make_llama, "fa", ("q_proj",))
    out = adapter.to_peft(tmp_path / "peft")
    assert sorted(p.name for p in out.iterdir()) == [
        "adapter_config.json",
        "adapter_model.safetensors",
        "sbora_meta.json",
    ]
    tensors = load_file(out / "adapter_model.safetensors")
    assert set(tensors) == {
        f"base_model.model.model.layers.{i}.self_attn.q_proj.lora_{ab}.weight"
        for i in (0, 1)
        for ab in "AB"
    }
    a = tensors["base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"]
    idx = adapter.indices["model.layers.0.self_attn.q_proj"]
    assert torch.equal(a, torch.eye(64)[idx])  # rows of the identity
    cfg = json.loads((out / "adapter_config.json").read_text())
    assert cfg["peft_type"] == "LORA" and cfg["r"] == 4 and cfg["lora_alpha"] == 12.0


def test_mixed_ranks_and_scales_use_rank_and_alpha_patterns(
    make_llama, token_ids, tmp_path: Path
) -> None:
    # a composed adapter: FA r=4 on q/v, FB r=8 on down_proj with another scale
    fa_model, fa = trained(make_llama, "fa", ("q_proj", "v_proj"), r=4, seed=1)
    _, fb = trained(make_llama, "fb", ("down_proj",), r=8, seed=2)
    for m in fb.modules.values():
        m.scale = 0.75
    mixed = Adapter(fa.config, {**fa.modules, **fb.modules}, base_fingerprint=fa.base_fingerprint)
    ours = mixed.apply(make_llama())
    mixed.to_peft(tmp_path / "mixed")
    cfg = json.loads((tmp_path / "mixed" / "adapter_config.json").read_text())
    assert cfg["rank_pattern"] and cfg["alpha_pattern"]
    peft_model = PeftModel.from_pretrained(make_llama(), tmp_path / "mixed").eval()
    with torch.no_grad():
        torch.testing.assert_close(
            peft_model(token_ids).logits, ours(token_ids).logits, rtol=0, atol=1e-6
        )
        # and the mixed adapter really differs from the FA part alone
        assert not torch.allclose(ours(token_ids).logits, fa_model(token_ids).logits)


@pytest.mark.parametrize("sidecar", [True, False])
def test_from_peft_round_trip(make_llama, tmp_path: Path, sidecar: bool) -> None:
    _, fa = trained(make_llama, "fa", ("q_proj", "up_proj"), seed=3)
    _, fb = trained(make_llama, "fb", ("v_proj",), seed=4)
    adapter = Adapter(fa.config, {**fa.modules, **fb.modules}, base_fingerprint=fa.base_fingerprint)
    adapter.to_peft(tmp_path / "p")
    if not sidecar:
        (tmp_path / "p" / "sbora_meta.json").unlink()
    back = Adapter.from_peft(tmp_path / "p")
    assert {n: m.variant for n, m in back.modules.items()} == {
        n: m.variant for n, m in adapter.modules.items()
    }
    assert back.indices.keys() == adapter.indices.keys()
    assert all(torch.equal(back.indices[n], adapter.indices[n]) for n in adapter.indices)
    assert all(torch.equal(back.delta(n), adapter.delta(n)) for n in adapter.modules)
    if sidecar:
        assert back.config == adapter.config
        assert back.base_fingerprint == adapter.base_fingerprint


def test_from_peft_of_a_plain_lora_touches_every_cell(make_llama, token_ids, tmp_path: Path):
    lora_cfg = LoraConfig(
        r=4, lora_alpha=8, target_modules=["q_proj", "o_proj"], init_lora_weights=False
    )
    peft_model = get_peft_model(make_llama(), lora_cfg).eval()
    peft_model.save_pretrained(tmp_path / "lora")
    adapter = Adapter.from_peft(tmp_path / "lora")
    assert {m.variant for m in adapter.modules.values()} == {"lora"}
    assert adapter.indices == {}
    name = "model.layers.0.self_attn.q_proj"
    assert adapter.modules[name].cells() == 64 * 64
    layer = peft_model.base_model.model.model.layers[0].self_attn.q_proj
    torch.testing.assert_close(adapter.delta(name), layer.get_delta_weight("default"))
    ours = adapter.apply(make_llama())
    with torch.no_grad():
        torch.testing.assert_close(
            ours(token_ids).logits, peft_model(token_ids).logits, rtol=1e-5, atol=1e-5
        )


def test_from_peft_refuses_pickle_and_unsupported(tmp_path: Path) -> None:
    (tmp_path / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": 4}))
    (tmp_path / "adapter_model.bin").write_bytes(b"\x80\x04K\x01.")
    with pytest.raises(PickleRefusedError):
        Adapter.from_peft(tmp_path)
    (tmp_path / "adapter_config.json").write_text(json.dumps({"peft_type": "IA3"}))
    (tmp_path / "adapter_model.safetensors").write_bytes(b"")
    with pytest.raises(AdapterFormatError, match="IA3"):
        Adapter.from_peft(tmp_path)


def test_native_load_points_at_from_peft(make_llama, tmp_path: Path) -> None:
    _, adapter = trained(make_llama, "fa", ("q_proj",))
    adapter.to_peft(tmp_path / "p")
    with pytest.raises(AdapterFormatError, match="from_peft"):
        Adapter.load(tmp_path / "p")
