"""Read an adapter directory (native SBoRA or PEFT LoRA) into what the registry records.

The files themselves are parsed by :class:`sbora_reg.sbora.Adapter`; this module only decides the
format from the files present, refuses pickle, and reduces the adapter to its summary: config
fields, base identity and, per module, the variant, shape and touched index set.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from sbora_reg.errors import (
    AdapterFormatError,
    FingerprintMismatchError,
    InvalidIndicesError,
    PickleRefusedError,
    ShapeMismatchError,
)
from sbora_reg.registry.records import BaseRecord

NATIVE_FILES = ("sbora_config.json", "sbora_adapter.safetensors")
PEFT_FILES = ("adapter_config.json", "adapter_model.safetensors")
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".pkl", ".pickle", ".ckpt")


@dataclass(frozen=True)
class ModuleSummary:
    """One adapted module: variant fa/fb/lora, kind, (out, in), touched indices (None: lora)."""

    variant: str
    kind: str
    shape: tuple[int, int]
    indices: np.ndarray | None


@dataclass(frozen=True)
class AdapterSummary:
    """Everything the registry stores about an adapter except its files."""

    format: str  # "sbora" | "peft"
    variant: str  # "fa" | "fb" | "lora" | "mixed": the per-module variants, summarised
    rank: int
    alpha: float
    target_modules: list[str]
    base_fingerprint: str | None
    base_model: str | None
    metadata: dict[str, Any]
    modules: dict[str, ModuleSummary] = field(repr=False)


def detect_format(path: Path) -> str:
    """``"sbora"`` or ``"peft"`` from the files in ``path``; refuses pickle and other inputs."""
    if not path.exists():
        raise AdapterFormatError(f"{path} does not exist: pass an adapter directory")
    if path.is_file():
        if path.suffix.lower() in PICKLE_SUFFIXES:
            raise PickleRefusedError(
                f"{path} is a pickle file, which is never loaded: convert it to safetensors"
            )
        raise AdapterFormatError(
            f"{path} is a file: pass the adapter directory (with sbora_config.json or "
            "adapter_config.json)"
        )
    if (path / NATIVE_FILES[0]).is_file():
        return "sbora"
    if (path / PEFT_FILES[0]).is_file():
        if not (path / PEFT_FILES[1]).is_file():
            pickled = [p.name for p in path.iterdir() if p.suffix.lower() in PICKLE_SUFFIXES]
            if pickled:
                raise PickleRefusedError(
                    f"{path} holds {pickled[0]}, a pickle file, which is never loaded: save the "
                    "adapter with safe_serialization=True"
                )
            raise AdapterFormatError(f"{path} has adapter_config.json but no {PEFT_FILES[1]}")
        return "peft"
    raise AdapterFormatError(
        f"{path} is not an adapter directory: expected sbora_config.json (native) or "
        "adapter_config.json (PEFT LoRA)"
    )


def adapter_files(path: Path, fmt: str) -> list[Path]:
    """The files of an adapter that the registry stores (the format's two files)."""
    names = NATIVE_FILES if fmt == "sbora" else PEFT_FILES
    missing = [n for n in names if not (path / n).is_file()]
    if missing:
        raise AdapterFormatError(f"{path} is missing {', '.join(missing)}")
    return [path / n for n in names]


def summarise(path: Path, fmt: str) -> AdapterSummary:
    """Parse the adapter in ``path`` (already in its final or staging place); refuse
    factors that are not finite (they would poison every checkpoint composed from them)."""
    import torch

    from sbora_reg.sbora.adapter import Adapter

    adapter = Adapter.load(path) if fmt == "sbora" else Adapter.from_peft(path)
    modules: dict[str, ModuleSummary] = {}
    for name, mod in adapter.modules.items():
        for factor in (mod.a, mod.b):
            if factor is not None and not bool(torch.isfinite(factor).all()):
                raise AdapterFormatError(
                    f"module {name} of the adapter has factor values that are not finite (NaN "
                    "or inf): the training diverged; retrain it (a lower learning rate) first"
                )
        idx = None if mod.indices is None else mod.indices.detach().cpu().numpy().astype(np.int64)
        modules[name] = ModuleSummary(
            variant=str(mod.variant),
            kind=str(mod.kind),
            shape=(int(mod.shape[0]), int(mod.shape[1])),
            indices=idx,
        )
    if not modules:
        raise AdapterFormatError(f"{path} adapts no module")
    variants = {m.variant for m in modules.values()}
    config = adapter.config
    return AdapterSummary(
        format=fmt,
        variant=variants.pop() if len(variants) == 1 else "mixed",
        rank=int(config.r),
        alpha=float(config.alpha),
        target_modules=list(config.target_modules),
        base_fingerprint=adapter.base_fingerprint or None,
        base_model=adapter.base_model or None,
        metadata={str(k): v for k, v in (adapter.metadata or {}).items()},
        modules=modules,
    )


def check_fits(summary: AdapterSummary, base: BaseRecord) -> None:
    """Raise unless every adapted module is in ``base`` with its shape and in-range indices."""
    if summary.base_fingerprint and summary.base_fingerprint != base.fingerprint:
        raise FingerprintMismatchError(
            f"the adapter was made for base fingerprint {summary.base_fingerprint[:12]}, "
            f"not {base.name} ({base.fingerprint[:12]}): pass the --base it was trained on"
        )
    for name, mod in sorted(summary.modules.items()):
        have = base.modules.get(name)
        if have is None:
            raise ShapeMismatchError(f"{base.name} has no module {name}: wrong --base?")
        if tuple(have.shape) != tuple(mod.shape):
            raise ShapeMismatchError(
                f"module {name} is {mod.shape[0]}x{mod.shape[1]} in the adapter but "
                f"{have.shape[0]}x{have.shape[1]} in {base.name}: wrong --base?"
            )
        if mod.indices is not None and mod.indices.size:
            dim = mod.shape[1] if mod.variant == "fa" else mod.shape[0]
            if mod.indices.min() < 0 or mod.indices.max() >= dim:
                raise InvalidIndicesError(f"module {name} has indices outside [0, {dim})")
