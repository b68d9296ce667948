"""`sbora-reg overlap` and `sbora-reg allocate` through CliRunner."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from tests import tiny
from transformers import AutoConfig, AutoModelForCausalLM

from sbora_reg import sbora
from sbora_reg.cli import main
from sbora_reg.registry.store import Registry

HIDDEN = 32
Q = "model.layers.{}.self_attn.q_proj"


def _base(path: Path, hidden: int) -> Path:
    tiny.llama("l32", hidden_size=hidden, vocab_size=20).save_pretrained(path)
    return path


def _adapter(base: Path, out: Path, variant: str, cols: list[int], targets=("q_proj",)) -> Path:
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(base))
    config = sbora.SBoRAConfig(variant=variant, r=len(cols), alpha=8, target_modules=targets)
    names = [n for n, _ in model.named_modules() if config.matches(n)]
    sbora.inject(model, config, indices={n: cols for n in names})
    sbora.extract(model).save(out)
    return out


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> dict:
    root = tmp_path_factory.mktemp("ov")
    base, small = _base(root / "base", HIDDEN), _base(root / "small", 16)
    db = root / "reg.db"
    with Registry.open(db) as reg:
        for name, variant, cols in [
            ("a", "fa", [0, 1, 2, 3]),
            ("b", "fa", [2, 3, 4, 5]),
            ("c", "fa", [10, 11, 12, 13]),
            ("e", "fb", [0, 1]),
        ]:
            reg.add(_adapter(base, root / name, variant, cols), name=name, base=str(base))
        reg.add(_adapter(small, root / "x", "fa", [0, 1]), name="x", base=str(small))
    return {"db": str(db), "base": base, "root": root}


def run(world: dict, *args: str) -> object:
    return CliRunner().invoke(main, ["--db", world["db"], *args])


def test_pair_report_json(world: dict) -> None:
    res = run(world, "overlap", "a", "b", "c", "--json")
    assert res.exit_code == 0, res.output
    data = json.loads(res.output)
    pairs = {(p["a"], p["b"]): p for p in data["pairs"]}
    assert set(pairs) == {("a@1", "b@1"), ("a@1", "c@1"), ("b@1", "c@1")}
    # FA/FA on q_proj (out = HIDDEN): columns {2, 3} shared in both layers.
    ab = pairs[("a@1", "b@1")]
    assert ab["modules"] == {Q.format(i): HIDDEN * 2 for i in range(2)}
    assert ab["shared_cells"] == 2 * HIDDEN * 2
    assert pairs[("a@1", "c@1")]["shared_cells"] == 0
    assert data["overlap"] is True


def test_fa_vs_fb_and_check_exit_codes(world: dict) -> None:
    res = run(world, "overlap", "c", "e@1", "--json")
    data = json.loads(res.output)
    assert data["pairs"][0]["shared_cells"] == 2 * (4 * 2)  # |R| * |C| per layer
    assert run(world, "overlap", "a", "c", "--check").exit_code == 0
    res = run(world, "overlap", "a", "b", "--check")
    assert res.exit_code == 3 and "a@1" in res.output


def test_against_all(world: dict) -> None:
    res = run(world, "overlap", "--against-all", "a", "--json")
    assert res.exit_code == 0, res.output
    data = json.loads(res.output)
    assert data["compared"] == 3  # b, c, e on the same base; x is on another base
    assert {p["b"] for p in data["pairs"]} == {"b@1", "e@1"}
    table = run(world, "overlap", "--against-all", "a")
    assert table.exit_code == 0 and "b@1" in table.output and "c@1" not in table.output
    assert "2 overlapping" in table.output and "--limit 0" not in table.output
    first = run(world, "overlap", "--against-all", "a", "--limit", "1")
    most = max(data["pairs"], key=lambda p: p["shared_cells"])["b"]
    assert first.exit_code == 0 and most in first.output and "the 1 sharing most" in first.output
    assert ({"b@1", "e@1"} - {most}).pop() not in first.output


def test_different_bases_are_not_compared(world: dict) -> None:
    res = run(world, "overlap", "a", "x", "--json", "--check")
    assert res.exit_code == 0
    pair = json.loads(res.output)["pairs"][0]
    assert pair["comparable"] is False and "different base" in pair["reason"]
    assert "not compared" in run(world, "overlap", "a", "x").output


def test_usage_and_unknown(world: dict) -> None:
    assert run(world, "overlap", "a").exit_code == 2
    assert run(world, "overlap").exit_code == 2
    res = run(world, "overlap", "a", "nope")
    assert res.exit_code == 1 and res.output.startswith("Error:")
