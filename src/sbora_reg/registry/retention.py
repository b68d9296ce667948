"""How much of each member's skill survives a composition, measured on the member's own data.

Disjoint regions keep weights apart, not skills: every member still reads the activations the
others changed. For each member with evaluation examples we score the base model, the base with
that member alone (applied unmerged), and the composed model, all on the same examples, and
report the share of the member's loss improvement that the composed model keeps.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from sbora_reg.errors import ConfigError
from sbora_reg.sbora import Adapter, unload
from sbora_reg.sbora.scoring import SkillScore, loss_gain_kept, score
from sbora_reg.sbora.training import load_causal_lm, load_examples, load_model


@dataclass(frozen=True)
class RetentionRow:
    """One member's skill on the base, alone, and in the composition."""

    member: str
    base: SkillScore
    alone: SkillScore
    composed: SkillScore

    @property
    def exact_retention(self) -> float:
        """Composed exact match over alone exact match: the skill that survived (first figure).

        NaN when the member alone gets nothing right (there is no skill to keep).
        """
        return self.composed.exact / self.alone.exact if self.alone.exact > 0 else math.nan

    @property
    def retention(self) -> float:
        """Share of the answer-loss gain kept (a loss figure can hide a lost skill: see above)."""
        return loss_gain_kept(self.base, self.alone, self.composed)

    def to_json(self) -> dict[str, Any]:
        exact, kept = self.exact_retention, self.retention
        return {
            "member": self.member,
            "examples": self.base.n,
            "exact_retention": None if math.isnan(exact) else exact,
            "base": self.base.__dict__,
            "alone": self.alone.__dict__,
            "composed": self.composed.__dict__,
            "retention": None if math.isnan(kept) else kept,  # loss gain kept
        }


def composed_model(base_dir: Path, out: Path, fmt: str) -> nn.Module:
    """The composition as a model: the merged checkpoint, or the base with the composed adapter."""
    if fmt == "merged":
        return load_causal_lm(out)
    adapter = Adapter.load(out) if fmt == "adapter" else Adapter.from_peft(out)
    return adapter.apply(load_causal_lm(base_dir))


def measure_retention(
    base_dir: str | Path,
    composed: nn.Module,
    members: Sequence[tuple[str, Adapter, Sequence[Any]]],
    on_member: Callable[[str], None] | None = None,
) -> list[RetentionRow]:
    """Score ``(name, adapter, examples)`` members on the base, alone and in ``composed``."""
    base, tokenizer = load_model(Path(base_dir), torch.float32, torch.device("cpu"))
    rows = []
    for name, adapter, examples in members:
        if on_member is not None:
            on_member(name)
        before = score(base, tokenizer, examples)
        alone = score(adapter.apply(base), tokenizer, examples)
        base = unload(base)  # removes the wrappers; the base weights were never changed
        rows.append(RetentionRow(name, before, alone, score(composed, tokenizer, examples)))
    return rows


def eval_sets(
    registry: Any, loaded: Sequence[tuple[Any, Any]], evals: Mapping[str, str | Path]
) -> list[tuple[str, Adapter, list[Any]]]:
    """``(ref, adapter, examples)`` for ``{member ref: JSONL file}``, against loaded members.

    ``loaded`` are the composition's ``(record, member)`` pairs (``compose.load_members``); every
    key must name one of them (``name`` or ``name@version``). Data files are read here, before
    anything is composed, so that a bad file fails first.
    """
    if not evals:
        return []
    members = {record.ref: member for record, member in loaded}
    chosen: list[tuple[str, Adapter, list[Any]]] = []
    for key, path in evals.items():
        ref = registry.resolve(key).ref
        if ref not in members:
            raise ConfigError(
                f"--eval names {key}, which is not a member of this composition "
                f"({', '.join(members)})"
            )
        chosen.append((ref, members[ref].adapter, load_examples(path)))
    return chosen


@dataclass(frozen=True)
class EvalResult:
    """One adapter version scored on its probe set: base, alone, and a composition when given."""

    member: str
    base: SkillScore
    alone: SkillScore
    composed: SkillScore | None = None

    def to_json(self) -> dict[str, Any]:
        if self.composed is not None:
            return RetentionRow(self.member, self.base, self.alone, self.composed).to_json()
        return {
            "member": self.member,
            "examples": self.base.n,
            "base": self.base.__dict__,
            "alone": self.alone.__dict__,
        }


def checkpoint_format(path: str | Path) -> str:
    """``adapter``, ``peft`` or ``merged``: which kind of compose output ``path`` holds."""
    from sbora_reg.registry.reading import NATIVE_FILES, PEFT_FILES

    root = Path(path)
    if (root / NATIVE_FILES[0]).is_file():
        return "adapter"
    return "peft" if (root / PEFT_FILES[0]).is_file() else "merged"


def evaluate(registry: Any, ref: str, checkpoint: str | Path | None = None) -> EvalResult:
    """Score version ``ref`` on its stored probe set: on its base, alone, and in ``checkpoint``
    (a compose output: merged checkpoint, composed adapter or PEFT adapter) when given. In a
    checkpoint calibrated on that probe set, only the rows calibration did not read count."""
    from sbora_reg.registry.members import load_members

    ((record, member),) = load_members(registry, [ref])
    probe = registry.probe_path(record)
    if probe is None:
        raise ConfigError(
            f"{record.ref} has no probe set: add one with `sbora-reg add DIR --probe FILE.jsonl` "
            "(or `train --probe`)"
        )
    examples = load_examples(probe)
    if checkpoint is not None:
        from sbora_reg.registry.calibration import held_out
        from sbora_reg.registry.manifest import read_calibration

        calibration = read_calibration(checkpoint) or {}
        if calibration.get("method", "none") != "none" and record.ref in calibration.get(
            "probes", {}
        ):
            examples = held_out(examples)  # the calibration read the others
    if checkpoint is None:
        base, tokenizer = load_model(Path(record.base), torch.float32, torch.device("cpu"))
        before = score(base, tokenizer, examples)
        alone = score(member.adapter.apply(base), tokenizer, examples)
        return EvalResult(record.ref, before, alone)
    model = composed_model(Path(record.base), Path(checkpoint), checkpoint_format(checkpoint))
    (row,) = measure_retention(record.base, model, [(record.ref, member.adapter, examples)])
    return EvalResult(record.ref, row.base, row.alone, row.composed)
