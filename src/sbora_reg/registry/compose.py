"""Compose task adapters into one model: a merged checkpoint, one multi-task adapter, or PEFT.

One function per output format (``compose_merged``, ``compose_adapter``, ``compose_peft``; the
merge itself is ``registry.merge``), each checking everything before it writes and writing its
output atomically with the manifest and model card of ``registry.manifest``. ``compose`` does it
for registered adapters and records the composition.
"""

from __future__ import annotations

import json
import shlex
import shutil
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from sqlalchemy import select

from sbora_reg import __version__, faults
from sbora_reg.errors import ConfigError, FingerprintMismatchError, OverlapError, ShapeMismatchError
from sbora_reg.registry import models
from sbora_reg.registry.checkpoint import (
    INDEX_NAME,
    atomic_dir,
    check_free_space,
    check_out_dir,
    file_sha256,
    open_checkpoint,
    parse_size,
    tree_sha256,
)
from sbora_reg.registry.manifest import (
    CARD_NAME,
    FORMATS,
    MANIFEST_NAME,
    OUT_DTYPE_NAMES,
    manifest,
    member_ref,
    model_card,
)
from sbora_reg.registry.members import load_members
from sbora_reg.registry.merge import (
    Member,
    Progress,
    combine,
    out_specs,
    touched_tensors,
    write_merged_weights,
)
from sbora_reg.registry.overlap import Footprint, Region, compare_all
from sbora_reg.registry.store import Registry
from sbora_reg.sbora.adapter import Adapter
from sbora_reg.sbora.fingerprint import dir_module_table, fingerprint_table

__all__ = [
    "FORMATS",
    "MANIFEST_NAME",
    "ComposeResult",
    "Member",
    "compose",
    "compose_adapter",
    "compose_members",
    "compose_merged",
    "compose_peft",
    "load_members",  # re-exported from registry.members
]

if TYPE_CHECKING:
    from sbora_reg.registry.retention import RetentionRow

# Base files that are weights or describe weights: never copied into the output as they are.
_SKIP_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".h5", ".msgpack", ".gguf")
_SKIP_NAMES = {INDEX_NAME, CARD_NAME, MANIFEST_NAME, "pytorch_model.bin.index.json"}


@dataclass
class ComposeResult:
    """What a compose did (or, for a dry run, would do)."""

    out: str
    format: str
    members: list[dict[str, Any]]
    allow_overlap: bool
    overlap_cells: int
    dtype: str | None
    dry_run: bool
    tensors: int = 0
    tensors_changed: int = 0
    total_bytes: int = 0
    files: dict[str, str] = field(default_factory=dict)
    output_sha256: str | None = None
    composition_id: int | None = None
    retention: list[RetentionRow] = field(default_factory=list)  # with ``measure``
    calibration: dict[str, Any] | None = None  # ``Calibration.to_json()`` when compose chose one

    def to_dict(self) -> dict[str, Any]:
        return {**self.__dict__, "retention": [row.to_json() for row in self.retention]}


# --- files beside the weights ------------------------------------------------------------


def copy_side_files(base: Path, out: Path, dtype: str | None) -> None:
    """Config, generation config, tokenizer and other small files; config dtype updated.

    A file the merge wrote already (a shard the base names oddly, kept by name) stays as written.
    """
    for src in sorted(base.iterdir()):
        if not src.is_file() or src.name in _SKIP_NAMES or src.name.endswith(_SKIP_SUFFIXES):
            continue
        if (out / src.name).exists():
            continue
        if src.name == "config.json" and dtype is not None:
            config = json.loads(src.read_text())
            for key in ("dtype", "torch_dtype"):
                if key in config or key == "dtype":
                    config[key] = dtype
            (out / src.name).write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
        else:
            shutil.copy2(src, out / src.name)


