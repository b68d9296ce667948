"""Allocation: disjoint from adapters and reservations, exhaustion, concurrency across processes."""

from __future__ import annotations

import multiprocessing as mp
from pathlib import Path

import numpy as np
import pytest
import torch
from tests import tiny

from sbora_reg import sbora
from sbora_reg.errors import AllocationError, NoMatchingModulesError, NotFoundError
from sbora_reg.registry import models as m
from sbora_reg.registry.allocate import allocate, release
from sbora_reg.registry.queries import consume_matching_reservation
from sbora_reg.registry.store import Registry

HIDDEN, LAYERS = 64, 2


@pytest.fixture(scope="module")
def base_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("base")
    tiny.llama(
        "l64-96", hidden_size=HIDDEN, num_hidden_layers=LAYERS, vocab_size=50
    ).save_pretrained(path)
    return path


@pytest.fixture
def registry(db_url: str, tmp_path: Path, base_dir: Path) -> Registry:
    """A registry with the tiny base, on SQLite and (when configured) PostgreSQL."""
    reg = Registry.open(db_url, data_dir=tmp_path / "data")
    reg.add_base(base_dir)
    yield reg
    reg.close()


def test_allocation_is_disjoint_seeded_and_written(
    registry: Registry, base_dir: Path, tmp_path: Path
) -> None:
    first = allocate(
        registry,
        str(base_dir),
        variant="fa",
        rank=20,
        targets=["q_proj", "v_proj"],
        task="t1",
        seed=1,
        out=tmp_path / "a.safetensors",
    )
    second = allocate(registry, str(base_dir), variant="fa", rank=20, targets=["q_proj"], seed=1)
    assert sorted(first.indices) == [
        f"model.layers.{i}.self_attn.{p}" for i in range(LAYERS) for p in ("q_proj", "v_proj")
    ]
    for name, idx in second.indices.items():
        assert idx.size == 20 and np.intersect1d(idx, first.indices[name]).size == 0
    # The file is what sbora.inject accepts, with the documented metadata.
    loaded, meta = sbora.read_indices_file(first.path)
    assert meta["variant"] == "fa" and meta["reservation"] == str(first.reservation_id)
    assert meta["base_fingerprint"] == registry.get_base(str(base_dir)).fingerprint
    for name, idx in first.indices.items():
        np.testing.assert_array_equal(loaded[name].numpy(), idx)
    # Same seed on a fresh registry gives the same draw; the seed matters.
    other = Registry.open(tmp_path / "other.db")
    other.add_base(base_dir)
    again = allocate(
        other, str(base_dir), variant="fa", rank=20, targets=["q_proj", "v_proj"], seed=1
    )
    other.close()
    third = Registry.open(tmp_path / "third.db")
    third.add_base(base_dir)
    differ = allocate(third, str(base_dir), variant="fa", rank=20, targets=["q_proj"], seed=2)
    third.close()
    for name in first.indices:
        np.testing.assert_array_equal(again.indices[name], first.indices[name])
    assert any(differ.indices[n].tolist() != first.indices[n].tolist() for n in differ.indices)


def test_inject_accepts_the_indices_file(
    registry: Registry, base_dir: Path, tmp_path: Path
) -> None:
    from transformers import AutoConfig, AutoModelForCausalLM

    alloc = allocate(
        registry,
        str(base_dir),
        variant="fb",
        rank=8,
        targets=["v_proj"],
        seed=0,
        out=tmp_path / "idx.safetensors",
    )
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(base_dir))
    config = sbora.SBoRAConfig(variant="fb", r=8, alpha=16, target_modules=("v_proj",))
    sbora.inject(model, config, indices=str(alloc.path))
    adapter = sbora.extract(model)
    for name, idx in alloc.indices.items():
        np.testing.assert_array_equal(adapter.indices[name].numpy(), idx)


