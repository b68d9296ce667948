"""Whole-model operations: inject, apply an adapter, extract, merge, unmerge, unload.

Every operation validates everything first and only then changes the model, so a bad input never
leaves a model half-adapted.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from sbora_reg.errors import (
    ConfigError,
    FingerprintMismatchError,
    InvalidIndicesError,
    NoMatchingModulesError,
    ShapeMismatchError,
)
from sbora_reg.sbora.adapter import Adapter, AdapterModule
from sbora_reg.sbora.config import SBoRAConfig
from sbora_reg.sbora.fingerprint import (
    Shape,
    layer_kind_and_shape,
    model_fingerprint,
    module_table,
    normalise_name,
)
from sbora_reg.sbora.indices import IndicesLike, default_indices, read_indices_file
from sbora_reg.sbora.indices import validate_indices as _validate
from sbora_reg.sbora.layer import SBoRALayer, is_adapter_param
from sbora_reg.sbora.quant import keep_standard_layout, quantization_metadata

CONFIG_ATTR = "_sbora_config"
_LAYER_KINDS = ("linear", "conv1d")


@dataclass(frozen=True)
class _Spec:
    """What to wrap one module with."""

    variant: str
    scale: float
    indices: torch.Tensor | None
    rank: int


# ---- discovery ------------------------------------------------------------------------------
def sbora_layers(model: nn.Module) -> Iterator[tuple[str, SBoRALayer]]:
    """(base-model name, layer) for every SBoRA layer of ``model``."""
    for name, module in model.named_modules():
        if isinstance(module, SBoRALayer):
            yield normalise_name(name), module


def _require_plain(model: nn.Module) -> None:
    first = next(sbora_layers(model), None)
    if first is not None:
        raise ConfigError(
            f"the model already has SBoRA layers ({first[0]}, ...): "
            "call sbora.unload or sbora.merge_and_unload first"
        )


def _few(names: list[str], n: int = 5) -> str:
    more = f", ... ({len(names)} in all)" if len(names) > n else ""
    return ", ".join(names[:n]) + more if names else "none"


def _find_targets(model: nn.Module, config: SBoRAConfig) -> dict[str, tuple[str, Shape]]:
    targets: dict[str, tuple[str, Shape]] = {}
    unsupported: list[str] = []
    for name, module in model.named_modules():
        if not name or not config.matches(name):
            continue
        found = layer_kind_and_shape(module)
        if found is not None and found[0] in _LAYER_KINDS:
            targets[name] = found
        elif not list(module.children()):
            unsupported.append(f"{name} ({type(module).__name__})")
    if targets:
        return targets
    if unsupported:
        raise NoMatchingModulesError(
            f"target_modules {config.target_modules!r} matched only unsupported layers "
            f"{_few(unsupported)}: SBoRA wraps nn.Linear and transformers Conv1D"
        )
    names = [n for n, (k, _) in module_table(model).items() if k in _LAYER_KINDS]
    raise NoMatchingModulesError(
        f"target_modules {config.target_modules!r} matched no module; "
        f"linear layers in this model include {_few(names)}"
    )


# ---- wrapping -------------------------------------------------------------------------------
def _wrap(model: nn.Module, specs: Mapping[str, _Spec], dropout: float) -> dict[str, SBoRALayer]:
    """Freeze every parameter and replace each named module by an ``SBoRALayer``.

    A 4-bit base stays in bitsandbytes' standard layout, so that the layer computes with what
    ``quant.dequantize_weight`` reads (merges stay regional).
    """
    for p in model.parameters():
        p.requires_grad_(False)
    keep_standard_layout(model)
    layers: dict[str, SBoRALayer] = {}
    for name, spec in specs.items():
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name)
        layer = SBoRALayer(
            getattr(parent, child),
            spec.variant,
            spec.scale,
            indices=spec.indices,
            rank=spec.rank,
            dropout=dropout,
        )
        setattr(parent, child, layer)
        layers[name] = layer
    return layers


def _given_indices(
    model: nn.Module, config: SBoRAConfig, indices: Mapping[str, IndicesLike] | str | Path
) -> Mapping[str, IndicesLike]:
    if not isinstance(indices, str | Path):
        return indices
    found, meta = read_indices_file(indices)
    if meta.get("variant") != config.variant:
        raise ConfigError(
            f"{indices} holds {meta.get('variant')!r} indices but the config's variant is "
            f"{config.variant!r}"
        )
    want = meta.get("base_fingerprint")
    if want and want != model_fingerprint(model):
        raise FingerprintMismatchError(
            f"{indices} was allocated for another base model (fingerprint {want[:12]}...): "
            "use indices allocated for this model"
        )
    return found


def inject(
    model: nn.Module,
    config: SBoRAConfig,
    indices: Mapping[str, IndicesLike] | str | Path | None = None,
) -> nn.Module:
    """Wrap every module matching ``config`` in an ``SBoRALayer`` (in place) and freeze the rest.

    ``indices`` (module name -> r indices, or an indices file) replaces the seeded draw; it must
    name exactly the matched modules. Indices are in the (out, in) frame: columns for FA, rows
    for FB. Only ``sbora_`` parameters are trainable afterwards.
    """
    _require_plain(model)
    given = None if indices is None else _given_indices(model, config, indices)
    targets = _find_targets(model, config)
    if given is not None:
        missing = sorted(set(targets) - set(given))
        extra = sorted(set(given) - set(targets))
        if missing or extra:
            raise InvalidIndicesError(
                f"indices must name exactly the matched modules: missing {_few(missing)}; "
                f"not matched {_few(extra)}"
            )
    specs: dict[str, _Spec] = {}
    for name, (_, (out, inp)) in targets.items():
        dim = inp if config.variant == "fa" else out
        if config.r > dim:
            raise ConfigError(f"r={config.r} is larger than the dimension {dim} of {name}: lower r")
        idx = (
            _validate(given[name], dim, name, r=config.r)
            if given is not None
            else default_indices(config.seed, name, dim, config.r)
        )
        specs[name] = _Spec(config.variant, config.scale, idx, config.r)
    _wrap(model, specs, config.dropout)
    setattr(model, CONFIG_ATTR, config)
    return model


def apply_adapter(model: nn.Module, adapter: Adapter) -> nn.Module:
    """Inject ``adapter`` with its own per-module variant, indices and scale; load its factors."""
    _require_plain(model)
    if adapter.base_fingerprint:
        have = model_fingerprint(model)
        if have != adapter.base_fingerprint:
            raise FingerprintMismatchError(
                f"the adapter was made for another base model (fingerprint "
                f"{adapter.base_fingerprint[:12]}..., this model {have[:12]}...): "
                "load the base model it was trained on"
            )
    table = module_table(model)
    for name, m in adapter.modules.items():
        found = table.get(name)
        if found is None or found[0] not in _LAYER_KINDS:
            raise ShapeMismatchError(
                f"the model has no linear layer {name} that the adapter adapts"
            )
        if found[1] != m.shape:
            raise ShapeMismatchError(
                f"{name} is {found[1]} in the model but {m.shape} in the adapter (out, in)"
            )
    specs = {
        name: _Spec(m.variant, m.scale, m.indices, m.rank) for name, m in adapter.modules.items()
    }
    layers = _wrap(model, specs, adapter.config.dropout)
    for name, layer in layers.items():
        layer.load_factors(adapter.modules[name].a, adapter.modules[name].b)
    setattr(model, CONFIG_ATTR, adapter.config)
    return model


# ---- reading back ---------------------------------------------------------------------------
def _layers_or_raise(model: nn.Module, what: str) -> list[tuple[str, SBoRALayer]]:
    layers = list(sbora_layers(model))
    if not layers:
        raise ConfigError(f"cannot {what}: the model has no SBoRA layers (call sbora.inject first)")
    return layers


def extract(model: nn.Module) -> Adapter:
    """The model's SBoRA adapter as data (factors copied to CPU), with its base fingerprint."""
    layers = _layers_or_raise(model, "extract")
    modules: dict[str, AdapterModule] = {}
    for name, layer in layers:
        a, b = layer.factor_a, layer.factor_b
        modules[name] = AdapterModule(
            name=name,
            variant=layer.variant,
            kind=layer.kind,
            shape=layer.shape,
            scale=layer.scale,
            indices=None if layer.variant == "lora" else layer.sbora_idx.detach().cpu().clone(),
            a=None if a is None else a.detach().cpu().clone(),
            b=None if b is None else b.detach().cpu().clone(),
        )
    config = getattr(model, CONFIG_ATTR, None)
    if not isinstance(config, SBoRAConfig):
        config = _config_from_layers(layers)
    name_or_path = getattr(getattr(model, "config", None), "_name_or_path", None)

    return Adapter(
        config=config,
        modules=modules,
        base_fingerprint=model_fingerprint(model),
        base_model=str(name_or_path) if name_or_path else None,
        metadata=quantization_metadata(model),
    )


