"""Merging members' deltas: into a base checkpoint's tensors, or into one multi-task adapter.

For every base tensor ``<module>.weight`` that members touch, in the (out, in) frame,

    W' = cast(W + Σ_m ΔW_m)      ΔW_m = s·B on columns idx (FA), s·A on rows idx (FB), s·B@A (LoRA)

added in float32 on the touched rows/columns only (members in order; ``sbora.delta.add_regional``,
the layer's own merge), then cast to the output dtype; every other weight is copied through byte
for byte (or cast when a dtype is given). The base is streamed one tensor at a time
(``registry.checkpoint``).
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Future, wait
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import torch

from sbora_reg import faults
from sbora_reg.errors import InternalError, QuantizationError, ShapeMismatchError
from sbora_reg.registry.checkpoint import (
    DTYPE_NAMES,
    DTYPES,
    FLOAT_DTYPES,
    INDEX_NAME,
    Backlog,
    Checkpoint,
    OutSpec,
    ShardWriter,
    TensorEntry,
    file_sha256,
    plan_output,
    read_tensor,
)
from sbora_reg.registry.manifest import member_ref
from sbora_reg.sbora.adapter import Adapter, AdapterModule, stack_modules
from sbora_reg.sbora.config import SBoRAConfig
from sbora_reg.sbora.delta import merge_regional

Progress = Callable[[int, int, str], None]  # (tensors done, tensors total, tensor name)


@dataclass(frozen=True)
class Member:
    """One adapter in a composition: who it is and its factors (an ``sbora.Adapter``)."""

    name: str
    version: int | None
    sha256: str | None
    adapter: Adapter


# --- the merge of one tensor -------------------------------------------------------------


def _factor(t: torch.Tensor | None) -> torch.Tensor:
    if t is None:  # AdapterModule.validate() makes this unreachable
        raise InternalError("internal: an adapter module lacks a factor or its indices")
    return t.detach().float()


def _idx(m: AdapterModule) -> torch.Tensor:
    if m.indices is None:
        raise InternalError(f"internal: module {m.name} has no indices")
    return m.indices


def _part(m: AdapterModule) -> tuple[torch.Tensor, torch.Tensor, float]:
    """``(idx, trained factor, scale)`` of an FA or FB module."""
    return _idx(m), _factor(m.b if m.variant == "fa" else m.a), m.scale


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
        # the same tensor when the dtype is unchanged: changed in place
        merged = merge_regional(w, modules[0].variant, [_part(m) for m in modules], dtype)
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
                    f"{member_ref(member)}: module {name} ({module.kind} {list(stored)}) does not "
                    f"fit the base checkpoint {ckpt.path} (its weight is {found}): wrong base "
                    "model?"
                )
            if entry.dtype not in FLOAT_DTYPES:
                raise QuantizationError(
                    f"{entry.name} is stored as {entry.dtype} in {ckpt.path}: compose merges into "
                    "16/32-bit weights only; save a dequantised base first"
                )
            touched.setdefault(entry.name, []).append(module)
    return touched


# --- the merged checkpoint ---------------------------------------------------------------


def out_specs(ckpt: Checkpoint, dtype: torch.dtype | None) -> list[OutSpec]:
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
    shard_size: int | None = None,
    progress: Progress | None = None,
) -> dict[str, str]:
    """Stream the merged weights into ``out`` (shards + index); returns file name -> sha256.

    ``shard_size`` None keeps the base's own files (``plan_output``).
    """
    specs = out_specs(ckpt, dtype)
    plan = plan_output(ckpt, specs, shard_size)
    entries = {t.name: t for t in ckpt.tensors}
    closing: dict[str, Future[str]] = {}  # shards being fsynced while the next is written
    backlog = Backlog()  # finished shards' hashers run beside the next shard's writing
    done = 0
    try:
        with _one_thread():
            for file, shard in plan:
                writer = ShardWriter(out / file, shard, {"format": "pt"}, backlog)
                try:
                    for spec in shard:
                        _write_one(writer, spec, entries[spec.name], touched.get(spec.name))
                        done += 1
                        faults.point("merge.tensor")
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
            "weight_map": {s.name: f for f, shard in plan for s in shard},
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
    metadata = {"composed_from": ",".join(member_ref(m) for m in members)}
    base_model = next((m.adapter.base_model for m in members if m.adapter.base_model), None)
    return Adapter(config, modules, base_fingerprint, base_model, metadata)


def _combine_module(name: str, mods: Sequence[AdapterModule]) -> AdapterModule:
    first = mods[0]
    out, inp = first.shape
    variants = {m.variant for m in mods}
    if variants in ({"fa"}, {"fb"}):
        return stack_modules(name, mods)
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
