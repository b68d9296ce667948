"""Stock PEFT LoRA files in and out.

Export materialises the fixed factor: FA writes ``lora_A = I_in[idx]`` (r, in), FB writes
``lora_B = I_out[:, idx]`` (out, r), so PEFT's ``W0 x + s·B A x`` is exactly the SBoRA forward.
Per-module ranks and scales go into ``rank_pattern``/``alpha_pattern``; SBoRA's own metadata
goes into a sidecar JSON (``sbora_meta.json``), never into extra tensors (vLLM rejects those).
Import recognises standard-basis factors again (one-hot rows of A -> FA, one-hot columns of
B -> FB); anything else is a plain LoRA module that touches every cell.
"""

from __future__ import annotations

import json
import math
import re
from collections import Counter
from pathlib import Path
from typing import Any

import torch

from sbora_reg.errors import AdapterFormatError, ConfigError
from sbora_reg.sbora.adapter import Adapter, AdapterModule
from sbora_reg.sbora.config import SBoRAConfig
from sbora_reg.sbora.storage import (
    is_pickle_name,
    read_safetensors,
    refuse_pickle,
    safetensors_bytes,
    write_dir_atomic,
)

PEFT_CONFIG = "adapter_config.json"
PEFT_WEIGHTS = "adapter_model.safetensors"
SIDECAR = "sbora_meta.json"
_PREFIX = "base_model.model."
_KEY = re.compile(r"^(?:base_model\.model\.)?(?P<name>.+)\.lora_(?P<ab>[AB])(?:\.[^.]+)?\.weight$")


# ---- export ---------------------------------------------------------------------------------
def _peft_factors(m: AdapterModule) -> tuple[torch.Tensor, torch.Tensor]:
    """(lora_A (r, in), lora_B (out, r)) of one module, identity rows/columns materialised."""
    out, inp = m.shape
    if m.variant == "fa":
        b = m.factor
        a = torch.zeros(m.rank, inp, dtype=b.dtype)
        a[torch.arange(m.rank), m.indices] = 1  # rows of I_in
        return a, b
    if m.variant == "fb":
        a = m.factor
        b = torch.zeros(out, m.rank, dtype=a.dtype)
        b[m.indices, torch.arange(m.rank)] = 1  # columns of I_out
        return a, b
    assert m.a is not None and m.b is not None
    return m.a, m.b


def _most_common(values: list[Any]) -> Any:
    return Counter(values).most_common(1)[0][0]


def peft_config_dict(adapter: Adapter, task_type: str | None = "CAUSAL_LM") -> dict[str, Any]:
    """The ``adapter_config.json`` of the export (stock ``LoraConfig`` fields)."""
    names = sorted(adapter.modules)
    ranks = {n: adapter.modules[n].rank for n in names}
    alphas = {n: adapter.modules[n].scale * ranks[n] for n in names}
    r = _most_common(list(ranks.values()))
    alpha = _most_common(list(alphas.values()))
    return {
        "peft_type": "LORA",
        "task_type": task_type,
        "base_model_name_or_path": adapter.base_model,
        "r": r,
        "lora_alpha": alpha,
        "target_modules": names,
        "rank_pattern": {re.escape(n): k for n, k in ranks.items() if k != r},
        "alpha_pattern": {re.escape(n): a for n, a in alphas.items() if a != alpha},
        "lora_dropout": adapter.config.dropout,
        "fan_in_fan_out": any(m.kind == "conv1d" for m in adapter.modules.values()),
        "bias": "none",
        "use_rslora": False,
        "use_dora": False,
        "init_lora_weights": True,
        "inference_mode": True,
        "modules_to_save": None,
    }


