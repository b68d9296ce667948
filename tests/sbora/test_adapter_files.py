"""Adapter data model and the native adapter folder: round trips and every bad input."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from tests import tiny
from tests.sbora.sbora_refs import dense_delta, randomise_adapter
from transformers import LlamaForCausalLM

from sbora_reg import sbora
from sbora_reg.errors import (
    AdapterFormatError,
    FingerprintMismatchError,
    InvalidIndicesError,
    PickleRefusedError,
    ShapeMismatchError,
)
from sbora_reg.sbora import Adapter, AdapterModule, SBoRAConfig
from sbora_reg.sbora.adapter import CONFIG_FILE, WEIGHTS_FILE

CFG = SBoRAConfig(variant="fa", r=4, alpha=8.0, target_modules=("q_proj", "v_proj", "down_proj"))


@pytest.fixture
def trained(make_llama) -> tuple[torch.nn.Module, Adapter]:
    model = sbora.inject(make_llama(), CFG)
    randomise_adapter(model, seed=3)
    return model, sbora.extract(model)


@pytest.fixture
def saved(trained, tmp_path: Path) -> Path:
    return trained[1].save(tmp_path / "adapter")


def test_save_load_apply_gives_identical_logits(trained, saved, make_llama, token_ids) -> None:
    model, adapter = trained
    assert sorted(p.name for p in saved.iterdir()) == sorted([CONFIG_FILE, WEIGHTS_FILE])
    loaded = Adapter.load(saved)
    assert loaded.config == adapter.config
    assert loaded.base_fingerprint == adapter.base_fingerprint
    fresh = loaded.apply(make_llama())
    with torch.no_grad():
        assert torch.equal(fresh(token_ids).logits, model(token_ids).logits)
    assert all(p.requires_grad == ("sbora_" in n) for n, p in fresh.named_parameters())


def test_files_follow_the_format(saved, trained) -> None:
    cfg = json.loads((saved / CONFIG_FILE).read_text())
    assert cfg["format"] == "sbora" and cfg["format_version"] == 1
    assert cfg["variant"] == "fa" and cfg["r"] == 4 and cfg["alpha"] == 8.0
    row = cfg["modules"]["model.layers.0.self_attn.q_proj"]
    assert row == {"variant": "fa", "shape": [64, 64], "kind": "linear", "scale": 2.0}
    tensors = load_file(saved / WEIGHTS_FILE)
    idx = tensors["model.layers.0.self_attn.q_proj.sbora_idx"]
    assert idx.dtype == torch.int64 and idx.shape == (4,)
    assert tensors["model.layers.0.self_attn.q_proj.sbora_B"].shape == (64, 4)
    from safetensors import safe_open

    with safe_open(saved / WEIGHTS_FILE, "pt") as fh:
        assert fh.metadata()["base_fingerprint"] == cfg["base_fingerprint"]


def test_content_hash_is_stable(trained, saved, tmp_path: Path) -> None:
    adapter = trained[1]
    assert adapter.sha256() == sbora.dir_sha256(saved) == Adapter.load(saved).sha256()
    again = adapter.save(tmp_path / "again")
    assert (again / WEIGHTS_FILE).read_bytes() == (saved / WEIGHTS_FILE).read_bytes()
    adapter.save(saved)  # overwrite in place
    assert not [p for p in saved.parent.iterdir() if p.name.startswith(".")]  # no temp leftovers


def test_delta_and_indices_match_the_dense_reference() -> None:
    gen = torch.Generator().manual_seed(0)
    b, a = torch.randn(6, 3, generator=gen), torch.randn(2, 5, generator=gen)
    fa = AdapterModule("m.fa", "fa", "linear", (6, 5), 1.5, torch.tensor([4, 0, 2]), b=b)
    fb = AdapterModule("m.fb", "fb", "conv1d", (6, 5), 0.5, torch.tensor([5, 1]), a=a)
    lora = AdapterModule("m.lo", "lora", "linear", (6, 5), 2.0, a=a, b=b[:, :2])
    adapter = Adapter(CFG, {m.name: m for m in (fa, fb, lora)})
    # the factor is permuted with its indices: ΔW is unchanged by sorting
    torch.testing.assert_close(
        adapter.delta("m.fa").double(), dense_delta("fa", torch.tensor([4, 0, 2]), b, 1.5, (6, 5))
    )
    torch.testing.assert_close(
        adapter.delta("m.fb").double(), dense_delta("fb", torch.tensor([5, 1]), a, 0.5, (6, 5))
    )
    torch.testing.assert_close(adapter.delta("m.lo").double(), 2.0 * b[:, :2].double() @ a.double())
    assert {k: v.tolist() for k, v in adapter.indices.items()} == {
        "m.fa": [0, 2, 4],
        "m.fb": [1, 5],
    }
    assert adapter.cells() == 6 * 3 + 2 * 5 + 6 * 5
    assert adapter.num_parameters() == 18 + 10 + 10 + 12


@pytest.mark.parametrize(
    ("kwargs", "error"),
    [
        ({"indices": torch.tensor([1, 1])}, InvalidIndicesError),
        ({"indices": torch.tensor([1, 5])}, InvalidIndicesError),
        ({"b": torch.zeros(6, 3)}, AdapterFormatError),
        ({"variant": "fc"}, AdapterFormatError),
    ],
)
def test_adapter_module_validates(kwargs: dict, error: type) -> None:
    args = {
        "name": "m",
        "variant": "fa",
        "kind": "linear",
        "shape": (6, 5),
        "scale": 1.0,
        "indices": torch.tensor([0, 1]),
        "b": torch.zeros(6, 2),
        **kwargs,
    }
    with pytest.raises(error):
        AdapterModule(**args)


# ---- bad files -----------------------------------------------------------------------------
def _raises(path: Path, error: type, words: str) -> None:
    with pytest.raises(error, match=words) as exc:
        Adapter.load(path)
    assert "\n" not in str(exc.value)


def test_truncated_safetensors(saved) -> None:
    data = (saved / WEIGHTS_FILE).read_bytes()
    (saved / WEIGHTS_FILE).write_bytes(data[: len(data) - 10])
    _raises(saved, AdapterFormatError, "truncated")


def test_corrupt_safetensors(saved) -> None:
    (saved / WEIGHTS_FILE).write_bytes(b"\x00" * 3 + b"not a safetensors file")
    _raises(saved, AdapterFormatError, "truncated or not a safetensors")


def test_corrupt_config(saved) -> None:
    (saved / CONFIG_FILE).write_text("{ nope")
    _raises(saved, AdapterFormatError, "not valid JSON")


def test_missing_file_and_folder(saved, tmp_path: Path) -> None:
    _raises(tmp_path / "nowhere", AdapterFormatError, "does not exist")
    (saved / WEIGHTS_FILE).unlink()
    _raises(saved, AdapterFormatError, "lacks sbora_adapter.safetensors")


@pytest.mark.parametrize("name", ["adapter_model.bin", "pytorch_model.bin", "adapter.pt", "a.pkl"])
def test_pickle_is_refused(tmp_path: Path, name: str) -> None:
    (tmp_path / name).write_bytes(b"\x80\x04K\x01.")  # a valid pickle, never opened
    _raises(tmp_path, PickleRefusedError, "never loads pickle")
    _raises(tmp_path / name, PickleRefusedError, "never loads pickle")


def test_newer_format_version(saved) -> None:
    cfg = json.loads((saved / CONFIG_FILE).read_text())
    (saved / CONFIG_FILE).write_text(json.dumps({**cfg, "format_version": 2}))
    _raises(saved, AdapterFormatError, "upgrade sbora-reg")


def test_header_and_config_fingerprints_must_agree(saved) -> None:
    cfg = json.loads((saved / CONFIG_FILE).read_text())
    (saved / CONFIG_FILE).write_text(json.dumps({**cfg, "base_fingerprint": "0" * 64}))
    _raises(saved, AdapterFormatError, "differ")


def _rewrite(saved: Path, change) -> None:  # type: ignore[no-untyped-def]
    tensors = load_file(saved / WEIGHTS_FILE)
    fingerprint = json.loads((saved / CONFIG_FILE).read_text())["base_fingerprint"]
    change(tensors)
    meta = {"format": "sbora", "format_version": "1", "base_fingerprint": fingerprint}
    save_file(tensors, saved / WEIGHTS_FILE, metadata=meta)


KEY = "model.layers.0.self_attn.q_proj"


@pytest.mark.parametrize(
    ("change", "error", "words"),
    [
        (lambda t: t.update({f"{KEY}.sbora_B": torch.zeros(64, 5)}), AdapterFormatError, "shape"),
        (lambda t: t.pop(f"{KEY}.sbora_B"), AdapterFormatError, "lacks tensor"),
        (lambda t: t.update({"extra.lora_A": torch.zeros(1)}), AdapterFormatError, "no module"),
        (
            lambda t: t.update({f"{KEY}.sbora_idx": torch.tensor([3, 1, 2, 9])}),
            AdapterFormatError,
            "strictly increasing",
        ),
        (
            lambda t: t.update({f"{KEY}.sbora_idx": torch.tensor([1, 2, 3, 64])}),
            InvalidIndicesError,
            "out of range",
        ),
        (
            lambda t: t.update({f"{KEY}.sbora_idx": torch.tensor([1, 2, 3, 4], dtype=torch.int32)}),
            AdapterFormatError,
            "int64",
        ),
    ],
    ids=["factor-shape", "missing-factor", "extra-tensor", "unsorted", "out-of-range", "int32"],
)
def test_inconsistent_tensors(saved, change, error: type, words: str) -> None:
    _rewrite(saved, change)
    _raises(saved, error, words)


# ---- applying to the wrong model -----------------------------------------------------------
def test_fingerprint_mismatch_leaves_the_model_alone(saved) -> None:
    other = LlamaForCausalLM(tiny.llama("l64-96", intermediate_size=80))
    with pytest.raises(FingerprintMismatchError, match="another base model"):
        Adapter.load(saved).apply(other)
    assert not list(sbora.sbora_layers(other))
    assert all(p.requires_grad for p in other.parameters())


def test_shape_mismatch_without_fingerprint(saved) -> None:
    adapter = Adapter.load(saved)
    adapter.base_fingerprint = None
    other = LlamaForCausalLM(tiny.llama("l64-96", intermediate_size=80))
    with pytest.raises(ShapeMismatchError, match=r"\(64, 80\) in the model"):
        adapter.apply(other)
    smaller = LlamaForCausalLM(tiny.llama("l64-96", num_hidden_layers=1))
    with pytest.raises(ShapeMismatchError, match="no linear layer model.layers.1"):
        adapter.apply(smaller)
    assert not list(sbora.sbora_layers(other)) and not list(sbora.sbora_layers(smaller))
