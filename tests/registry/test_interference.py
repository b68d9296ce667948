"""Crosstalk ‖ΔW_j X_i‖ / ‖ΔW_i X_i‖ against a dense one-hot reference, and through the CLI."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from tests.registry.registry_factory import make_adapter

from sbora_reg.cli import main
from sbora_reg.registry import Registry
from sbora_reg.registry.interference import crosstalk
from sbora_reg.sbora import Adapter, AdapterModule, SBoRAConfig

OUT, IN = 6, 10


def _fa(name: str, idx: list[int], seed: int) -> Adapter:
    b = torch.randn(OUT, len(idx), generator=torch.Generator().manual_seed(seed))
    module = AdapterModule("m", "fa", "linear", (OUT, IN), 0.5, torch.tensor(idx), None, b)
    config = SBoRAConfig(variant="fa", r=len(idx), alpha=0.5 * len(idx), target_modules=("m",))
    return Adapter(config, {"m": module}, None, None, {"name": name})


def _dense(adapter: Adapter) -> torch.Tensor:
    m = adapter.modules["m"]
    assert m.b is not None and m.indices is not None
    return m.scale * m.b @ torch.eye(IN)[m.indices]  # s·B·A with A = I[idx]: (out, in)


def test_crosstalk_equals_the_dense_reference_and_can_be_zero() -> None:
    a, b = _fa("a", [0, 1, 2], 1), _fa("b", [5, 7], 2)
    gen = torch.Generator().manual_seed(3)
    x_a, x_b = torch.randn(40, IN, generator=gen), torch.randn(30, IN, generator=gen)
    result = crosstalk([("a", a), ("b", b)], [{"m": x_a}, {"m": x_b}])
    for i, x in enumerate((x_a, x_b)):
        own = (x @ _dense((a, b)[i]).T).norm()
        for j, other in enumerate((a, b)):
            want = float((x @ _dense(other).T).norm() / own)
            assert result.overall[i][j] == pytest.approx(want, rel=1e-5)
            assert result.modules["m"][i][j] == pytest.approx(want, rel=1e-5)
    assert result.overall[0][0] == pytest.approx(1.0)
    assert result.overall[0][1] > 0.05  # disjoint columns, yet b writes into a's computation
    # inputs of task a that never reach b's columns: b is invisible to a
    x_quiet = x_a.clone()
    x_quiet[:, [5, 7]] = 0
    quiet = crosstalk([("a", a), ("b", b)], [{"m": x_quiet}, {"m": x_b}])
    assert quiet.overall[0][1] == 0.0 and quiet.overall[1][0] > 0


def test_interference_cli_on_probe_sets(tmp_path: Path, tiny_lm_dir: Path) -> None:
    db = str(tmp_path / "reg.db")
    probe = tmp_path / "p.jsonl"
    probe.write_text("".join(json.dumps({"prompt": f"{i}+1=", "answer": str(i + 1)}) + "\n"
                             for i in range(6)))  # fmt: skip
    with Registry.open(db) as reg:
        for name, variant, target, seed in (("a", "fa", "q_proj", 1), ("b", "fb", "v_proj", 2)):
            make_adapter(tmp_path / name, tiny_lm_dir, variant, seed=seed, targets=(target,))
            reg.add(tmp_path / name, name=name, base=str(tiny_lm_dir))
            reg.set_probe(name, probe)
    png = tmp_path / "x.png"
    result = CliRunner().invoke(
        main, ["--db", db, "interference", "a", "b", "--png", str(png), "--json"]
    )
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    assert data["members"] == ["a@1", "b@1"]
    assert data["overall"][0][0] == pytest.approx(1.0) and data["overall"][1][1] == pytest.approx(
        1.0
    )
    assert all(
        v is not None and v >= 0 and math.isfinite(v) for row in data["overall"] for v in row
    )
    assert png.stat().st_size > 1000
    # a module only one of them adapts: undefined for the other's row
    q = "model.layers.0.self_attn.q_proj"
    assert data["modules"][q][1] == [None, None] and data["modules"][q][0][0] == pytest.approx(1)
    no_probe = CliRunner().invoke(main, ["--db", db, "interference", "a"])
    assert no_probe.exit_code == 1 and no_probe.output.startswith("Error: ")
