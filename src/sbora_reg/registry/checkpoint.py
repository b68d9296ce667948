"""Streamed safetensors checkpoints: read a base tensor by tensor, write sharded output atomically.

A checkpoint directory holds either one ``model.safetensors`` or several shards listed by
``model.safetensors.index.json`` (``{"metadata": {"total_size": N}, "weight_map": {name: file}}``).
Reading never loads more than one tensor: headers are parsed up front (so a missing or truncated
shard is found before anything is written), a tensor to change is read into one fresh buffer, and
a tensor that passes through unchanged is copied as raw bytes by the kernel, never loaded. (Reads
go by the parsed offsets rather than ``safetensors.safe_open``, whose memory map would keep every
page it touched resident until the shard is closed, and whose tensors would need another copy.)

Writing plans the shards from the tensors' output dtypes and shapes before any data exists, so each
shard's header is written first and its tensors are then streamed into it one at a time: the
``safetensors`` Python API only saves a whole dict of tensors, which would hold a shard in memory.
The byte layout is the documented one: an 8-byte little-endian header length, a JSON header padded
with spaces to 8 bytes, then the tensors back to back in header order.
"""

from __future__ import annotations

import collections
import contextlib
import hashlib
import json
import mmap
import os
import re
import shutil
import struct
import threading
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO

import torch

from sbora_reg.errors import AdapterFormatError, ConfigError, InternalError, OutputError
from sbora_reg.sbora import files
from sbora_reg.sbora.files import stale_temps

INDEX_NAME = "model.safetensors.index.json"
SINGLE_NAME = "model.safetensors"
_COPY_CHUNK = 16 << 20  # bytes per read when a tensor is copied through unchanged
_SYNC_EVERY = 64 << 20  # bytes written between background fdatasyncs of a shard
_HASH_BEHIND = 1 << 30  # bytes written but not yet hashed back, across an output's shards
_HASH_WINDOW = 16 << 20  # bytes of written output mapped at a time for the hasher to read
_copy_file_range = getattr(os, "copy_file_range", None)  # Linux only; plain reads elsewhere

DTYPES: dict[str, torch.dtype] = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
    "F8_E4M3": torch.float8_e4m3fn,
    "F8_E5M2": torch.float8_e5m2,
}
DTYPE_NAMES = {v: k for k, v in DTYPES.items()}
FLOAT_DTYPES = ("F64", "F32", "F16", "BF16")

_UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12}
_UNITS.update({"KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40})


def parse_size(text: str | int) -> int:
    """Bytes in ``"500MB"``, ``"5GB"``, ``"2GiB"`` or a plain integer (decimal units as in HF)."""
    if isinstance(text, int):
        return text
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]i?B|B)?\s*", text, flags=re.IGNORECASE)
    if m is None or float(m.group(1)) <= 0:
        raise ConfigError(f"invalid size {text!r}: use a number with a unit, e.g. 500MB or 5GB")
    return int(float(m.group(1)) * _UNITS[(m.group(2) or "").upper()])


@dataclass(frozen=True)
class TensorEntry:
    """One tensor of a checkpoint: where its bytes are and what they hold."""

    name: str
    dtype: str  # safetensors dtype name, e.g. "BF16"
    shape: tuple[int, ...]
    file: Path
    start: int  # absolute byte offset in ``file``
    end: int

    @property
    def nbytes(self) -> int:
        return self.end - self.start


@dataclass
class Checkpoint:
    """The tensors of a checkpoint directory, in file order, with every shard already checked."""

    path: Path
    tensors: list[TensorEntry]
    files: list[Path]
    metadata: dict[str, str] = field(default_factory=dict)

    @property
    def total_size(self) -> int:
        return sum(t.nbytes for t in self.tensors)


def read_header(path: Path) -> tuple[dict[str, dict], dict[str, str], int]:
    """``(tensors, metadata, data_start)`` of a safetensors file, after checking its size."""
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            raw = f.read(8)
            (n,) = struct.unpack("<Q", raw) if len(raw) == 8 else (-1,)
            header = json.loads(f.read(n)) if 0 < n <= size - 8 else None
    except FileNotFoundError:
        raise AdapterFormatError(f"checkpoint shard {path} is missing: restore it") from None
    except (OSError, ValueError) as exc:
        raise AdapterFormatError(f"cannot read checkpoint shard {path}: {exc}") from exc
    if not isinstance(header, dict):
        raise AdapterFormatError(f"{path} is not a safetensors file (bad header): restore it")
    metadata = header.pop("__metadata__", None) or {}
    data_end = max((int(v["data_offsets"][1]) for v in header.values()), default=0)
    if size != 8 + n + data_end:
        raise AdapterFormatError(
            f"checkpoint shard {path} is truncated or corrupt ({size} bytes, header says "
            f"{8 + n + data_end}): restore it"
        )
    return header, metadata, 8 + n


