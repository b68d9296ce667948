"""Overlap at scale: one adapter vs 10,000 and all pairs among 1,000 (32 layers x 7 modules, r=32).

Synthetic regions on a LLaMA-7B-shaped base (q/k/v/o 4096x4096, gate/up 11008x4096, down
4096x11008), half the adapters FA and half FB. Goals (issue 5): one vs 10,000 in <= 1 s, all
pairs among 1,000 in <= 10 s. Each timing is printed as a ratio to its goal and against the
per-pair reference (``overlap.compare``, one pair x module at a time) measured in this process on
a sample, and the vectorised answers are checked against that reference on the sample.
``--registry-n N`` also registers N adapters in a temporary SQLite registry and times the same
query through its bulk loader (``Registry.region_table``).

    .venv/bin/python benchmarks/overlap_scale.py
    .venv/bin/python benchmarks/overlap_scale.py --many 2000 --pairs 300 --registry-n 0  # quick
"""

from __future__ import annotations

import argparse
import hashlib
import tempfile
import time
from pathlib import Path

import numpy as np

from sbora_reg.registry.overlap import Footprint, Region, compare
from sbora_reg.registry.region_table import RegionTable, all_pairs, one_vs_many
from sbora_reg.sbora.cells import FA, FB

LAYERS, HIDDEN, INTER, RANK = 32, 4096, 11008, 32
KINDS = {
    "self_attn.q_proj": (HIDDEN, HIDDEN),
    "self_attn.k_proj": (HIDDEN, HIDDEN),
    "self_attn.v_proj": (HIDDEN, HIDDEN),
    "self_attn.o_proj": (HIDDEN, HIDDEN),
    "mlp.gate_proj": (INTER, HIDDEN),
    "mlp.up_proj": (INTER, HIDDEN),
    "mlp.down_proj": (HIDDEN, INTER),
}
MODULES = {f"model.layers.{i}.{k}": s for i in range(LAYERS) for k, s in KINDS.items()}
GOAL_ONE_VS_MANY_S, GOAL_ALL_PAIRS_S = 1.0, 10.0


def distinct_sorted(rng: np.random.Generator, dims: np.ndarray, r: int) -> np.ndarray:
    """(S, r) sorted distinct indices, row s drawn from range(dims[s]) (sorted draw + arange)."""
    raw = (rng.random((dims.size, r)) * (dims[:, None] - r + 1)).astype(np.int64)
    raw.sort(axis=1)
    return raw + np.arange(r)


def synthetic_table(n: int, seed: int) -> RegionTable:
    """``n`` adapters, each FA or FB on every module, packed directly (no per-region objects)."""
    rng = np.random.default_rng(seed)
    names = sorted(MODULES)
    out = np.array([MODULES[m][0] for m in names], dtype=np.int64)
    inn = np.array([MODULES[m][1] for m in names], dtype=np.int64)
    variant = np.where(np.arange(n) % 2 == 0, FA, FB).astype(np.int8)  # (n,)
    seg_adapter = np.repeat(np.arange(n), len(names))
    seg_module = np.tile(np.arange(len(names)), n)
    seg_variant = variant[seg_adapter]
    dims = np.where(seg_variant == FA, inn[seg_module], out[seg_module])
    flat = distinct_sorted(rng, dims, RANK).reshape(-1)
    return RegionTable.from_arrays(
        base="llama-7b-shaped",
        names=[f"task{i}@1" for i in range(n)],
        modules=names,
        out=out,
        inn=inn,
        seg_adapter=seg_adapter,
        seg_module=seg_module,
        seg_variant=seg_variant,
        indices=(flat, np.full(seg_adapter.size, RANK, dtype=np.int64)),
    )


def footprint_of(table: RegionTable, j: int) -> Footprint:
    """Adapter ``j`` of a table as a footprint of per-module regions (for the reference)."""
    segs = np.flatnonzero(table.seg_adapter == j)
    starts = np.concatenate(([0], np.cumsum(table.seg_count)[:-1]))
    regions = {}
    for s in segs.tolist():
        m = int(table.seg_module[s])
        code = int(table.seg_variant[s])
        offset = table.col_offset[m] if code == FA else table.row_offset[m]
        keys = table.keys[starts[s] : starts[s] + table.seg_count[s]]
        variant = "fa" if code == FA else "fb" if code == FB else "lora"
        regions[table.modules[m]] = Region(
            variant, (int(table.out[m]), int(table.inn[m])), keys - offset
        )
    return Footprint(table.names[j], table.base, regions)


def best_of(fn, repeat: int) -> tuple[float, object]:
    best, result = float("inf"), None
    for _ in range(repeat):
        start = time.perf_counter()
        result = fn()
        best = min(best, time.perf_counter() - start)
    return best, result


