"""Scoring a model on ``(prompt, answer)`` examples: answer-token loss and exact match.

Teacher forced: "exact" means every answer token is the argmax given the prompt and the answer's
earlier tokens, which is what greedy decoding of the answer would produce. Composition reports
(``registry.retention``) and the demo score each member on the base, alone and composed.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from sbora_reg.sbora.training import encode


@dataclass(frozen=True)
class SkillScore:
    """Answer-token loss (nats per token) and exact-match rate on held-out examples."""

    loss: float
    exact: float
    n: int


def batches(examples: Sequence[Any], size: int) -> Iterator[list[Any]]:
    """``examples`` in consecutive batches of ``size`` (the last may be shorter)."""
    items = list(examples)
    for i in range(0, len(items), size):
        yield items[i : i + size]


@torch.no_grad()
def score(model: nn.Module, tokenizer: Any, examples: Sequence[Any]) -> SkillScore:
    """Answer-token loss (nats/token) and exact-match rate of ``model`` on ``examples``.

    ``examples`` are ``(prompt, answer)`` pairs or ``training.Example`` objects.
    """
    device = next(model.parameters()).device
    model.eval()
    total_loss, total_tokens, exact = 0.0, 0, 0
    for batch in batches(examples, 32):
        enc = encode(tokenizer, batch, device)
        logits = model(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"]).logits
        logits, labels = logits[:, :-1].float(), enc["labels"][:, 1:]  # predict token t+1
        answer = labels != -100
        nll = nn.functional.cross_entropy(logits.transpose(1, 2), labels, reduction="none")
        total_loss += float(nll[answer].sum())
        total_tokens += int(answer.sum())
        right = (logits.argmax(-1) == labels) | ~answer
        exact += int(right.all(dim=1).sum())
    return SkillScore(
        loss=total_loss / max(total_tokens, 1), exact=exact / len(examples), n=len(examples)
    )


def loss_gain_kept(base: SkillScore, alone: SkillScore, composed: SkillScore) -> float:
    """Share of a skill's loss improvement (base -> alone) that survives in the composed model."""
    gained = base.loss - alone.loss
    if gained <= 0:
        return math.nan
    return (base.loss - composed.loss) / gained
