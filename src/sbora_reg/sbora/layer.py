"""``SBoRALayer``: one frozen base layer plus one regional (standard-basis) low-rank update.

With ``s = alpha / r`` and ``x`` (..., in), ``y0 = base_layer(x)`` (..., out):

- FA:   ``y = y0 + s · x[..., idx] @ B.T``          B: (out, r), only columns ``idx`` of W change
- FB:   ``y = y0.index_add(-1, idx, s · x @ A.T)``   A: (r, in),  only rows ``idx`` of W change
- LoRA: ``y = y0 + s · (x @ A.T) @ B.T``             (plain LoRA modules imported from PEFT)

No one-hot matrix and no (out, in) temporary exists in forward or backward: FA gathers r input
features, FB scatters r output features. ``merge`` writes the update into the touched region of
the base weight and keeps a copy of that region, so ``unmerge`` restores it bit for bit.
"""

from __future__ import annotations

import math
from typing import cast

import torch
import torch.nn.functional as F
from torch import nn

from sbora_reg.errors import ConfigError, QuantizationError
from sbora_reg.sbora import delta as _delta
from sbora_reg.sbora.fingerprint import layer_kind_and_shape

PREFIX = "sbora_"


def is_adapter_param(name: str) -> bool:
    """The one predicate for adapter state (trainable, saved, filtered): an ``sbora_`` name."""
    return name.rsplit(".", 1)[-1].startswith(PREFIX)


