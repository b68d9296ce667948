"""Jobs that span the method and the registry, as one call each.

``train_and_register``: allocate a region from the registry when none is given, hold a probe
set out of the data when none is given, train an SBoRA adapter (``sbora.training.train_adapter``)
and register what it wrote with that probe set, consuming the reservation it was trained on.
(Composing, calibrating and measuring is ``compose.compose(..., calibrate=, measure=)``.)
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Callable
from contextlib import AbstractContextManager
from pathlib import Path
from typing import TYPE_CHECKING, Any

from sbora_reg.registry.names import check_name

if TYPE_CHECKING:
    from sbora_reg.registry.records import AdapterRecord
    from sbora_reg.registry.store import Registry
    from sbora_reg.sbora.training import TrainResult


HOLDOUT_MAX = 256  # probe rows held out of the training data when no probe set is given


def train_and_register(
    open_registry: Callable[[], AbstractContextManager[Registry]],
    name: str,
    base_dir: str | os.PathLike[str],
    data: Any,
    out_dir: str | os.PathLike[str],
    *,
    task: str | None = None,
    probe: str | os.PathLike[str] | None = None,
    holdout: bool = True,
    on_event: Callable[[str], None] | None = None,
    **train_options: Any,
) -> tuple[TrainResult, AdapterRecord | None]:
    """``train_adapter(base_dir, data, out_dir, **train_options)``, then register ``out_dir``
    (with ``probe``, a held-out JSONL, as its probe set).

    Without ``indices`` (one process) the adapter's region is allocated from the registry first
    (``allocate``: disjoint from every adapter and live reservation on the base) and released
    again if training fails. Without ``probe`` and with ``holdout``, every tenth training row
    (at most ``HOLDOUT_MAX``; none under 20 rows) is held out of training and stored as the
    probe set, so that ``compose`` can calibrate and measure with nothing typed.
    ``on_event(message)`` says what was chosen. ``name`` and ``task`` are checked before training
    starts. Under torchrun only rank 0 registers (the other ranks get ``None``). The adapter is
    recorded on ``base_dir`` and consumes the matching reservation it was trained on.
    """
    from sbora_reg.sbora.training import Example, load_examples, train_adapter, world_info

    check_name(name)
    if task is not None:
        check_name(task, "task")
    say = on_event or (lambda _msg: None)
    if probe is not None:
        load_examples(probe)  # a bad probe file fails before training, not after it
    examples = list(data) if not isinstance(data, str | os.PathLike) else load_examples(data)
    held: list[Example] = []
    if probe is None and holdout and len(examples) >= 20:
        picked = set(range(9, len(examples), 10)[:HOLDOUT_MAX])  # every tenth row, spread out
        held = [e for i, e in enumerate(examples) if i in picked]
        examples = [e for i, e in enumerate(examples) if i not in picked]
        say(f"held out {len(held)} of {len(examples) + len(held)} rows as the probe set")
    with tempfile.TemporaryDirectory(prefix="sbora-train-") as scratch:
        if held:
            probe = Path(scratch) / "probe.jsonl"
            probe.write_text("".join(json.dumps({"prompt": e.prompt, "answer": e.answer}) + "\n"
                                     for e in held))  # fmt: skip
        reservation = None
        if train_options.get("indices") is None and world_info()[1] == 1:
            reservation = _allocate(open_registry, base_dir, task, train_options, Path(scratch))
            say(f"allocated a disjoint region from the registry (reservation {reservation})")
        try:
            result = train_adapter(base_dir, examples, out_dir, **train_options)
        except BaseException:
            if reservation is not None:
                from sbora_reg.registry.allocate import release

                with open_registry() as registry:
                    release(registry, reservation)
            raise
        if result.rank != 0:
            return result, None
        with open_registry() as registry:
            record = registry.add(
                Path(out_dir), name=name, task=task, base=str(base_dir), probe=probe
            )
    return result, record


def _allocate(
    open_registry: Callable[[], AbstractContextManager[Registry]],
    base_dir: str | os.PathLike[str],
    task: str | None,
    train_options: dict[str, Any],
    scratch: Path,
) -> int:
    """Reserve the config's region on the base; ``train_options["indices"]`` becomes its file."""
    from sbora_reg.registry.allocate import allocate

    config = train_options["config"]
    with open_registry() as registry:
        found = allocate(
            registry, str(base_dir), variant=config.variant, rank=config.r,
            targets=list(config.target_modules), task=task, seed=config.seed,
            out=scratch / "indices.safetensors",
        )  # fmt: skip
    train_options["indices"] = found.path
    return found.reservation_id
