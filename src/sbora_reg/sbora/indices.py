"""Standard-basis index sets: validation, the default seeded draw, and the indices file.

Invariant everywhere: an index tensor is int64, 1-D, strictly increasing and in ``[0, dim)``.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping, Sequence
from pathlib import Path

import torch

from sbora_reg.errors import AdapterFormatError, ConfigError, InvalidIndicesError
from sbora_reg.sbora.files import write_atomic
from sbora_reg.sbora.storage import read_safetensors, safetensors_bytes

IndicesLike = torch.Tensor | Sequence[int]
INDICES_FORMAT = "sbora-indices"


def validate_indices(idx: IndicesLike, dim: int, name: str, r: int | None = None) -> torch.Tensor:
    """Return ``idx`` as a sorted int64 tensor, or raise ``InvalidIndicesError``.

    ``dim`` is the size of the indexed axis (``in`` for FA, ``out`` for FB); ``r``, if given, is
    the required length.
    """
    return sort_indices(idx, dim, name, r)[0]


def sort_indices(
    idx: IndicesLike, dim: int, name: str, r: int | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Validated sorted int64 indices and the permutation ``order`` with ``sorted = idx[order]``.

    A factor stored along ``idx`` must be permuted by ``order`` too (FA: ``B[:, order]``).
    """
    try:
        t = torch.as_tensor(idx)
    except (TypeError, ValueError, RuntimeError) as exc:
        raise InvalidIndicesError(f"indices for {name} are not a list of integers") from exc
    if t.dtype.is_floating_point or t.dtype.is_complex or t.dtype == torch.bool:
        raise InvalidIndicesError(f"indices for {name} must be integers, not {t.dtype}")
    if t.dim() != 1 or t.numel() == 0:
        raise InvalidIndicesError(f"indices for {name} must be a non-empty 1-D list")
    t = t.detach().to("cpu", torch.int64)
    if r is not None and t.numel() != r:
        raise InvalidIndicesError(f"{name} needs {r} indices, got {t.numel()}")
    if t.numel() > dim:
        raise ConfigError(f"r={t.numel()} is larger than the dimension {dim} of {name}")
    bad = t[(t < 0) | (t >= dim)]
    if bad.numel():
        raise InvalidIndicesError(f"index {int(bad[0])} is out of range [0, {dim}) for {name}")
    t, order = torch.sort(t)
    dup = t[1:][t[1:] == t[:-1]]
    if dup.numel():
        raise InvalidIndicesError(
            f"index {int(dup[0])} appears more than once for {name}: indices must be distinct"
        )
    return t.contiguous(), order


def default_indices(seed: int, name: str, dim: int, r: int) -> torch.Tensor:
    """The seeded draw: r sorted distinct indices, a function of (seed, module name) only."""
    if r > dim:
        raise ConfigError(f"r={r} is larger than the dimension {dim} of {name}: lower r")
    digest = hashlib.sha256(f"{seed}:{name}".encode()).digest()
    gen = torch.Generator(device="cpu").manual_seed(int.from_bytes(digest[:8], "little") >> 1)
    return torch.sort(torch.randperm(dim, generator=gen)[:r])[0].to(torch.int64)


def save_indices(
    path: str | Path,
    indices: Mapping[str, IndicesLike],
    variant: str,
    base_fingerprint: str | None = None,
    reservation: str | int | None = None,
) -> Path:
    """Write an indices file (see docs/FORMAT.md); indices must already be valid sets."""
    if variant not in ("fa", "fb"):
        raise ConfigError(f"variant must be 'fa' or 'fb', not {variant!r}")
    tensors: dict[str, torch.Tensor] = {}
    for name, idx in indices.items():
        t = validate_indices(idx, dim=2**62, name=name)
        tensors[name] = t
    meta = {"format": INDICES_FORMAT, "variant": variant}
    if base_fingerprint:
        meta["base_fingerprint"] = base_fingerprint
    if reservation is not None:
        meta["reservation"] = str(reservation)
    path = Path(path)
    write_atomic(path, safetensors_bytes(tensors, meta))
    return path


def read_indices_file(path: str | Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Indices and header metadata of an indices file."""
    path = Path(path)
    tensors, meta = read_safetensors(path)
    if meta.get("format") != INDICES_FORMAT:
        raise AdapterFormatError(
            f"{path} is not an SBoRA indices file (format={meta.get('format')!r}); "
            "make one with `sbora-reg allocate` or sbora.save_indices"
        )
    out = {name: validate_indices(t, dim=2**62, name=name) for name, t in tensors.items()}
    return out, meta


def load_indices(path: str | Path) -> dict[str, torch.Tensor]:
    """Module name -> sorted int64 indices, from an indices file."""
    return read_indices_file(path)[0]