def to_peft(adapter: Adapter, directory: str | Path, task_type: str | None = "CAUSAL_LM") -> Path:
    """Write ``adapter_config.json`` + ``adapter_model.safetensors`` + the SBoRA sidecar."""
    tensors: dict[str, torch.Tensor] = {}
    for name, m in sorted(adapter.modules.items()):
        a, b = _peft_factors(m)
        tensors[f"{_PREFIX}{name}.lora_A.weight"] = a
        tensors[f"{_PREFIX}{name}.lora_B.weight"] = b
    sidecar = {
        "format": "sbora-peft",
        "format_version": 1,
        "config": adapter.config.to_dict(),
        "base_fingerprint": adapter.base_fingerprint,
        "base_model": adapter.base_model,
        "metadata": adapter.metadata,
        "modules": {
            n: {
                "variant": m.variant,
                "kind": m.kind,
                "indices": None if m.indices is None else m.indices.tolist(),
            }
            for n, m in sorted(adapter.modules.items())
        },
    }
    config = peft_config_dict(adapter, task_type)
    directory = Path(directory)
    write_dir_atomic(
        directory,
        {
            PEFT_WEIGHTS: safetensors_bytes(tensors, {"format": "pt"}),
            SIDECAR: (json.dumps(sidecar, indent=2, sort_keys=True) + "\n").encode(),
            PEFT_CONFIG: (json.dumps(config, indent=2, sort_keys=True) + "\n").encode(),
        },
    )
    return directory


# ---- import ---------------------------------------------------------------------------------
def standard_basis(m: torch.Tensor) -> torch.Tensor | None:
    """For ``m`` (r, n) whose rows are distinct rows of the identity: their positions, else None."""
    if m.dim() != 2 or m.shape[0] > m.shape[1]:
        return None
    ones = m == 1
    if not bool(((m == 0) | ones).all()) or not bool((ones.sum(dim=1) == 1).all()):
        return None
    idx = ones.float().argmax(dim=1)
    if torch.unique(idx).numel() != idx.numel():
        return None
    return idx.to(torch.int64)


def _pattern_value(patterns: dict[str, Any], name: str, default: Any) -> Any:
    # PEFT's own rule (peft.utils.other.get_pattern_key)
    for key, value in patterns.items():
        if re.match(rf"(.*\.)?({key})$", name):
            return value
    return default


def _read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise AdapterFormatError(f"{path} is not valid JSON: {exc}") from exc
    if not isinstance(data, dict):
        raise AdapterFormatError(f"{path} must hold a JSON object")
    return data


def _check_peft_dir(directory: Path) -> None:
    if directory.is_file():
        refuse_pickle(directory)
        raise AdapterFormatError(f"{directory} is a file: pass the PEFT adapter folder")
    if not directory.is_dir():
        raise AdapterFormatError(f"PEFT adapter folder {directory} does not exist")
    if not (directory / PEFT_WEIGHTS).is_file():
        pickles = sorted(p.name for p in directory.iterdir() if is_pickle_name(p.name))
        if pickles:
            refuse_pickle(directory / pickles[0])
        raise AdapterFormatError(f"{directory} has no {PEFT_WEIGHTS}")
    if not (directory / PEFT_CONFIG).is_file():
        raise AdapterFormatError(f"{directory} has no {PEFT_CONFIG}")


def _group_factors(
    tensors: dict[str, torch.Tensor], where: Path
) -> dict[str, dict[str, torch.Tensor]]:
    pairs: dict[str, dict[str, torch.Tensor]] = {}
    for key, t in tensors.items():
        match = _KEY.match(key)
        if match is None:
            raise AdapterFormatError(
                f"{where} holds {key}: only LoRA factors of linear layers can be imported"
            )
        pairs.setdefault(match["name"], {})[match["ab"]] = t
    for name, pair in pairs.items():
        if set(pair) != {"A", "B"}:
            raise AdapterFormatError(f"{where} lacks lora_A or lora_B for {name}")
    if not pairs:
        raise AdapterFormatError(f"{where} holds no LoRA factors")
    return pairs