def open_checkpoint(path: str | Path) -> Checkpoint:
    """Read the layout of a single-file or sharded safetensors checkpoint and check every shard."""
    path = Path(path)
    index = path / INDEX_NAME
    if index.is_file():
        try:
            weight_map: dict[str, str] = json.loads(index.read_text())["weight_map"]
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise AdapterFormatError(f"cannot read {index}: {exc}") from exc
        names = sorted(set(weight_map.values()))
        files.check_shard_names(index, names)
    elif (path / SINGLE_NAME).is_file():
        weight_map, names = {}, [SINGLE_NAME]
    else:
        raise AdapterFormatError(
            f"{path} has no {SINGLE_NAME} or {INDEX_NAME}: pass a safetensors model directory "
            "(pickle checkpoints are not read)"
        )
    tensors: list[TensorEntry] = []
    metadata: dict[str, str] = {}
    for shard in names:
        file = path / shard
        header, meta, data_start = read_header(file)
        metadata = metadata or meta
        for name, spec in sorted(header.items(), key=lambda kv: kv[1]["data_offsets"][0]):
            if weight_map and weight_map.get(name) != shard:
                continue  # a stray tensor the index does not point to
            begin, end = spec["data_offsets"]
            tensors.append(
                TensorEntry(name, spec["dtype"], tuple(spec["shape"]), file, data_start + begin,
                            data_start + end)
            )  # fmt: skip
    missing = set(weight_map) - {t.name for t in tensors}
    if missing:
        raise AdapterFormatError(
            f"{index} lists {len(missing)} tensors that its shards lack (e.g. "
            f"{sorted(missing)[0]}): the checkpoint is incomplete"
        )
    return Checkpoint(path, tensors, [path / n for n in names], metadata)


def read_tensor(entry: TensorEntry) -> torch.Tensor:
    """One tensor, read straight into a fresh writable buffer (one copy, no mmap kept open).

    ``open_checkpoint`` already parsed and size-checked the header, so the bytes at
    ``entry.start:entry.end`` are the tensor in little-endian order, as safetensors stores it.
    """
    buf = torch.empty(entry.nbytes, dtype=torch.uint8)
    with open(entry.file, "rb") as f:
        f.seek(entry.start)
        if f.readinto(memoryview(buf.numpy())) != entry.nbytes:  # type: ignore[arg-type]
            raise AdapterFormatError(f"{entry.file} ended early while reading {entry.name}")
    try:
        dtype = DTYPES[entry.dtype]
    except KeyError:
        raise AdapterFormatError(f"{entry.name} has unsupported dtype {entry.dtype}") from None
    return buf.view(dtype).reshape(entry.shape)


@dataclass(frozen=True)
class OutSpec:
    """A tensor to write: name, safetensors dtype and shape (its size follows)."""

    name: str
    dtype: str
    shape: tuple[int, ...]

    @property
    def nbytes(self) -> int:
        n = DTYPES[self.dtype].itemsize
        for d in self.shape:
            n *= d
        return n


def plan_shards(specs: Sequence[OutSpec], max_bytes: int) -> list[list[OutSpec]]:
    """Split tensors, in order, into shards of at most ``max_bytes`` (a bigger one stands alone)."""
    shards: list[list[OutSpec]] = [[]]
    size = 0
    for spec in specs:
        if shards[-1] and size + spec.nbytes > max_bytes:
            shards.append([])
            size = 0
        shards[-1].append(spec)
        size += spec.nbytes
    return shards


def shard_names(count: int) -> list[str]:
    """File names as transformers writes them: one ``model.safetensors`` or numbered shards."""
    if count == 1:
        return [SINGLE_NAME]
    return [f"model-{i:05d}-of-{count:05d}.safetensors" for i in range(1, count + 1)]


