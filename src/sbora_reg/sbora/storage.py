"""Safe file I/O for adapters and index files: safetensors only, no pickle, atomic writes."""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

from sbora_reg.errors import AdapterFormatError, PickleRefusedError
from sbora_reg.sbora.files import atomic_dir, fsync_write, write_atomic

PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".pkl", ".pickle", ".ckpt")


def is_pickle_name(name: str) -> bool:
    """Whether a file name looks like a pickle-based checkpoint."""
    lower = name.lower()
    return lower.endswith(PICKLE_SUFFIXES) or lower.startswith("pytorch_model")


def refuse_pickle(path: Path) -> None:
    """Raise ``PickleRefusedError`` if ``path`` names a pickle-based file."""
    if is_pickle_name(path.name):
        raise PickleRefusedError(
            f"{path} is a pickle-based file; sbora-reg never loads pickle: "
            "convert it to safetensors first"
        )


def read_safetensors(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """All tensors and the header metadata of a safetensors file (one-line errors)."""
    refuse_pickle(path)
    try:
        data = path.read_bytes()
    except FileNotFoundError as exc:
        raise AdapterFormatError(f"{path} does not exist") from exc
    except OSError as exc:
        raise AdapterFormatError(f"cannot read {path}: {exc.strerror}") from exc
    try:
        tensors = st_load(data)
        metadata = _header_metadata(data)
    except (SafetensorError, ValueError) as exc:
        reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise AdapterFormatError(
            f"{path} is truncated or not a safetensors file ({reason}); re-export or re-download it"
        ) from exc
    return tensors, metadata


def _header_metadata(data: bytes) -> dict[str, str]:
    n = int.from_bytes(data[:8], "little")
    header = json.loads(data[8 : 8 + n])
    meta = header.get("__metadata__") or {}
    if not isinstance(meta, dict):
        raise ValueError("header metadata is not a string map")
    return {str(k): str(v) for k, v in meta.items()}


def safetensors_bytes(tensors: Mapping[str, torch.Tensor], metadata: Mapping[str, str]) -> bytes:
    """Deterministic safetensors bytes (contiguous CPU copies of ``tensors``)."""
    plain = {k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}
    data = st_save(plain, metadata=dict(metadata))
    # safetensors writes the metadata map in hash order; canonicalise the header (same length,
    # same content, sorted keys, space padding as the format allows) so equal adapters hash equal.
    n = int.from_bytes(data[:8], "little")
    header = json.dumps(json.loads(data[8 : 8 + n]), sort_keys=True, separators=(",", ":"))
    raw = header.encode()
    if len(raw) > n:  # pragma: no cover - the same content never grows
        return data
    return data[:8] + raw + b" " * (n - len(raw)) + data[8 + n :]


def write_dir_atomic(target: Path, files: Mapping[str, bytes]) -> None:
    """Write a folder of files so a killed process never leaves a half-written folder.

    A new (or empty) folder is built under a temp name beside ``target`` and renamed into place
    (``files.atomic_dir``). An existing non-empty folder keeps its other files: each file is
    replaced atomically, in the order given.
    """
    if target.exists() and not target.is_dir():
        raise AdapterFormatError(f"{target} exists and is not a folder: choose another path")
    if target.is_dir() and any(target.iterdir()):
        for name, data in files.items():
            write_atomic(target / name, data)
        return
    with atomic_dir(target) as tmp:
        for name, data in files.items():
            fsync_write(tmp / name, data)
