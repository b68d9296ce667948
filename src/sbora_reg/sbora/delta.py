"""Dense weight updates ``ΔW`` (out, in) of each variant, as pure tensor functions.

SBoRA-FA fixes ``A = I_in[idx]`` (rows of the identity), so ``ΔW = s·B·A`` is ``s·B`` placed in
columns ``idx`` and zero elsewhere. SBoRA-FB fixes ``B = I_out[:, idx]``, so ``ΔW`` is ``s·A``
placed in rows ``idx``. Plain LoRA is ``s·B@A`` everywhere. These are built by index assignment,
never through a one-hot matrix, and always in float32.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from sbora_reg.errors import AdapterFormatError
from sbora_reg.sbora.cells import cells

__all__ = [
    "add_regional",
    "axis",
    "cells",
    "delta_weight",
    "fa_delta",
    "fb_delta",
    "lora_delta",
    "merge_regional",
]

Shape = tuple[int, int]


def fa_delta(b: torch.Tensor, idx: torch.Tensor, scale: float, shape: Shape) -> torch.Tensor:
    """FA: ``ΔW[:, idx] = s·B`` with ``B`` (out, r)."""
    delta = torch.zeros(shape, dtype=torch.float32, device=b.device)
    delta[:, idx.to(b.device)] = scale * b.detach().float()
    return delta


def fb_delta(a: torch.Tensor, idx: torch.Tensor, scale: float, shape: Shape) -> torch.Tensor:
    """FB: ``ΔW[idx, :] = s·A`` with ``A`` (r, in)."""
    delta = torch.zeros(shape, dtype=torch.float32, device=a.device)
    delta[idx.to(a.device), :] = scale * a.detach().float()
    return delta


def axis(variant: str) -> int:
    """The dimension of ``(out, in)`` that an index set selects: 1 (columns) for FA, 0 for FB."""
    if variant not in ("fa", "fb"):
        raise AdapterFormatError(f"a {variant!r} module has no index axis")
    return 1 if variant == "fa" else 0


def add_regional(
    region: torch.Tensor, variant: str, positions: torch.Tensor, factor: torch.Tensor, scale: float
) -> None:
    """``region[:, positions] += s·B`` (FA) or ``region[positions, :] += s·A`` (FB), in place.

    ``region`` is float32, ``(out, u)`` for FA or ``(u, in)`` for FB; ``positions`` (r,) index it.
    The one regional merge: the layer, compose and the combined adapter all add through it.
    """
    region.index_add_(axis(variant), positions, scale * factor.detach().float())


def merge_regional(
    weight: torch.Tensor,
    variant: str,
    parts: Sequence[tuple[torch.Tensor, torch.Tensor, float]],
    dtype: torch.dtype,
) -> torch.Tensor:
    """``cast(W + Σ ΔW)`` for ``(idx, factor, scale)`` parts of one variant on ``weight`` (out, in).

    Only the union of the parts' indices goes through float32 (members in order); every other
    weight is untouched. With ``dtype == weight.dtype`` the result *is* ``weight``, changed in
    place (also through a transposed view).
    """
    dim = axis(variant)
    union = torch.unique(torch.cat([idx.to(weight.device) for idx, _, _ in parts]))  # sorted (u,)
    region = weight.index_select(dim, union).float()  # (out, u) or (u, in)
    for idx, factor, scale in parts:
        positions = torch.searchsorted(union, idx.to(weight.device))
        add_regional(region, variant, positions, factor, scale)
    merged = weight.to(dtype)
    merged.index_copy_(dim, union, region.to(dtype))
    return merged


def lora_delta(a: torch.Tensor, b: torch.Tensor, scale: float) -> torch.Tensor:
    """Plain LoRA: ``ΔW = s·B@A`` with ``A`` (r, in), ``B`` (out, r)."""
    return scale * (b.detach().float() @ a.detach().float())


def delta_weight(
    variant: str,
    shape: Shape,
    scale: float,
    idx: torch.Tensor | None,
    a: torch.Tensor | None,
    b: torch.Tensor | None,
) -> torch.Tensor:
    """Dense float32 ``ΔW`` (out, in) of one module of any variant."""
    if variant == "fa" and idx is not None and b is not None:
        return fa_delta(b, idx, scale, shape)
    if variant == "fb" and idx is not None and a is not None:
        return fb_delta(a, idx, scale, shape)
    if variant == "lora" and a is not None and b is not None:
        return lora_delta(a, b, scale)
    raise AdapterFormatError(f"incomplete factors for a {variant!r} module")