class SBoRALayer(nn.Module):
    """Wraps ``base_layer`` (``nn.Linear`` incl. bitsandbytes, or GPT-2 ``Conv1D``)."""

    base_layer: nn.Module
    sbora_idx: torch.Tensor
    sbora_A: nn.Parameter  # (r, in): FB and LoRA
    sbora_B: nn.Parameter  # (out, r): FA and LoRA
    sbora_saved: torch.Tensor | None

    def __init__(
        self,
        base_layer: nn.Module,
        variant: str,
        scale: float,
        indices: torch.Tensor | None = None,
        rank: int | None = None,
        dropout: float = 0.0,
    ) -> None:
        super().__init__()
        found = layer_kind_and_shape(base_layer)
        if found is None or found[0] not in ("linear", "conv1d"):
            raise ConfigError(
                f"SBoRA wraps nn.Linear or transformers Conv1D, not {type(base_layer).__name__}"
            )
        self.base_layer = base_layer
        self.kind, self.shape = found
        self.variant = variant
        self.scale = float(scale)
        self.merged = False
        out, inp = self.shape
        weight = cast(torch.Tensor, base_layer.weight)
        dtype = weight.dtype if weight.dtype.is_floating_point else torch.float32
        device = weight.device
        self.sbora_dropout: nn.Module = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        # Original region of the base weight while merged (not part of the state dict).
        self.register_buffer("sbora_saved", None, persistent=False)
        if variant in ("fa", "fb"):
            if indices is None:
                raise ConfigError(f"an SBoRA-{variant.upper()} layer needs indices")
            idx = indices.to(device=device, dtype=torch.int64)
            self.register_buffer("sbora_idx", idx)
            r = int(idx.numel())
            if variant == "fa":  # trained B (out, r); zero init so the model starts unchanged
                self.sbora_B = nn.Parameter(torch.zeros(out, r, dtype=dtype, device=device))
            else:  # trained A (r, in)
                self.sbora_A = nn.Parameter(torch.zeros(r, inp, dtype=dtype, device=device))
        elif variant == "lora":
            if rank is None or rank < 1:
                raise ConfigError("a plain LoRA layer needs a positive rank")
            self.register_buffer("sbora_idx", None)
            self.sbora_A = nn.Parameter(torch.empty(rank, inp, dtype=dtype, device=device))
            nn.init.kaiming_uniform_(self.sbora_A, a=math.sqrt(5))
            self.sbora_B = nn.Parameter(torch.zeros(out, rank, dtype=dtype, device=device))
        else:
            raise ConfigError(f"variant must be 'fa', 'fb' or 'lora', not {variant!r}")

    # ---- views -------------------------------------------------------------------------------
    @property
    def rank(self) -> int:
        if self.variant == "lora":
            return int(self.sbora_A.shape[0])
        return int(self.sbora_idx.numel())

    @property
    def factor_a(self) -> torch.Tensor | None:
        return self.sbora_A if self.variant in ("fb", "lora") else None

    @property
    def factor_b(self) -> torch.Tensor | None:
        return self.sbora_B if self.variant in ("fa", "lora") else None

    def delta_weight(self) -> torch.Tensor:
        """Dense float32 ``ΔW`` (out, in) (for tests and inspection; forward never builds it)."""
        idx = self.sbora_idx if self.variant != "lora" else None
        return _delta.delta_weight(
            self.variant, self.shape, self.scale, idx, self.factor_a, self.factor_b
        )

    def region(self) -> tuple[str, torch.Tensor | None]:
        """What the update touches in the (out, in) frame: ("cols"|"rows", idx) or ("all", None)."""
        if self.variant == "fa":
            return "cols", self.sbora_idx
        if self.variant == "fb":
            return "rows", self.sbora_idx
        return "all", None

    def extra_repr(self) -> str:
        return (
            f"variant={self.variant}, kind={self.kind}, shape={self.shape}, r={self.rank}, "
            f"scale={self.scale:g}, merged={self.merged}"
        )

    # ---- forward -----------------------------------------------------------------------------
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.base_layer(x)  # (..., out)
        if self.merged:
            return y
        if self.variant == "fa":
            return self._forward_fa(x, y)
        if self.variant == "fb":
            return self._forward_fb(x, y)
        a, b = self.sbora_A, self.sbora_B
        h = F.linear(self.sbora_dropout(x).to(a.dtype), a)  # (..., r)
        return y + (F.linear(h, b) * self.scale).to(y.dtype)

    def _forward_fa(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        b = self.sbora_B  # (out, r)
        # gather on a 2-D view: faster than index_select on the last dim of a 3-D tensor
        xs = x.reshape(-1, x.shape[-1]).index_select(1, self.sbora_idx)  # (N, r)
        xs = self.sbora_dropout(xs).to(b.dtype)
        y2 = y.reshape(-1, y.shape[-1])  # (N, out)
        inplace = not torch.is_grad_enabled()  # y is our own fresh tensor: no new (N, out)
        if y.dtype == b.dtype:
            # one fused kernel: y + s · xs @ B.T
            if inplace:
                return y2.addmm_(xs, b.T, alpha=self.scale).view(y.shape)
            return torch.addmm(y2, xs, b.T, alpha=self.scale).view(y.shape)
        d = (F.linear(xs, b) * self.scale).to(y.dtype)
        return (y2.add_(d) if inplace else y2 + d).view(y.shape)

    def _forward_fb(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        a = self.sbora_A  # (r, in)
        h = F.linear(self.sbora_dropout(x).to(a.dtype), a).to(y.dtype)  # (..., r)
        if not torch.is_grad_enabled():
            return y.index_add_(-1, self.sbora_idx, h, alpha=self.scale)
        # out-of-place under autograd: the base output stays untouched
        return y.index_add(-1, self.sbora_idx, h, alpha=self.scale)

    # ---- merge -------------------------------------------------------------------------------
    def _weight_view(self) -> torch.Tensor:
        """The base weight as an (out, in) view (Conv1D stores (in, out))."""
        w = cast(torch.Tensor, self.base_layer.weight)
        if not w.dtype.is_floating_point:
            raise QuantizationError(
                "merge into a quantised base needs dequantising first: "
                "use sbora_reg.sbora.quant.merge_dequantized"
            )
        return w.data.T if self.kind == "conv1d" else w.data

    @torch.no_grad()
    def merge(self) -> None:
        """Add ``ΔW`` into the base weight's region (float32 sum, cast back). Idempotent."""
        if self.merged:
            return
        w = self._weight_view()
        if self.variant in ("fa", "fb"):
            idx = self.sbora_idx
            old = w.index_select(_delta.axis(self.variant), idx)  # (out, r) or (r, in), a copy
            factor = self.sbora_B if self.variant == "fa" else self.sbora_A
            _delta.merge_regional(w, self.variant, [(idx, factor, self.scale)], w.dtype)
        else:
            old = w.clone()
            w.copy_(old.float() + _delta.lora_delta(self.sbora_A, self.sbora_B, self.scale))
        self.sbora_saved = old
        self.merged = True

    @torch.no_grad()
    def unmerge(self) -> None:
        """Restore the exact base weights saved at merge time. Idempotent."""
        if not self.merged:
            return
        w = self._weight_view()
        saved = self.sbora_saved
        assert saved is not None  # set by merge()
        if self.variant == "fa":
            w[:, self.sbora_idx] = saved
        elif self.variant == "fb":
            w[self.sbora_idx, :] = saved
        else:
            w.copy_(saved)
        self.sbora_saved = None
        self.merged = False

    @torch.no_grad()
    def load_factors(self, a: torch.Tensor | None, b: torch.Tensor | None) -> None:
        """Copy trained factors in (cast to this layer's factor dtype)."""
        if self.variant in ("fb", "lora"):
            assert a is not None
            self.sbora_A.copy_(a)
        if self.variant in ("fa", "lora"):
            assert b is not None
            self.sbora_B.copy_(b)
