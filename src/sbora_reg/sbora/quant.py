"""QSBoRA: SBoRA on a bitsandbytes 4-bit (NF4/FP4) or 8-bit (LLM.int8) base model.

The adapter stays in 16/32-bit and the quantised base is never touched by training:

    FA:  y = Q(W0) x + s · B x[idx]            (gather; the adapter term never dequantises W0)
    FB:  y = (Q(W0) x).index_add(-1, idx, s · A x)

``Linear4bit`` and ``Linear8bitLt`` subclass ``nn.Linear``, so ``sbora.inject`` wraps them as it
wraps any linear layer. What is special lives here:

- loading (``load_quantized``) and preparing for training (``prepare_for_training``);
- ``dequantize_weight``: the float (out, in) weight a quantised layer really computes with;
- ``merge_dequantized``: dequantise, add ΔW, keep the result in 16/32-bit. Only the adapter's
  columns (FA) or rows (FB) change; every other weight equals the dequantised base bit for bit;
- ``keep_standard_layout``: bitsandbytes' CPU backend may repack 4-bit weights for its own
  kernel (AVX512-BF16); every layer we load, prepare or wrap stays in the standard layout, so
  ``dequantize_weight`` is what it computes with on every path;
- re-quantising a merge is ``sbora.requant.requantize`` (not regional, and says how much).
- ``quantization_metadata``: how an adapter's training base was quantised, for its metadata. The
  adapter's ``base_fingerprint`` is the unquantised checkpoint's (the fingerprint reads
  ``in_features``/``out_features``, not the packed weight).
"""

from __future__ import annotations

import copy
import importlib
from pathlib import Path
from types import ModuleType
from typing import Any

import torch
from torch import nn

from sbora_reg.errors import ConfigError, QuantizationError
from sbora_reg.sbora.layer import SBoRALayer

FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
QUANT_TYPES = ("nf4", "fp4")


# --------------------------------------------------------------------------- bitsandbytes access


def require_bitsandbytes() -> ModuleType:
    """Import bitsandbytes or raise a ``QuantizationError`` that says how to get it."""
    try:
        return importlib.import_module("bitsandbytes")
    except ImportError as exc:
        raise QuantizationError(
            "this needs bitsandbytes for a quantised base model: pip install 'bitsandbytes>=0.45'"
        ) from exc


# Parameter classes of quantised bitsandbytes layers, recognised by name so that a model holding
# them is reported clearly even where bitsandbytes cannot be imported.
_QUANT_PARAM_NAMES = ("Params4bit", "Int8Params")


def quant_kind(module: nn.Module) -> str | None:
    """``"nf4"``, ``"fp4"`` or ``"int8"`` for a quantised bitsandbytes linear layer, else None.

    An 8-bit layer that keeps fp16 weights (``has_fp16_weights=True``) is not quantised storage
    and reports None.
    """
    weight = getattr(module, "weight", None)
    kind = type(weight).__name__
    if kind == "Params4bit":
        return str(weight.quant_type)  # type: ignore[union-attr]
    if kind == "Int8Params":
        return "int8" if weight.dtype == torch.int8 else None  # type: ignore[union-attr]
    return None


def is_quantized(module: nn.Module) -> bool:
    """Whether ``module`` is a bitsandbytes linear layer holding quantised weights."""
    return quant_kind(module) is not None


def has_quantized_layers(model: nn.Module) -> bool:
    """Whether any layer of ``model`` holds quantised weights."""
    return any(is_quantized(m) for m in model.modules())


# --------------------------------------------------------------------------- loading, training