def equivalent_command(
    members: Sequence[Member], base: Path, out: Path, fmt: str, **flags: Any
) -> str:
    """The ``sbora-reg compose`` command line that writes this output (for the model card)."""
    words = ["sbora-reg", "compose", *(member_ref(m) for m in members)]
    words += ["--base", str(base), "--out", str(out), "--format", fmt]
    for flag, value in flags.items():
        if value is True:
            words.append(f"--{flag.replace('_', '-')}")
        elif value not in (None, False):
            words += [f"--{flag.replace('_', '-')}", str(value)]
    return shlex.join(words)


# --- checks ------------------------------------------------------------------------------


def check_members(base: Path, members: Sequence[Member]) -> str:
    """The base directory's fingerprint, after checking every member was made for it."""
    table = dir_module_table(base)
    fingerprint = fingerprint_table(table)
    for member in members:
        theirs = member.adapter.base_fingerprint
        if theirs and theirs != fingerprint:
            raise FingerprintMismatchError(
                f"{member_ref(member)} was made for another base model (fingerprint {theirs[:12]}, "
                f"{base} is {fingerprint[:12]}): compose members of one base only"
            )
        for name, module in member.adapter.modules.items():
            if name not in table or table[name][1] != tuple(module.shape):
                raise ShapeMismatchError(
                    f"{member_ref(member)}: module {name} {list(module.shape)} is not a layer of "
                    f"{base}: wrong base model?"
                )
    return fingerprint


def check_overlap(members: Sequence[Member], fingerprint: str, allow_overlap: bool) -> int:
    """Shared cells across all members (every pair); ``OverlapError`` unless ``allow_overlap``."""
    footprints = [
        Footprint(
            member_ref(m),
            fingerprint,
            {
                name: Region(
                    mod.variant,
                    mod.shape,
                    np.zeros(0, np.int64) if mod.indices is None else mod.indices.numpy(),
                )
                for name, mod in m.adapter.modules.items()
            },
        )
        for m in members
    ]
    clashes = [p for p in compare_all(footprints) if p.overlaps]
    total = sum(p.total for p in clashes)
    if clashes and not allow_overlap:
        report = "; ".join(
            f"{p.a} & {p.b}: {p.total} cells ("
            + ", ".join(f"{mod} {n}" for mod, n in list(p.modules.items())[:3])
            + (", ..." if len(p.modules) > 3 else "")
            + ")"
            for p in clashes
        )
        raise OverlapError(
            f"members touch the same weights, {total} cells in all: {report}; allocate disjoint "
            "regions, leave a member out, or pass --allow-overlap to sum them"
        )
    return total


# --- one function per output format -------------------------------------------------------


@dataclass(frozen=True)
class _Checked:
    """What every format establishes before writing: members fit the base and each other."""

    members: Sequence[Member]
    base: Path
    out: Path
    fingerprint: str
    result: ComposeResult


def _check(
    members: Sequence[Member],
    base_dir: str | Path,
    out: str | Path,
    fmt: str,
    dtype: str | None,
    allow_overlap: bool,
    force: bool,
    dry_run: bool,
    calibration: dict[str, Any] | None = None,
) -> _Checked:
    if not members:
        raise ConfigError("nothing to compose: name at least one adapter")
    base, target = Path(base_dir), Path(out).absolute()
    fingerprint = check_members(base, members)
    cells = check_overlap(members, fingerprint, allow_overlap)
    check_out_dir(target, force)
    result = ComposeResult(
        out=str(target),
        format=fmt,
        members=[
            {
                "name": m.name,
                "version": m.version,
                "sha256": m.sha256,
                "modules": len(m.adapter.modules),
            }
            for m in members
        ],
        allow_overlap=allow_overlap,
        overlap_cells=cells,
        dtype=dtype,
        dry_run=dry_run,
        calibration=calibration,
    )
    return _Checked(members, base, target, fingerprint, result)


Scorer = Callable[[Path, str], "list[RetentionRow]"]  # (staged output, format) -> rows


