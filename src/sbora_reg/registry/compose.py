"""Compose task adapters into one model: a merged checkpoint, one multi-task adapter, or PEFT.

Merged: for every base tensor ``<module>.weight`` that members touch, in the (out, in) frame,

    W' = cast(W + Σ_m ΔW_m)      ΔW_m = s·B on columns idx (FA), s·A on rows idx (FB), s·B@A (LoRA)

added in float32 on the touched rows/columns only (members in order), then cast to the output
dtype; every other weight is copied through byte for byte (or cast when ``dtype`` is given). The
base is streamed one tensor at a time (``registry.checkpoint``) and the output appears atomically.
"""

from __future__ import annotations

import contextlib
import json
import shlex
import shutil
import sys
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Future, wait
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import torch

from sbora_reg import __version__
from sbora_reg.errors import (
    ConfigError,
    FingerprintMismatchError,
    InternalError,
    OverlapError,
    QuantizationError,
    ShapeMismatchError,
)
from sbora_reg.registry import models
from sbora_reg.registry.checkpoint import (
    DEFAULT_SHARD_SIZE,
    DTYPE_NAMES,
    DTYPES,
    FLOAT_DTYPES,
    INDEX_NAME,
    Checkpoint,
    OutSpec,
    ShardWriter,
    TensorEntry,
    atomic_dir,
    check_free_space,
    check_out_dir,
    file_sha256,
    open_checkpoint,
    parse_size,
    plan_shards,
    read_tensor,
    shard_names,
    tree_sha256,
)
from sbora_reg.registry.overlap import Footprint, Region, compare_all
from sbora_reg.registry.ranges import format_ranges
from sbora_reg.registry.reading import detect_format
from sbora_reg.registry.records import AdapterRecord
from sbora_reg.registry.store import Registry
from sbora_reg.sbora.adapter import Adapter, AdapterModule
from sbora_reg.sbora.config import SBoRAConfig
from sbora_reg.sbora.fingerprint import dir_module_table, fingerprint_table

MANIFEST_NAME = "sbora_manifest.json"
FORMATS = ("merged", "adapter", "peft")
OUT_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
# Base files that are weights or describe weights: never copied into the output as they are.
_SKIP_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".h5", ".msgpack", ".gguf")
_SKIP_NAMES = {INDEX_NAME, "README.md", MANIFEST_NAME, "pytorch_model.bin.index.json"}

Progress = Callable[[int, int, str], None]  # (tensors done, tensors total, tensor name)


@dataclass(frozen=True)
class Member:
    """One adapter in a composition: who it is and its factors (an ``sbora.Adapter``)."""

    name: str
    version: int | None
    sha256: str | None
    adapter: Adapter


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

    def to_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


# --- the merge of one tensor -------------------------------------------------------------


def _factor(t: torch.Tensor | None) -> torch.Tensor:
    if t is None:  # AdapterModule.validate() makes this unreachable
        raise InternalError("internal: an adapter module lacks a factor or its indices")
    return t.detach().float()


def _idx(m: AdapterModule) -> torch.Tensor:
    if m.indices is None:
        raise InternalError(f"internal: module {m.name} has no indices")
    return m.indices


def merge_tensor(
    weight: torch.Tensor, modules: Sequence[AdapterModule], dtype: torch.dtype
) -> torch.Tensor:
    """``cast(W + Σ ΔW)`` for one stored weight; only touched rows/columns go through float32.

    ``weight`` is as stored ((out, in), or (in, out) for Conv1D); ``modules`` are the members'
    ``AdapterModule`` entries for it, applied in order.
    """
    conv = modules[0].kind == "conv1d"
    w = weight.T if conv else weight  # (out, in) view
    variants = {m.variant for m in modules}
    if variants in ({"fa"}, {"fb"}):
        dim = 1 if variants == {"fa"} else 0  # FA: columns, FB: rows
        union = torch.unique(torch.cat([_idx(m) for m in modules]))  # sorted (u,)
        region = w.index_select(dim, union).float()  # (out, u) or (u, in)
        for m in modules:
            part = _factor(m.b) if m.variant == "fa" else _factor(m.a)
            region.index_add_(dim, torch.searchsorted(union, _idx(m)), m.scale * part)
        merged = w.to(dtype)  # the same tensor when the dtype is unchanged: changed in place
        merged.index_copy_(dim, union, region.to(dtype))
    else:  # LoRA or FA and FB on one module: every cell may change
        full = w.float()
        for m in modules:
            full += m.delta()
        merged = full.to(dtype)
    return merged.T.contiguous() if conv else merged


