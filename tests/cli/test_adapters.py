"""CLI: add / list / show / rm / gc through CliRunner; bad input gives `Error: ...`, exit 1."""

from __future__ import annotations

import json
import sqlite3
from pathlib import Path

import pytest
from click.testing import CliRunner, Result
from tests.registry.registry_factory import make_adapter, make_base

from sbora_reg.cli import main  # noqa: E402
from sbora_reg.registry import Registry  # noqa: E402
from sbora_reg.registry.ranges import format_ranges  # noqa: E402


@pytest.fixture(scope="module")
def base(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_base(tmp_path_factory.mktemp("cli-base") / "tiny")


@pytest.fixture
def db(tmp_path: Path) -> str:
    return str(tmp_path / "reg.db")


def run(db: str, *args: str) -> Result:
    return CliRunner().invoke(main, ["--db", db, *args])


def listing(db: str) -> list[dict]:
    result = run(db, "list", "--json")
    assert result.exit_code == 0, result.output
    return json.loads(result.output)


def test_add_list_show_rm_gc(db: str, base: Path, tmp_path: Path) -> None:
    adapter = make_adapter(tmp_path / "a", base, "fb", seed=1)
    make_adapter(tmp_path / "b", base, "fa", seed=2)
    added = run(
        db,
        "add",
        str(tmp_path / "a"),
        "--name",
        "math",
        "--task",
        "arith",
        "--tag",
        "team=x",
        "--json",
    )
    assert added.exit_code == 0, added.output
    record = json.loads(added.output)
    assert (record["ref"], record["task"], record["tags"]) == ("math@1", "arith", {"team": "x"})
    assert record["sha256"] == adapter.sha256()
    assert run(db, "add", str(tmp_path / "b"), "--name", "math").exit_code == 0

    table = run(db, "list")
    assert table.exit_code == 0 and "math@1" in table.output and "math@2" in table.output
    assert [r["ref"] for r in listing(db)] == ["math@1", "math@2"]
    filtered = json.loads(run(db, "list", "--tag", "team=x", "--json").output)
    assert [r["ref"] for r in filtered] == ["math@1"]

    shown = run(db, "show", "math@1", "--json")
    assert shown.exit_code == 0
    detail = json.loads(shown.output)
    assert set(detail["modules"]) == set(adapter.modules)
    for name, mod in adapter.modules.items():
        got = detail["modules"][name]
        assert got["ranges"] == format_ranges(mod.indices.numpy())
        assert (got["variant"], got["count"], got["shape"]) == ("fb", mod.rank, list(mod.shape))
    people = run(db, "show", "math@1")
    assert people.exit_code == 0 and "math@1" in people.output
    some = next(iter(adapter.modules.values()))
    assert format_ranges(some.indices.numpy()) in people.output
    assert json.loads(run(db, "show", "math", "--json").output)["ref"] == "math@2"

    removed = run(db, "rm", "math@1")
    assert removed.exit_code == 0 and "math@1" in removed.output
    freed = run(db, "gc")
    assert freed.exit_code == 0 and "freed 1 blob" in freed.output
    assert [r["ref"] for r in listing(db)] == ["math@2"]


def test_env_var_selects_database(base: Path, tmp_path: Path) -> None:
    make_adapter(tmp_path / "a", base)
    db = tmp_path / "env.db"
    result = CliRunner(env={"SBORA_REG_DB": str(db)}).invoke(main, ["add", str(tmp_path / "a")])
    assert result.exit_code == 0, result.output
    with Registry.open(db) as reg:
        assert [r.ref for r in reg.list()] == ["a@1"]


def _truncated(tmp: Path, base: Path) -> list[str]:
    make_adapter(tmp / "t", base, seed=5)
    f = tmp / "t" / "sbora_adapter.safetensors"
    f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])
    return ["add", str(tmp / "t")]


def _corrupt(tmp: Path, base: Path) -> list[str]:
    make_adapter(tmp / "c", base, seed=6)
    (tmp / "c" / "sbora_adapter.safetensors").write_bytes(
        b"\x08\x00\x00\x00\x00\x00\x00\x00{garbage"
    )
    return ["add", str(tmp / "c")]


def _pickle(tmp: Path, base: Path) -> list[str]:
    (tmp / "adapter_model.bin").write_bytes(b"\x80\x04\x95pickle")
    return ["add", str(tmp / "adapter_model.bin")]


def _wrong_base(tmp: Path, base: Path) -> list[str]:
    other = make_base(tmp / "other", hidden=32)
    make_adapter(tmp / "w", base, seed=7, with_fingerprint=False)
    return ["add", str(tmp / "w"), "--base", str(other)]


