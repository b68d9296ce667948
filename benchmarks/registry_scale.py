"""Registry at scale: N synthetic adapters on one 32-layer x 7-module base (dims 4096/11008, r=32).

Records go through the same store code path as ``sbora-reg add`` (``Registry.register``: regions
encoded, one write transaction per adapter) but skip staging and hashing adapter files, as the
issue allows. Prints time per add, ``list`` and ``show``, the bulk region load the overlap
check uses (``region_table``, against reading every region row) and ``overlap --against-all``
on it, and the database size relative to the raw int32 index data, each as a ratio to its goal
and ``list`` also against a plain sqlite3 fetch of the same rows measured in this process.

    .venv/bin/python benchmarks/registry_scale.py            # 10,000 adapters
    .venv/bin/python benchmarks/registry_scale.py --n 1000   # quicker
    .venv/bin/python benchmarks/registry_scale.py --workdir W --reuse  # re-measure W's registry
"""

from __future__ import annotations

import argparse
import hashlib
import sqlite3
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
from transformers import LlamaConfig

from sbora_reg.registry import Registry
from sbora_reg.registry.overlap_queries import overlap_against_all
from sbora_reg.registry.reading import AdapterSummary, ModuleSummary

LAYERS, HIDDEN, INTER, RANK = 32, 4096, 11008, 32
TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
GOALS_MS = {"add": 50.0, "list": 300.0, "against": 300.0}
GOAL_DB_RATIO = 1.5


def make_base(directory: Path) -> Path:
    LlamaConfig(
        hidden_size=HIDDEN,
        intermediate_size=INTER,
        num_hidden_layers=LAYERS,
        num_attention_heads=32,
        num_key_value_heads=32,
        vocab_size=32000,
    ).save_pretrained(directory)
    return directory


def synthetic(
    shapes: dict[str, tuple[int, int]], rng: np.random.Generator, variant: str = "fa"
) -> AdapterSummary:
    """One adapter on every target: RANK random columns (FA) or rows (FB) per module."""
    modules = {}
    for name, (out, inp) in shapes.items():
        dim = inp if variant == "fa" else out
        idx = np.sort(rng.choice(dim, size=RANK, replace=False)).astype(np.int64)
        modules[name] = ModuleSummary(variant, "linear", (out, inp), idx)
    return AdapterSummary(
        "sbora", variant, RANK, 2.0 * RANK, list(TARGETS), None, None, {}, modules
    )