def merge_in_place(weight: torch.Tensor, modules: Sequence[AdapterModule]) -> None:
    """``W <- cast(W + Σ ΔW)`` in ``weight``'s own storage and dtype."""
    merged = merge_tensor(weight, modules, weight.dtype)
    if merged.data_ptr() != weight.data_ptr():  # the dense path builds a new tensor
        weight.copy_(merged)


def touched_tensors(ckpt: Checkpoint, members: Sequence[Member]) -> dict[str, list[AdapterModule]]:
    """Tensor name -> the members' modules on it, after checking every one fits the base."""
    entries = {t.name: t for t in ckpt.tensors}
    touched: dict[str, list[AdapterModule]] = {}
    for member in members:
        for name, module in member.adapter.modules.items():
            entry = entries.get(f"{name}.weight")
            out, inp = module.shape
            stored = (inp, out) if module.kind == "conv1d" else (out, inp)
            if entry is None or entry.shape != stored:
                found = "absent" if entry is None else f"shaped {list(entry.shape)}"
                raise ShapeMismatchError(
                    f"{_ref(member)}: module {name} ({module.kind} {list(stored)}) does not fit "
                    f"the base checkpoint {ckpt.path} (its weight is {found}): wrong base model?"
                )
            if entry.dtype not in FLOAT_DTYPES:
                raise QuantizationError(
                    f"{entry.name} is stored as {entry.dtype} in {ckpt.path}: compose merges into "
                    "16/32-bit weights only; save a dequantised base first"
                )
            touched.setdefault(entry.name, []).append(module)
    return touched


# --- the merged checkpoint ---------------------------------------------------------------


def _out_specs(ckpt: Checkpoint, dtype: torch.dtype | None) -> list[OutSpec]:
    name = DTYPE_NAMES[dtype] if dtype is not None else None
    return [
        OutSpec(t.name, name if name and t.dtype in FLOAT_DTYPES else t.dtype, t.shape)
        for t in ckpt.tensors
    ]


@contextlib.contextmanager
def _one_thread() -> Iterator[None]:
    """Run torch ops on one thread for the duration of a merge, then restore the setting.

    The region updates are small and memory-bound: intra-op threads only add synchronisation,
    and on a busy machine each parallel op can stall for a whole scheduler slice (measured: the
    1.5 GB benchmark spent 8 s in ``index_add_`` with 2 threads, 0.05 s with 1).
    """
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def _write_one(
    writer: ShardWriter, spec: OutSpec, entry: TensorEntry, mods: list[AdapterModule] | None
) -> None:
    """One output tensor: a kernel copy (patched in place when touched) or a cast."""
    if spec.dtype == entry.dtype:
        writer.copy_raw(spec.name, entry, partial(merge_in_place, modules=mods) if mods else None)
    elif mods:
        writer.write_tensor(spec.name, merge_tensor(read_tensor(entry), mods, DTYPES[spec.dtype]))
    else:
        writer.write_tensor(spec.name, read_tensor(entry).to(DTYPES[spec.dtype]))


def write_merged_weights(
    ckpt: Checkpoint,
    touched: dict[str, list[AdapterModule]],
    out: Path,
    dtype: torch.dtype | None = None,
    shard_size: int = DEFAULT_SHARD_SIZE,
    progress: Progress | None = None,
) -> dict[str, str]:
    """Stream the merged weights into ``out`` (shards + index); returns file name -> sha256."""
    specs = _out_specs(ckpt, dtype)
    plan = plan_shards(specs, shard_size)
    names = shard_names(len(plan))
    entries = {t.name: t for t in ckpt.tensors}
    closing: dict[str, Future[str]] = {}  # shards being fsynced while the next is written
    done = 0
    try:
        with _one_thread():
            for file, shard in zip(names, plan, strict=True):
                writer = ShardWriter(out / file, shard, {"format": "pt"})
                try:
                    for spec in shard:
                        _write_one(writer, spec, entries[spec.name], touched.get(spec.name))
                        done += 1
                        if progress is not None:
                            progress(done, len(specs), spec.name)
                except BaseException:
                    writer.abort()
                    raise
                closing[file] = writer.close()
    finally:
        wait(closing.values())  # never leave a thread writing into a directory being removed
    hashes = {file: job.result() for file, job in closing.items()}
    if len(plan) > 1:
        index = {
            "metadata": {"total_size": sum(s.nbytes for s in specs)},
            "weight_map": {s.name: f for f, shard in zip(names, plan, strict=True) for s in shard},
        }
        (out / INDEX_NAME).write_text(json.dumps(index, indent=2) + "\n")
        hashes[INDEX_NAME] = file_sha256(out / INDEX_NAME)
    return hashes


