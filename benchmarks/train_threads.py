"""Training steps with 1 and 2 intra-op threads, on an idle machine and beside a busy process.

The demo's training step: SmolLM2-135M (the PyPI base), SBoRA-FA r=16 on q,k,v,up,down, a batch
of 16 examples of the demo's ``add`` skill, AdamW. For each load (``idle``; ``busy``: one other
process spinning on a core, as a second job would) and each thread setting (1, 2 and ``auto``,
what ``sbora-reg train --threads auto`` picks at that moment), one block of steps runs; blocks
are interleaved over rounds so drift hits all alike. The first step of a block is a warm-up and
not counted; the report gives the median step time per (load, threads) and the ratio of each to
the best setting under that load.

    .venv/bin/python benchmarks/train_threads.py               # 3 rounds x 4 steps
    .venv/bin/python benchmarks/train_threads.py --rounds 1 --steps 3
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from sbora_reg import sbora
from sbora_reg.demo.base import prepare_base
from sbora_reg.demo.run import TARGETS
from sbora_reg.demo.skills import SKILLS
from sbora_reg.sbora.training import auto_threads, encode, load_model, run_steps

LOADS = ("idle", "busy")
SETTINGS = ("1", "2", "auto")


def spinner() -> subprocess.Popen[bytes]:
    """Another CPU-bound process: one core busy until it is killed."""
    return subprocess.Popen([sys.executable, "-c", "while True: pass"])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--steps", type=int, default=4, help="steps per block (first: warm-up)")
    parser.add_argument("--workdir", type=Path, default=Path(tempfile.gettempdir()))
    args = parser.parse_args()
    base = prepare_base(args.workdir / "sbora-reg-smollm2")
    model, tokenizer = load_model(base, torch.float32, torch.device("cpu"))
    config = sbora.SBoRAConfig(variant="fa", r=16, alpha=32, target_modules=TARGETS)
    sbora.inject(model, config)
    examples = SKILLS["add"].examples(16, seed=0)
    batch = encode(tokenizer, examples, torch.device("cpu"))
    times: dict[tuple[str, str], list[float]] = {(ld, s): [] for ld in LOADS for s in SETTINGS}
    picked: dict[str, list[int]] = {ld: [] for ld in LOADS}
    for r in range(args.rounds):
        for load in LOADS:
            busy = spinner() if load == "busy" else None
            try:
                time.sleep(0.5)  # let the spinner reach the run queue
                for setting in SETTINGS:
                    threads = auto_threads() if setting == "auto" else int(setting)
                    if setting == "auto":
                        picked[load].append(threads)
                    torch.set_num_threads(threads)
                    stamps = [time.perf_counter()]
                    run_steps(
                        model, [batch] * args.steps, steps=args.steps, lr=1e-4,
                        on_step=lambda *_, seen=stamps: seen.append(time.perf_counter()),
                    )  # fmt: skip
                    steps = [b - a for a, b in zip(stamps, stamps[1:], strict=False)][1:]
                    times[(load, setting)] += steps
                    print(f"round {r + 1} {load:4} threads={setting:4} ({threads}): "
                          + " ".join(f"{s:.2f}" for s in steps), flush=True)  # fmt: skip
            finally:
                if busy is not None:
                    busy.kill()
                    busy.wait()
    print(f"\nmedian step (s), SmolLM2-135M FA r=16, batch 16, {torch.__version__}")
    print("| load | 1 thread | 2 threads | auto (picked) | auto / best |")
    print("|---|---|---|---|---|")
    for load in LOADS:
        med = {s: statistics.median(times[(load, s)]) for s in SETTINGS}
        best = min(med["1"], med["2"])
        chose = ",".join(str(p) for p in sorted(set(picked[load])))
        print(f"| {load} | {med['1']:.2f} | {med['2']:.2f} | {med['auto']:.2f} ({chose}) | "
              f"{med['auto'] / best:.2f} |")  # fmt: skip


if __name__ == "__main__":
    main()