def timed(fn, repeat: int = 5) -> tuple[float, float]:
    """Median wall and CPU time of ``fn`` in ms (CPU time is robust to a busy machine)."""
    wall, cpu = [], []
    for _ in range(repeat):
        start, start_cpu = time.perf_counter(), time.process_time()
        fn()
        wall.append((time.perf_counter() - start) * 1000)
        cpu.append((time.process_time() - start_cpu) * 1000)
    return statistics.median(wall), statistics.median(cpu)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=10_000, help="number of adapters (10,000)")
    parser.add_argument("--workdir", type=Path, default=None, help="keep the registry here")
    parser.add_argument(
        "--reuse",
        action="store_true",
        help="measure list/show/size on the registry already in --workdir (no adds)",
    )
    parser.add_argument(
        "--mixed", action="store_true", help="every other adapter SBoRA-FB (rows) instead of FA"
    )
    args = parser.parse_args()
    if args.reuse and args.workdir is None:
        parser.error("--reuse needs --workdir")
    work = args.workdir or Path(tempfile.mkdtemp(prefix="sbora-reg-bench-"))
    work.mkdir(parents=True, exist_ok=True)
    db_path = work / "registry.db"
    start = time.perf_counter()
    reg = Registry.open(db_path)  # an older registry is migrated here (0003 backfills footprints)
    open_ms = (time.perf_counter() - start) * 1000
    base_dir = work / "base" if args.reuse else make_base(work / "base")
    base = reg.add_base(str(base_dir))
    shapes = {
        n: m.shape
        for n, m in base.modules.items()
        if m.kind == "linear" and n.rsplit(".", 1)[-1] in TARGETS
    }
    assert len(shapes) == LAYERS * len(TARGETS), len(shapes)
    rng = np.random.default_rng(0)

    add_ms, add_cpu_ms = [float("nan")], [float("nan")]
    if args.reuse:
        args.n = len(reg.list())
    else:
        add_ms, add_cpu_ms = [], []
    for i in range(0 if args.reuse else args.n):
        summary = synthetic(shapes, rng, "fb" if args.mixed and i % 2 else "fa")
        sha = hashlib.sha256(f"adapter-{i}".encode()).hexdigest()
        reg.blobs.path(sha).mkdir(parents=True, exist_ok=True)  # stands in for staged files
        start, cpu = time.perf_counter(), time.process_time()
        reg.register(
            summary,
            sha,
            0,
            name=f"task{i % 500}",
            base=base,
            task=f"t{i % 20}",
            tags={"owner": f"team{i % 7}"},
        )
        add_ms.append((time.perf_counter() - start) * 1000)
        add_cpu_ms.append((time.process_time() - cpu) * 1000)
        if (i + 1) % 1000 == 0:
            print(f"  {i + 1} added, median {statistics.median(add_ms[-1000:]):.1f} ms", flush=True)

    list_ms, list_cpu = timed(reg.list)
    task_ms, task_cpu = timed(lambda: reg.list(task="t3"))
    show_ms, show_cpu = timed(lambda: reg.show("task7"))
    bulk_ms, bulk_cpu = timed(lambda: reg.region_table(base), repeat=3)
    # overlap --against-all: a scan of every footprint row (no index), the first query (scan,
    # then the index written), and the later ones (through the index)
    scan_ms, scan_cpu = timed(lambda: overlap_against_all(reg, "task7", 10**9), repeat=3)
    reg.index_path(base).unlink(missing_ok=True)
    cold_ms, cold_cpu = timed(lambda: overlap_against_all(reg, "task7"), repeat=1)
    index_mib = reg.index_path(base).stat().st_size / 2**20
    against_ms, against_cpu = timed(lambda: overlap_against_all(reg, "task7"), repeat=5)
    against = overlap_against_all(reg, "task7")
    assert against.totals == overlap_against_all(reg, "task7", 10**9).totals
    overlapping = len(against.found)
    reports_ms, _ = timed(lambda: overlap_against_all(reg, "task7").to_json(), repeat=3)
    # Reference: the same regions read as one row per (adapter, module), as before footprints.
    rows_ms, rows_cpu = timed(lambda: reg.regions_on_base(base), repeat=1)

    def raw_fetch() -> None:
        con = sqlite3.connect(db_path)
        con.execute("SELECT * FROM adapters JOIN bases ON bases.id = adapters.base_id").fetchall()
        con.execute("SELECT * FROM tags").fetchall()
        con.close()

    raw_ms, raw_cpu = timed(raw_fetch)
    reg.close()
    con = sqlite3.connect(db_path)
    con.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    con.close()
    db_bytes = db_path.stat().st_size
    raw_bytes = args.n * len(shapes) * RANK * 4

    add_med, add_p95 = statistics.median(add_ms), float(np.percentile(add_ms, 95))
    add_cpu = statistics.median(add_cpu_ms)
    goal_add, goal_list = GOALS_MS["add"], GOALS_MS["list"]
    print(f"adapters: {args.n} x {len(shapes)} modules, r={RANK}; registry {db_path}")
    print("                 wall ms   cpu ms   goal ms   wall/goal  cpu/goal")
    print(
        f"add (median)   {add_med:9.1f} {add_cpu:8.1f} {goal_add:9.0f} {add_med / goal_add:10.2f}"
        f" {add_cpu / goal_add:9.2f}   (p95 wall {add_p95:.1f} ms)"
    )
    print(
        f"list (all)     {list_ms:9.1f} {list_cpu:8.1f} {goal_list:9.0f} "
        f"{list_ms / goal_list:10.2f} {list_cpu / goal_list:9.2f}   "
        f"({list_ms / raw_ms:.1f}x a raw sqlite3 fetch of the same rows, {raw_ms:.1f} ms)"
    )
    print(f"list --task    {task_ms:9.1f} {task_cpu:8.1f}")
    print(f"show           {show_ms:9.1f} {show_cpu:8.1f}")
    goal_against = GOALS_MS["against"]
    print(
        f"region_table   {bulk_ms:9.1f} {bulk_cpu:8.1f}   (all {args.n * len(shapes)} regions; "
        f"{rows_ms / bulk_ms:.1f}x faster than reading them per region row, {rows_ms:.0f} ms "
        f"wall, {rows_cpu:.0f} ms cpu, which builds no table)"
    )
    print(
        f"against-all    {against_ms:9.1f} {against_cpu:8.1f} {goal_against:9.0f} "
        f"{against_ms / goal_against:10.2f} {against_cpu / goal_against:9.2f}   "
        f"(through the index, keys read from the database; {overlapping} overlapping)"
    )
    print(
        f"  first query  {cold_ms:9.1f} {cold_cpu:8.1f}   (no index yet: the scan, then the "
        f"index written, {index_mib:.0f} MiB)"
    )
    print(
        f"  scan         {scan_ms:9.1f} {scan_cpu:8.1f}   (every footprint row read and looked "
        f"up, no index: {scan_ms / against_ms:.1f}x the indexed query)"
    )
    print(
        f"  + reports    {reports_ms:9.1f}            (the same with every pair's per-module "
        "breakdown built, as --json prints it)"
    )
    print(f"open           {open_ms:9.1f}            (includes migrating an older schema)")
    print(
        f"db size {db_bytes / 2**20:.1f} MiB; raw int32 indices {raw_bytes / 2**20:.1f} MiB; "
        f"ratio {db_bytes / raw_bytes:.2f} (goal <= {GOAL_DB_RATIO})"
    )


if __name__ == "__main__":
    main()