def _write(
    checked: _Checked,
    force: bool,
    command: str | None,
    base_model: str | None,
    write_payload: Callable[[Path], dict[str, str]],
    score: Scorer | None = None,
) -> ComposeResult:
    """Write ``out`` atomically: the format's payload, then (with ``score``) the members'
    measurements on the staged output, then manifest and card; hash every file."""
    c, result = checked, checked.result
    check_free_space(c.out, result.total_bytes)
    if result.dry_run:
        return result
    command = command or equivalent_command(
        c.members, c.base, c.out, result.format, dtype=result.dtype,
        allow_overlap=result.allow_overlap,
    )  # fmt: skip
    with atomic_dir(c.out, force) as tmp:
        hashes = write_payload(tmp)
        if score is not None:
            result.retention = score(tmp, result.format)
        text = json.dumps(
            manifest(c.members, result.allow_overlap, c.fingerprint, result.calibration), indent=2
        )
        (tmp / MANIFEST_NAME).write_text(text + "\n")
        rows = [row.to_json() for row in result.retention]
        (tmp / CARD_NAME).write_text(
            model_card(
                c.members, base_model or str(c.base), result.format, command, rows,
                result.calibration,
            )
        )  # fmt: skip
        for path in sorted(tmp.rglob("*")):
            name = str(path.relative_to(tmp))
            if path.is_file() and name not in hashes:  # shards were hashed as written
                hashes[name] = file_sha256(path)
        result.files = hashes
    result.output_sha256 = tree_sha256(result.files)
    return result


def compose_merged(
    members: Sequence[Member],
    base_dir: str | Path,
    out: str | Path,
    *,
    dtype: str | None = None,
    shard_size: int | str | None = None,
    progress: Progress | None = None,
    allow_overlap: bool = False,
    force: bool = False,
    dry_run: bool = False,
    command: str | None = None,
    base_model: str | None = None,
    score: Scorer | None = None,
    calibration: dict[str, Any] | None = None,
) -> ComposeResult:
    """A merged checkpoint: the base with every member's ΔW added, streamed tensor by tensor.

    Checks, all before anything is written (and all a dry run does): dtype, members' base
    fingerprint and module shapes, overlap across all members, the output path, every base
    shard present with its full size, and free disk space. ``dtype`` casts floating weights.
    """
    if dtype is not None and dtype not in OUT_DTYPE_NAMES:
        raise ConfigError(f"unknown dtype {dtype!r}: use one of {', '.join(OUT_DTYPE_NAMES)}")
    size = None if shard_size is None else parse_size(shard_size)
    checked = _check(
        members, base_dir, out, "merged", dtype, allow_overlap, force, dry_run, calibration
    )
    ckpt = open_checkpoint(checked.base)
    touched = touched_tensors(ckpt, members)
    target = getattr(torch, dtype) if dtype else None  # one of OUT_DTYPE_NAMES
    result = checked.result
    result.tensors, result.tensors_changed = len(ckpt.tensors), len(touched)
    result.total_bytes = sum(s.nbytes for s in out_specs(ckpt, target))

    def payload(tmp: Path) -> dict[str, str]:
        hashes = write_merged_weights(ckpt, touched, tmp, target, size, progress)
        copy_side_files(checked.base, tmp, dtype)
        return hashes

    return _write(checked, force, command, base_model, payload, score)


def _compose_combined(
    fmt: str,
    members: Sequence[Member],
    base_dir: str | Path,
    out: str | Path,
    write_adapter: Callable[[Adapter, Path], None],
    allow_overlap: bool,
    force: bool,
    dry_run: bool,
    command: str | None,
    base_model: str | None,
    score: Scorer | None,
    calibration: dict[str, Any] | None,
) -> ComposeResult:
    checked = _check(members, base_dir, out, fmt, None, allow_overlap, force, dry_run, calibration)
    adapter = combine(members, checked.fingerprint)
    checked.result.total_bytes = sum(len(b) for b in adapter.file_bytes().values())

    def payload(tmp: Path) -> dict[str, str]:
        write_adapter(adapter, tmp)
        return {}

    return _write(checked, force, command, base_model, payload, score)