def _config_from_layers(layers: list[tuple[str, SBoRALayer]]) -> SBoRAConfig:
    sbora = [lay for _, lay in layers if lay.variant in ("fa", "fb")] or [layers[0][1]]
    first = sbora[0]
    variant = first.variant if first.variant in ("fa", "fb") else "fa"
    return SBoRAConfig(
        variant=variant,
        r=first.rank,
        alpha=first.scale * first.rank,
        target_modules=tuple(n for n, _ in layers),
    )


def trainable_parameters(model: nn.Module) -> dict[str, nn.Parameter]:
    """The adapter's trainable parameters (the ``sbora_`` ones)."""
    return {n: p for n, p in model.named_parameters() if is_adapter_param(n)}


# ---- merge / unload -------------------------------------------------------------------------
def merge(model: nn.Module) -> nn.Module:
    """Write every adapter update into its base weight region (idempotent, exact to unmerge)."""
    layers = _layers_or_raise(model, "merge")
    for _, layer in layers:
        layer._weight_view()  # raises on a quantised base before any layer changes
    for _, layer in layers:
        layer.merge()
    return model


def unmerge(model: nn.Module) -> nn.Module:
    """Restore the exact base weights saved at merge time (idempotent)."""
    for _, layer in _layers_or_raise(model, "unmerge"):
        layer.unmerge()
    return model


def unload(model: nn.Module) -> nn.Module:
    """Replace every SBoRA layer by its base layer, WITHOUT merging, and return the model.

    Layers that are merged at that moment keep the merged weights (as PEFT's ``unload``); base
    parameters stay frozen. Use ``merge_and_unload`` for a plain model that includes the update.
    """
    for name, module in list(model.named_modules()):
        if isinstance(module, SBoRALayer):
            parent_name, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent_name), child, module.base_layer)
    if hasattr(model, CONFIG_ATTR):
        delattr(model, CONFIG_ATTR)
    return model


def merge_and_unload(model: nn.Module) -> nn.Module:
    """Merge every adapter update and return the plain model."""
    return unload(merge(model))
