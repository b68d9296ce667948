"""Shape fingerprint of a base model: which adapters fit which model.

The fingerprint is a sha256 over the sorted lines ``name<TAB>kind<TAB>out<TAB>in`` of every
``nn.Linear`` (bitsandbytes ``Linear4bit``/``Linear8bitLt`` included), GPT-2 ``Conv1D`` and
``nn.Embedding`` module, with shapes in the ``(out, in)`` frame (``Conv1D`` stores its weight
transposed) and wrapper segments such as ``.base_layer`` removed. It depends on names and shapes
only: the same model in fp32, bf16, 4-bit or with adapters injected has one fingerprint.

A model directory gets the same table without building the model: ``header_module_table`` reads
it from ``config.json`` and the safetensors headers (names and shapes, a few KB per shard), by
rules checked against the in-memory table for every family in ``HEADER_FAMILIES``
(tests/sbora/test_fingerprint.py builds each one). A directory the rules do not cover (another
family, a quantised checkpoint, a config without weights) falls back to building the model on the
meta device, once: ``dir_module_table`` caches either result per directory, keyed by the sizes
and mtimes of its config and weight files, so a changed file is noticed by a ``stat``.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from sbora_reg.errors import AdapterFormatError
from sbora_reg.sbora.files import check_shard_names

if TYPE_CHECKING:
    from torch import nn

log = logging.getLogger(__name__)

Shape = tuple[int, int]
Table = dict[str, tuple[str, Shape]]

# Segments that wrappers (ours and PEFT's) insert between a module's name and the real layer.
_WRAPPER_SEGMENTS = ("base_layer",)

# --- the table of a model in memory -------------------------------------------------------


def layer_kind_and_shape(module: nn.Module) -> tuple[str, Shape] | None:
    """``("linear"|"conv1d"|"embedding", (out, in))`` for a supported layer, else None."""
    from torch import nn
    from transformers.pytorch_utils import Conv1D

    if isinstance(module, Conv1D):
        nx, nf = module.weight.shape  # Conv1D weight is (in, out)
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


def module_table(model: nn.Module) -> Table:
    """Every supported layer of ``model``: normalised name -> (kind, (out, in))."""
    table: Table = {}
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


# --- the table of a model directory, from its files ---------------------------------------

# Families (config ``model_type``) whose causal-LM module table the header rules reproduce.
# Every 2-D ``<module>.weight`` is an nn.Linear, an nn.Embedding (named in _EMBEDDINGS) or, in
# the GPT-2 family, a Conv1D stored (in, out); a tied output head (no ``lm_head.weight`` on disk)
# is still an nn.Linear shaped like the token embedding. Families whose checkpoints are converted
# on load (GPT-NeoX's ``embed_out``, fused MoE experts) are not listed: they take the fallback.
_LINEAR_FAMILIES = (
    "llama", "mistral", "ministral", "qwen2", "qwen3", "gemma", "gemma2", "gemma3_text", "phi",
    "phi3", "opt", "bloom", "falcon", "olmo", "olmo2", "stablelm", "starcoder2", "granite",
    "cohere", "smollm3", "gpt_bigcode", "gptj", "exaone4", "glm",
)  # fmt: skip
HEADER_FAMILIES: dict[str, str] = {
    **dict.fromkeys(_LINEAR_FAMILIES, "linear"),
    "gpt2": "conv1d",
    "openai-gpt": "conv1d",
}
_TOKEN_EMBEDDINGS = ("embed_tokens", "wte", "word_embeddings", "tokens_embed")
_EMBEDDINGS = (*_TOKEN_EMBEDDINGS, "wpe", "embed_positions", "positions_embed")
_HEAD = "lm_head"
INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise AdapterFormatError(f"cannot read {path}: {exc}") from exc


def weight_files(path: Path) -> list[Path]:
    """The safetensors files of a model directory (from its index when sharded); [] if none."""
    index = path / INDEX_FILE
    if index.is_file():
        weight_map = _read_json(index).get("weight_map")
        if not isinstance(weight_map, dict):
            raise AdapterFormatError(f"{index} has no weight_map: restore it")
        names = sorted(set(weight_map.values()), key=str)
        check_shard_names(index, names)
        return [path / name for name in names]
    return [path / SINGLE_FILE] if (path / SINGLE_FILE).is_file() else []


def _header_shapes(file: Path) -> dict[str, list[int]]:
    """Tensor name -> shape from one safetensors header (nothing else is read)."""
    try:
        with open(file, "rb") as f:
            size = os.fstat(f.fileno()).st_size
            n = int.from_bytes(f.read(8), "little")
            if not 0 < n <= size - 8:
                raise ValueError("bad header length")
            header = json.loads(f.read(n))
        return {k: list(v["shape"]) for k, v in header.items() if k != "__metadata__"}
    except FileNotFoundError:
        raise AdapterFormatError(f"checkpoint shard {file} is missing: restore it") from None
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
        raise AdapterFormatError(f"{file} is not a safetensors file (bad header: {exc})") from exc


def header_module_table(path: str | Path) -> Table | None:
    """The module table from ``config.json`` and the safetensors headers, or None where the
    rules do not cover this directory (see ``HEADER_FAMILIES``)."""
    path = Path(path)
    config = _read_json(path / "config.json")
    layout = HEADER_FAMILIES.get(config.get("model_type", "")) if isinstance(config, dict) else None
    files = weight_files(path)
    if layout is None or not files or config.get("quantization_config"):
        return None
    table: Table = {}
    for file in files:
        for name, shape in _header_shapes(file).items():
            if not name.endswith(".weight") or len(shape) != 2:
                continue
            module = name.removesuffix(".weight")
            last = module.rpartition(".")[2]
            rows, cols = int(shape[0]), int(shape[1])
            if last in _EMBEDDINGS:
                table[module] = ("embedding", (rows, cols))
            elif layout == "conv1d" and module != _HEAD:
                table[module] = ("conv1d", (cols, rows))
            else:
                table[module] = ("linear", (rows, cols))
    body = {n.partition(".")[0] for n in table if n != _HEAD}
    tokens = [s for n, (k, s) in table.items() if n.rpartition(".")[2] in _TOKEN_EMBEDDINGS]
    if len(body) != 1 or len(tokens) != 1:
        return None  # a checkpoint without the causal LM's prefix, or an unknown embedding
    layers = {next((p for p in n.split(".") if p.isdigit()), None) for n in table} - {None}
    declared = config.get("num_hidden_layers", config.get("n_layer"))
    if declared is not None and len(layers) != declared:
        return None  # weights and config disagree: the model is what the config builds
    table.setdefault(_HEAD, ("linear", tokens[0]))  # a tied head is not stored
    return table


def meta_model_from_dir(path: str | Path) -> nn.Module:
    """Build the model described by ``path/config.json`` on the meta device (no weights, no RAM)."""
    import torch
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


# --- the per-directory cache --------------------------------------------------------------


def cache_dir() -> Path:
    """``$SBORA_REG_CACHE`` or the user cache directory of sbora-reg."""
    env = os.environ.get("SBORA_REG_CACHE")
    if env:
        return Path(env)
    import platformdirs

    return Path(platformdirs.user_cache_dir("sbora-reg"))


def _stat_key(path: Path) -> list[list[Any]]:
    """``[name, size, mtime_ns]`` of the files the table is read from (re-checked every time)."""
    names = ["config.json", INDEX_FILE, *(f.name for f in weight_files(path))]
    key = []
    for name in dict.fromkeys(names):
        try:
            st = (path / name).stat()
        except FileNotFoundError:
            continue
        key.append([name, st.st_size, st.st_mtime_ns])
    return key


def _cache_file(path: Path) -> Path:
    return cache_dir() / "fingerprints" / (hashlib.sha256(str(path).encode()).hexdigest() + ".json")


def _cached(path: Path, key: list[list[Any]]) -> Table | None:
    try:
        data = json.loads(_cache_file(path).read_text())
        if data["path"] != str(path) or data["key"] != key:
            return None
        return {n: (k, (int(s[0]), int(s[1]))) for n, (k, s) in data["table"].items()}
    except (OSError, ValueError, KeyError, TypeError):
        return None  # no entry, another writer's half file, an older layout: compute again


def _store(path: Path, key: list[list[Any]], table: Table) -> None:
    from sbora_reg.sbora.files import write_atomic

    data = {"path": str(path), "key": key, "table": table}
    try:
        write_atomic(_cache_file(path), json.dumps(data).encode())
    except OSError as exc:  # a read-only cache only costs the next call the work again
        log.debug("fingerprint cache not written for %s: %s", path, exc)


def dir_module_table(path: str | Path) -> Table:
    """Module table of a transformers model directory, never loading its weights.

    From the headers where ``header_module_table`` applies, else from a meta-device model;
    cached per directory until its config or weight files change.
    """
    path = Path(path).expanduser().absolute()
    if not (path / "config.json").is_file():
        raise AdapterFormatError(f"{path} has no config.json: pass a transformers model directory")
    key = _stat_key(path)
    table = _cached(path, key)
    if table is None:
        table = header_module_table(path)
        if table is None:
            log.info("building %s on the meta device for its module table", path)
            table = module_table(meta_model_from_dir(path))
        _store(path, key, table)
    return table


def dir_fingerprint(path: str | Path) -> str:
    """Fingerprint of a transformers model directory without loading its weights."""
    return fingerprint_table(dir_module_table(path))