def _write_native(adapter: Adapter, tmp: Path) -> None:
    for name, data in adapter.file_bytes().items():
        (tmp / name).write_bytes(data)


def _write_peft(adapter: Adapter, tmp: Path) -> None:
    adapter.to_peft(tmp)


def compose_adapter(
    members: Sequence[Member],
    base_dir: str | Path,
    out: str | Path,
    *,
    allow_overlap: bool = False,
    force: bool = False,
    dry_run: bool = False,
    command: str | None = None,
    base_model: str | None = None,
    score: Scorer | None = None,
    calibration: dict[str, Any] | None = None,
) -> ComposeResult:
    """One multi-task SBoRA adapter whose ΔW is the members' sum (``merge.combine``)."""
    return _compose_combined(
        "adapter", members, base_dir, out, _write_native,
        allow_overlap, force, dry_run, command, base_model, score, calibration,
    )  # fmt: skip


def compose_peft(
    members: Sequence[Member],
    base_dir: str | Path,
    out: str | Path,
    *,
    allow_overlap: bool = False,
    force: bool = False,
    dry_run: bool = False,
    command: str | None = None,
    base_model: str | None = None,
    score: Scorer | None = None,
    calibration: dict[str, Any] | None = None,
) -> ComposeResult:
    """The combined adapter as one stock PEFT LoRA adapter (``Adapter.to_peft``)."""
    return _compose_combined(
        "peft", members, base_dir, out, _write_peft,
        allow_overlap, force, dry_run, command, base_model, score, calibration,
    )  # fmt: skip


def compose_members(
    members: Sequence[Member],
    base_dir: str | Path,
    out: str | Path,
    fmt: str = "merged",
    *,
    dtype: str | None = None,
    shard_size: int | str | None = None,
    progress: Progress | None = None,
    allow_overlap: bool = False,
    force: bool = False,
    dry_run: bool = False,
    command: str | None = None,
    base_model: str | None = None,
    score: Scorer | None = None,
    calibration: dict[str, Any] | None = None,
) -> ComposeResult:
    """``--format`` as a string (the CLI's view): the function of that format.

    ``dtype`` and ``shard_size`` are options of ``merged`` only and refused for the others;
    ``progress`` reports merged tensors (the other formats write one small file).
    """
    if fmt not in FORMATS:
        raise ConfigError(f"unknown format {fmt!r}: use one of {', '.join(FORMATS)}")
    common: dict[str, Any] = {
        "allow_overlap": allow_overlap, "force": force, "dry_run": dry_run,
        "command": command, "base_model": base_model, "score": score,
        "calibration": calibration,
    }  # fmt: skip
    if fmt == "merged":
        return compose_merged(
            members, base_dir, out, dtype=dtype, shard_size=shard_size, progress=progress, **common
        )
    if dtype is not None:
        raise ConfigError("--dtype applies to --format merged only (adapters stay float32)")
    if shard_size is not None:
        raise ConfigError("--shard-size applies to --format merged only")
    writer = compose_adapter if fmt == "adapter" else compose_peft
    return writer(members, base_dir, out, **common)


# --- through the registry ----------------------------------------------------------------


