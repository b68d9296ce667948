"""Benchmark `compose` (merged format) against a plain copy of the same checkpoint files.

A synthetic Llama-shaped bf16 safetensors checkpoint (default ~1.5 GB, in several shards) gets 4
members: two SBoRA-FA (r=32 on q/k/v/o, disjoint columns) and two SBoRA-FB (r=32 on
gate/up/down, disjoint rows). Each round runs, in a fresh subprocess each, ``shutil.copytree`` of
the base directory and ``compose_members`` onto it, and measures inside the child the wall time
of the operation alone and its peak RSS above the child's RSS just before it starts (the kernel's
high-water mark, reset through /proc/self/clear_refs so imports and set-up do not count; where that
is unavailable, ``resource.getrusage(RUSAGE_SELF).ru_maxrss``). compose fsyncs every shard it
writes and copytree does not, so a copy followed by an fsync of each file is timed too.
Goals (issue 6): time <= 1.5x the copy; peak RSS <= 3x the largest tensor plus the adapters,
never the whole model.

    .venv/bin/python benchmarks/compose.py              # ~1.5 GB
    .venv/bin/python benchmarks/compose.py --size 0.2   # quick
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from safetensors.torch import save_file
from transformers import LlamaConfig

from sbora_reg.registry.checkpoint import INDEX_NAME, OutSpec, plan_shards, shard_names
from sbora_reg.sbora import Adapter, AdapterModule, SBoRAConfig
from sbora_reg.sbora.fingerprint import dir_fingerprint, dir_module_table

RANK = 32
OPS = ("copy", "copy+fsync", "compose")
FA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj")
FB_TARGETS = ("gate_proj", "up_proj", "down_proj")


def _status(key: str) -> int:
    """A byte count from /proc/self/status (VmRSS: now, VmHWM: peak since the last reset)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1]) * 1024
    return 0


