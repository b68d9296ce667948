"""`sbora-reg compose` through click's CliRunner: JSON, table, dry run, errors."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import load_file
from tests import tiny
from transformers import LlamaForCausalLM

from sbora_reg.cli import main
from sbora_reg.registry import Registry
from sbora_reg.sbora import Adapter, AdapterModule, SBoRAConfig
from sbora_reg.sbora.fingerprint import dir_fingerprint

Q0 = "model.layers.0.self_attn.q_proj"


def _adapter(base: Path, cols: list[int], seed: int) -> Adapter:
    g = torch.Generator().manual_seed(seed)
    idx = torch.tensor(cols, dtype=torch.int64)
    module = AdapterModule(
        Q0, "fa", "linear", (32, 32), 2.0, idx, None, torch.randn(32, len(cols), generator=g)
    )
    config = SBoRAConfig(
        variant="fa", r=len(cols), alpha=2.0 * len(cols), target_modules=("q_proj",)
    )
    return Adapter(config, {Q0: module}, base_fingerprint=dir_fingerprint(base))


@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory) -> tuple[str, Path]:
    root = tmp_path_factory.mktemp("cli")
    torch.manual_seed(0)
    config = tiny.llama(
        "l32", intermediate_size=64, num_hidden_layers=1, num_key_value_heads=1, vocab_size=50
    )
    LlamaForCausalLM(config).save_pretrained(root / "base")
    db = str(root / "reg.db")
    with Registry.open(db) as registry:
        for name, cols, seed in (("a", [0, 1], 1), ("b", [2, 3, 4], 2), ("c", [1], 3)):
            _adapter(root / "base", cols, seed).save(root / name)
            registry.add(root / name, name=name, base=str(root / "base"))
    return db, root / "base"


def run(db: str, *args: str):  # type: ignore[no-untyped-def]
    return CliRunner().invoke(main, ["--db", db, "compose", *args])


def test_compose_json_and_table(setup, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    db, base = setup
    out = tmp_path / "out"
    res = run(db, "a", "b@1", "--base", str(base), "--out", str(out), "--json")
    assert res.exit_code == 0, res.output
    data = json.loads(res.stdout)
    assert data["out"] == str(out) and data["format"] == "merged" and not data["dry_run"]
    assert [m["name"] for m in data["members"]] == ["a", "b"] and data["tensors_changed"] == 1
    assert data["composition_id"] >= 1 and len(data["output_sha256"]) == 64
    merged, original = load_file(out / "model.safetensors"), load_file(base / "model.safetensors")
    changed = (merged[f"{Q0}.weight"] != original[f"{Q0}.weight"]).any(0)
    assert changed.nonzero().flatten().tolist() == [0, 1, 2, 3, 4]
    res = run(db, "a", "--base", str(base), "--out", str(tmp_path / "o2"), "--dtype", "bfloat16")
    assert res.exit_code == 0, res.output
    assert "Wrote" in res.stdout and "a" in res.stdout and "composition #" in res.stdout


def test_dry_run_and_errors(setup, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    db, base = setup
    out = tmp_path / "out"
    res = run(db, "a", "b", "--base", str(base), "--out", str(out), "--dry-run")
    assert res.exit_code == 0 and "Dry run" in res.stdout and not out.exists()
    res = run(db, "a", "c", "--base", str(base), "--out", str(out))
    assert res.exit_code == 1 and res.stderr.startswith("Error: members touch the same weights")
    assert res.stderr.count("\n") == 1 and not out.exists()
    res = run(db, "a", "c", "--base", str(base), "--out", str(out), "--allow-overlap", "--json")
    assert res.exit_code == 0 and json.loads(res.stdout)["overlap_cells"] == 32
    res = run(db, "a", "--base", str(base), "--out", str(out))
    assert res.exit_code == 1 and "already exists" in res.stderr
    res = run(db, "a", "--base", str(base), "--out", str(out), "--shard-size", "lots")
    assert res.exit_code == 2 and "invalid size" in res.stderr
    res = run(db, "a", "--out", str(out))
    assert res.exit_code == 2
    res = run(db, "zzz", "--base", str(base), "--out", str(tmp_path / "x"))
    assert res.exit_code == 1 and "Error: no adapter named 'zzz'" in res.stderr
