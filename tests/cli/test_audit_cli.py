"""`sbora-reg audit` through CliRunner: usage table/JSON/PNG and the checkpoint diff exit codes."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import load_file, save_file
from tests import tiny
from transformers import AutoModelForCausalLM, LlamaForCausalLM

from sbora_reg import sbora
from sbora_reg.cli import main
from sbora_reg.registry.compose import compose
from sbora_reg.registry.store import Registry


def _adapter(base: Path, out: Path, variant: str, idx: list[int], target: str) -> Path:
    model = AutoModelForCausalLM.from_pretrained(base)
    config = sbora.SBoRAConfig(variant=variant, r=len(idx), alpha=4, target_modules=(target,))
    names = [n for n, _ in model.named_modules() if config.matches(n)]
    sbora.inject(model, config, indices={n: idx for n in names})
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.normal_()
    sbora.extract(model).save(out)
    return out


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> dict:
    root = tmp_path_factory.mktemp("cli_audit")
    torch.manual_seed(0)
    config = tiny.llama("l32")
    base = root / "base"
    LlamaForCausalLM(config).save_pretrained(base)
    db = root / "reg.db"
    with Registry.open(db) as reg:
        a = reg.add(
            _adapter(base, root / "a", "fa", [0, 1, 2], "q_proj"),
            name="a",
            task="math",
            base=str(base),
        )
        b = reg.add(
            _adapter(base, root / "b", "fa", [8, 9], "q_proj"),
            name="b",
            task="code",
            base=str(base),
        )
        out = Path(compose(reg, [a.ref, b.ref], base, root / "merged", "merged").out)
    return {"db": str(db), "base": base, "out": out, "root": root}


def run(world: dict, *args: str):
    return CliRunner().invoke(main, ["--db", world["db"], *args])


def test_usage_json_and_png(world: dict, tmp_path: Path) -> None:
    png = tmp_path / "audit.png"
    res = run(world, "audit", "--base", str(world["base"]), "--json", "--png", str(png))
    assert res.exit_code == 0, res.output
    data = json.loads(res.output)
    groups = {g["name"]: g for g in data["groups"]}
    assert set(groups) == {"math", "code"}
    q0 = groups["math"]["modules"]["model.layers.0.self_attn.q_proj"]
    assert q0["cols"] == "0-2" and q0["rows"] == "" and q0["cells"] == 32 * 3
    assert data["cells"] == 2 * 32 * 5 and data["overlaps"] == []
    assert 0 < data["share"] < 1
    assert png.is_file() and png.stat().st_size > 10_000
    table = run(world, "audit", "--base", str(world["base"]), "--task", "code")
    assert table.exit_code == 0 and "code" in table.output and "math" not in table.output


def test_checkpoint_clean_then_planted(world: dict, tmp_path: Path) -> None:
    ok = run(world, "audit", str(world["out"]), "--base", str(world["base"]))
    assert ok.exit_code == 0, ok.output
    assert "0 unexplained" in ok.output
    bad = tmp_path / "bad"
    shutil.copytree(world["out"], bad)
    (file,) = bad.glob("*.safetensors")
    tensors = load_file(file)
    tensors["model.layers.1.mlp.up_proj.weight"][5, 6] += 0.5
    save_file(tensors, file, metadata={"format": "pt"})
    res = run(world, "audit", str(bad), "--base", str(world["base"]), "--json")
    assert res.exit_code == 3
    data = json.loads(res.output)
    assert data["clean"] is False and data["unexplained_weights"] == 1
    assert data["findings"][0]["tensor"] == "model.layers.1.mlp.up_proj.weight"
    assert (data["findings"][0]["rows"], data["findings"][0]["cols"]) == ("5", "6")
    text = run(world, "audit", str(bad), "--base", str(world["base"]), "--source", "registry")
    assert text.exit_code == 3 and "up_proj" in text.output


def test_errors(world: dict, tmp_path: Path) -> None:
    res = run(world, "audit", str(tmp_path), "--base", str(world["base"]))
    assert res.exit_code == 1 and res.output.startswith("Error:")
    assert run(world, "audit").exit_code == 2