def plan_output(
    ckpt: Checkpoint, specs: Sequence[OutSpec], max_bytes: int | None
) -> list[tuple[str, list[OutSpec]]]:
    """The output's files and their tensors, in order: shards of at most ``max_bytes`` with
    transformers' names, or (``None``) the base's own layout, each tensor in the file of the
    same name (one file is always ``model.safetensors``). ``specs`` follow ``ckpt.tensors``.

    Keeping the base's shards keeps the output's files comparable with the base's one by one,
    and lets the shards of a big output be hashed side by side.
    """
    if max_bytes is not None:
        plan = plan_shards(specs, max_bytes)
        return list(zip(shard_names(len(plan)), plan, strict=True))
    by_file: dict[Path, list[OutSpec]] = {file: [] for file in ckpt.files}
    for entry, spec in zip(ckpt.tensors, specs, strict=True):
        by_file[entry.file].append(spec)
    layout = [(file.name, shard) for file, shard in by_file.items() if shard]
    if len(layout) <= 1:
        return [(SINGLE_NAME, layout[0][1] if layout else [])]
    return layout


class Backlog:
    """Bytes copied into an output but not yet read back by its hashers, bounded.

    One is shared by the shards of an output, so the writer may run ahead of the hashing by up
    to ``limit`` bytes: the hashers of several finished shards then run at once, one per core,
    while the read-back still finds the bytes in the page cache.
    """

    def __init__(self, limit: int = _HASH_BEHIND) -> None:
        self._limit = limit
        self._pending = 0
        self._cond = threading.Condition()

    def take(self, n: int) -> None:
        """Wait until ``n`` more bytes fit (a range bigger than the limit waits to be alone)."""
        with self._cond:
            self._cond.wait_for(lambda: not self._pending or self._pending + n <= self._limit)
            self._pending += n

    def give(self, n: int) -> None:
        with self._cond:
            self._pending -= n
            self._cond.notify_all()


class _Hasher:
    """sha256 fed on one worker thread, so hashing overlaps the copy (hashlib drops the GIL)."""

    def __init__(self, backlog: Backlog | None = None) -> None:
        self._backlog = backlog or Backlog()
        self._sha = hashlib.sha256()
        self._pool = ThreadPoolExecutor(1, thread_name_prefix="sbora-sha256")
        self._jobs: collections.deque[Future[None]] = collections.deque()

    def feed(self, data: Any) -> None:
        """Hash ``data`` (bytes-like, unchanged until hashed) after everything before it, once
        every earlier job is done: one tensor in memory at most."""
        self._submit(lambda sha: sha.update(data), queue=1)

    def feed_range(self, path: Path, start: int, end: int) -> None:
        """Hash bytes ``start:end`` of ``path``, read back, after everything before it; such
        jobs wait only while the backlog is full, so a burst of quick kernel copies does not wait
        for the hash."""
        n = end - start
        self._backlog.take(n)
        try:
            job = self._submit(_hash_range(path, start, end), queue=None)
        except BaseException:
            self._backlog.give(n)
            raise
        job.add_done_callback(lambda _: self._backlog.give(n))  # also when cancelled

    def _submit(self, job: Callable[[Any], None], queue: int | None) -> Future[None]:
        while queue is not None and len(self._jobs) >= queue:
            self._jobs.popleft().result()
        while self._jobs and self._jobs[0].done():
            self._jobs.popleft().result()  # re-raises a failed job's error now
        self._jobs.append(self._pool.submit(job, self._sha))
        return self._jobs[-1]

    def wait(self) -> None:
        while self._jobs:
            self._jobs.popleft().result()

    def finish(self, last: Callable[[], None]) -> Future[str]:
        """Run ``last()`` after every job, then give the digest; the caller does not wait."""
        previous, self._jobs = list(self._jobs), collections.deque()

        def job() -> str:
            for earlier in previous:
                earlier.result()  # done already (one worker, in order); re-raises its error
            last()
            return self._sha.hexdigest()

        done = self._pool.submit(job)
        self._pool.shutdown(wait=False)
        return done

    def abort(self) -> None:
        self._pool.shutdown(cancel_futures=True)


def _hash_range(path: Path, start: int, end: int) -> Callable[[Any], None]:
    """A hasher job: bytes ``start:end`` of ``path``, which the page cache still holds, hashed
    straight from the cache through read-only maps of ``_HASH_WINDOW`` bytes, populated at once
    (one fault per window, not per page, and no copy into a buffer: on the 1.5 GB benchmark
    1.33-1.37 s a compose against 1.43-1.57 s reading back through a reused 1 MiB buffer)."""

    def job(sha: Any) -> None:
        with open(path, "rb", buffering=0) as f:
            pos = start
            while pos < end:
                base = pos - pos % mmap.ALLOCATIONGRANULARITY  # map offsets must be aligned
                n = min(end - pos, _HASH_WINDOW)
                flags = mmap.MAP_SHARED | getattr(mmap, "MAP_POPULATE", 0)  # Linux only
                with (
                    mmap.mmap(f.fileno(), pos + n - base, flags, mmap.PROT_READ, offset=base) as mm,
                    memoryview(mm) as view,
                ):
                    sha.update(view[pos - base : pos - base + n])
                pos += n

    return job