def load_quantized(
    path: str | Path,
    bits: int = 4,
    quant_type: str = "nf4",
    double_quant: bool = True,
    compute_dtype: torch.dtype = torch.bfloat16,
    dtype: torch.dtype = torch.float32,
    **kwargs: Any,
) -> nn.Module:
    """Load a transformers causal LM from ``path`` with its linear layers quantised.

    ``bits=4`` gives ``Linear4bit`` (``quant_type`` nf4|fp4, ``double_quant`` quantises the block
    scales too, ``compute_dtype`` is the matmul dtype); ``bits=8`` gives ``Linear8bitLt``. The
    other parameters (embeddings, norms, head) load in ``dtype``. Extra keyword arguments go to
    ``from_pretrained``. Equivalent to passing transformers' ``BitsAndBytesConfig`` yourself.
    """
    require_bitsandbytes()
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    if bits not in (4, 8):
        raise ConfigError(f"bits must be 4 or 8, not {bits!r}")
    if quant_type not in QUANT_TYPES:
        raise ConfigError(f"quant_type must be 'nf4' or 'fp4', not {quant_type!r}")
    if compute_dtype not in FLOAT_DTYPES:
        raise ConfigError(
            f"compute_dtype must be float32, bfloat16 or float16, not {compute_dtype}"
        )
    if bits == 4:
        qconfig = BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type=quant_type,
            bnb_4bit_use_double_quant=double_quant,
            bnb_4bit_compute_dtype=compute_dtype,
        )
    else:
        qconfig = BitsAndBytesConfig(load_in_8bit=True)
    try:
        model = AutoModelForCausalLM.from_pretrained(
            path, quantization_config=qconfig, dtype=dtype, **kwargs
        )
    except OSError as exc:
        raise ConfigError(f"cannot load a model from {path}: {exc}") from exc
    return keep_standard_layout(model)


def prepare_for_training(model: nn.Module, gradient_checkpointing: bool = True) -> nn.Module:
    """Make a quantised model ready for adapter training (PEFT's prepare_model_for_kbit_training).

    Freezes every parameter (``sbora.inject`` then adds the trainable adapter), upcasts 16-bit
    parameters that are not quantised (norms, embeddings, head) to float32 for stable training,
    and with ``gradient_checkpointing`` turns it on (non-reentrant) with input gradients enabled,
    so that checkpointed blocks still pass gradients back to the adapters. 4-bit layers are kept
    in the standard layout (``keep_standard_layout``).
    """
    keep_standard_layout(model)
    for param in model.parameters():
        param.requires_grad_(False)
        if type(param).__name__ not in _QUANT_PARAM_NAMES and param.dtype in FLOAT_DTYPES[1:]:
            param.data = param.data.float()
    if gradient_checkpointing:
        hf: Any = model  # a transformers PreTrainedModel
        if not getattr(hf, "supports_gradient_checkpointing", False):
            raise ConfigError(
                f"{type(model).__name__} does not support gradient checkpointing: "
                "pass gradient_checkpointing=False"
            )
        kwargs = {"use_reentrant": False}
        if hasattr(hf, "activation_checkpointing_enable"):  # transformers >= 5 name
            hf.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
        else:
            hf.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
        hf.enable_input_require_grads()
        if getattr(hf, "config", None) is not None:
            hf.config.use_cache = False  # the KV cache is useless (and warned about) here
    return model


# --------------------------------------------------------------------------- dequantisation


def _is_4bit(module: nn.Module) -> bool:
    return type(getattr(module, "weight", None)).__name__ == "Params4bit"


def _repacked_for_cpu(state: Any) -> bool:
    """Whether bitsandbytes' CPU backend has repacked this 4-bit weight for its fused kernel."""
    return bool(getattr(state, "packing_format_for_cpu", False))


def _standard_layout(weight: torch.Tensor, state: Any) -> tuple[torch.Tensor, Any]:
    """A CPU-repacked 4-bit weight in bitsandbytes' standard layout, on a copy, same values.

    On CPUs with AVX512-BF16, ``Linear4bit`` repacks its weight in place at the first eval-mode,
    no-grad forward (``quant_state.packing_format_for_cpu`` marks it): the codes are tiled, and
    the block scales (double-quantised ones expanded first) are stored as bf16 in (in/blocksize,
    out) order. The kernel then computes with ``code · bf16(scale)``. bitsandbytes' own inverse
    undoes the tiling; told that the scales are not nested it keeps those bf16 scales instead of
    quantising them again (which would change the weights once more), but leaves them in the
    kernel's order: the standard layout wants them flat, row-major, as float32.
    """
    import bitsandbytes.functional as bnbf

    state = copy.deepcopy(state)
    state.original_nested = False
    data, state = bnbf._convert_weight_packed_for_cpu_inverse(weight.detach().clone(), state)
    state.absmax = state.absmax.T.reshape(-1).float()  # (out·in/blocksize,)
    return data, state


