"""`sbora-reg train` through CliRunner: allocate -> train -> register, bad input, options."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from click.testing import CliRunner

from sbora_reg import sbora
from sbora_reg.cli import main
from sbora_reg.registry import models as m
from sbora_reg.registry.store import Registry


def _data(path: Path, n: int = 16) -> Path:
    rows = [
        {"prompt": f"{i % 10}+{i // 10 % 10}=", "answer": str(i % 10 + i // 10 % 10)}
        for i in range(n)
    ]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_allocated_indices_are_trained_and_registration_consumes_them(
    tmp_path: Path, tiny_lm_dir: Path
) -> None:
    db = str(tmp_path / "reg.db")
    with Registry.open(db) as reg:
        reg.add_base(tiny_lm_dir)
    runner = CliRunner()
    idx = tmp_path / "idx.safetensors"
    alloc = runner.invoke(
        main,
        [
            "--db",
            db,
            "allocate",
            "--base",
            str(tiny_lm_dir),
            "--variant",
            "fb",
            "--rank",
            "6",
            "--targets",
            "k_proj,up_proj",
            "--task",
            "add",
            "--seed",
            "2",
            "--out",
            str(idx),
            "--json",
        ],
    )
    assert alloc.exit_code == 0, alloc.output
    reservation = json.loads(alloc.output)["reservation"]
    out = tmp_path / "adapter"
    res = runner.invoke(
        main,
        [
            "--db",
            db,
            "train",
            "--base",
            str(tiny_lm_dir),
            "--data",
            str(_data(tmp_path / "d.jsonl")),
            "--out",
            str(out),
            "--indices",
            str(idx),
            "--steps",
            "3",
            "--batch-size",
            "4",
            "--lr",
            "1e-2",
            "--register",
            "adder",
            "--task",
            "add",
            "--json",
        ],
    )
    assert res.exit_code == 0, res.output
    report = json.loads(res.stdout)
    assert report["steps"] == 3 and len(report["losses"]) == 3
    assert report["registered"]["name"] == "adder" and report["registered"]["task"] == "add"
    adapter = sbora.Adapter.load(out)
    assert adapter.config.variant == "fb" and adapter.config.r == 6
    assert report["trainable_parameters"] == adapter.num_parameters() > 0
    reserved = sbora.load_indices(idx)
    assert sorted(adapter.indices) == sorted(reserved)
    for name, want in reserved.items():
        assert adapter.indices[name].tolist() == want.tolist()
    with Registry.open(db) as reg:
        with reg.read() as session:
            row = session.get(m.Reservation, reservation)
            assert row is not None and row.consumed_by_adapter_id is not None
        regions = reg.regions("adder")
    assert {k: r.indices.tolist() for k, r in regions.items()} == {
        k: v.tolist() for k, v in reserved.items()
    }


def test_bad_data_is_one_error_line_and_writes_nothing(tmp_path: Path, tiny_lm_dir: Path) -> None:
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "1+1=", "answer": "2"}\nnot json\n')
    runner = CliRunner()
    db = str(tmp_path / "reg.db")
    for data, message in [
        (bad, "line 2 is not valid JSON"),
        (tmp_path / "missing.jsonl", "does not exist"),
    ]:
        out = tmp_path / "out"
        res = runner.invoke(
            main,
            [
                "--db",
                db,
                "train",
                "--base",
                str(tiny_lm_dir),
                "--data",
                str(data),
                "--out",
                str(out),
                "--register",
                "x",
            ],
        )
        assert res.exit_code == 1, res.output
        assert res.stderr.startswith("Error: ") and message in res.stderr
        assert len(res.stderr.strip().splitlines()) == 1
        assert not out.exists()
    assert not Path(db).exists()


def test_usage_errors_and_human_output(tmp_path: Path, tiny_lm_dir: Path) -> None:
    runner = CliRunner()
    data = _data(tmp_path / "d.jsonl", 6)
    common = ["train", "--base", str(tiny_lm_dir), "--data", str(data)]
    both = runner.invoke(
        main, [*common, "--out", str(tmp_path / "o"), "--steps", "1", "--epochs", "1"]
    )
    assert both.exit_code == 2 and "not both" in both.output
    task = runner.invoke(main, [*common, "--out", str(tmp_path / "o"), "--task", "t"])
    assert task.exit_code == 2 and "--register" in task.output
    threads = runner.invoke(main, [*common, "--out", str(tmp_path / "o"), "--threads", "0"])
    assert threads.exit_code == 2 and "neither a positive number nor auto" in threads.output
    wrong = runner.invoke(main, [*common, "--out", str(tmp_path / "o"), "--targets", "nope"])
    assert wrong.exit_code == 1 and "matched no module" in wrong.stderr
    out = tmp_path / "fa"
    res = runner.invoke(
        main,
        [
            *common,
            "--out",
            str(out),
            "--targets",
            "o_proj",
            "--rank",
            "4",
            "--epochs",
            "2",
            "--batch-size",
            "4",
            "--threads",
            "1",
        ],
    )
    assert res.exit_code == 0, res.output
    assert "trained 4 steps on 6 examples" in res.stdout and str(out) in res.stdout
    adapter = sbora.Adapter.load(out)
    assert adapter.config.variant == "fa" and adapter.config.alpha == 8.0
    assert all(name.endswith("o_proj") for name in adapter.modules)


@pytest.mark.parametrize(
    ("quantize", "label"), [("nf4", "bnb-nf4-dq"), ("int8", "bnb-int8")], ids=["nf4", "int8"]
)
@pytest.mark.parametrize("variant", ["fa", "fb"])
def test_train_on_a_quantised_base_then_merge_dequantized_is_regional(
    tmp_path: Path, tiny_lm_dir: Path, quantize: str, label: str, variant: str
) -> None:
    """QSBoRA end to end: train on the quantised base, run it for inference (where bitsandbytes'
    CPU backend may repack 4-bit weights), merge: weights outside the region stay bit-identical
    to the dequantised base."""
    import torch

    from sbora_reg.sbora import quant

    out = tmp_path / "adapter"
    res = CliRunner().invoke(
        main,
        [
            "--db",
            str(tmp_path / "reg.db"),
            "train",
            "--base",
            str(tiny_lm_dir),
            "--data",
            str(_data(tmp_path / "d.jsonl")),
            "--out",
            str(out),
            "--quantize",
            quantize,
            "--variant",
            variant,
            "--rank",
            "4",
            "--targets",
            "q_proj,down_proj",
            "--steps",
            "3",
            "--lr",
            "5e-2",
            "--json",
        ],
    )
    assert res.exit_code == 0, res.output
    adapter = sbora.Adapter.load(out)
    assert adapter.metadata["quantization"] == label
    bits = 8 if quantize == "int8" else 4
    model = quant.load_quantized(
        tiny_lm_dir, bits=bits, quant_type="nf4", double_quant=True, compute_dtype=torch.float32
    )
    base = {n: quant.dequantize_weight(model.get_submodule(n)) for n in adapter.modules}
    model = adapter.apply(model).eval()
    with torch.no_grad():
        model(torch.randint(3, 90, (2, 7)))  # inference forwards, before the merge
        model(torch.randint(3, 90, (1, 1)))
    quant.merge_dequantized(model, dtype=torch.float32)
    for name, module in adapter.modules.items():
        merged = model.get_submodule(name).base_layer.weight.detach()
        delta = module.delta().float()  # dense ΔW (out, in)
        region = torch.zeros(delta.shape, dtype=torch.bool)
        if variant == "fa":
            region[:, module.indices] = True
        else:
            region[module.indices, :] = True
        assert not torch.equal(merged[region], base[name][region])
        assert torch.equal(merged[~region], base[name][~region])  # bit-identical outside
        expected = base[name] + delta
        # one float32 addition per touched weight
        assert ((merged - expected).abs() <= 2.0**-24 * expected.abs()).all()


def test_register_without_indices_allocates_disjoint_regions_and_holds_out_a_probe_set(
    tmp_path: Path, tiny_lm_dir: Path
) -> None:
    """train --register with no --indices: each run reserves a region disjoint from the others
    and consumes it; every tenth row is held out of training and stored as the probe set."""
    db = str(tmp_path / "reg.db")
    runner = CliRunner()
    data = _data(tmp_path / "d.jsonl", 40)
    rows = data.read_text().splitlines()
    for name, extra in (("one", []), ("two", []), ("three", ["--no-holdout"])):
        res = runner.invoke(main, ["--db", db, "train", "--base", str(tiny_lm_dir), "--data",
                                   str(data), "--out", str(tmp_path / name), "--steps", "2",
                                   "--batch-size", "4", "--targets", "q_proj,up_proj",
                                   "--register", name, "--json", *extra])  # fmt: skip
        assert res.exit_code == 0, res.output
        report = json.loads(res.stdout)
        assert report["examples"] == (40 if extra else 36)
    with Registry.open(db) as reg:
        with reg.read() as session:
            reservations = session.query(m.Reservation).all()
            assert len(reservations) == 3
            assert all(r.consumed_by_adapter_id is not None for r in reservations)
        one, two, three = (reg.resolve(n) for n in ("one", "two", "three"))
        probe = reg.probe_path(one)
        assert probe is not None and probe.read_text().splitlines() == rows[9::10]
        assert three.probe_sha256 is None
    overlap = runner.invoke(main, ["--db", db, "overlap", "one", "two", "three", "--json"])
    assert overlap.exit_code == 0, overlap.output
    pairs = json.loads(overlap.stdout)["pairs"]
    assert len(pairs) == 3 and all(p["shared_cells"] == 0 for p in pairs), overlap.stdout
