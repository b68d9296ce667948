"""How much of each skill survives composition: exact match base / alone / composed, per seed.

    python benchmarks/interference.py [--skills add,sort,last,max,rev,upper] [--sizes 3,6]
        [--seeds 0,1] [--steps 150] [--eval 200] [--probe 256] [--calibrate none,lsq,tune]
        [--variant fa] [--out benchmarks/results/interference.md] [--workdir DIR]
        [--tune-balance B] [--tune-lr LR] [--tune-steps N]  (tune's constants, in the label)

The issue's setup through the project's own library calls: SmolLM2-135M-Instruct (from PyPI),
per skill ``allocate`` (r=16 on q,k,v,up,down, disjoint), ``train_and_register`` with a probe
set of ``--probe`` held-out prompts (batch 16, lr 2e-3). Then, for each size k (the first k
skills) and each compose-time method, ``compose`` (format ``adapter``: the same sum of deltas as
a merged checkpoint, without writing 0.5 GB per row) and exact match of every member on
``--eval`` further prompts that neither training nor the probe set saw. Trained adapters and
base/alone scores are kept in ``--workdir``, so a later run with another method reuses them.
Each finished (seed, size, method) appends its rows to ``--out``, so a long run can be
committed as it goes.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from sbora_reg.demo.skills import EVAL_SEED, PROBE_SEED, SKILLS, Example

TARGETS = ("q_proj", "k_proj", "v_proj", "up_proj", "down_proj")


def _jsonl(path: Path, rows: list[Example]) -> Path:
    path.write_text("".join(json.dumps({"prompt": p, "answer": a}) + "\n" for p, a in rows))
    return path


def _examples(skill: str, n: int, seed: int) -> list[Example]:
    return SKILLS[skill].examples(n, seed)  # the demo's skills (sbora_reg.demo.skills)


def train_skills(args: argparse.Namespace, seed: int, base: Path, work: Path) -> list[str]:
    """Allocate and train every skill of ``--skills`` once (reused when already registered)."""
    from sbora_reg.registry import Registry
    from sbora_reg.registry.allocate import allocate
    from sbora_reg.registry.jobs import train_and_register
    from sbora_reg.sbora.training import config_for_indices

    refs = []
    for i, skill in enumerate(args.skills.split(",")):
        name = f"{skill}-s{seed}"
        with Registry.open(work / "registry.db") as registry:
            done = [r for r in registry.list() if r.name == name]
            if done:  # trained by an earlier run: give it this run's probe set
                probe = _examples(skill, args.probe, PROBE_SEED)
                path = registry.probe_path(done[-1])
                if path is None or len(path.read_text().splitlines()) != len(probe):
                    registry.set_probe(done[-1].ref, _jsonl(work / f"{skill}.probe.jsonl", probe))
                refs.append(done[-1].ref)
                continue
        train = _jsonl(work / f"{skill}.train.jsonl", _examples(skill, args.steps * 16, seed))
        probe = _jsonl(work / f"{skill}.probe.jsonl", _examples(skill, args.probe, PROBE_SEED))
        indices = work / f"{skill}.indices.safetensors"
        with Registry.open(work / "registry.db") as registry:
            allocate(
                registry, str(base), variant=args.variant, rank=args.rank,
                targets=list(TARGETS), task=skill, seed=100 * seed + i, out=indices,
            )  # fmt: skip
        started = time.perf_counter()
        result, record = train_and_register(
            lambda: Registry.open(work / "registry.db"), name, base, train, work / skill,
            task=skill, probe=probe, config=config_for_indices(indices), indices=indices,
            steps=args.steps, batch_size=16, lr=args.lr, seed=seed,
        )  # fmt: skip
        assert record is not None
        refs.append(record.ref)
        took = time.perf_counter() - started
        print(f"seed {seed}: trained {skill} in {took:.0f} s, loss {result.losses[-1]:.3f}",
              flush=True)  # fmt: skip
    return refs


def alone_scores(base: Path, work: Path, refs: list[str], evals: dict[str, list]) -> dict:
    """Base and alone exact match of every member on its eval prompts (cached in ``work``)."""
    from sbora_reg.registry import Registry
    from sbora_reg.registry.members import load_members
    from sbora_reg.sbora import unload
    from sbora_reg.sbora.scoring import score
    from sbora_reg.sbora.training import load_model

    cache = work / "alone.json"
    scores = json.loads(cache.read_text()) if cache.exists() else {}
    missing = [r for r in refs if r not in scores]
    if missing:
        import torch

        model, tokenizer = load_model(base, torch.float32, torch.device("cpu"))
        with Registry.open(work / "registry.db") as registry:
            loaded = load_members(registry, missing)
        for record, member in loaded:
            before = score(model, tokenizer, evals[record.ref])
            alone = score(member.adapter.apply(model), tokenizer, evals[record.ref])
            model = unload(model)
            scores[record.ref] = {"base": before.__dict__, "alone": alone.__dict__}
        cache.write_text(json.dumps(scores, indent=2))
    return scores


def composed_rows(
    args: argparse.Namespace, base: Path, work: Path, refs: list[str], method: str,
    evals: dict[str, list], alone: dict,
) -> list[dict]:  # fmt: skip
    """Compose ``refs`` with ``method`` and score every member on its eval prompts."""
    from sbora_reg.registry import Registry
    from sbora_reg.registry.compose import compose
    from sbora_reg.registry.retention import composed_model
    from sbora_reg.sbora.scoring import score
    from sbora_reg.sbora.training import load_model

    out = work / f"composed-{len(refs)}-{method}"
    started = time.perf_counter()
    with Registry.open(work / "registry.db") as registry:
        compose(registry, refs, base, out, "adapter", force=True, calibrate=method,
                command="benchmarks/interference.py")  # fmt: skip
    took = time.perf_counter() - started
    model = composed_model(base, out, "adapter")
    _, tokenizer = load_model(base, __import__("torch").float32, __import__("torch").device("cpu"))
    rows = []
    for ref in refs:
        got = score(model, tokenizer, evals[ref])
        a = alone[ref]["alone"]["exact"]
        rows.append({
            "skill": ref.split("-s")[0], "base": alone[ref]["base"]["exact"], "alone": a,
            "composed": got.exact, "kept": got.exact / a if a else float("nan"),
            "prompts": got.n, "compose_s": took,
        })  # fmt: skip
    return rows


HEADER = (
    "| seed | skills | method | skill | base | alone | composed | kept | prompts |\n"
    "|---|---|---|---|---|---|---|---|---|\n"
)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--skills", default="add,sort,last,max,rev,upper")
    parser.add_argument("--sizes", default="3,6", help="compose the first k skills, per k")
    parser.add_argument("--seeds", default="0,1")
    parser.add_argument("--steps", type=int, default=150)
    parser.add_argument("--eval", type=int, default=200)
    parser.add_argument("--probe", type=int, default=256)
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--variant", default="fa", choices=["fa", "fb"])
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--calibrate", default="none,lsq,tune", help="compose-time methods")
    parser.add_argument("--workdir", default="/tmp/sbora-interference")
    parser.add_argument("--out", default="benchmarks/results/interference.md")
    parser.add_argument("--train-only", action="store_true")
    parser.add_argument(
        "--tune-balance", type=float, default=None,
        help="tune's member sampling exponent (sbora.calibrate.TUNE_BALANCE); labels the rows",
    )  # fmt: skip
    parser.add_argument("--tune-lr", type=float, default=None, help="sbora.calibrate.TUNE_LR")
    parser.add_argument(
        "--tune-steps", type=int, default=None, help="sbora.calibrate.TUNE_STEPS_PER_MEMBER"
    )
    args = parser.parse_args()
    from sbora_reg.sbora import calibrate

    tuned = []  # what differs from tune's defaults, for the rows' label
    for value, constant, what in (
        (args.tune_balance, "TUNE_BALANCE", "balance"),
        (args.tune_lr, "TUNE_LR", "lr"),
        (args.tune_steps, "TUNE_STEPS_PER_MEMBER", "steps/member"),
    ):
        if value is not None:
            setattr(calibrate, constant, value)
            tuned.append(f"{what} {value:g}")

    from sbora_reg.demo.base import prepare_base

    base = prepare_base(Path(args.workdir) / "base")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    if not out.exists():
        out.write_text(
            "# Composition retention (benchmarks/interference.py)\n\n"
            f"Setup: SmolLM2-135M-Instruct, r={args.rank} on {','.join(TARGETS)}, disjoint "
            f"allocation, {args.steps} steps of 16, lr {args.lr}; probe sets of {args.probe} "
            "prompts (compose-time calibration reads the even rows); scored on "
            f"{args.eval} other held-out prompts per skill. Exact match; `kept` = composed / "
            "alone. Methods: `none` the plain sum of deltas; `lsq` / `tune` see "
            "`sbora-reg compose --help`.\n\n" + HEADER
        )
    for seed in (int(s) for s in args.seeds.split(",")):
        work = Path(args.workdir) / f"{args.variant}-seed{seed}"
        work.mkdir(parents=True, exist_ok=True)
        refs = train_skills(args, seed, base, work)
        if args.train_only:
            continue
        evals = {
            ref: _examples(ref.split("-s")[0], args.eval, EVAL_SEED) for ref in refs
        }  # fmt: skip
        alone = alone_scores(base, work, refs, evals)
        for k in (int(s) for s in args.sizes.split(",")):
            for method in args.calibrate.split(","):
                rows = composed_rows(args, base, work, refs[:k], method, evals, alone)
                label = method if args.variant == "fa" else f"{method} (FB)"
                if method == "tune" and tuned:
                    label += f" ({', '.join(tuned)})"
                text = "".join(
                    f"| {seed} | {k} | {label} | {r['skill']} | {r['base']:.2f} | "
                    f"{r['alone']:.2f} | {r['composed']:.2f} | {r['kept']:.3f} | "
                    f"{r['prompts']} |\n"
                    for r in rows
                )
                with out.open("a") as fh:
                    fh.write(text)
                print(text, f"(compose {rows[0]['compose_s']:.1f} s)", flush=True)


if __name__ == "__main__":
    main()
