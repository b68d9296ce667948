"""Compose-time calibration of registered members on their stored probe sets.

``sbora.calibrate`` holds the methods (``lsq``: the members' factors re-solved so that their sum
reproduces each member's own update on every member's inputs; ``tune``: ``lsq``, then a few
steps of distillation from each member alone). Here they take their data from the
registry, so a user types nothing extra: each member's probe set, read by the base model. The
probe rows at even positions calibrate; the odd ones stay unseen, and ``compose --measure`` of
a calibrated composition scores only those (``held_out``), so its figures are out of sample.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from sbora_reg.errors import ConfigError
from sbora_reg.registry.merge import Member

if TYPE_CHECKING:
    from sbora_reg.registry.records import AdapterRecord
    from sbora_reg.registry.store import Registry

AUTO = "auto"
DEFAULT = "tune"  # what auto applies: the best of benchmarks/interference.py (README table)


@dataclass(frozen=True)
class Calibration:
    """How a composition's members were calibrated (recorded in its manifest and card)."""

    method: str  # one of sbora.calibrate.METHODS
    reason: str = ""  # why ``auto`` chose ``none``
    probes: dict[str, str] = field(default_factory=dict)  # member ref -> probe sha256
    rows: dict[str, int] = field(default_factory=dict)  # member ref -> calibration rows

    @property
    def applied(self) -> bool:
        return self.method != "none"

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {"method": self.method}
        if self.reason:
            out["reason"] = self.reason
        if self.applied:
            out["data"] = "probe rows at even positions (odd rows are held out)"
            out["probes"], out["rows"] = dict(self.probes), dict(self.rows)
        return out


def calibration_rows(examples: Sequence[Any]) -> list[Any]:
    """The probe rows calibration reads (even positions)."""
    return list(examples[0::2])


def held_out(examples: Sequence[Any]) -> list[Any]:
    """The probe rows calibration never read (odd positions): where it is measured."""
    return list(examples[1::2])


def choose(
    registry: Registry,
    loaded: Sequence[tuple[AdapterRecord, Member]],
    method: str,
    allow_overlap: bool = False,
) -> Calibration:
    """Resolve ``method`` (``auto``: ``tune`` when two or more disjoint SBoRA members all have
    probe sets, else ``none`` with the reason); a named method must be possible."""
    from sbora_reg.sbora.calibrate import METHODS, region_columns

    records = [r for r, _ in loaded]

    if method not in (AUTO, *METHODS):
        raise ConfigError(
            f"unknown calibration {method!r}: use one of {', '.join((AUTO, *METHODS))}"
        )
    if method == "none":
        return Calibration("none")
    try:
        region_columns([m.adapter for _, m in loaded])
    except ConfigError as exc:  # plain LoRA members, or FA and FB in one module
        if method == AUTO:
            return Calibration("none", str(exc))
        raise
    if allow_overlap:
        if method == AUTO:
            return Calibration("none", "--allow-overlap: members share weights")
        raise ConfigError(
            f"--calibrate {method} solves each member on its own region: it cannot be combined "
            "with --allow-overlap"
        )
    if len(records) < 2:
        if method == AUTO:
            return Calibration("none", "one member: nothing to calibrate against")
        raise ConfigError("calibration needs two or more members")
    missing = [r.ref for r in records if registry.probe_path(r) is None]
    if missing:
        if method == AUTO:
            return Calibration("none", f"no probe set: {', '.join(missing)}")
        raise ConfigError(
            f"--calibrate {method} reads every member's probe set, and {', '.join(missing)} has "
            "none: add one with `sbora-reg add DIR --probe FILE.jsonl`, or pass --calibrate none"
        )
    return Calibration(
        DEFAULT if method == AUTO else method,
        probes={r.ref: str(r.probe_sha256) for r in records},
    )


def calibrate_members(
    registry: Registry,
    loaded: Sequence[tuple[AdapterRecord, Member]],
    base_dir: str | Path,
    chosen: Calibration,
    on_member: Callable[[str], None] | None = None,
) -> tuple[list[Member], Calibration]:
    """The members with calibrated factors (same names, versions, hashes and regions) and the
    calibration as applied; unchanged members when ``chosen`` is ``none``."""
    members = [m for _, m in loaded]
    if not chosen.applied:
        return members, chosen
    import torch

    from sbora_reg.sbora.calibrate import (
        calibrate,
        capture_moments,
        match,
        region_columns,
        tune,
    )
    from sbora_reg.sbora.training import load_examples, load_model

    sets = []
    for record, _ in loaded:
        probe = registry.probe_path(record)
        assert probe is not None  # choose() checked
        examples = load_examples(probe)
        if len(examples) < 2:
            raise ConfigError(
                f"{record.ref}'s probe set has one row: calibration needs at least two (it "
                "reads the even rows and leaves the odd ones for measurement)"
            )
        sets.append(calibration_rows(examples))
    adapters = [m.adapter for m in members]
    columns = region_columns(adapters)
    model, tokenizer = load_model(Path(base_dir), torch.float32, torch.device("cpu"))
    moments = []
    for (record, _), rows in zip(loaded, sets, strict=True):
        if on_member is not None:
            on_member(record.ref)
        moments.append(capture_moments(model, tokenizer, rows, columns))
    solved = calibrate(adapters, moments)
    if chosen.method == "match":
        solved = match(model, tokenizer, adapters, sets, start=solved)
    elif chosen.method == "tune":
        solved = tune(model, tokenizer, adapters, sets, start=solved)
    out = [Member(m.name, m.version, m.sha256, a) for m, a in zip(members, solved, strict=True)]
    rows_used = {record.ref: len(rows) for (record, _), rows in zip(loaded, sets, strict=True)}
    return out, Calibration(chosen.method, chosen.reason, chosen.probes, rows_used)
