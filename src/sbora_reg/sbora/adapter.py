"""``Adapter``: a trained SBoRA adapter as data, and its native files (docs/FORMAT.md).

An adapter is a table of modules. Each ``AdapterModule`` holds, in the ``(out, in)`` frame, its
variant, its standard-basis indices and its trained factor:
FA ``ΔW[:, idx] = s·B`` (B: (out, r)); FB ``ΔW[idx, :] = s·A`` (A: (r, in));
LoRA (imported from PEFT) ``ΔW = s·B@A``.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from sbora_reg.errors import AdapterFormatError, ConfigError
from sbora_reg.sbora import delta as _delta
from sbora_reg.sbora.config import SBoRAConfig
from sbora_reg.sbora.files import files_sha256
from sbora_reg.sbora.indices import sort_indices
from sbora_reg.sbora.storage import (
    is_pickle_name,
    read_safetensors,
    refuse_pickle,
    safetensors_bytes,
    write_dir_atomic,
)

if TYPE_CHECKING:
    from torch import nn

FORMAT = "sbora"
FORMAT_VERSION = 1
CONFIG_FILE = "sbora_config.json"
WEIGHTS_FILE = "sbora_adapter.safetensors"
MODULE_VARIANTS = ("fa", "fb", "lora")
KINDS = ("linear", "conv1d")


@dataclass
class AdapterModule:
    """One adapted module: ``shape`` is ``(out, in)``; ``a`` is A (r, in), ``b`` is B (out, r)."""

    name: str
    variant: str
    kind: str
    shape: tuple[int, int]
    scale: float
    indices: torch.Tensor | None = None
    a: torch.Tensor | None = None
    b: torch.Tensor | None = None

    def __post_init__(self) -> None:
        self.shape = (int(self.shape[0]), int(self.shape[1]))
        self.validate()

    @property
    def rank(self) -> int:
        if self.indices is not None:
            return int(self.indices.numel())
        assert self.a is not None  # validate() guarantees it for lora
        return int(self.a.shape[0])

    @property
    def factor(self) -> torch.Tensor:
        """The trained factor of an SBoRA module (B for FA, A for FB)."""
        t = self.b if self.variant == "fa" else self.a
        if t is None or self.variant == "lora":
            raise ConfigError(f"{self.name} is a plain LoRA module: it has two factors")
        return t

    def delta(self) -> torch.Tensor:
        """Dense float32 ``ΔW`` (out, in)."""
        return _delta.delta_weight(
            self.variant, self.shape, self.scale, self.indices, self.a, self.b
        )

    def cells(self) -> int:
        """Number of weight cells this module may change."""
        return _delta.cells(self.variant, self.shape, self.rank)

    def tensors(self) -> dict[str, torch.Tensor]:
        """The safetensors entries of this module (FORMAT.md names)."""
        n = self.name
        if self.variant == "fa":
            assert self.indices is not None and self.b is not None
            return {f"{n}.sbora_idx": self.indices, f"{n}.sbora_B": self.b}
        if self.variant == "fb":
            assert self.indices is not None and self.a is not None
            return {f"{n}.sbora_idx": self.indices, f"{n}.sbora_A": self.a}
        assert self.a is not None and self.b is not None
        return {f"{n}.lora_A": self.a, f"{n}.lora_B": self.b}

    def validate(self) -> None:
        """Check variant, kind, scale, factor shapes and index invariants."""
        out, inp = self.shape
        where = f"module {self.name}"
        if self.variant not in MODULE_VARIANTS:
            raise AdapterFormatError(f"{where} has unknown variant {self.variant!r}")
        if self.kind not in KINDS:
            raise AdapterFormatError(f"{where} has unknown kind {self.kind!r}")
        if out < 1 or inp < 1:
            raise AdapterFormatError(f"{where} has an empty shape {self.shape}")
        if not math.isfinite(self.scale):
            raise AdapterFormatError(f"{where} has a non-finite scale {self.scale}")
        if self.variant in ("fa", "fb"):
            if self.indices is None:
                raise AdapterFormatError(f"{where} ({self.variant}) has no indices")
            dim = inp if self.variant == "fa" else out
            idx, order = sort_indices(self.indices, dim, self.name)
            r = idx.numel()
            want = (out, r) if self.variant == "fa" else (r, inp)
            have = self.b if self.variant == "fa" else self.a
            label = "B" if self.variant == "fa" else "A"
            _check_factor(where, label, have, want)
            assert have is not None
            self.indices = idx
            if not torch.equal(order, torch.arange(r)):
                # keep ΔW unchanged: the factor's r axis follows its indices
                if self.variant == "fa":
                    self.b = have[:, order.to(have.device)]
                else:
                    self.a = have[order.to(have.device)]
        else:
            if self.a is None or self.b is None:
                raise AdapterFormatError(f"{where} (lora) needs both A and B")
            r = int(self.a.shape[0]) if self.a.dim() == 2 else -1
            _check_factor(where, "A", self.a, (r, inp))
            _check_factor(where, "B", self.b, (out, r))
            if self.indices is not None:
                raise AdapterFormatError(f"{where} (lora) must not carry indices")


def stack_modules(name: str, mods: Sequence[AdapterModule]) -> AdapterModule:
    """SBoRA modules of one variant as one module on the union of their indices, at scale 1,
    whose factor holds each module's ``s·factor`` at its positions: the same ΔW as their sum."""
    variants = {m.variant for m in mods}
    if len(variants) != 1 or variants & {"lora"}:
        raise ConfigError(f"{name}: only SBoRA modules of one variant stack ({sorted(variants)})")
    first = mods[0]
    out, inp = first.shape
    idx = [m.indices for m in mods if m.indices is not None]
    union = torch.unique(torch.cat(idx))
    size = (out, len(union)) if first.variant == "fa" else (len(union), inp)
    factor = torch.zeros(size, dtype=torch.float32)
    for m, i in zip(mods, idx, strict=True):
        _delta.add_regional(factor, m.variant, torch.searchsorted(union, i), m.factor, m.scale)
    a, b = (None, factor) if first.variant == "fa" else (factor, None)
    return AdapterModule(name, first.variant, first.kind, (out, inp), 1.0, union, a, b)


