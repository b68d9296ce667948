"""Dense references and tiny-model configs for the SBoRA tests (no weights are downloaded)."""

from __future__ import annotations

import torch
from tests import tiny
from torch import nn

LLAMA = tiny.llama("l64-96")
GPT2 = tiny.gpt2("g48", bos_token_id=0, eos_token_id=0)


def one_hot(idx: torch.Tensor, n: int, dtype: torch.dtype = torch.float64) -> torch.Tensor:
    """(r, n) rows of the n×n identity: the fixed factor written out densely."""
    return torch.eye(n, dtype=dtype)[idx]


def dense_delta(
    variant: str, idx: torch.Tensor, factor: torch.Tensor, scale: float, shape: tuple[int, int]
) -> torch.Tensor:
    """Reference ΔW (out, in) in float64: FA ``s·B@one_hot(idx)``; FB ``s·one_hot(idx).T@A``."""
    out, inp = shape
    f = factor.double()  # keeps the graph when factor requires grad
    if variant == "fa":
        return scale * f @ one_hot(idx, inp)
    return scale * one_hot(idx, out).T @ f


def randomise_adapter(model: nn.Module, seed: int = 0, std: float = 0.05) -> None:
    """Give every trained factor non-zero values (they start at zero)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in sorted(model.named_parameters()):
            if name.rsplit(".", 1)[-1].startswith("sbora_"):
                p.copy_(torch.randn(p.shape, generator=gen) * std)