def keep_standard_layout(model: nn.Module) -> nn.Module:
    """Keep every 4-bit layer of ``model`` in bitsandbytes' standard layout, in place.

    A layer that was already repacked for the CPU kernel is unpacked to the same values
    (``code · bf16(scale)``), and no layer repacks itself later: so each layer computes with
    exactly ``dequantize_weight``'s tensor, before and after any forward, in its compute dtype,
    on every CPU (and on CUDA, where nothing is repacked). The price on AVX512-BF16 CPUs is
    bitsandbytes' unfused inference path. Returns ``model``.
    """
    for module in model.modules():
        if not _is_4bit(module):
            continue
        layer: Any = module
        # Linear4bit.forward repacks when this is true (set in its __init__ from has_avx512bf16)
        layer.support_avx512bf16_for_cpu = False
        weight = layer.weight
        if _repacked_for_cpu(weight.quant_state):
            weight.data, weight.quant_state = _standard_layout(weight, weight.quant_state)
            if getattr(layer, "quant_state", None) is not None:
                layer.quant_state = weight.quant_state
    return model


def dequantize_weight(module: nn.Module) -> torch.Tensor:
    """The float32 weight (out, in) that ``module`` multiplies with.

    Works for ``Linear4bit`` (NF4/FP4, double quantisation or not; in the standard layout or
    repacked for bitsandbytes' CPU kernel, see ``keep_standard_layout``), ``Linear8bitLt`` (row
    scales ``SCB``: ``W = CB · SCB / 127``) and plain ``nn.Linear``; an SBoRA wrapper is read
    through its ``base_layer``. The result is a new tensor; the module is not modified.
    """
    layer: Any = getattr(module, "base_layer", module)
    weight = getattr(layer, "weight", None)
    if not isinstance(weight, torch.Tensor):
        raise QuantizationError(f"{type(layer).__name__} has no weight to dequantise")
    kind = quant_kind(layer)
    if kind is None:
        if not weight.is_floating_point():
            raise QuantizationError(
                f"cannot read a {weight.dtype} weight of {type(layer).__name__}"
            )
        return weight.detach().float().clone()
    require_bitsandbytes()
    import bitsandbytes.functional as bnbf

    if kind == "int8":
        scb = getattr(weight, "SCB", None)
        if scb is None:  # after a first forward the scales live in the layer's matmul state
            scb = layer.state.SCB
        return bnbf.int8_vectorwise_dequant(weight.data, scb).float()
    data, state = weight.data, layer.weight.quant_state
    if _repacked_for_cpu(state):
        data, state = _standard_layout(weight, state)
    return bnbf.dequantize_4bit(data, state).float()


def dequantized_linear(module: nn.Module, dtype: torch.dtype = torch.bfloat16) -> nn.Linear:
    """A plain ``nn.Linear`` in ``dtype`` holding ``module``'s dequantised weight and its bias."""
    _check_float_dtype(dtype)
    weight = dequantize_weight(module)
    out, inp = weight.shape
    bias = getattr(module, "bias", None)
    linear = nn.Linear(inp, out, bias=bias is not None, device=weight.device, dtype=dtype)
    with torch.no_grad():
        linear.weight.copy_(weight)
        if bias is not None:
            linear.bias.copy_(bias.detach())
    linear.requires_grad_(False)
    return linear


def _check_float_dtype(dtype: torch.dtype) -> None:
    if dtype not in FLOAT_DTYPES:
        raise QuantizationError(
            f"a regional merge keeps weights in float32, bfloat16 or float16, not {dtype}; "
            "quantising the merged weight again is sbora.requant.requantize (it is not regional)"
        )


# --------------------------------------------------------------------------- merging


def _sbora_layers(model: nn.Module) -> list[tuple[str, SBoRALayer]]:
    found = [(n, m) for n, m in model.named_modules() if isinstance(m, SBoRALayer)]
    if not found:
        raise QuantizationError("the model has no SBoRA layers: inject or apply an adapter first")
    return found


def _set_submodule(model: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, new)


