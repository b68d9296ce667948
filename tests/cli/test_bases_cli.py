"""`sbora-reg base add|list`, and allocating on a fresh registry: bases on their own."""

from __future__ import annotations

import json
from pathlib import Path

from click.testing import CliRunner, Result
from tests import tiny
from tests.registry.registry_factory import make_adapter

from sbora_reg.cli import main
from sbora_reg.registry import Registry


def run(db: Path, *args: str) -> Result:
    return CliRunner().invoke(main, ["--db", str(db), *args])


def _base(path: Path, name_or_path: str | None = None) -> Path:
    """A tiny config-only base; ``name_or_path`` as a Hub download's config.json carries it."""
    tiny.llama("l32", vocab_size=20).save_pretrained(path)
    if name_or_path is not None:
        config = json.loads((path / "config.json").read_text())
        (path / "config.json").write_text(json.dumps({**config, "_name_or_path": name_or_path}))
    return path


def test_base_add_and_list_then_allocate_by_its_name(tmp_path: Path) -> None:
    base, db = _base(tmp_path / "base"), tmp_path / "reg.db"
    added = run(db, "base", "add", str(base), "--name", "tiny", "--hub-id", "acme/tiny", "--json")
    assert added.exit_code == 0, added.output
    record = json.loads(added.output)
    assert (record["label"], record["hub_id"], record["name"]) == ("tiny", "acme/tiny", str(base))
    assert record["modules"] == 2 * 7 + 2  # seven projections per layer, embedding and head
    listed = run(db, "base", "list", "--json")
    assert [b["label"] for b in json.loads(listed.output)] == ["tiny"]
    alloc = run(db, "allocate", "--base", "tiny", "--variant", "fa", "--rank", "2",
                "--targets", "q_proj", "--json")  # fmt: skip
    assert alloc.exit_code == 0, alloc.output
    assert json.loads(alloc.output)["base"] == str(base)
    # adding it again changes nothing but what is given
    again = run(db, "base", "add", str(base), "--json")
    assert json.loads(again.output) == record
    assert "tiny" in run(db, "base", "list").output


def test_allocate_on_a_fresh_registry_registers_the_base(tmp_path: Path) -> None:
    base, db = _base(tmp_path / "base", "owner/real-model"), tmp_path / "reg.db"
    alloc = run(db, "allocate", "--base", str(base), "--variant", "fb", "--rank", "3",
                "--targets", "v_proj", "--json")  # fmt: skip
    assert alloc.exit_code == 0, alloc.output
    (only,) = json.loads(run(db, "base", "list", "--json").output)
    assert only["hub_id"] == "owner/real-model"  # from the config's _name_or_path


def test_model_cards_name_the_bases_hub_id(tmp_path: Path) -> None:
    base, db = _base(tmp_path / "base", "/a/local/path"), tmp_path / "reg.db"
    assert run(db, "base", "add", str(base)).exit_code == 0
    (only,) = json.loads(run(db, "base", "list", "--json").output)
    assert only["hub_id"] is None  # a local path is not a Hub id
    make_adapter(tmp_path / "a", base, "fa", seed=1, targets=("q_proj",))
    assert run(db, "add", str(tmp_path / "a"), "--name", "a").exit_code == 0
    assert run(db, "base", "add", str(base), "--hub-id", "acme/tiny").exit_code == 0
    out = tmp_path / "adapter-out"
    composed = run(db, "compose", "a", "--base", str(base), "--out", str(out), "--format",
                   "adapter")  # fmt: skip
    assert composed.exit_code == 0, composed.output
    assert 'base_model: "acme/tiny"' in (out / "README.md").read_text()


def test_bad_base_input_is_one_line_and_changes_nothing(tmp_path: Path) -> None:
    base, db = _base(tmp_path / "base"), tmp_path / "reg.db"
    other = _base(tmp_path / "other")
    assert run(db, "base", "add", str(base), "--name", "tiny").exit_code == 0
    with Registry.open(db) as registry:
        before = [b.to_json() for b in registry.bases()]
    for args in (
        ["base", "add", str(base), "--hub-id", "no-slash"],
        ["base", "add", str(base), "--hub-id", "a/b/c"],
        ["base", "add", str(base), "--hub-id", "acme/-bad"],
        ["base", "add", str(other), "--name", "tiny"],  # taken by the first base
        ["base", "add", str(base), "--name", "has space"],
        ["allocate", "--base", "nosuch", "--variant", "fa", "--rank", "1", "--targets", "q_proj"],
    ):
        result = run(db, *args)
        assert result.exit_code == 1, (args, result.output)
        lines = result.output.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("Error: "), (args, result.output)
    with Registry.open(db) as registry:
        assert [b.to_json() for b in registry.bases()] == before
