"""A small world to break: a tiny sharded base with weights, a SQLite registry holding two
disjoint adapters, and a fresh copy of it for every test."""

from __future__ import annotations

import shutil
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from tests import tiny
from tests.registry.registry_factory import make_adapter
from transformers import LlamaForCausalLM

from sbora_reg.registry import Registry


@dataclass(frozen=True)
class World:
    root: Path
    db: Path
    base: Path

    @property
    def blobs(self) -> Path:
        return Path(f"{self.db}.d") / "blobs"


def save_base(path: Path) -> Path:
    """A 2-layer hidden-32 Llama in several safetensors shards, with a tokenizer config."""
    torch.manual_seed(0)
    config = tiny.llama("l32", vocab_size=50, tie_word_embeddings=False)
    LlamaForCausalLM(config).save_pretrained(path, max_shard_size="20KB")
    (path / "tokenizer_config.json").write_text('{"model_max_length": 64}')
    return path


@pytest.fixture(scope="session")
def world_template(tmp_path_factory: pytest.TempPathFactory) -> World:
    root = tmp_path_factory.mktemp("fault-world")
    base = save_base(root / "base")
    db = root / "reg" / "registry.db"
    with Registry.open(db) as reg:
        reg.add_base(str(base))
        for name, target, seed in (("a", "q_proj", 1), ("b", "v_proj", 2)):
            make_adapter(root / "src" / name, base, "fa", r=2, seed=seed, targets=(target,))
            reg.add(root / "src" / name, name=name, base=str(base))
    return World(root, db, base)


@pytest.fixture
def world(world_template: World, tmp_path: Path) -> World:
    """A copy of the registry (database and blobs) for one test; the base is shared, read-only."""
    reg = tmp_path / "reg"
    shutil.copytree(world_template.db.parent, reg)
    shutil.copytree(world_template.root / "src", tmp_path / "src")
    return World(tmp_path, reg / "registry.db", world_template.base)


# PostgreSQL: a fresh database per test (skipped without a server, a failure under CI)
from tests.registry.conftest import pg_template, pg_url  # noqa: E402, F401