# --- one multi-task adapter --------------------------------------------------------------


def combine(members: Sequence[Member], base_fingerprint: str | None = None) -> Adapter:
    """One adapter whose ΔW on every module is the members' sum (exact for disjoint members).

    Per module, members of one variant become that variant on the union of their indices, with
    ``s·factor`` summed into float32 factors at scale 1 (so composed modules of any rank and scale
    live in one file); a module mixing FA and FB, or with a LoRA member, becomes a LoRA module with
    the members' factors concatenated (FA: ``A = I[idx]``, FB: ``B = I[:, idx]``).
    """
    by_module: dict[str, list[AdapterModule]] = {}
    for member in members:
        for name, module in member.adapter.modules.items():
            by_module.setdefault(name, []).append(module)
    modules = {name: _combine_module(name, mods) for name, mods in sorted(by_module.items())}
    variants = {m.variant for m in modules.values()} & {"fa", "fb"}
    config = SBoRAConfig(
        variant="fb" if variants == {"fb"} else "fa",
        r=max(m.rank for m in modules.values()),
        alpha=1.0,
        target_modules=tuple(sorted(modules)),
    )
    metadata = {"composed_from": ",".join(_ref(m) for m in members)}
    base_model = next((m.adapter.base_model for m in members if m.adapter.base_model), None)
    return Adapter(config, modules, base_fingerprint, base_model, metadata)


def _combine_module(name: str, mods: Sequence[AdapterModule]) -> AdapterModule:
    first = mods[0]
    out, inp = first.shape
    variants = {m.variant for m in mods}
    if variants in ({"fa"}, {"fb"}):
        dim = 1 if variants == {"fa"} else 0
        union = torch.unique(torch.cat([_idx(m) for m in mods]))
        size = (out, len(union)) if dim == 1 else (len(union), inp)
        factor = torch.zeros(size, dtype=torch.float32)
        for m in mods:
            part = _factor(m.b) if m.variant == "fa" else _factor(m.a)
            factor.index_add_(dim, torch.searchsorted(union, _idx(m)), m.scale * part)
        a, b = (None, factor) if dim == 1 else (factor, None)
        return AdapterModule(name, first.variant, first.kind, (out, inp), 1.0, union, a, b)
    a_parts, b_parts = [], []
    for m in mods:  # ΔW = Σ s·B_m A_m = [s·B_1 ... s·B_k] @ [A_1; ...; A_k]
        if m.variant == "fa":
            a_parts.append(torch.eye(inp)[m.indices])
            b_parts.append(m.scale * _factor(m.b))
        elif m.variant == "fb":
            a_parts.append(m.scale * _factor(m.a))
            b_parts.append(torch.eye(out)[:, m.indices])
        else:
            a_parts.append(_factor(m.a))
            b_parts.append(m.scale * _factor(m.b))
    a, b = torch.cat(a_parts, 0), torch.cat(b_parts, 1)
    return AdapterModule(name, "lora", first.kind, (out, inp), 1.0, None, a, b)


# --- files beside the weights ------------------------------------------------------------


def _ref(member: Member) -> str:
    return member.name if member.version is None else f"{member.name}@{member.version}"


def manifest(members: Sequence[Member], allow_overlap: bool, fingerprint: str | None) -> dict:
    """``sbora_manifest.json``: members and the regions they declare (read by ``audit``)."""
    rows = []
    for member in members:
        regions = {
            name: {
                "variant": m.variant,
                "kind": m.kind,
                "shape": list(m.shape),
                "indices": None if m.indices is None else format_ranges(m.indices.numpy()),
            }
            for name, m in sorted(member.adapter.modules.items())
        }
        rows.append(
            {"name": member.name, "version": member.version, "sha256": member.sha256,
             "regions": regions}
        )  # fmt: skip
    return {
        "format": "sbora-manifest",
        "format_version": 1,
        "tool_version": __version__,
        "base_fingerprint": fingerprint,
        "allow_overlap": allow_overlap,
        "members": rows,
    }