def reference_per_pair_s(fps: list[Footprint], pairs: int) -> float:
    """Seconds per pair of the one-pair-at-a-time reference (``compare``), on a sample."""
    start = time.perf_counter()
    done = 0
    for i in range(len(fps)):
        for j in range(i + 1, len(fps)):
            compare(fps[i], fps[j])
            done += 1
            if done == pairs:
                return (time.perf_counter() - start) / done
    return (time.perf_counter() - start) / max(done, 1)


def bench_one_vs_many(n: int) -> None:
    start = time.perf_counter()
    table = synthetic_table(n, seed=0)
    build = time.perf_counter() - start
    query = footprint_of(synthetic_table(1, seed=99), 0)
    query = Footprint("query", table.base, query.regions)
    secs, many = best_of(lambda: one_vs_many(query, table), repeat=3)
    sample = [footprint_of(table, j) for j in range(0, n, max(1, n // 20))]
    for fp in sample:
        assert many.totals[table.index_of(fp.name)] == compare(query, fp).total, fp.name
    ref = reference_per_pair_s([query, *sample], pairs=len(sample))
    print(
        f"one vs {n:,}: {secs:.3f} s (goal {GOAL_ONE_VS_MANY_S:.0f} s, ratio "
        f"{secs / GOAL_ONE_VS_MANY_S:.2f}); per-pair reference {ref * n:.1f} s extrapolated, "
        f"{ref * n / secs:.0f}x slower; pack {build:.1f} s once; "
        f"{int((many.totals > 0).sum()):,} overlap; checked {len(sample)} against reference"
    )


def bench_all_pairs(n: int) -> None:
    table = synthetic_table(n, seed=1)
    secs, matrix = best_of(lambda: all_pairs(table), repeat=1)
    fps = [footprint_of(table, j) for j in range(8)]
    for i in range(len(fps)):
        for j in range(i + 1, len(fps)):
            assert matrix[i, j] == compare(fps[i], fps[j]).total, (i, j)
    n_pairs = n * (n - 1) // 2
    ref = reference_per_pair_s(fps, pairs=28)
    print(
        f"all pairs among {n:,} ({n_pairs:,} pairs): {secs:.2f} s (goal {GOAL_ALL_PAIRS_S:.0f} s,"
        f" ratio {secs / GOAL_ALL_PAIRS_S:.2f}); per-pair reference {ref * n_pairs:.0f} s "
        f"extrapolated, {ref * n_pairs / secs:.0f}x slower; checked 28 pairs against reference"
    )


def bench_registry(n: int) -> None:
    from transformers import LlamaConfig

    from sbora_reg.registry.reading import AdapterSummary, ModuleSummary
    from sbora_reg.registry.store import Registry

    work = Path(tempfile.mkdtemp(prefix="sbora-overlap-bench-"))
    LlamaConfig(
        hidden_size=HIDDEN,
        intermediate_size=INTER,
        num_hidden_layers=LAYERS,
        num_attention_heads=32,
        vocab_size=32000,
    ).save_pretrained(work / "base")
    reg = Registry.open(work / "registry.db")
    base = reg.add_base(str(work / "base"))
    table = synthetic_table(n, seed=2)
    start = time.perf_counter()
    for j in range(n):
        fp = footprint_of(table, j)
        modules = {
            k: ModuleSummary(r.variant, "linear", r.shape, r.indices) for k, r in fp.regions.items()
        }
        variant = next(iter(modules.values())).variant
        summary = AdapterSummary(
            "sbora", variant, RANK, 2.0 * RANK, list(KINDS), None, None, {}, modules
        )
        sha = hashlib.sha256(f"adapter-{j}".encode()).hexdigest()
        reg.blobs.path(sha).mkdir(parents=True, exist_ok=True)  # stands in for staged files
        reg.register(summary, sha, 0, name=f"task{j}", base=base)
    fill = time.perf_counter() - start
    query = Footprint("query", base.fingerprint, footprint_of(synthetic_table(1, 99), 0).regions)
    load, packed = best_of(lambda: reg.region_table(base), repeat=1)
    secs, many = best_of(lambda: one_vs_many(query, packed), repeat=3)
    same_base = Footprint("query", table.base, query.regions)
    in_memory, _ = best_of(lambda: one_vs_many(same_base, table), repeat=3)
    reg.close()
    print(
        f"registry ({n:,} adapters registered in {fill:.0f} s): bulk load {load:.2f} s + "
        f"one vs all {secs:.3f} s; in-memory one vs all {in_memory:.3f} s (ratio "
        f"{secs / in_memory:.2f}); {int((many.totals > 0).sum()):,} overlap"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--many", type=int, default=10_000, help="adapters for one-vs-many")
    parser.add_argument("--pairs", type=int, default=1_000, help="adapters for all-pairs")
    parser.add_argument("--registry-n", type=int, default=1_000, help="0 skips the registry run")
    args = parser.parse_args()
    print(f"base: {LAYERS} layers x {len(KINDS)} modules, r={RANK}, half FA / half FB")
    bench_one_vs_many(args.many)
    bench_all_pairs(args.pairs)
    if args.registry_n:
        bench_registry(args.registry_n)


if __name__ == "__main__":
    main()