def _reset_peak() -> bool:
    """Reset the kernel's peak-RSS mark so it measures the operation alone (Linux >= 4.0)."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def make_base(folder: Path, size_gb: float) -> tuple[int, int]:
    """Write a bf16 Llama-shaped checkpoint of ``size_gb``; returns (bytes, largest tensor)."""
    hidden = 2048 if size_gb >= 1 else 1024
    inter, vocab = int(hidden * 2.75), 32000
    per_layer = 4 * hidden * hidden + 3 * hidden * inter
    layers = max(1, round((size_gb * 1e9 / 2 - 2 * vocab * hidden) / per_layer))
    config = LlamaConfig(
        hidden_size=hidden, intermediate_size=inter, num_hidden_layers=layers,
        num_attention_heads=hidden // 128, num_key_value_heads=hidden // 128,
        vocab_size=vocab, tie_word_embeddings=False, dtype="bfloat16",
    )  # fmt: skip
    folder.mkdir(parents=True)
    config.save_pretrained(folder)
    shapes = {"model.embed_tokens.weight": (vocab, hidden)}
    for i in range(layers):
        p = f"model.layers.{i}."
        for t in FA_TARGETS:
            shapes[f"{p}self_attn.{t}.weight"] = (hidden, hidden)
        shapes[f"{p}mlp.gate_proj.weight"] = shapes[f"{p}mlp.up_proj.weight"] = (inter, hidden)
        shapes[f"{p}mlp.down_proj.weight"] = (hidden, inter)
        shapes[f"{p}input_layernorm.weight"] = (hidden,)
        shapes[f"{p}post_attention_layernorm.weight"] = (hidden,)
    shapes["model.norm.weight"] = (hidden,)
    shapes["lm_head.weight"] = (vocab, hidden)
    specs = [OutSpec(n, "BF16", s) for n, s in shapes.items()]
    total = sum(s.nbytes for s in specs)
    plan = plan_shards(specs, max(total // 5 + 1, max(s.nbytes for s in specs)))
    names = shard_names(len(plan))
    g = torch.Generator().manual_seed(0)
    for file, shard in zip(names, plan, strict=True):
        tensors = {s.name: torch.randn(s.shape, generator=g).bfloat16() for s in shard}
        save_file(tensors, folder / file, metadata={"format": "pt"})
    weight_map = {s.name: f for f, shard in zip(names, plan, strict=True) for s in shard}
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (folder / INDEX_NAME).write_text(json.dumps(index))
    return total, max(s.nbytes for s in specs)


def make_members(base: Path) -> list:  # type: ignore[type-arg]
    """Four disjoint members: FA on attention columns, FB on MLP rows."""
    from sbora_reg.registry.compose import Member

    table, fingerprint = dir_module_table(base), dir_fingerprint(base)
    g = torch.Generator().manual_seed(1)
    members = []
    for k, (variant, targets) in enumerate(
        [("fa", FA_TARGETS), ("fa", FA_TARGETS), ("fb", FB_TARGETS), ("fb", FB_TARGETS)]
    ):
        modules = {}
        for name, (kind, (out, inp)) in table.items():
            if not name.endswith(targets):
                continue
            idx = torch.arange(k % 2 * RANK, (k % 2 + 1) * RANK)  # member pairs are disjoint
            a = torch.randn(RANK, inp, generator=g) if variant == "fb" else None
            b = torch.randn(out, RANK, generator=g) if variant == "fa" else None
            modules[name] = AdapterModule(name, variant, kind, (out, inp), 2.0, idx, a, b)
        config = SBoRAConfig(variant=variant, r=RANK, alpha=2.0 * RANK, target_modules=targets)
        members.append(Member(f"task{k}", 1, None, Adapter(config, modules, fingerprint)))
    return members


def child(op: str, base: Path, out: Path) -> None:
    """Run one operation in this process and print its wall time and RSS as JSON."""
    from sbora_reg.registry.compose import compose_members

    members = make_members(base) if op == "compose" else []
    adapters = sum(
        t.numel() * t.element_size()
        for m in members
        for mod in m.adapter.modules.values()
        for t in (mod.a, mod.b, mod.indices)
        if t is not None
    )
    reset = _reset_peak()
    rss0 = _status("VmRSS")
    t0 = time.perf_counter()
    if op.startswith("copy"):
        shutil.copytree(base, out)
        for path in out.iterdir() if op == "copy+fsync" else ():
            with open(path, "rb") as f:
                os.fsync(f.fileno())
    else:
        compose_members(members, base, out, command="benchmarks/compose.py")
    wall = time.perf_counter() - t0
    peak = _status("VmHWM") if reset else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    print(json.dumps({"wall": wall, "rss0": rss0, "peak": peak, "adapters": adapters}))


def run_child(op: str, base: Path, out: Path) -> dict:  # type: ignore[type-arg]
    shutil.rmtree(out, ignore_errors=True)
    cmd = [sys.executable, __file__, "--child", op, "--base", str(base), "--out", str(out)]
    done = subprocess.run(cmd, check=True, capture_output=True, text=True)
    result = json.loads(done.stdout.strip().splitlines()[-1])
    shutil.rmtree(out, ignore_errors=True)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=float, default=1.5, help="checkpoint size in GB")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--workdir", type=Path, default=None)
    parser.add_argument("--child", choices=OPS, help=argparse.SUPPRESS)
    parser.add_argument("--base", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--out", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(args.child, args.base, args.out)
        return
    work = Path(tempfile.mkdtemp(prefix="sbora-compose-bench-", dir=args.workdir))
    try:
        base = work / "base"
        total, largest = make_base(base, args.size)
        shards = len(list(base.glob("*.safetensors")))
        print(f"checkpoint {total / 1e9:.2f} GB in {shards} shards, largest tensor "
              f"{largest / 1e6:.0f} MB; 4 members (2 FA, 2 FB), r={RANK}")  # fmt: skip
        walls: dict[str, list[float]] = {op: [] for op in OPS}
        rss: list[dict] = []  # type: ignore[type-arg]
        for r in range(args.rounds):  # interleaved, page cache warm after the first read
            for op in OPS:
                res = run_child(op, base, work / "out")
                walls[op].append(res["wall"])
                if op == "compose":
                    rss.append(res)
            print(f"round {r + 1}: " + ", ".join(f"{op} {walls[op][-1]:.2f} s" for op in OPS))
        copy, comp = statistics.median(walls["copy"]), statistics.median(walls["compose"])
        synced = statistics.median(walls["copy+fsync"])
        peak = max(x["peak"] - x["rss0"] for x in rss)
        adapters = rss[0]["adapters"]
        print(f"median: copytree {copy:.2f} s, copytree+fsync {synced:.2f} s, compose "
              f"{comp:.2f} s; ratio {comp / copy:.2f}x the copy (goal <= 1.5x), "
              f"{comp / synced:.2f}x the synced copy")  # fmt: skip
        print(f"peak RSS above the child's start: {peak / 1e6:.0f} MB = "
              f"{peak / largest:.2f}x the largest tensor ({largest / 1e6:.0f} MB); adapters "
              f"{adapters / 1e6:.1f} MB; goal <= {(3 * largest + adapters) / 1e6:.0f} MB; "
              f"model {total / 1e6:.0f} MB")  # fmt: skip
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