def model_card(members: Sequence[Member], base_model: str, fmt: str, command: str) -> str:
    """README.md with YAML front matter naming the base and every member."""
    tags = ["sbora", "sbora-reg", "merge" if fmt == "merged" else "lora"]
    lines = ["---", f"base_model: {json.dumps(base_model)}", "tags:"]
    lines += [f"- {t}" for t in tags]
    lines += ["---", "", "# Composed SBoRA model", ""]
    lines += [
        f"{len(members)} SBoRA task adapters composed by sbora-reg {__version__} "
        f"(format `{fmt}`) onto `{base_model}`.",
        "",
        "| member | version | modules | sha256 |",
        "|---|---|---|---|",
    ]
    for m in members:
        v = "" if m.version is None else m.version
        lines.append(f"| {m.name} | {v} | {len(m.adapter.modules)} | `{m.sha256 or ''}` |")
    lines += ["", "Regions per member: `sbora_manifest.json`.", "", "Command:", "", "```"]
    lines += [command, "```", ""]
    return "\n".join(lines)


def copy_side_files(base: Path, out: Path, dtype: str | None) -> None:
    """Config, generation config, tokenizer and other small files; config dtype updated."""
    for src in sorted(base.iterdir()):
        if not src.is_file() or src.name in _SKIP_NAMES or src.name.endswith(_SKIP_SUFFIXES):
            continue
        if src.name == "config.json" and dtype is not None:
            config = json.loads(src.read_text())
            for key in ("dtype", "torch_dtype"):
                if key in config or key == "dtype":
                    config[key] = dtype
            (out / src.name).write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
        else:
            shutil.copy2(src, out / src.name)


def default_command() -> str:
    """The command line of this process, quoted, as it would be typed again."""
    return shlex.join([Path(sys.argv[0]).name, *sys.argv[1:]])


# --- checks ------------------------------------------------------------------------------


def check_members(base: Path, members: Sequence[Member]) -> str:
    """The base directory's fingerprint, after checking every member was made for it."""
    table = dir_module_table(base)
    fingerprint = fingerprint_table(table)
    for member in members:
        theirs = member.adapter.base_fingerprint
        if theirs and theirs != fingerprint:
            raise FingerprintMismatchError(
                f"{_ref(member)} was made for another base model (fingerprint {theirs[:12]}, "
                f"{base} is {fingerprint[:12]}): compose members of one base only"
            )
        for name, module in member.adapter.modules.items():
            if name not in table or table[name][1] != tuple(module.shape):
                raise ShapeMismatchError(
                    f"{_ref(member)}: module {name} {list(module.shape)} is not a layer of "
                    f"{base}: wrong base model?"
                )
    return fingerprint


