"""`sbora-reg compose --eval`: each member's skill on the base, alone and composed, measured on its
own data and checked against losses computed independently (HF's own label loss on dense
weights W0 + ΔW built from the adapters)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from transformers import AutoModelForCausalLM, AutoTokenizer

from sbora_reg import sbora
from sbora_reg.cli import main
from sbora_reg.registry.store import Registry
from sbora_reg.sbora.training import encode, train_adapter


def _data(path: Path, offset: int) -> Path:
    rows = [{"prompt": f"{i}*{offset}=", "answer": str(i * offset)} for i in range(12)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def _adapter(base: Path, out: Path, data: Path, variant: str, targets: tuple[str, ...]) -> Path:
    """A briefly trained adapter, so that its skill (lower loss on ``data``) is real."""
    cfg = sbora.SBoRAConfig(variant=variant, r=4, alpha=8, target_modules=targets)
    train_adapter(base, data, out, config=cfg, steps=25, batch_size=12, lr=3e-2)
    return out


def _hf_loss(model, tokenizer, path: Path) -> float:
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    batch = encode(tokenizer, [(r["prompt"], r["answer"]) for r in rows], torch.device("cpu"))
    with torch.no_grad():
        return float(model(**batch).loss)  # mean NLL over the answer tokens (one batch)


def _dense(base: Path, adapters: list[sbora.Adapter]):
    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    weights = dict(model.named_parameters())
    with torch.no_grad():
        for adapter in adapters:
            for name in adapter.modules:
                weights[f"{name}.weight"] += adapter.delta(name)
    return model


@pytest.fixture
def setup(tmp_path: Path, tiny_lm_dir: Path):
    db = str(tmp_path / "reg.db")
    d3, d7 = _data(tmp_path / "t3.jsonl", 3), _data(tmp_path / "t7.jsonl", 7)
    a = _adapter(tiny_lm_dir, tmp_path / "a", d3, "fa", ("q_proj", "up_proj"))
    b = _adapter(tiny_lm_dir, tmp_path / "b", d7, "fb", ("v_proj", "down_proj"))
    with Registry.open(db) as reg:
        reg.add_base(tiny_lm_dir)
        reg.add(a, name="times3", base=str(tiny_lm_dir))
        reg.add(b, name="times7", base=str(tiny_lm_dir))
    return db, a, b, d3, d7


def test_eval_reports_base_alone_composed_against_dense_losses(setup, tmp_path, tiny_lm_dir):
    db, a, b, d3, d7 = setup
    out = tmp_path / "composed"
    res = CliRunner().invoke(
        main,
        ["--db", db, "compose", "times3", "times7", "--base", str(tiny_lm_dir), "--out", str(out),
         "--eval", f"times3={d3}", "--eval", f"times7@1={d7}", "--json"],
    )  # fmt: skip
    assert res.exit_code == 0, res.output
    rows = {r["member"]: r for r in json.loads(res.stdout)["retention"]}
    assert set(rows) == {"times3@1", "times7@1"}

    tok = AutoTokenizer.from_pretrained(tiny_lm_dir)
    ad_a, ad_b = sbora.Adapter.load(a), sbora.Adapter.load(b)
    base = AutoModelForCausalLM.from_pretrained(tiny_lm_dir, dtype=torch.float32)
    composed = _dense(tiny_lm_dir, [ad_a, ad_b])
    for member, adapter, data in (("times3@1", ad_a, d3), ("times7@1", ad_b, d7)):
        row = rows[member]
        want = {
            "base": _hf_loss(base, tok, data),
            "alone": _hf_loss(_dense(tiny_lm_dir, [adapter]), tok, data),
            "composed": _hf_loss(composed, tok, data),
        }
        for key, loss in want.items():
            assert row[key]["loss"] == pytest.approx(loss, rel=1e-5, abs=1e-5), key
            assert row[key]["n"] == 12
        gained = want["base"] - want["alone"]
        assert gained > 0.1  # the member really learned its data
        expected = (want["base"] - want["composed"]) / gained
        assert row["retention"] == pytest.approx(expected, rel=1e-4, abs=1e-4)
        alone, composed_exact = row["alone"]["exact"], row["composed"]["exact"]
        want_exact = composed_exact / alone if alone > 0 else None
        assert row["exact_retention"] == (
            pytest.approx(want_exact) if want_exact is not None else None
        )


def test_eval_of_a_non_member_or_bad_file_fails_before_writing(setup, tmp_path, tiny_lm_dir):
    db, _, _, d3, _ = setup
    out = tmp_path / "composed"
    runner = CliRunner()
    common = ["--db", db, "compose", "times3", "times7", "--base", str(tiny_lm_dir)]
    res = runner.invoke(main, [*common, "--out", str(out), "--eval", f"nobody={d3}"])
    assert res.exit_code == 1 and "Error:" in res.output
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "1"}\nnot json\n')
    res = runner.invoke(main, [*common, "--out", str(out), "--eval", f"times3={bad}"])
    assert res.exit_code == 1 and "line 1" in res.output
    res = runner.invoke(main, [*common, "--out", str(out), "--eval", "times3"])
    assert res.exit_code == 2
    assert not out.exists()
    assert not list(tmp_path.glob("composed*"))


def test_probe_sets_are_stored_and_scored_by_eval_and_compose_measure(setup, tmp_path, tiny_lm_dir):
    """A probe set stored with a version scores it the same way --eval does with the file."""
    from sbora_reg.registry import models as m

    db, _, _, d3, d7 = setup
    runner = CliRunner()
    # stored with add --probe (times7, re-added: same content, same version) and set_probe
    with Registry.open(db) as reg:
        reg.set_probe("times3", d3)
        blob = reg.blob_path(reg.resolve("times3").probe_sha256)
        assert (blob / "probe.jsonl").read_bytes() == d3.read_bytes()
    b_dir = tmp_path / "b"
    added = runner.invoke(main, ["--db", db, "add", str(b_dir), "--name", "times7",
                                 "--probe", str(d7), "--json"])  # fmt: skip
    assert added.exit_code == 0, added.output
    assert json.loads(added.stdout)["ref"] == "times7@1"
    assert json.loads(added.stdout)["probe_sha256"]
    assert runner.invoke(main, ["--db", db, "gc"]).exit_code == 0  # probe blobs are referenced
    common = ["--db", db, "compose", "times3", "times7", "--base", str(tiny_lm_dir), "--json",
              "--calibrate", "none"]  # fmt: skip
    by_file = runner.invoke(main, [*common, "--out", str(tmp_path / "f"),
                                   "--eval", f"times3={d3}", "--eval", f"times7={d7}"])  # fmt: skip
    by_probe = runner.invoke(main, [*common, "--out", str(tmp_path / "p"), "--measure"])
    assert by_file.exit_code == 0 and by_probe.exit_code == 0, by_probe.output
    rows_file = json.loads(by_file.stdout)["retention"]
    rows_probe = json.loads(by_probe.stdout)["retention"]
    assert rows_probe == rows_file and len(rows_probe) == 2
    with Registry.open(db) as reg, reg.read() as session:
        comp = session.get(m.Composition, json.loads(by_probe.stdout)["composition_id"])
        assert comp.measurements == rows_probe  # recorded on the composition
    card = (tmp_path / "p" / "README.md").read_text()  # and in the model card
    for row in rows_probe:
        assert (
            f"| {row['member']} | {row['base']['exact']:.2f} | {row['alone']['exact']:.2f} |"
            in card
        )
    # eval: alone and in the composed checkpoint, the same numbers as compose measured
    alone = runner.invoke(main, ["--db", db, "eval", "times3", "--json"])
    assert alone.exit_code == 0, alone.output
    row = {r["member"]: r for r in rows_probe}["times3@1"]
    assert json.loads(alone.stdout)["alone"] == row["alone"]
    assert json.loads(alone.stdout)["base"] == row["base"]
    composed = runner.invoke(
        main, ["--db", db, "eval", "times3", "--checkpoint", str(tmp_path / "p"), "--json"]
    )
    assert composed.exit_code == 0, composed.output
    assert json.loads(composed.stdout) == row
    # no probe, or a bad one: one line, nothing changed
    bad = tmp_path / "bad.jsonl"
    bad.write_text("not json\n")
    for args in (["add", str(b_dir), "--name", "other", "--probe", str(bad)],):
        result = runner.invoke(main, ["--db", db, *args])
        assert result.exit_code == 1 and result.output.startswith("Error: "), result.output
    with Registry.open(db) as reg:
        assert [r.ref for r in reg.list()] == ["times3@1", "times7@1"]
        make = reg.resolve("times7")
    assert make.probe_sha256


def test_calibrate_lsq_reads_probe_sets_keeps_regions_and_measures_held_out_rows(
    setup, tmp_path, tiny_lm_dir
):
    """compose --calibrate lsq: factors re-solved on the members' own regions (audit clean, the
    merged and adapter outputs agree), the manifest says how, and --measure / eval score only
    the probe rows calibration did not read."""
    from safetensors.torch import load_file

    from sbora_reg.registry.manifest import MANIFEST_NAME
    from sbora_reg.sbora.calibrate import capture_moments, objective, region_columns

    db, a, b, d3, d7 = setup
    runner = CliRunner()
    common = ["--db", db, "compose", "times3", "times7", "--base", str(tiny_lm_dir)]
    # no probe sets: lsq is refused before anything is written; auto says why it did not
    res = runner.invoke(main, [*common, "--out", str(tmp_path / "x"), "--calibrate", "lsq"])
    assert res.exit_code == 1 and res.output.startswith("Error: ") and "probe" in res.output
    assert not (tmp_path / "x").exists()
    res = runner.invoke(main, [*common, "--out", str(tmp_path / "x"), "--calibrate", "auto"])
    assert res.exit_code == 0 and "Not calibrated: no probe set" in res.output, res.output
    with Registry.open(db) as reg:
        reg.set_probe("times3", d3)
        reg.set_probe("times7", d7)

    outs = {}
    for fmt in ("merged", "adapter"):
        outs[fmt] = tmp_path / f"cal-{fmt}"
        res = runner.invoke(main, [*common, "--out", str(outs[fmt]), "--format", fmt,
                                   "--calibrate", "lsq", "--measure", "--json"])  # fmt: skip
        assert res.exit_code == 0, res.output
        got = json.loads(res.stdout)
        assert got["calibration"]["method"] == "lsq"
        assert got["calibration"]["rows"] == {"times3@1": 6, "times7@1": 6}  # even rows of 12
        assert [r["examples"] for r in got["retention"]] == [6, 6]  # the odd rows
        manifest = json.loads((outs[fmt] / MANIFEST_NAME).read_text())
        assert manifest["calibration"] == got["calibration"]
        assert "Calibrated (`lsq`)" in (outs[fmt] / "README.md").read_text()

    # the composed adapter: same regions as the members, other factors than their plain sum
    composed = sbora.Adapter.load(outs["adapter"])
    members = [sbora.Adapter.load(a), sbora.Adapter.load(b)]
    for name, module in composed.modules.items():
        owner = next(m for m in members if name in m.modules)
        assert torch.equal(module.indices, owner.modules[name].indices)
    assert any(
        not torch.allclose(composed.delta(n), next(m for m in members if n in m.modules).delta(n))
        for n in composed.modules
    )
    # the merged checkpoint is the base plus exactly that adapter's ΔW (the one merge path), and
    # every weight outside the regions is bit-identical to the base
    base_w = load_file(tiny_lm_dir / "model.safetensors")
    merged_w = load_file(outs["merged"] / "model.safetensors")
    for key, w0 in base_w.items():
        module = key.removesuffix(".weight")
        if module in composed.modules:
            assert torch.equal(merged_w[key], w0 + composed.delta(module))
        else:
            assert torch.equal(merged_w[key], w0), key
    audit = runner.invoke(main, ["--db", db, "audit", str(outs["merged"]), "--base",
                                 str(tiny_lm_dir)])  # fmt: skip
    assert audit.exit_code == 0, audit.output

    # calibration lowers its objective on the calibration rows, module by module
    model = AutoModelForCausalLM.from_pretrained(tiny_lm_dir, dtype=torch.float32)
    tok = AutoTokenizer.from_pretrained(tiny_lm_dir)
    cols = region_columns(members)
    rows = [[(r["prompt"], r["answer"]) for r in map(json.loads, p.read_text().splitlines())][0::2]
            for p in (d3, d7)]  # fmt: skip
    moments = [capture_moments(model, tok, r, cols) for r in rows]
    solved = [sbora.Adapter(m.config, {n: composed.modules[n] for n in m.modules}) for m in members]
    for name in cols:
        assert objective(solved, moments, name, members) <= objective(members, moments, name)

    # eval of the calibrated checkpoint: the held-out rows, the numbers compose measured
    res = runner.invoke(main, ["--db", db, "eval", "times3", "--checkpoint", str(outs["merged"]),
                               "--json"])  # fmt: skip
    assert res.exit_code == 0, res.output
    assert json.loads(res.stdout)["examples"] == 6
