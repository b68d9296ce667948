"""Commands that do not quantise never import bitsandbytes (its CPU backend warns on import).

Checked in a fresh interpreter, since this test process may already hold it.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from tests.registry.registry_factory import make_adapter

from sbora_reg import sbora  # noqa: E402

RUN_EACH = """
import json, sys
from sbora_reg.cli import main
seen = []
for args in json.loads(sys.argv[1]):
    try:
        main(args, prog_name="sbora-reg", standalone_mode=False)
        code = 0
    except SystemExit as exc:
        code = exc.code
    seen.append([args[2], code, "bitsandbytes" in sys.modules])
print(json.dumps(seen))
"""


def test_commands_that_do_not_quantise_never_import_bitsandbytes(
    tmp_path: Path, tiny_lm_dir: Path
) -> None:
    base = str(tiny_lm_dir)
    make_adapter(tmp_path / "a", tiny_lm_dir, "fa", seed=1, targets=("q_proj",))
    make_adapter(tmp_path / "b", tiny_lm_dir, "fb", seed=2, targets=("v_proj",))
    sbora.Adapter.load(tmp_path / "b").to_peft(tmp_path / "peft")
    data = tmp_path / "d.jsonl"
    data.write_text('{"prompt": "1+1=", "answer": "2"}\n')
    db = ["--db", str(tmp_path / "reg.db")]
    commands = [
        [*db, "add", str(tmp_path / "a"), "--name", "a", "--base", base],
        [*db, "add", str(tmp_path / "peft"), "--name", "p", "--base", base],
        [*db, "list", "--json"],
        [*db, "show", "a@1", "--json"],
        [*db, "overlap", "a", "p", "--json"],
        [*db, "compose", "a", "p", "--base", base, "--out", str(tmp_path / "out")],
        [*db, "audit", str(tmp_path / "out"), "--base", base, "--json"],
        [*db, "train", "--base", base, "--data", str(data), "--out", str(tmp_path / "t")]
        + ["--steps", "1", "--json"],
    ]
    done = subprocess.run(
        [sys.executable, "-c", RUN_EACH, json.dumps(commands)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr
    seen = json.loads(done.stdout.strip().splitlines()[-1])
    assert [code for _, code, _ in seen] == [0] * len(commands), seen
    assert [verb for verb, _, imported in seen if imported] == []
    assert "gemm_4bit" not in done.stderr


READ_ONLY = """
import json, sys
from sbora_reg.cli import main
try:
    main(json.loads(sys.argv[1]), prog_name="sbora-reg", standalone_mode=False)
except SystemExit as exc:
    assert not exc.code, exc.code
heavy = ("torch", "transformers", "safetensors", "bitsandbytes", "peft", "alembic")
print(json.dumps(sorted(m for m in heavy if m in sys.modules)))
"""


def _heavy_imports(label: str, args: list[str], env: dict[str, str] | None = None) -> list[str]:
    """The heavy modules (``READ_ONLY``'s list) a fresh interpreter imported running ``args``."""
    done = subprocess.run(
        [sys.executable, "-c", READ_ONLY, json.dumps(args)],
        capture_output=True,
        text=True,
        timeout=120,
        env=env,
    )
    assert done.returncode == 0, (label, done.stderr)
    return list(json.loads(done.stdout.strip().splitlines()[-1]))


def test_read_commands_import_neither_torch_nor_transformers(
    tmp_path: Path, tiny_lm_dir: Path
) -> None:
    from sbora_reg.registry import Registry

    make_adapter(tmp_path / "a", tiny_lm_dir, "fa", seed=1, targets=("q_proj",))
    make_adapter(tmp_path / "b", tiny_lm_dir, "fb", seed=2, targets=("v_proj",))
    db = str(tmp_path / "reg.db")
    with Registry.open(db) as registry:  # created and migrated here, not in the commands
        for name in ("a", "b"):
            registry.add(tmp_path / name, name=name, base=str(tiny_lm_dir))
    commands = {
        "--help": ["--help"],
        "list": ["--db", db, "list"],
        "list --json": ["--db", db, "list", "--json"],
        "show": ["--db", db, "show", "a@1"],
        "overlap": ["--db", db, "overlap", "a", "b"],
        "overlap --against-all": ["--db", db, "overlap", "--against-all", "a", "--json"],
        "db current": ["--db", db, "db", "current"],
    }
    for label, args in commands.items():
        assert _heavy_imports(label, args) == [], label


def test_compose_and_base_registration_never_import_transformers(
    tmp_path: Path, tiny_lm_dir: Path
) -> None:
    """The base's fingerprint comes from its safetensors headers: registering a base and
    composing onto it build no model, so transformers (seconds to import) stays out."""
    from sbora_reg.registry import Registry

    make_adapter(tmp_path / "a", tiny_lm_dir, "fa", seed=1, targets=("q_proj",))
    db = str(tmp_path / "reg.db")
    with Registry.open(db):  # created and migrated here, not in the commands
        pass
    base = str(tiny_lm_dir)
    commands = {
        "base add": ["--db", db, "base", "add", base],
        "add": ["--db", db, "add", str(tmp_path / "a"), "--name", "a", "--base", base],
        "compose": ["--db", db, "compose", "a", "--base", base, "--out", str(tmp_path / "o")],
    }
    env = {**os.environ, "SBORA_REG_CACHE": str(tmp_path / "cache")}  # nothing cached yet
    for label, args in commands.items():
        imported = _heavy_imports(label, args, env)
        assert "transformers" not in imported and "peft" not in imported, (label, imported)
    assert (tmp_path / "o" / "model.safetensors").is_file()