def check_overlap(members: Sequence[Member], fingerprint: str, allow_overlap: bool) -> int:
    """Shared cells across all members (every pair); ``OverlapError`` unless ``allow_overlap``."""
    footprints = [
        Footprint(
            _ref(m),
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


# --- the whole compose -------------------------------------------------------------------


def compose_members(
    members: Sequence[Member],
    base_dir: str | Path,
    out: str | Path,
    fmt: str = "merged",
    *,
    dtype: str | None = None,
    shard_size: int | str = DEFAULT_SHARD_SIZE,
    allow_overlap: bool = False,
    force: bool = False,
    dry_run: bool = False,
    command: str | None = None,
    base_model: str | None = None,
    progress: Progress | None = None,
) -> ComposeResult:
    """Check, then write ``out`` (merged checkpoint, native adapter or PEFT adapter) atomically.

    Checks, all before anything is written (and all a dry run does): format and dtype, members'
    base fingerprint and module shapes, overlap across all members, the output path, every base
    shard present with its full size (merged), and free disk space.
    """
    if fmt not in FORMATS:
        raise ConfigError(f"unknown format {fmt!r}: use one of {', '.join(FORMATS)}")
    if dtype is not None and dtype not in OUT_DTYPES:
        raise ConfigError(f"unknown dtype {dtype!r}: use one of {', '.join(OUT_DTYPES)}")
    if not members:
        raise ConfigError("nothing to compose: name at least one adapter")
    if dtype is not None and fmt != "merged":
        raise ConfigError("--dtype applies to --format merged only (adapters stay float32)")
    base, out = Path(base_dir), Path(out).absolute()
    fingerprint = check_members(base, members)
    cells = check_overlap(members, fingerprint, allow_overlap)
    check_out_dir(out, force)
    result = ComposeResult(
        out=str(out),
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
    )
    target = OUT_DTYPES[dtype] if dtype else None
    if fmt == "merged":
        ckpt = open_checkpoint(base)
        touched = touched_tensors(ckpt, members)
        result.tensors, result.tensors_changed = len(ckpt.tensors), len(touched)
        result.total_bytes = sum(s.nbytes for s in _out_specs(ckpt, target))
    else:
        adapter = combine(members, fingerprint)
        result.total_bytes = sum(len(b) for b in adapter.file_bytes().values())
    check_free_space(out, result.total_bytes)
    if dry_run:
        return result
    command = command or default_command()
    with atomic_dir(out, force) as tmp:
        hashes: dict[str, str] = {}
        if fmt == "merged":
            size = parse_size(shard_size)
            hashes = write_merged_weights(ckpt, touched, tmp, target, size, progress)
            copy_side_files(base, tmp, dtype)
        elif fmt == "adapter":
            for name, data in adapter.file_bytes().items():
                (tmp / name).write_bytes(data)
        else:
            adapter.to_peft(tmp)
        text = json.dumps(manifest(members, allow_overlap, fingerprint), indent=2)
        (tmp / MANIFEST_NAME).write_text(text + "\n")
        card = model_card(members, base_model or str(base), fmt, command)
        (tmp / "README.md").write_text(card)
        for path in sorted(tmp.rglob("*")):
            name = str(path.relative_to(tmp))
            if path.is_file() and name not in hashes:  # shards were hashed as written
                hashes[name] = file_sha256(path)
        result.files = hashes
    result.output_sha256 = tree_sha256(result.files)
    return result


# --- through the registry ----------------------------------------------------------------


def load_members(registry: Registry, refs: Sequence[str]) -> list[tuple[AdapterRecord, Member]]:
    """Resolve ``name[@version]`` refs and load each adapter from its stored blob."""
    loaded: list[tuple[AdapterRecord, Member]] = []
    for ref in refs:
        record = registry.resolve(ref)
        if any(r.id == record.id for r, _ in loaded):
            raise ConfigError(f"{record.ref} is named twice: list each member once")
        blob = registry.blob_path(record.sha256)
        fmt = detect_format(blob)
        adapter = Adapter.load(blob) if fmt == "sbora" else Adapter.from_peft(blob)
        # The registry checked the adapter against its base when it was added.
        adapter.base_fingerprint = adapter.base_fingerprint or record.base_fingerprint
        loaded.append((record, Member(record.name, record.version, record.sha256, adapter)))
    return loaded


def compose(
    registry: Registry,
    refs: Sequence[str],
    base_dir: str | Path,
    out_dir: str | Path,
    fmt: str = "merged",
    **options: Any,
) -> ComposeResult:
    """Compose registered adapters onto ``base_dir`` and record the composition.

    ``refs`` are ``name`` (latest version) or ``name@version``; ``options`` are those of
    ``compose_members`` (dtype, shard_size, allow_overlap, force, dry_run, command, progress).
    The database is written once, after the output is in place, in one short transaction.
    """
    loaded = load_members(registry, refs)
    for record, _ in loaded:
        if record.base_fingerprint != loaded[0][0].base_fingerprint:
            raise FingerprintMismatchError(
                f"{loaded[0][0].ref} and {record.ref} are registered on different base models: "
                "compose members of one base only"
            )
    options.setdefault("base_model", loaded[0][0].base)
    options.setdefault("command", default_command())
    result = compose_members([m for _, m in loaded], base_dir, out_dir, fmt, **options)
    if result.dry_run:
        return result
    base = registry.get_base(loaded[0][0].base_fingerprint)
    with registry.write() as session:
        row = models.Composition(
            base_id=base.id,
            output_sha256=result.output_sha256,
            output_path=result.out,
            format=fmt,
            tool_version=__version__,
            allow_overlap=result.allow_overlap,
            command=options["command"],
        )
        row.members = [
            models.CompositionMember(
                position=i, adapter_id=r.id, adapter_ref=r.ref, adapter_sha256=r.sha256
            )
            for i, (r, _) in enumerate(loaded)
        ]
        session.add(row)
        session.flush()
        result.composition_id = row.id
    return result