class ShardWriter:
    """Writes one safetensors file whose header is known in advance, tensor by tensor.

    Bytes are hashed as they are written, so the output's sha256 costs no second read; tensors
    that pass through unchanged are copied by the kernel (``os.copy_file_range``) where it can.
    """

    def __init__(
        self,
        path: Path,
        specs: Sequence[OutSpec],
        metadata: dict[str, str],
        backlog: Backlog | None = None,
    ):
        header: dict[str, object] = {"__metadata__": metadata}
        offset = 0
        for spec in specs:
            header[spec.name] = {
                "dtype": spec.dtype,
                "shape": list(spec.shape),
                "data_offsets": [offset, offset + spec.nbytes],
            }
            offset += spec.nbytes
        raw = json.dumps(header, separators=(",", ":")).encode()
        raw += b" " * (-len(raw) % 8)
        self.path = path
        self._pending = list(specs)
        self._hasher = _Hasher(backlog)
        # Read-write: copied tensors are patched in place through a shared memory map.
        self._f: BinaryIO = open(path, "w+b")  # noqa: SIM115 - closed in close()/abort()
        # Written bytes reach the disk while the rest is written (fdatasync on a worker every
        # _SYNC_EVERY bytes), so the fsync that close() waits for has little left to do.
        self._syncer = ThreadPoolExecutor(1, thread_name_prefix="sbora-fsync")
        self._sync_job: Future[None] | None = None
        self._synced = 0
        self._write(struct.pack("<Q", len(raw)) + raw)

    def _write(self, data: Any) -> None:
        """Write a bytes-like object; it must stay unchanged until hashed (the next write)."""
        self._f.write(data)
        self._hasher.feed(data)

    def _start_sync(self) -> None:
        """Start writing what is written so far back to disk, unless that is already under way."""
        end = self._f.tell()
        if end - self._synced >= _SYNC_EVERY and (self._sync_job is None or self._sync_job.done()):
            self._f.flush()
            self._synced = end
            self._sync_job = self._syncer.submit(os.fdatasync, self._f.fileno())

    def _stop_sync(self) -> None:
        if self._sync_job is not None:
            self._sync_job.result()
        self._syncer.shutdown()

    def _next(self, name: str, nbytes: int) -> None:
        """Check the next planned tensor is ``name`` of ``nbytes`` bytes, then mark it written."""
        if not self._pending or self._pending[0].name != name:
            raise InternalError(f"internal: {name} written out of the planned order")
        if self._pending[0].nbytes != nbytes:
            raise InternalError(f"internal: {name} does not match its planned size")
        self._pending.pop(0)

    def write_tensor(self, name: str, tensor: torch.Tensor) -> None:
        """Write the next planned tensor (dtype and shape must match the plan)."""
        spec = self._pending[0] if self._pending else None
        if spec and (DTYPE_NAMES.get(tensor.dtype), tuple(tensor.shape)) != (
            spec.dtype,
            spec.shape,
        ):
            raise InternalError(f"internal: {name} does not match its planned dtype or shape")
        self._next(name, tensor.numel() * tensor.element_size())
        flat = tensor.detach().contiguous().reshape(-1).view(torch.uint8)
        self._write(memoryview(flat.numpy()))  # type: ignore[arg-type]
        self._start_sync()

    def copy_raw(
        self, name: str, entry: TensorEntry, patch: Callable[[torch.Tensor], None] | None = None
    ) -> None:
        """Write the next planned tensor by copying its bytes from a base shard.

        ``patch``, when given, then changes the copy in place: it gets the tensor as stored,
        mapped straight onto the output file, so a tensor with a few changed rows or columns
        costs no read into memory and no second write.
        """
        self._next(name, entry.nbytes)
        self._f.flush()
        start = self._f.tell()
        with open(entry.file, "rb") as src:
            self._copy_range(src, entry)
        self._f.seek(0, os.SEEK_END)
        if patch is not None and entry.nbytes:
            self._patch(start, entry, patch)
        self._hasher.feed_range(self.path, start, start + entry.nbytes)
        self._start_sync()

    def _copy_range(self, src: BinaryIO, entry: TensorEntry) -> None:
        done = 0
        try:
            if _copy_file_range is None:
                raise OSError("os.copy_file_range is not available on this system")
            while done < entry.nbytes:
                n = _copy_file_range(
                    src.fileno(), self._f.fileno(), entry.nbytes - done, entry.start + done
                )
                if n == 0:
                    raise AdapterFormatError(f"{entry.file} ended early while reading {entry.name}")
                done += n
        except OSError:  # no kernel copy here (old kernel, other file systems): plain reads
            src.seek(entry.start + done)
            self._f.seek(0, os.SEEK_END)
            while done < entry.nbytes:
                chunk = src.read(min(entry.nbytes - done, _COPY_CHUNK))
                if not chunk:
                    raise AdapterFormatError(
                        f"{entry.file} ended early while reading {entry.name}"
                    ) from None
                self._f.write(chunk)
                done += len(chunk)
            self._f.flush()

    def _patch(self, start: int, entry: TensorEntry, patch: Callable[[torch.Tensor], None]) -> None:
        base = start - start % mmap.ALLOCATIONGRANULARITY  # mmap offsets must be aligned
        with mmap.mmap(self._f.fileno(), start + entry.nbytes - base, offset=base) as mm:
            raw = torch.frombuffer(mm, dtype=torch.uint8, count=entry.nbytes, offset=start - base)
            patch(raw.view(DTYPES[entry.dtype]).reshape(entry.shape))
            del raw  # the map closes only once no tensor points into it

    def close(self) -> Future[str]:
        """Finish the file in the background: fsync and close it, then its sha256.

        The fsync (disk time, not CPU) of one shard thus overlaps writing the next one.
        """
        if self._pending:
            raise InternalError(f"internal: {self.path.name} is missing {self._pending[0].name}")
        self._f.flush()

        def sync_and_close() -> None:
            self._stop_sync()
            os.fsync(self._f.fileno())
            self._f.close()

        return self._hasher.finish(sync_and_close)

    def abort(self) -> None:
        self._hasher.abort()
        with contextlib.suppress(OSError):
            self._stop_sync()
        self._f.close()