def unstack(stacked: AdapterModule, member: AdapterModule) -> torch.Tensor:
    """``member``'s factor (its own scale, dtype float32) read back out of a stacked module."""
    assert stacked.indices is not None and member.indices is not None
    positions = torch.searchsorted(stacked.indices, member.indices)
    part = stacked.factor.detach().float().index_select(_delta.axis(member.variant), positions)
    return (part * (stacked.scale / member.scale)).contiguous()


def _check_factor(where: str, label: str, t: torch.Tensor | None, want: tuple[int, int]) -> None:
    if t is None:
        raise AdapterFormatError(f"{where} has no {label} factor")
    if not t.dtype.is_floating_point:
        raise AdapterFormatError(f"{where}: factor {label} must be floating point, not {t.dtype}")
    if tuple(t.shape) != want or want[0] < 1 or want[1] < 1:
        raise AdapterFormatError(
            f"{where}: factor {label} has shape {tuple(t.shape)}, expected {want}"
        )


@dataclass
class Adapter:
    """A trained adapter: its config, per-module factors and where it came from."""

    config: SBoRAConfig
    modules: dict[str, AdapterModule]
    base_fingerprint: str | None = None
    base_model: str | None = None
    metadata: dict[str, str] = field(default_factory=dict)

    # ---- views -------------------------------------------------------------------------------
    @property
    def indices(self) -> dict[str, torch.Tensor]:
        """Module name -> sorted int64 indices (plain LoRA modules have none and are left out)."""
        return {n: m.indices for n, m in self.modules.items() if m.indices is not None}

    def delta(self, module: str) -> torch.Tensor:
        """Dense float32 ``ΔW`` (out, in) of one module."""
        try:
            return self.modules[module].delta()
        except KeyError:
            raise ConfigError(
                f"the adapter has no module {module!r}; it has {_few(self.modules)}"
            ) from None

    def cells(self) -> int:
        """Total number of weight cells the adapter may change."""
        return sum(m.cells() for m in self.modules.values())

    def num_parameters(self) -> int:
        """Number of trained parameters (index buffers excluded)."""
        return sum(t.numel() for m in self.modules.values() for t in (m.a, m.b) if t is not None)

    # ---- native files -----------------------------------------------------------------------
    def config_dict(self) -> dict[str, Any]:
        """The content of ``sbora_config.json``."""
        return {
            "format": FORMAT,
            "format_version": FORMAT_VERSION,
            **self.config.to_dict(),
            "base_fingerprint": self.base_fingerprint,
            "base_model": self.base_model,
            "modules": {
                n: {"variant": m.variant, "shape": list(m.shape), "kind": m.kind, "scale": m.scale}
                for n, m in sorted(self.modules.items())
            },
            "metadata": dict(self.metadata),
        }

    def file_bytes(self) -> dict[str, bytes]:
        """The exact bytes of the two native files, by file name."""
        tensors: dict[str, torch.Tensor] = {}
        for m in self.modules.values():
            tensors.update(m.tensors())
        header = {"format": FORMAT, "format_version": str(FORMAT_VERSION)}
        if self.base_fingerprint:
            header["base_fingerprint"] = self.base_fingerprint
        config = json.dumps(self.config_dict(), indent=2, sort_keys=True) + "\n"
        return {
            WEIGHTS_FILE: safetensors_bytes(tensors, header),
            CONFIG_FILE: config.encode(),
        }

    def sha256(self) -> str:
        """Content hash of the saved adapter: sha256 over each file's name, size and bytes."""
        return files_sha256(self.file_bytes())

    def save(self, directory: str | Path) -> Path:
        """Write ``sbora_config.json`` + the safetensors atomically; return the dir."""
        directory = Path(directory)
        write_dir_atomic(directory, self.file_bytes())
        return directory

    @classmethod
    def load(cls, directory: str | Path) -> Adapter:
        """Read and validate a native adapter directory (no pickle is ever loaded)."""
        return _load(Path(directory))

    # ---- models and PEFT --------------------------------------------------------------------
    def apply(self, model: nn.Module) -> nn.Module:
        """Inject this adapter into ``model`` (in place) with its indices and trained factors."""
        from sbora_reg.sbora.model import apply_adapter

        return apply_adapter(model, self)

    def to_peft(self, directory: str | Path) -> Path:
        """Write a stock PEFT LoRA adapter (identity rows/columns materialised)."""
        from sbora_reg.sbora.peft_io import to_peft

        return to_peft(self, directory)

    @classmethod
    def from_peft(cls, directory: str | Path) -> Adapter:
        """Read a PEFT LoRA adapter; standard-basis factors become FA/FB modules."""
        from sbora_reg.sbora.peft_io import from_peft

        return from_peft(directory)


