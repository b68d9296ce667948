"""A model directory's module table from its files equals the in-memory model's.

Every family the header rules claim (``HEADER_FAMILIES``) is built tiny from its own config class,
saved by transformers, and read back both ways; a directory the rules do not cover takes the
meta-model path, and the per-directory cache notices a changed file.
"""

from __future__ import annotations

import contextlib
import json
import os
from pathlib import Path
from typing import Any

import pytest
import torch
from tests import tiny
from transformers import AutoConfig, AutoModelForCausalLM, GPT2LMHeadModel, LlamaForCausalLM

from sbora_reg.errors import AdapterFormatError
from sbora_reg.sbora import fingerprint as fp

SMALL: dict[str, Any] = dict(
    hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
    num_key_value_heads=2, head_dim=8, vocab_size=64, n_embd=32, n_layer=2, n_head=4,
    ffn_dim=48, word_embed_proj_dim=32, n_positions=64, max_position_embeddings=64,
)  # fmt: skip


def _tiny_family(model_type: str, folder: Path, **overrides: Any) -> torch.nn.Module:
    config = AutoConfig.for_model(model_type)
    for key, value in {**SMALL, **overrides}.items():
        if hasattr(config, key):
            with contextlib.suppress(AttributeError):  # a derived property (Falcon's head_dim)
                setattr(config, key, value)
    if getattr(config, "layer_types", None):
        config.layer_types = config.layer_types[: config.num_hidden_layers]
    if getattr(config, "pad_token_id", None) is not None:
        config.pad_token_id = 0
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config)
    model.save_pretrained(folder)
    return model


@pytest.mark.parametrize("model_type", sorted(fp.HEADER_FAMILIES))
def test_headers_give_the_models_table(model_type: str, tmp_path: Path) -> None:
    model = _tiny_family(model_type, tmp_path)
    from_files = fp.header_module_table(tmp_path)
    assert from_files is not None
    assert from_files == fp.module_table(model)
    assert fp.dir_fingerprint(tmp_path) == fp.model_fingerprint(model)


@pytest.mark.parametrize("tied", [True, False])
def test_tied_and_untied_heads(tied: bool, tmp_path: Path) -> None:
    model = LlamaForCausalLM(tiny.llama("l32", tie_word_embeddings=tied))
    model.save_pretrained(tmp_path)
    files = fp.weight_files(tmp_path)
    with open(files[0], "rb") as f:
        header = json.loads(f.read(int.from_bytes(f.read(8), "little")))
    assert ("lm_head.weight" in header) is not tied
    assert fp.header_module_table(tmp_path) == fp.module_table(model)


def test_sharded_checkpoint(tmp_path: Path) -> None:
    model = GPT2LMHeadModel(tiny.gpt2("g48"))
    model.save_pretrained(tmp_path, max_shard_size="20KB")
    assert len(fp.weight_files(tmp_path)) > 1
    assert fp.header_module_table(tmp_path) == fp.module_table(model)


def test_uncovered_directories_build_the_model(tmp_path: Path) -> None:
    """A config without weights and a family outside the rules: the meta model decides."""
    config_only = tmp_path / "config-only"
    config_only.mkdir()
    tiny.llama("l32").save_pretrained(config_only)
    assert fp.header_module_table(config_only) is None
    model = LlamaForCausalLM(tiny.llama("l32"))
    assert fp.dir_module_table(config_only) == fp.module_table(model)

    neox = tmp_path / "neox"  # saves its head as embed_out, a module named lm_head in memory
    model = _tiny_family("gpt_neox", neox)
    assert fp.header_module_table(neox) is None
    assert fp.dir_fingerprint(neox) == fp.model_fingerprint(model)


def test_cache_follows_the_files(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SBORA_REG_CACHE", str(tmp_path / "cache"))
    base = tmp_path / "base"
    LlamaForCausalLM(tiny.llama("l32")).save_pretrained(base)
    first = fp.dir_module_table(base)
    assert len(list((tmp_path / "cache" / "fingerprints").iterdir())) == 1

    calls = []
    real = fp.header_module_table
    monkeypatch.setattr(fp, "header_module_table", lambda p: calls.append(p) or real(p))
    assert fp.dir_module_table(base) == first
    assert calls == []  # served from the cache

    LlamaForCausalLM(tiny.llama("l32", intermediate_size=40)).save_pretrained(base)
    changed = fp.dir_module_table(base)
    assert len(calls) == 1 and changed != first
    assert changed["model.layers.0.mlp.up_proj"] == ("linear", (40, 32))


def test_cache_ignores_a_damaged_entry(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SBORA_REG_CACHE", str(tmp_path / "cache"))
    base = tmp_path / "base"
    model = LlamaForCausalLM(tiny.llama("l32"))
    model.save_pretrained(base)
    fp.dir_module_table(base)
    (entry,) = (tmp_path / "cache" / "fingerprints").iterdir()
    entry.write_text('{"path": ')
    assert fp.dir_module_table(base) == fp.module_table(model)


def test_unreadable_headers_are_one_error(tmp_path: Path) -> None:
    LlamaForCausalLM(tiny.llama("l32")).save_pretrained(tmp_path)
    weights = tmp_path / "model.safetensors"
    weights.write_bytes(b"\xff" * 64)
    with pytest.raises(AdapterFormatError, match="not a safetensors file"):
        fp.dir_module_table(tmp_path)
    os.remove(weights)
    (tmp_path / "config.json").unlink()
    with pytest.raises(AdapterFormatError, match="no config.json"):
        fp.dir_module_table(tmp_path)


def test_config_that_disagrees_with_the_weights_decides(tmp_path: Path) -> None:
    """A config declaring more layers than the weights hold builds the model it declares."""
    LlamaForCausalLM(tiny.llama("l32")).save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps({**config, "num_hidden_layers": 3}))
    assert fp.header_module_table(tmp_path) is None
    deeper = fp.module_table(LlamaForCausalLM(tiny.llama("l32", num_hidden_layers=3)))
    assert fp.dir_module_table(tmp_path) == deeper


def test_an_index_naming_shards_outside_is_refused_before_any_read(tmp_path: Path) -> None:
    base = tmp_path / "base"
    GPT2LMHeadModel(tiny.gpt2("g48")).save_pretrained(base, max_shard_size="20KB")
    index = base / fp.INDEX_FILE
    data = json.loads(index.read_text())
    first = sorted(set(data["weight_map"].values()))[0]
    (base / first).rename(tmp_path / "x.safetensors")  # still valid, one level up
    data["weight_map"] = {
        k: ("../x.safetensors" if v == first else v) for k, v in data["weight_map"].items()
    }
    index.write_text(json.dumps(data))
    with pytest.raises(AdapterFormatError, match="outside"):
        fp.dir_module_table(base)