def file_sha256(path: Path) -> str:
    """sha256 of a file, read in chunks."""
    sha = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_COPY_CHUNK):
            sha.update(chunk)
    return sha.hexdigest()


def tree_sha256(file_hashes: dict[str, str]) -> str:
    """One digest for a directory: sha256 over sorted ``relative-path<TAB>file-sha256`` lines."""
    lines = sorted(f"{name}\t{digest}" for name, digest in file_hashes.items())
    return hashlib.sha256("\n".join(lines).encode()).hexdigest()


def check_out_dir(out: Path, force: bool) -> None:
    """Refuse an existing output path unless ``force``; the parent must exist and be writable."""
    if out.exists() and not force:
        raise OutputError(f"{out} already exists: choose another --out or pass --force")
    if out.exists() and not out.is_dir():
        raise OutputError(f"{out} exists and is not a directory: remove it first")
    parent = out.absolute().parent
    if not parent.is_dir() or not os.access(parent, os.W_OK):
        raise OutputError(f"cannot write into {parent}: create it or choose another --out")


def check_free_space(out: Path, need: int) -> None:
    """Refuse when the output's file system has less than ``need`` bytes (plus 1%) free."""
    free = shutil.disk_usage(out.absolute().parent).free
    if free < need * 1.01:
        raise OutputError(
            f"not enough disk space in {out.absolute().parent}: need {need / 1e9:.2f} GB, "
            f"{free / 1e9:.2f} GB free"
        )


@contextlib.contextmanager
def atomic_dir(out: str | Path, force: bool = False) -> Iterator[Path]:
    """``sbora.files.atomic_dir`` for an ``--out`` path: checked first, ``force`` replaces it.

    Temp folders that killed writers left beside ``out`` (``<out>.tmp-<pid>-*`` of processes
    that no longer run) are removed first; a live writer's are left alone.
    """
    out = Path(out).absolute()
    files.restore_swapped(out)  # the previous output, if a killed --force compose moved it aside
    check_out_dir(out, force)
    for stale in stale_temps(out.parent, out.name):
        shutil.rmtree(stale, ignore_errors=True)
    with files.atomic_dir(out, replace=force) as tmp:
        yield tmp
