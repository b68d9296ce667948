"""`sbora-reg allocate` through CliRunner: reservation, indices file, errors."""

from __future__ import annotations

import json
from pathlib import Path

from click.testing import CliRunner
from tests import tiny

from sbora_reg import sbora
from sbora_reg.cli import main
from sbora_reg.registry.store import Registry


def test_allocate_json_file_and_exhaustion(tmp_path: Path) -> None:
    base = tmp_path / "base"
    tiny.llama("l32", vocab_size=20).save_pretrained(base)
    db = str(tmp_path / "reg.db")
    with Registry.open(db) as reg:
        reg.add_base(base)
    runner = CliRunner()
    args = [
        "--db",
        db,
        "allocate",
        "--base",
        str(base),
        "--variant",
        "fa",
        "--rank",
        "20",
        "--targets",
        "q_proj,v_proj",
        "--task",
        "t",
        "--seed",
        "3",
    ]
    out = tmp_path / "idx.safetensors"
    res = runner.invoke(main, [*args, "--out", str(out), "--json"])
    assert res.exit_code == 0, res.output
    data = json.loads(res.output)
    assert data["variant"] == "fa" and data["task"] == "t" and len(data["modules"]) == 4
    loaded = sbora.load_indices(out)
    assert sorted(loaded) == sorted(data["modules"])
    assert all(t.numel() == 20 for t in loaded.values())
    # 32 columns, 20 taken: asking for 20 more fails and says 12 are free.
    res = runner.invoke(main, args)
    assert res.exit_code == 1 and "only 12 free columns" in res.output
    res = runner.invoke(main, [*args[:-6], "--rank", "12", "--targets", "q_proj"])
    assert res.exit_code == 0 and "Reservation" in res.output
    again = runner.invoke(main, [*args[:-6], "--rank", "1", "--targets", "q_proj", "--json"])
    assert again.exit_code == 1 and "only 0 free" in again.output


def test_allocate_cross_variant_needs_the_flag(tmp_path: Path) -> None:
    base = tmp_path / "base"
    tiny.llama("l32", num_hidden_layers=1, vocab_size=20).save_pretrained(base)
    db = str(tmp_path / "reg.db")
    with Registry.open(db) as reg:
        reg.add_base(base)
    runner = CliRunner()
    common = ["--db", db, "allocate", "--base", str(base), "--rank", "4", "--targets", "k_proj"]
    assert runner.invoke(main, [*common, "--variant", "fb"]).exit_code == 0
    refused = runner.invoke(main, [*common, "--variant", "fa"])
    assert refused.exit_code == 1 and "--allow-cross-variant" in refused.output
    ok = runner.invoke(main, [*common, "--variant", "fa", "--allow-cross-variant", "--json"])
    assert ok.exit_code == 0
    assert json.loads(ok.stdout)["warnings"]
    # Now the fa reservation crosses the fb axis too: fb is refused in turn.
    assert runner.invoke(main, [*common, "--variant", "fb"]).exit_code == 1
    assert runner.invoke(main, [*common, "--variant", "xx"]).exit_code == 2
