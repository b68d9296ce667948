"""Jobs that span the method and the registry, as one call each.

``train_and_register``: train an SBoRA adapter (``sbora.training.train_adapter``) and register
what it wrote, consuming the reservation it was trained on. (Composing and measuring is
``compose.compose(..., measure=...)``.)
"""

from __future__ import annotations

import os
from collections.abc import Callable
from contextlib import AbstractContextManager
from pathlib import Path
from typing import TYPE_CHECKING, Any

from sbora_reg.registry.names import check_name

if TYPE_CHECKING:
    from sbora_reg.registry.records import AdapterRecord
    from sbora_reg.registry.store import Registry
    from sbora_reg.sbora.training import TrainResult


def train_and_register(
    open_registry: Callable[[], AbstractContextManager[Registry]],
    name: str,
    base_dir: str | os.PathLike[str],
    data: Any,
    out_dir: str | os.PathLike[str],
    *,
    task: str | None = None,
    probe: str | os.PathLike[str] | None = None,
    **train_options: Any,
) -> tuple[TrainResult, AdapterRecord | None]:
    """``train_adapter(base_dir, data, out_dir, **train_options)``, then register ``out_dir``
    (with ``probe``, a held-out JSONL, as its probe set).

    ``name`` and ``task`` are checked before training starts; the registry is opened (and
    created) only once an adapter exists, so a run that fails leaves no database behind. Under
    torchrun only rank 0 registers (the other ranks get ``None``). The adapter is recorded on
    ``base_dir`` and consumes the matching reservation it was trained on (see ``queries``).
    """
    from sbora_reg.sbora.training import load_examples, train_adapter

    check_name(name)
    if task is not None:
        check_name(task, "task")
    if probe is not None:
        load_examples(probe)  # a bad probe file fails before training, not after it
    result = train_adapter(base_dir, data, out_dir, **train_options)
    if result.rank != 0:
        return result, None
    with open_registry() as registry:
        record = registry.add(Path(out_dir), name=name, task=task, base=str(base_dir), probe=probe)
    return result, record
