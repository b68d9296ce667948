"""Tiny bases and adapters for registry tests: a 2-layer Llama config, adapters built as data."""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path

import torch
from tests import tiny

from sbora_reg.sbora import Adapter, AdapterModule, SBoRAConfig
from sbora_reg.sbora.fingerprint import dir_module_table, fingerprint_table

TARGETS = ("q_proj", "v_proj", "up_proj")


def make_base(directory: Path, hidden: int = 64, layers: int = 2) -> Path:
    """A tiny Llama model directory (config.json is all the registry reads)."""
    config = tiny.llama(
        "l64", hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers
    )
    config.save_pretrained(directory)
    return directory


@lru_cache(maxsize=8)
def _table(base: str) -> dict:
    return dir_module_table(base)


def make_adapter(
    directory: Path,
    base: Path,
    variant: str = "fa",
    r: int = 4,
    seed: int = 0,
    targets: tuple[str, ...] = TARGETS,
    with_fingerprint: bool = True,
) -> Adapter:
    """Save a native adapter for ``base`` with seeded random indices and factors."""
    gen = torch.Generator().manual_seed(seed)
    table = _table(str(base))
    modules: dict[str, AdapterModule] = {}
    for name, (kind, (out, inp)) in sorted(table.items()):
        if kind == "embedding" or not name.endswith(targets):
            continue
        if variant == "lora":
            a, b = torch.randn(r, inp, generator=gen), torch.randn(out, r, generator=gen)
            modules[name] = AdapterModule(name, "lora", kind, (out, inp), 2.0, None, a, b)
            continue
        dim = inp if variant == "fa" else out
        idx = torch.randperm(dim, generator=gen)[:r].sort().values
        factor = torch.randn((out, r) if variant == "fa" else (r, inp), generator=gen)
        a, b = (None, factor) if variant == "fa" else (factor, None)
        modules[name] = AdapterModule(name, variant, kind, (out, inp), 2.0, idx, a, b)
    adapter = Adapter(
        config=SBoRAConfig(
            variant="fa" if variant == "lora" else variant,
            r=r,
            alpha=2.0 * r,
            target_modules=targets,
        ),
        modules=modules,
        base_fingerprint=fingerprint_table(table) if with_fingerprint else None,
        base_model=str(base),
        metadata={"seed": str(seed)},
    )
    adapter.save(directory)
    return adapter