def dir_sha256(directory: str | Path) -> str:
    """The ``Adapter.sha256()`` of a saved native adapter directory, from its files."""
    directory = Path(directory)
    return files_sha256({n: (directory / n).read_bytes() for n in (CONFIG_FILE, WEIGHTS_FILE)})


def _few(names: Any, n: int = 5) -> str:
    items = sorted(names)
    more = f", ... ({len(items)} in all)" if len(items) > n else ""
    return ", ".join(items[:n]) + more if items else "none"


def _check_files(directory: Path) -> None:
    if directory.is_file():
        refuse_pickle(directory)
        raise AdapterFormatError(
            f"{directory} is a file: pass the adapter folder holding {CONFIG_FILE}"
        )
    if not directory.is_dir():
        raise AdapterFormatError(f"adapter folder {directory} does not exist")
    missing = [n for n in (CONFIG_FILE, WEIGHTS_FILE) if not (directory / n).is_file()]
    if not missing:
        return
    pickles = sorted(p.name for p in directory.iterdir() if is_pickle_name(p.name))
    if pickles:
        refuse_pickle(directory / pickles[0])
    if (directory / "adapter_config.json").is_file():
        raise AdapterFormatError(
            f"{directory} is a PEFT adapter, not a native one: use Adapter.from_peft"
        )
    raise AdapterFormatError(f"{directory} lacks {' and '.join(missing)}: not an SBoRA adapter")


