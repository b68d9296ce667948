"""Dense weight updates ``ΔW`` (out, in) of each variant, as pure tensor functions.

SBoRA-FA fixes ``A = I_in[idx]`` (rows of the identity), so ``ΔW = s·B·A`` is ``s·B`` placed in
columns ``idx`` and zero elsewhere. SBoRA-FB fixes ``B = I_out[:, idx]``, so ``ΔW`` is ``s·A``
placed in rows ``idx``. Plain LoRA is ``s·B@A`` everywhere. These are built by index assignment,
never through a one-hot matrix, and always in float32.
"""

from __future__ import annotations

import torch

from sbora_reg.errors import AdapterFormatError

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


def cells(variant: str, shape: Shape, rank: int) -> int:
    """How many weight cells a module's update may touch (FA out·r, FB r·in, LoRA all)."""
    out, inp = shape
    if variant == "fa":
        return out * rank
    if variant == "fb":
        return rank * inp
    return out * inp