def from_peft(directory: str | Path) -> Adapter:
    """Read a stock PEFT LoRA adapter; standard-basis modules become FA/FB, others stay LoRA."""
    directory = Path(directory)
    _check_peft_dir(directory)
    cfg = _read_json(directory / PEFT_CONFIG)
    if cfg.get("peft_type") != "LORA":
        raise AdapterFormatError(f"{directory} is a {cfg.get('peft_type')} adapter, not LoRA")
    if cfg.get("use_dora"):
        raise AdapterFormatError(f"{directory} is a DoRA adapter, which SBoRA cannot represent")
    sidecar = _read_json(directory / SIDECAR) if (directory / SIDECAR).is_file() else {}
    hints = sidecar.get("modules") or {}
    tensors, _ = read_safetensors(directory / PEFT_WEIGHTS)
    pairs = _group_factors(tensors, directory / PEFT_WEIGHTS)
    conv_default = "conv1d" if cfg.get("fan_in_fan_out") else "linear"
    modules: dict[str, AdapterModule] = {}
    for name, pair in sorted(pairs.items()):
        a, b = pair["A"], pair["B"]
        if a.dim() != 2 or b.dim() != 2 or a.shape[0] != b.shape[1]:
            raise AdapterFormatError(
                f"{name}: lora_A {tuple(a.shape)} and lora_B {tuple(b.shape)} do not fit"
            )
        r = int(a.shape[0])
        alpha = float(
            _pattern_value(cfg.get("alpha_pattern") or {}, name, cfg.get("lora_alpha", r))
        )
        scale = alpha / math.sqrt(r) if cfg.get("use_rslora") else alpha / r
        hint = hints.get(name) or {}
        modules[name] = _import_module(name, a, b, scale, hint.get("kind") or conv_default, hint)
    return Adapter(
        config=_import_config(cfg, sidecar, modules),
        modules=modules,
        base_fingerprint=sidecar.get("base_fingerprint") or None,
        base_model=sidecar.get("base_model") or cfg.get("base_model_name_or_path") or None,
        metadata={str(k): str(v) for k, v in (sidecar.get("metadata") or {}).items()},
    )


def _import_module(
    name: str, a: torch.Tensor, b: torch.Tensor, scale: float, kind: str, hint: dict[str, Any]
) -> AdapterModule:
    shape = (int(b.shape[0]), int(a.shape[1]))
    cols = standard_basis(a)  # FA: A = I_in[idx]
    rows = standard_basis(b.T)  # FB: B = I_out[:, idx]
    if cols is not None and (rows is None or hint.get("variant") != "fb"):
        return AdapterModule(name, "fa", kind, shape, scale, indices=cols, b=b.clone())
    if rows is not None:
        return AdapterModule(name, "fb", kind, shape, scale, indices=rows, a=a.clone())
    return AdapterModule(name, "lora", kind, shape, scale, a=a.clone(), b=b.clone())


def _import_config(
    cfg: dict[str, Any], sidecar: dict[str, Any], modules: dict[str, AdapterModule]
) -> SBoRAConfig:
    if isinstance(sidecar.get("config"), dict):
        try:
            return SBoRAConfig.from_dict(sidecar["config"])
        except ConfigError:
            pass  # a damaged sidecar: fall back to what PEFT's config says
    variants = [m.variant for m in modules.values() if m.variant in ("fa", "fb")]
    targets = cfg.get("target_modules")
    if not (isinstance(targets, str) or (isinstance(targets, list) and targets)):
        targets = sorted(modules)
    try:
        return SBoRAConfig(
            variant=_most_common(variants) if variants else "fa",
            r=int(cfg.get("r") or next(iter(modules.values())).rank),
            alpha=float(cfg.get("lora_alpha") or 1.0),
            target_modules=tuple(targets) if isinstance(targets, list) else targets,
            dropout=float(cfg.get("lora_dropout") or 0.0),
        )
    except (ConfigError, TypeError, ValueError) as exc:
        raise AdapterFormatError(f"cannot read the PEFT config: {exc}") from exc
