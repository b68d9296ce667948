"""compose through the registry: members resolved and recorded; adapter and PEFT outputs."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from peft import PeftModel
from sqlalchemy import select
from test_compose import Q, V, assert_exact, make_adapter, save_llama
from transformers import AutoModelForCausalLM

from sbora_reg import __version__
from sbora_reg.errors import FingerprintMismatchError, NotFoundError, OverlapError
from sbora_reg.registry import Registry, models
from sbora_reg.registry.checkpoint import file_sha256, tree_sha256
from sbora_reg.registry.compose import Member, compose
from sbora_reg.sbora import Adapter

UP = "model.layers.{}.mlp.up_proj"
IDS = torch.randint(0, 100, (2, 10), generator=torch.Generator().manual_seed(0))


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> tuple[Registry, Path, dict[str, Adapter]]:
    root = tmp_path_factory.mktemp("world")
    base = save_llama(root / "base")
    registry = Registry.open(root / "reg.db")
    plans = {
        "alpha": {Q.format(0): ("fa", [0, 5, 9]), V.format(1): ("fb", [2, 3])},
        "beta": {Q.format(1): ("fa", [7]), V.format(0): ("fb", [1, 30]), UP.format(0): ("fa", [4])},
        "gamma": {Q.format(0): ("fa", [1, 2]), UP.format(1): ("fb", [100, 101])},
        "clash": {Q.format(0): ("fa", [5, 6])},
        "crossed": {Q.format(0): ("fb", [3])},
    }
    adapters = {}
    for i, (name, plan) in enumerate(plans.items()):
        adapters[name] = make_adapter(base, plan, i + 1)
        adapters[name].save(root / name)
        registry.add(root / name, name=name, base=str(base))
    return registry, base, adapters


def logits(model: torch.nn.Module) -> torch.Tensor:
    with torch.no_grad():
        return model(IDS).logits


def base_model(base: Path) -> torch.nn.Module:
    return AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)


def test_compose_records_and_matches_unmerged_members(world, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    registry, base, adapters = world
    out = tmp_path / "merged"
    result = compose(registry, ["alpha@1", "beta"], base, out, command="sbora-reg compose x")
    ms = [Member(n, 1, None, adapters[n]) for n in ("alpha", "beta")]
    assert_exact(out, base, ms)
    files = {p.name: file_sha256(p) for p in out.iterdir()}
    assert result.files == files and result.output_sha256 == tree_sha256(files)
    # Reference: the base with both members injected unmerged (they share no module here).
    union = Adapter(
        adapters["alpha"].config, {**adapters["alpha"].modules, **adapters["beta"].modules}
    )
    expected = logits(union.apply(base_model(base)))
    torch.testing.assert_close(logits(base_model(out)), expected, rtol=1e-5, atol=1e-5)
    with registry.read() as session:
        row = session.get_one(models.Composition, result.composition_id)
        assert (row.output_sha256, row.format, row.tool_version) == (
            result.output_sha256,
            "merged",
            __version__,
        )
        assert row.command == "sbora-reg compose x" and row.allow_overlap is False
        assert [(m.adapter_ref, m.adapter_sha256) for m in row.members] == [
            ("alpha@1", registry.resolve("alpha").sha256),
            ("beta@1", registry.resolve("beta").sha256),
        ]


@pytest.mark.parametrize("fmt", ["adapter", "peft"])
@pytest.mark.parametrize("refs", [("alpha", "beta", "gamma"), ("alpha", "clash", "crossed")])
def test_adapter_outputs_equal_merged(world, tmp_path: Path, fmt: str, refs) -> None:  # type: ignore[no-untyped-def]
    registry, base, _ = world
    overlap = "clash" in refs  # FA+FA sharing a column, FA+FB on one module
    compose(registry, refs, base, tmp_path / "m", allow_overlap=overlap, command="t")
    compose(registry, refs, base, tmp_path / fmt, fmt, allow_overlap=overlap, command="t")
    merged = logits(base_model(tmp_path / "m"))
    if fmt == "adapter":
        model = Adapter.load(tmp_path / fmt).apply(base_model(base))
    else:
        model = PeftModel.from_pretrained(base_model(base), tmp_path / fmt)
    torch.testing.assert_close(logits(model), merged, rtol=1e-5, atol=1e-5)
    assert logits(base_model(base)).sub(merged).abs().max() > 1e-3  # the members do something


def test_refusals_write_and_record_nothing(world, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    registry, base, _ = world
    out = tmp_path / "out"
    with registry.read() as session:
        before = len(session.scalars(select(models.Composition)).all())
    with pytest.raises(OverlapError, match="clash@1"):
        compose(registry, ["alpha", "clash"], base, out, command="t")
    with pytest.raises(NotFoundError):
        compose(registry, ["alpha", "nosuch"], base, out, command="t")
    other = save_llama(tmp_path / "wide", shard="5GB")
    (other / "config.json").write_text(
        (other / "config.json")
        .read_text()
        .replace('"num_hidden_layers": 2', '"num_hidden_layers": 3')
    )
    with pytest.raises(FingerprintMismatchError, match="another base model"):
        compose(registry, ["alpha"], other, out, command="t")
    result = compose(registry, ["alpha", "beta"], base, out, dry_run=True, command="t")
    assert result.dry_run and result.composition_id is None
    assert sorted(p.name for p in tmp_path.iterdir()) == ["wide"]
    with registry.read() as session:
        assert len(session.scalars(select(models.Composition)).all()) == before


def test_gc_removes_temp_folders_of_dead_composes_beside_recorded_outputs(world, tmp_path):
    """A compose killed mid-write leaves ``OUT.tmp-<pid>-*`` (and ``-old``) beside --out; gc
    removes those of processes that no longer run, and never a live writer's."""
    import os
    import subprocess

    registry, base, _ = world
    out = tmp_path / "composed"
    compose(registry, ["alpha", "beta"], base, out, "adapter", calibrate="none")
    dead = subprocess.Popen(["true"])
    dead.wait()  # its pid no longer runs
    left = [out.with_name(f"composed.tmp-{dead.pid}-abcd"), out.with_name(
        f"composed.tmp-{dead.pid}-abcd-old")]  # fmt: skip
    live = out.with_name(f"composed.tmp-{os.getpid()}-beef")
    for path in (*left, live):
        path.mkdir()
        (path / "model.safetensors").write_bytes(b"x" * 1000)
    result = registry.gc()
    assert result.temp_removed >= 2 and result.bytes_freed >= 2000
    assert not any(p.exists() for p in left)
    assert live.is_dir() and out.is_dir()  # a live writer's folder and the output stay
    live.joinpath("model.safetensors").unlink()
    live.rmdir()
