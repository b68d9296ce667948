"""Merging an SBoRA adapter into a quantised base and quantising it again: honest about its cost.

``requantize`` is not regional: NF4/FP4 quantise blocks of 64 consecutive values of a row and
int8 whole rows, so a regional update moves the block (row) scales and changes weights the
adapter never touched; the returned report counts them. FA touches every row, so it always
leaks; FB leaks only through shared scales (double quantisation re-quantises all block scales,
so nearly every weight moves). ``quant.merge_dequantized`` is the regional merge.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from sbora_reg.errors import QuantizationError
from sbora_reg.sbora.layer import SBoRALayer
from sbora_reg.sbora.quant import (
    _sbora_layers,
    _set_submodule,
    dequantize_weight,
    keep_standard_layout,
    quant_kind,
    require_bitsandbytes,
)


@dataclass(frozen=True)
class ModuleRequantStats:
    """What re-quantising one merged module changed, against the dequantised base."""

    kind: str  # nf4 | fp4 | int8
    region_cells: int  # cells the adapter may touch (out·r for FA, r·in for FB)
    outside_cells: int  # all other cells
    changed_outside: int  # of those, how many now dequantise to a different value
    max_error_inside: float  # max |dequant(requantised) - (dequant(W0) + ΔW)| in the region


@dataclass(frozen=True)
class RequantizeReport:
    """Per-module and total counts of weights outside the adapters' regions that changed."""

    modules: dict[str, ModuleRequantStats] = field(default_factory=dict)

    @property
    def changed_outside(self) -> int:
        return sum(m.changed_outside for m in self.modules.values())

    @property
    def outside_cells(self) -> int:
        return sum(m.outside_cells for m in self.modules.values())

    @property
    def fraction_changed_outside(self) -> float:
        total = self.outside_cells
        return self.changed_outside / total if total else 0.0

    def to_dict(self) -> dict[str, Any]:
        return {
            "changed_outside": self.changed_outside,
            "outside_cells": self.outside_cells,
            "fraction_changed_outside": self.fraction_changed_outside,
            "modules": {n: vars(s) for n, s in self.modules.items()},
        }


def region_mask(layer: SBoRALayer) -> torch.Tensor:
    """Boolean (out, in) mask of the cells an SBoRA layer may change (FA columns, FB rows)."""
    mask = torch.zeros(layer.shape, dtype=torch.bool, device=layer.sbora_idx.device)
    if layer.variant == "fa":
        mask[:, layer.sbora_idx] = True
    else:
        mask[layer.sbora_idx, :] = True
    return mask


def _quantize_like(base: Any, weight: torch.Tensor) -> nn.Module:
    """A new bitsandbytes layer of ``base``'s kind and settings holding ``weight`` quantised."""
    bnb = require_bitsandbytes()
    bias = base.bias
    device = weight.device
    if quant_kind(base) == "int8":
        new8 = bnb.nn.Linear8bitLt(
            base.in_features,
            base.out_features,
            bias=bias is not None,
            has_fp16_weights=False,
            threshold=base.state.threshold,
            device=device,
        )
        cb, scb, _ = bnb.functional.int8_vectorwise_quant(weight.to(torch.float16).contiguous())
        new8.weight = bnb.nn.Int8Params(
            cb, requires_grad=False, has_fp16_weights=False, CB=cb, SCB=scb
        )
        if bias is not None:
            new8.bias = nn.Parameter(bias.detach().clone(), requires_grad=False)
        return new8.train(base.training)
    old = base.weight.quant_state
    new4 = bnb.nn.Linear4bit(
        base.in_features,
        base.out_features,
        bias=bias is not None,
        compute_dtype=base.compute_dtype,
        compress_statistics=base.weight.compress_statistics,
        quant_type=base.weight.quant_type,
        quant_storage=base.weight.quant_storage,
        device=device,
    )
    qdata, state = bnb.functional.quantize_4bit(
        weight.to(getattr(old, "original_dtype", old.dtype)).contiguous(),
        blocksize=base.weight.blocksize,
        compress_statistics=base.weight.compress_statistics,
        quant_type=base.weight.quant_type,
        quant_storage=base.weight.quant_storage,
    )
    new4.weight = bnb.nn.Params4bit(
        qdata,
        requires_grad=False,
        quant_state=state,
        blocksize=base.weight.blocksize,
        compress_statistics=base.weight.compress_statistics,
        quant_type=base.weight.quant_type,
        quant_storage=base.weight.quant_storage,
        module=new4,
        bnb_quantized=True,
    )
    new4.quant_state = state
    if bias is not None:
        new4.bias = nn.Parameter(bias.detach().clone(), requires_grad=False)
    return keep_standard_layout(new4.train(base.training))


def requantize(model: nn.Module) -> RequantizeReport:
    """Merge each SBoRA adapter over a quantised base and quantise the result again, in place.

    Not regional: a changed value moves its block's (NF4/FP4) or row's (int8) scale, so weights
    the adapter never touched change too. Each wrapper is replaced by a quantised layer of the
    base's kind and settings holding ``quant(dequant(W0) + ΔW)``; the report counts, per module,
    the cells outside the adapter's region whose dequantised value is no longer
    ``dequant(W0)``. Use ``merge_dequantized`` to keep merges regional.
    """
    stats: dict[str, ModuleRequantStats] = {}
    for name, layer in _sbora_layers(model):
        base: Any = layer.base_layer
        kind = quant_kind(base)
        if kind is None:
            raise QuantizationError(
                f"{name} has an unquantised base: requantize only merges into quantised layers"
            )
        if layer.merged:
            raise QuantizationError(f"{name} is merged: unmerge it before requantize")
        w0 = dequantize_weight(base)  # (out, in) float32
        target = w0 + layer.delta_weight().to(w0)
        new = _quantize_like(base, target)
        w1 = dequantize_weight(new)
        mask = region_mask(layer).to(w0.device)
        inside_err = (w1 - target)[mask].abs().max().item() if mask.any() else 0.0
        stats[name] = ModuleRequantStats(
            kind=kind,
            region_cells=int(mask.sum()),
            outside_cells=int((~mask).sum()),
            changed_outside=int((w1 != w0)[~mask].sum()),
            max_error_inside=float(inside_err),
        )
        _set_submodule(model, name, new)
    if hasattr(model, "_sbora_config"):  # no SBoRA layer is left (as after sbora.unload)
        delattr(model, "_sbora_config")
    return RequantizeReport(stats)