def compose(
    registry: Registry,
    refs: Sequence[str],
    base_dir: str | Path,
    out_dir: str | Path,
    fmt: str = "merged",
    *,
    dtype: str | None = None,
    shard_size: int | str | None = None,
    progress: Progress | None = None,
    allow_overlap: bool = False,
    force: bool = False,
    dry_run: bool = False,
    command: str | None = None,
    measure: Mapping[str, str | Path] | None = None,
    measure_probes: bool = False,
    on_measure: Callable[[str], None] | None = None,
    calibrate: str = "auto",
    on_calibrate: Callable[[str], None] | None = None,
) -> ComposeResult:
    """Compose registered adapters onto ``base_dir`` and record the composition.

    ``refs`` are ``name`` (latest version) or ``name@version``; the options are those of
    ``compose_members``. The database is written once, after the output is in place, in one
    short transaction. ``calibrate`` (``none``, ``lsq``, ``match``, ``tune`` or ``auto``:
    ``tune`` when every member has a probe set; ``registry.calibration``) re-solves the
    members' factors on their probe sets before merging (``on_calibrate(member)`` as each set
    is read); regions never change. A dry run reports the choice without calibrating.
    ``measure`` (``{member: JSONL file}``, read before anything is written) scores those members
    on the base, alone and composed into ``result.retention`` (``on_measure(member)`` as each
    starts); ``measure_probes`` adds every member's stored probe set (its held-out rows when
    calibrated). Measurements are recorded on the composition. Each member is loaded once.
    """
    from sbora_reg.registry.calibration import calibrate_members, choose, held_out
    from sbora_reg.registry.retention import eval_sets

    loaded = load_members(registry, refs)
    faults.point("compose.loaded")
    for record, _ in loaded:
        if record.base_fingerprint != loaded[0][0].base_fingerprint:
            raise FingerprintMismatchError(
                f"{loaded[0][0].ref} and {record.ref} are registered on different base models: "
                "compose members of one base only"
            )
    chosen = choose(registry, loaded, calibrate, allow_overlap)
    files = {r.ref: p for r, _ in loaded if (p := registry.probe_path(r))} if measure_probes else {}
    sets = eval_sets(registry, loaded, {**files, **(measure or {})})
    if chosen.applied:  # probe sets are measured on the rows calibration does not read
        explicit = {registry.resolve(key).ref for key in measure or {}}
        sets = [(ref, a, rows if ref in explicit else held_out(rows)) for ref, a, rows in sets]
    base = registry.get_base(loaded[0][0].base)
    if command is None:
        command = equivalent_command(
            [m for _, m in loaded], Path(base_dir), Path(out_dir).absolute(), fmt, dtype=dtype,
            allow_overlap=allow_overlap, calibrate=None if calibrate == "none" else calibrate,
        )  # fmt: skip
    if dry_run:
        members, calibration = [m for _, m in loaded], chosen
    else:
        members, calibration = calibrate_members(registry, loaded, base_dir, chosen, on_calibrate)
    result = compose_members(
        members, base_dir, out_dir, fmt, dtype=dtype, shard_size=shard_size, progress=progress,
        allow_overlap=allow_overlap, force=force, dry_run=dry_run, command=command,
        base_model=base.card_name, score=_scorer(base_dir, sets, on_measure) if sets else None,
        calibration=calibration.to_json() if calibration.applied or calibration.reason else None,
    )  # fmt: skip
    if result.dry_run:
        return result
    faults.point("compose.record")
    with registry.write() as session:
        # a member removed while it was being composed is recorded by ref and hash only
        ids = [r.id for r, _ in loaded]
        alive = set(session.scalars(select(models.Adapter.id).where(models.Adapter.id.in_(ids))))
        row = models.Composition(
            base_id=base.id,
            output_sha256=result.output_sha256,
            output_path=result.out,
            format=fmt,
            tool_version=__version__,
            allow_overlap=result.allow_overlap,
            command=command,
            measurements=[r.to_json() for r in result.retention] if sets else None,
        )
        row.members = [
            models.CompositionMember(
                position=i,
                adapter_id=r.id if r.id in alive else None,
                adapter_ref=r.ref,
                adapter_sha256=r.sha256,
            )
            for i, (r, _) in enumerate(loaded)
        ]
        session.add(row)
        session.flush()
        result.composition_id = row.id

    return result


def _scorer(
    base_dir: str | Path, sets: Sequence[Any], on_measure: Callable[[str], None] | None
) -> Scorer:
    """Score ``sets`` on the staged output before it is finished (so the card can say)."""

    def score(staged: Path, fmt: str) -> list[RetentionRow]:
        from sbora_reg.registry.retention import composed_model, measure_retention

        model = composed_model(Path(base_dir), staged, fmt)
        return measure_retention(base_dir, model, sets, on_measure)

    return score
