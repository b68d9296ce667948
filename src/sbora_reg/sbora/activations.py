"""What reaches a model's linear modules when it reads some examples (prompt and answer tokens).

``module_inputs`` runs the model over ``(prompt, answer)`` examples teacher-forced, as training
and scoring see them, and hands every named module's input rows (one per real token: padding
left out) to a callback. Interference (``registry.interference``) keeps rows; compose-time
calibration (``sbora.calibrate``) keeps their second moments.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import nn

from sbora_reg.sbora.scoring import batches
from sbora_reg.sbora.training import encode

RowSink = Callable[[str, torch.Tensor], None]  # (module name, float32 rows (tokens, features))


@torch.no_grad()
def module_inputs(
    model: nn.Module,
    tokenizer: Any,
    examples: Sequence[Any],
    modules: Sequence[str],
    sink: RowSink,
    batch_size: int = 16,
    outputs: bool = False,
) -> int:
    """Feed ``examples`` through ``model``; ``sink(module, rows)`` for every named module and
    batch (in batch order), one row per non-padding token: the module's input, or with
    ``outputs`` its output. Returns how many tokens were read."""
    mask: list[torch.Tensor] = []

    def hook(name: str) -> Any:
        def grab(_module: nn.Module, args: tuple[torch.Tensor, ...], *out: torch.Tensor) -> None:
            x = (out[0] if outputs else args[0]).detach()
            sink(name, x[mask[0]].reshape(-1, x.shape[-1]).float())

        return grab

    def register(name: str) -> Any:
        module = model.get_submodule(name)
        if outputs:
            return module.register_forward_hook(hook(name))
        return module.register_forward_pre_hook(hook(name))

    handles = [register(n) for n in modules]
    tokens = 0
    try:
        device = next(model.parameters()).device
        model.eval()
        for batch in batches(examples, batch_size):
            enc = encode(tokenizer, batch, device)
            mask[:] = [enc["attention_mask"].bool()]
            tokens += int(mask[0].sum())
            model(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"])
    finally:
        for handle in handles:
            handle.remove()
    return tokens