def _bad_name(name: str):
    def build(tmp: Path, base: Path) -> list[str]:
        make_adapter(tmp / "n", base, seed=8)
        return ["add", str(tmp / "n"), "--name", name]

    return build


def _unknown(ref: str):
    return lambda tmp, base: ["show", ref]


@pytest.mark.parametrize(
    "build",
    [
        _truncated,
        _corrupt,
        _pickle,
        _wrong_base,
        _bad_name("a/b"),
        _bad_name(".."),
        _bad_name("ctl\x1bname"),
        _unknown("ghost"),
        _unknown("kept@9"),
        lambda tmp, base: ["rm", "kept@9"],
    ],
    ids=[
        "truncated",
        "corrupt",
        "pickle",
        "wrong-base",
        "slash",
        "dotdot",
        "control",
        "unknown-name",
        "unknown-version",
        "rm-unknown",
    ],
)
def test_bad_input_is_one_error_line(db: str, base: Path, tmp_path: Path, build) -> None:
    make_adapter(tmp_path / "kept", base, seed=1)
    assert run(db, "add", str(tmp_path / "kept")).exit_code == 0
    before = listing(db)
    blobs_before = sorted(p.name for p in Path(f"{db}.d", "blobs").iterdir())
    result = run(db, *build(tmp_path, base))
    assert result.exit_code == 1, result.output
    assert result.output.startswith("Error: ") and result.output.count("\n") == 1
    assert "Traceback" not in result.output
    assert listing(db) == before
    assert sorted(p.name for p in Path(f"{db}.d", "blobs").iterdir()) == blobs_before


def test_newer_schema_is_an_error(db: str) -> None:
    assert run(db, "db", "upgrade").exit_code == 0
    con = sqlite3.connect(db)
    con.execute("UPDATE alembic_version SET version_num = 'from_the_future'")
    con.commit()
    con.close()
    for args in (["list"], ["db", "upgrade"]):
        result = run(db, *args)
        assert result.exit_code == 1
        assert result.output.startswith("Error: ") and "newer than this sbora-reg" in result.output


def test_bad_tag_is_a_usage_error(db: str, base: Path, tmp_path: Path) -> None:
    make_adapter(tmp_path / "a", base)
    result = run(db, "add", str(tmp_path / "a"), "--tag", "novalue")
    assert result.exit_code == 2 and "KEY=VALUE" in result.output


def test_a_flipped_byte_in_a_stored_blob_is_named_and_never_merged(tmp_path, tiny_lm_dir):
    """Corruption at rest: one byte of a stored adapter changed after add is caught by the next
    command that reads it (compose, show --verify) with one Error line, and by verify."""
    import json as _json

    from click.testing import CliRunner

    from sbora_reg.cli import main
    from sbora_reg.registry.store import Registry
    from sbora_reg.sbora import SBoRAConfig, inject
    from sbora_reg.sbora.model import extract
    from sbora_reg.sbora.training import load_causal_lm

    model = load_causal_lm(tiny_lm_dir)
    inject(model, SBoRAConfig(variant="fa", r=2, alpha=4, target_modules=("q_proj",)))
    extract(model).save(tmp_path / "a")
    db = str(tmp_path / "reg.db")
    runner = CliRunner()
    assert runner.invoke(main, ["--db", db, "add", str(tmp_path / "a"), "--name", "a", "--base",
                                str(tiny_lm_dir)]).exit_code == 0  # fmt: skip
    ok = runner.invoke(main, ["--db", db, "verify", "--all", "--json"])
    assert ok.exit_code == 0 and [r["ok"] for r in _json.loads(ok.stdout)] == [True]
    with Registry.open(db) as reg:
        blob = reg.blob_path(reg.resolve("a").sha256)
    weights = blob / "sbora_adapter.safetensors"
    data = bytearray(weights.read_bytes())
    data[-1] ^= 0x01  # one flipped bit in the last factor value
    weights.write_bytes(bytes(data))
    out = tmp_path / "composed"
    for args in (["compose", "a", "--base", str(tiny_lm_dir), "--out", str(out)],
                 ["show", "a", "--verify"]):  # fmt: skip
        res = runner.invoke(main, ["--db", db, *args])
        assert res.exit_code == 1, res.output
        assert res.stderr.startswith("Error: the stored files of a@1") and "verify" in res.stderr
        assert len(res.stderr.strip().splitlines()) == 1
    assert not out.exists() and not list(tmp_path.glob("composed*"))
    bad = runner.invoke(main, ["--db", db, "verify", "--all"])
    assert bad.exit_code == 1 and "DAMAGED" in bad.stdout and "0 of 1 blobs ok" in bad.stdout
    usage = runner.invoke(main, ["--db", db, "verify"])
    assert usage.exit_code == 2