def test_exhaustion_says_how_many_are_free(registry: Registry, base_dir: Path) -> None:
    # v_proj: (out, in) = (32, 64) with 2 KV heads of 16: FB rows run out first.
    allocate(registry, str(base_dir), variant="fb", rank=30, targets=["v_proj"], seed=0)
    with pytest.raises(AllocationError, match=r"only 2 free rows of 32"):
        allocate(registry, str(base_dir), variant="fb", rank=3, targets=["v_proj"], seed=0)
    last = allocate(registry, str(base_dir), variant="fb", rank=2, targets=["v_proj"], seed=0)
    assert all(idx.size == 2 for idx in last.indices.values())
    # A refused allocation records nothing; a released one frees its indices.
    release(registry, last.reservation_id)
    allocate(registry, str(base_dir), variant="fb", rank=2, targets=["v_proj"], seed=5)
    with pytest.raises(NotFoundError):
        release(registry, 10_000)


def test_refuses_other_variant_unless_allowed(registry: Registry, base_dir: Path) -> None:
    allocate(registry, str(base_dir), variant="fb", rank=4, targets=["q_proj"], seed=0)
    with pytest.raises(AllocationError, match="allow-cross-variant"):
        allocate(registry, str(base_dir), variant="fa", rank=4, targets=["q_proj"], seed=0)
    done = allocate(
        registry,
        str(base_dir),
        variant="fa",
        rank=4,
        targets=["q_proj"],
        seed=0,
        allow_cross_variant=True,
    )
    assert len(done.warnings) == LAYERS and "reservation" in done.warnings[0]


def test_no_matching_targets(registry: Registry, base_dir: Path) -> None:
    with pytest.raises(NoMatchingModulesError):
        allocate(registry, str(base_dir), variant="fa", rank=4, targets=["c_attn"])


def _save_adapter(
    base_dir: Path,
    out: Path,
    variant: str,
    r: int,
    targets: tuple[str, ...],
    indices: dict | str | None,
    seed: int = 0,
) -> Path:
    from transformers import AutoConfig, AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(base_dir))
    config = sbora.SBoRAConfig(variant=variant, r=r, alpha=2 * r, target_modules=targets, seed=seed)
    sbora.inject(model, config, indices=indices)
    adapter = sbora.extract(model)
    adapter.save(out)
    return out


def test_registered_adapters_are_avoided_and_consume_reservations(
    registry: Registry, base_dir: Path, tmp_path: Path
) -> None:
    plain = _save_adapter(base_dir, tmp_path / "plain", "fa", 16, ("q_proj",), None, seed=3)
    rec = registry.add(plain, name="plain", base=str(base_dir))
    used = registry.regions(rec)
    alloc = allocate(
        registry,
        str(base_dir),
        variant="fa",
        rank=40,
        targets=["q_proj"],
        seed=0,
        out=tmp_path / "r.safetensors",
    )
    for name, idx in alloc.indices.items():
        assert np.intersect1d(idx, used[name].indices).size == 0
    # Exactly 64 - 16 - 40 = 8 columns are left on each q_proj.
    with pytest.raises(AllocationError, match="only 8 free columns"):
        allocate(registry, str(base_dir), variant="fa", rank=9, targets=["q_proj"])
    trained = _save_adapter(base_dir, tmp_path / "trained", "fa", 40, ("q_proj",), str(alloc.path))
    registry.add(trained, name="trained", task="t", base=str(base_dir))
    with registry.read() as session:
        res = session.get(m.Reservation, alloc.reservation_id)
        assert res is not None and res.consumed_by_adapter_id is not None
    # Consumed: the adapter itself now holds those columns, still not free.
    with pytest.raises(AllocationError, match="only 8 free columns"):
        allocate(registry, str(base_dir), variant="fa", rank=9, targets=["q_proj"])