def _read_config(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise AdapterFormatError(f"{path} is not valid JSON: {exc}") from exc
    if not isinstance(data, dict) or data.get("format") != FORMAT:
        raise AdapterFormatError(f"{path} is not an SBoRA adapter config (format != 'sbora')")
    version = data.get("format_version")
    if not isinstance(version, int) or version > FORMAT_VERSION or version < 1:
        raise AdapterFormatError(
            f"{path} has format_version {version!r}; this sbora-reg reads up to "
            f"{FORMAT_VERSION}: upgrade sbora-reg"
        )
    return data


def _load(directory: Path) -> Adapter:
    _check_files(directory)
    data = _read_config(directory / CONFIG_FILE)
    tensors, header = read_safetensors(directory / WEIGHTS_FILE)
    where = directory / WEIGHTS_FILE
    if header.get("format") != FORMAT:
        raise AdapterFormatError(f"{where} header says format={header.get('format')!r}, not sbora")
    fingerprint = data.get("base_fingerprint") or None
    if (header.get("base_fingerprint") or None) != fingerprint:
        raise AdapterFormatError(
            f"{directory}: the base fingerprint in {CONFIG_FILE} and in {WEIGHTS_FILE} differ; "
            "the two files come from different adapters"
        )
    try:
        config = SBoRAConfig.from_dict({k: data[k] for k in SBoRAConfig.field_names() if k in data})
    except ConfigError as exc:
        raise AdapterFormatError(f"{directory / CONFIG_FILE}: {exc}") from exc
    table = data.get("modules")
    if not isinstance(table, dict) or not table:
        raise AdapterFormatError(f"{directory / CONFIG_FILE} has no module table")
    modules: dict[str, AdapterModule] = {}
    used: set[str] = set()
    for name, row in table.items():
        modules[name] = _module_from_row(name, row, tensors, used, where)
    extra = sorted(set(tensors) - used)
    if extra:
        raise AdapterFormatError(f"{where} has tensors no module declares: {_few(extra)}")
    metadata = data.get("metadata") or {}
    if not isinstance(metadata, dict):
        raise AdapterFormatError(f"{directory / CONFIG_FILE}: metadata must be an object")
    return Adapter(
        config=config,
        modules=modules,
        base_fingerprint=fingerprint,
        base_model=data.get("base_model") or None,
        metadata={str(k): str(v) for k, v in metadata.items()},
    )


def _module_from_row(
    name: str, row: Any, tensors: dict[str, torch.Tensor], used: set[str], where: Path
) -> AdapterModule:
    try:
        variant, kind = str(row["variant"]), str(row["kind"])
        shape = (int(row["shape"][0]), int(row["shape"][1]))
        scale = float(row["scale"])
    except (KeyError, TypeError, ValueError, IndexError) as exc:
        raise AdapterFormatError(f"module {name}: bad entry in the module table ({exc})") from exc
    names = {
        "fa": ("sbora_idx", "sbora_B"),
        "fb": ("sbora_idx", "sbora_A"),
        "lora": ("lora_A", "lora_B"),
    }.get(variant)
    if names is None:
        raise AdapterFormatError(f"module {name} has unknown variant {variant!r}")
    got: dict[str, torch.Tensor] = {}
    for part in names:
        key = f"{name}.{part}"
        if key not in tensors:
            raise AdapterFormatError(f"{where} lacks tensor {key}")
        got[part] = tensors[key]
        used.add(key)
    idx = got.get("sbora_idx")
    if idx is not None and idx.dtype != torch.int64:
        raise AdapterFormatError(f"{where}: {name}.sbora_idx must be int64, not {idx.dtype}")
    if (
        idx is not None
        and idx.dim() == 1
        and idx.numel() > 1
        and not bool((idx[1:] > idx[:-1]).all())
    ):
        raise AdapterFormatError(
            f"{where}: {name}.sbora_idx must be strictly increasing (sorted, distinct)"
        )
    return AdapterModule(
        name=name,
        variant=variant,
        kind=kind,
        shape=shape,
        scale=scale,
        indices=idx,
        a=got.get("sbora_A", got.get("lora_A")),
        b=got.get("sbora_B", got.get("lora_B")),
    )
