"""SBoRA, Standard-Basis LoRA (arXiv 2407.05413): regional low-rank updates of frozen weights.

For a target weight ``W0`` (out, in) and scale ``s = alpha / r``:

- SBoRA-FA fixes ``A = I_in[idx]`` and trains ``B`` (out, r): ``y = W0 x + s·B x[idx]``,
  so only the r columns ``idx`` of ``W`` change on merge: ``W[:, idx] += s·B``.
- SBoRA-FB fixes ``B = I_out[:, idx]`` and trains ``A`` (r, in): ``y = W0 x + s·(A x)`` scattered
  into outputs ``idx``, so only the r rows ``idx`` change: ``W[idx, :] += s·A``.

The fixed factor is an int64 index buffer, never a dense one-hot matrix.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from sbora_reg._lazy import lazy_names

if TYPE_CHECKING:
    from sbora_reg.sbora.adapter import Adapter, AdapterModule, dir_sha256
    from sbora_reg.sbora.config import SBoRAConfig
    from sbora_reg.sbora.delta import cells, delta_weight, fa_delta, fb_delta, lora_delta
    from sbora_reg.sbora.fingerprint import model_fingerprint
    from sbora_reg.sbora.indices import (
        default_indices,
        load_indices,
        read_indices_file,
        save_indices,
        validate_indices,
    )
    from sbora_reg.sbora.layer import SBoRALayer, is_adapter_param
    from sbora_reg.sbora.model import (
        apply_adapter,
        extract,
        inject,
        merge,
        merge_and_unload,
        sbora_layers,
        trainable_parameters,
        unload,
        unmerge,
    )
    from sbora_reg.sbora.peft_io import from_peft, to_peft

# Names are loaded on first use (PEP 562), so that torch-free parts of the package
# (``sbora.config``, ``sbora.cells``) and the registry's read commands do not import torch.
_WHERE = {
    "Adapter": "adapter",
    "AdapterModule": "adapter",
    "dir_sha256": "adapter",
    "SBoRAConfig": "config",
    "cells": "delta",
    "delta_weight": "delta",
    "fa_delta": "delta",
    "fb_delta": "delta",
    "lora_delta": "delta",
    "model_fingerprint": "fingerprint",
    "default_indices": "indices",
    "load_indices": "indices",
    "read_indices_file": "indices",
    "save_indices": "indices",
    "validate_indices": "indices",
    "SBoRALayer": "layer",
    "is_adapter_param": "layer",
    "apply_adapter": "model",
    "extract": "model",
    "inject": "model",
    "merge": "model",
    "merge_and_unload": "model",
    "sbora_layers": "model",
    "trainable_parameters": "model",
    "unload": "model",
    "unmerge": "model",
    "from_peft": "peft_io",
    "to_peft": "peft_io",
}


__getattr__, __dir__ = lazy_names(__name__, _WHERE)


__all__ = [
    "Adapter",
    "AdapterModule",
    "SBoRAConfig",
    "SBoRALayer",
    "apply_adapter",
    "cells",
    "default_indices",
    "delta_weight",
    "dir_sha256",
    "extract",
    "fa_delta",
    "fb_delta",
    "from_peft",
    "inject",
    "is_adapter_param",
    "load_indices",
    "lora_delta",
    "merge",
    "merge_and_unload",
    "model_fingerprint",
    "read_indices_file",
    "save_indices",
    "sbora_layers",
    "to_peft",
    "trainable_parameters",
    "unload",
    "unmerge",
    "validate_indices",
]