def test_consume_requires_exact_match(registry: Registry, base_dir: Path) -> None:
    alloc = allocate(registry, str(base_dir), variant="fa", rank=4, targets=["q_proj"], seed=0)
    base = registry.get_base(str(base_dir))
    rows = [(base.modules[n].id, "fa", idx) for n, idx in alloc.indices.items()]
    wrong = [(mid, "fa", idx + 1 if i == 0 else idx) for i, (mid, _, idx) in enumerate(rows)]
    with registry.write() as session:
        assert consume_matching_reservation(session, base.id, 999, wrong) is None
        assert consume_matching_reservation(session, base.id, 999, rows[:1]) is None
        assert (
            consume_matching_reservation(
                session, base.id, 999, [(mid, "fb", idx) for mid, _, idx in rows]
            )
            is None
        )
    # (Matching is only checked here; the adapter id would be a real adapter in production.)


def _worker(db: str, data: str, base: str, seed: int, queue: mp.Queue, start: object) -> None:
    reg = Registry.open(db, data_dir=data)
    try:
        start.wait(timeout=60)  # type: ignore[attr-defined]  # all allocate at the same moment
        got = []
        for k in range(3):
            a = allocate(
                reg, base, variant="fa", rank=3, targets=["q_proj", "k_proj"], seed=seed * 10 + k
            )
            got.append({n: i.tolist() for n, i in a.indices.items()})
        queue.put(got)
    except Exception as exc:  # report to the parent instead of hanging it
        queue.put(repr(exc))
    finally:
        reg.close()


def test_concurrent_allocations_never_share_an_index(
    registry: Registry, db_url: str, base_dir: Path, tmp_path: Path
) -> None:
    db, data = db_url, str(tmp_path / "data")
    # fork: the children reuse the imported modules (spawn would import torch four times).
    ctx = mp.get_context("fork")
    queue, start = ctx.Queue(), ctx.Barrier(4)
    procs = [
        ctx.Process(target=_worker, args=(db, data, str(base_dir), s, queue, start))
        for s in range(4)
    ]
    for p in procs:
        p.start()
    results = [queue.get(timeout=120) for _ in procs]
    for p in procs:
        p.join(timeout=60)
    assert all(isinstance(r, list) for r in results), results
    seen: dict[str, list[int]] = {}
    for per_proc in results:
        for alloc in per_proc:
            for name, idx in alloc.items():
                seen.setdefault(name, []).extend(idx)
    # 4 processes x 3 allocations x rank 3 = 36 columns per module, all distinct.
    assert len(seen) == 2 * LAYERS
    for idx in seen.values():
        assert len(idx) == 36 and len(set(idx)) == 36


def test_gpt2_conv1d_allocation_feeds_inject(tmp_path: Path) -> None:
    """Conv1D layers are allocated in the (out, in) frame that inject and the registry use."""
    from transformers import GPT2LMHeadModel

    config = tiny.gpt2("g16", n_layer=2, vocab_size=30)
    config.save_pretrained(tmp_path / "gpt2")
    with Registry.open(tmp_path / "reg.db") as reg:
        reg.add_base(tmp_path / "gpt2")
        fa = allocate(
            reg,
            str(tmp_path / "gpt2"),
            variant="fa",
            rank=16,
            targets=["c_attn"],
            seed=0,
            out=tmp_path / "fa.safetensors",
        )
        # c_attn is (out, in) = (48, 16): FA takes all 16 input columns, none are left.
        with pytest.raises(AllocationError, match="only 0 free columns of 16"):
            allocate(reg, str(tmp_path / "gpt2"), variant="fa", rank=1, targets=["c_attn"])
    model = GPT2LMHeadModel(config)
    sbora.inject(
        model,
        sbora.SBoRAConfig(variant="fa", r=16, alpha=16, target_modules=("c_attn",)),
        indices=str(fa.path),
    )
    for name, idx in sbora.extract(model).indices.items():
        np.testing.assert_array_equal(idx.numpy(), fa.indices[name])
