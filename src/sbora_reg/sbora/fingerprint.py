"""Shape fingerprint of a base model: which adapters fit which model.

The fingerprint is a sha256 over the sorted lines ``name<TAB>kind<TAB>out<TAB>in`` of every
``nn.Linear`` (bitsandbytes ``Linear4bit``/``Linear8bitLt`` included), GPT-2 ``Conv1D`` and
``nn.Embedding`` module, with shapes in the ``(out, in)`` frame (``Conv1D`` stores its weight
transposed) and wrapper segments such as ``.base_layer`` removed. It depends on names and shapes
only: the same model in fp32, bf16, 4-bit or with adapters injected has one fingerprint.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from pathlib import Path
from typing import cast

import torch
from torch import nn

from sbora_reg.errors import AdapterFormatError

Shape = tuple[int, int]

# Segments that wrappers (ours and PEFT's) insert between a module's name and the real layer.
_WRAPPER_SEGMENTS = ("base_layer",)


def _conv1d_type() -> type | None:
    try:
        from transformers.pytorch_utils import Conv1D
    except ImportError:  # pragma: no cover - transformers is a dependency
        return None
    return Conv1D


def layer_kind_and_shape(module: nn.Module) -> tuple[str, Shape] | None:
    """``("linear"|"conv1d"|"embedding", (out, in))`` for a supported layer, else None."""
    conv1d = _conv1d_type()
    if conv1d is not None and isinstance(module, conv1d):
        nx, nf = cast(torch.Tensor, module.weight).shape  # Conv1D weight is (in, out)
        return "conv1d", (int(nf), int(nx))
    if isinstance(module, nn.Linear):
        # Use the declared features: a 4-bit weight is packed and has another shape.
        return "linear", (int(module.out_features), int(module.in_features))
    if isinstance(module, nn.Embedding):
        return "embedding", (int(module.num_embeddings), int(module.embedding_dim))
    return None


def normalise_name(name: str) -> str:
    """Drop wrapper segments so an injected model reports its base's module names."""
    return ".".join(p for p in name.split(".") if p not in _WRAPPER_SEGMENTS)


def module_table(model: nn.Module) -> dict[str, tuple[str, Shape]]:
    """Every supported layer of ``model``: normalised name -> (kind, (out, in))."""
    table: dict[str, tuple[str, Shape]] = {}
    for name, module in model.named_modules():
        found = layer_kind_and_shape(module)
        if found is not None:
            table[normalise_name(name)] = found
    return table


def fingerprint_table(table: Mapping[str, tuple[str, Shape]]) -> str:
    """sha256 hex digest of a module table (order independent)."""
    lines = sorted(f"{n}\t{k}\t{s[0]}\t{s[1]}" for n, (k, s) in table.items())
    return hashlib.sha256("\n".join(lines).encode()).hexdigest()


def model_fingerprint(model: nn.Module) -> str:
    """Fingerprint of a model in memory (quantised or injected models included)."""
    return fingerprint_table(module_table(model))


def meta_model_from_dir(path: str | Path) -> nn.Module:
    """Build the model described by ``path/config.json`` on the meta device (no weights, no RAM)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    path = Path(path)
    if not (path / "config.json").is_file():
        raise AdapterFormatError(f"{path} has no config.json: pass a transformers model directory")
    try:
        config = AutoConfig.from_pretrained(path)
        config.__dict__.pop("quantization_config", None)
        with torch.device("meta"):
            return AutoModelForCausalLM.from_config(config)
    except (OSError, ValueError, KeyError, json.JSONDecodeError) as exc:
        raise AdapterFormatError(f"cannot read the model config in {path}: {exc}") from exc


def dir_module_table(path: str | Path) -> dict[str, tuple[str, Shape]]:
    """Module table of a transformers model directory, read from its config alone."""
    return module_table(meta_model_from_dir(path))


def dir_fingerprint(path: str | Path) -> str:
    """Fingerprint of a transformers model directory without loading its weights."""
    return fingerprint_table(dir_module_table(path))
