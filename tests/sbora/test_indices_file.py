"""The indices file (what `sbora-reg allocate` writes) and inject(..., indices=path)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from sbora_reg import sbora
from sbora_reg.errors import (
    AdapterFormatError,
    ConfigError,
    FingerprintMismatchError,
    InvalidIndicesError,
    PickleRefusedError,
)
from sbora_reg.sbora import SBoRAConfig

Q = [f"model.layers.{i}.self_attn.q_proj" for i in (0, 1)]
CFG = SBoRAConfig(variant="fb", r=3, alpha=6, target_modules=["q_proj"])


def test_round_trip_sorts_and_keeps_metadata(tmp_path: Path) -> None:
    path = sbora.save_indices(
        tmp_path / "i.safetensors",
        {"a": [5, 1, 3], "b": torch.tensor([0])},
        variant="fa",
        base_fingerprint="f" * 64,
        reservation=12,
    )
    found, meta = sbora.read_indices_file(path)
    assert {k: v.tolist() for k, v in found.items()} == {"a": [1, 3, 5], "b": [0]}
    assert all(v.dtype == torch.int64 for v in found.values())
    assert meta == {
        "format": "sbora-indices",
        "variant": "fa",
        "base_fingerprint": "f" * 64,
        "reservation": "12",
    }
    assert sbora.load_indices(path).keys() == found.keys()


def test_inject_from_a_file(make_llama, tmp_path: Path) -> None:
    model = make_llama()
    path = sbora.save_indices(
        tmp_path / "i.safetensors",
        {n: [7, 2, 30] for n in Q},
        variant="fb",
        base_fingerprint=sbora.model_fingerprint(model),
    )
    sbora.inject(model, CFG, indices=path)
    assert {n: lay.sbora_idx.tolist() for n, lay in sbora.sbora_layers(model)} == {
        n: [2, 7, 30] for n in Q
    }


def test_file_for_another_model_or_variant_is_refused(make_llama, tmp_path: Path) -> None:
    model = make_llama()
    other = sbora.save_indices(
        tmp_path / "o.safetensors",
        {n: [1, 2, 3] for n in Q},
        variant="fb",
        base_fingerprint="0" * 64,
    )
    with pytest.raises(FingerprintMismatchError):
        sbora.inject(model, CFG, indices=other)
    fa = sbora.save_indices(tmp_path / "fa.safetensors", {n: [1, 2, 3] for n in Q}, variant="fa")
    with pytest.raises(ConfigError, match="'fa' indices"):
        sbora.inject(model, CFG, indices=fa)
    assert not list(sbora.sbora_layers(model))


def test_bad_files(tmp_path: Path) -> None:
    with pytest.raises(InvalidIndicesError, match="more than once"):
        sbora.save_indices(tmp_path / "d.safetensors", {"a": [1, 1]}, variant="fa")
    plain = tmp_path / "plain.safetensors"
    save_file({"a": torch.tensor([1, 2])}, plain)
    with pytest.raises(AdapterFormatError, match="not an SBoRA indices file"):
        sbora.load_indices(plain)
    dup = tmp_path / "dup.safetensors"
    save_file({"a": torch.tensor([2, 2])}, dup, metadata={"format": "sbora-indices"})
    with pytest.raises(InvalidIndicesError):
        sbora.load_indices(dup)
    (tmp_path / "i.pt").write_bytes(b"\x80\x04K\x01.")
    with pytest.raises(PickleRefusedError):
        sbora.load_indices(tmp_path / "i.pt")
    with pytest.raises(AdapterFormatError, match="does not exist"):
        sbora.load_indices(tmp_path / "missing.safetensors")


def test_default_indices_validate_rank() -> None:
    idx = sbora.default_indices(0, "m", 10, 10)
    assert idx.tolist() == list(range(10))
    with pytest.raises(ConfigError, match="larger than the dimension"):
        sbora.default_indices(0, "m", 10, 11)