def activation_dtype(model: nn.Module) -> torch.dtype:
    """The dtype of the model's unquantised, non-adapter parameters (what activations flow in)."""
    for name, param in model.named_parameters():
        quantised = type(param).__name__ in _QUANT_PARAM_NAMES
        if not quantised and "sbora_" not in name and param.is_floating_point():
            return param.dtype
    return torch.float32


def merge_dequantized(
    model: nn.Module, dtype: torch.dtype | None = None, everywhere: bool = False
) -> nn.Module:
    """Merge every SBoRA adapter of ``model`` into a dequantised copy of its base weight.

    Each quantised base layer under an SBoRA wrapper becomes an ``nn.Linear`` in ``dtype``
    (float32, bfloat16 or float16; default: the dtype of the model's unquantised parameters, so
    the merged model still runs) holding ``dequant(W0)``, and the wrapper then merges ``ΔW``
    into it regionally: only the adapter's columns (FA) or rows (FB) differ from
    ``dequant(W0)``. With ``everywhere`` the other quantised linear layers are dequantised too (a
    plain 16/32-bit model results, whose ``config`` no longer claims quantisation). Returns
    ``model``, merged in place; ``sbora.unload`` then drops the wrappers.
    """
    dtype = activation_dtype(model) if dtype is None else dtype
    _check_float_dtype(dtype)
    layers = _sbora_layers(model)
    for name, layer in layers:
        if is_quantized(layer.base_layer) and layer.merged:
            raise QuantizationError(f"{name} is merged over a quantised base: unmerge it first")
    # dequantise everything first, so that a failure leaves the model as it was
    plain = {
        n: dequantized_linear(lay.base_layer, dtype)
        for n, lay in layers
        if is_quantized(lay.base_layer)
    }
    for name, layer in layers:
        if name in plain:
            layer.base_layer = plain[name]
        layer.merge()
    if everywhere:
        for name, module in list(model.named_modules()):
            if is_quantized(module):
                _set_submodule(model, name, dequantized_linear(module, dtype))
        _drop_quantization_config(model)
    return model


def _drop_quantization_config(model: nn.Module) -> None:
    """Make a fully dequantised transformers model save and report as a plain model."""
    if has_quantized_layers(model):
        return
    hf: Any = model
    config = getattr(hf, "config", None)
    if config is not None and hasattr(config, "quantization_config"):
        del config.quantization_config
    for flag in ("is_loaded_in_4bit", "is_loaded_in_8bit", "is_quantized"):
        if getattr(hf, flag, False):
            setattr(hf, flag, False)
    if getattr(hf, "hf_quantizer", None) is not None:
        hf.hf_quantizer = None
    if hasattr(hf, "quantization_method"):
        hf.quantization_method = None


# --------------------------------------------------------------------------- adapter metadata


def _label(module: Any) -> str:
    kind = quant_kind(module)
    if kind == "int8":
        return "bnb-int8"
    # compress_statistics is double quantisation (the block scales are quantised to 8 bits)
    return f"bnb-{kind}-dq" if module.weight.compress_statistics else f"bnb-{kind}"


def quantization_metadata(model: nn.Module) -> dict[str, str]:
    """Adapter metadata describing the quantised base the adapter was trained on.

    ``{"quantization": "bnb-nf4-dq", "compute_dtype": "bfloat16"}`` for an NF4 base with double
    quantisation (``bnb-fp4``, ``bnb-int8``, ...; several kinds are joined with commas); ``{}``
    when the SBoRA layers' bases are not quantised. Only the base layers under SBoRA wrappers
    count, or every layer when the model has no wrappers.
    """
    bases: list[Any] = [m.base_layer for m in model.modules() if isinstance(m, SBoRALayer)]
    if not bases:
        bases = list(model.modules())
    quantised = [m for m in bases if is_quantized(m)]
    if not quantised:
        return {}
    meta = {"quantization": ",".join(sorted({_label(m) for m in quantised}))}
    dtypes = {str(m.compute_dtype).removeprefix("torch.") for m in quantised if _has_compute(m)}
    if dtypes:
        meta["compute_dtype"] = ",".join(sorted(dtypes))
    return meta


def _has_compute(module: nn.Module) -> bool:
    return getattr(module, "compute_dtype", None) is not None
