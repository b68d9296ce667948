"""Small procedural skills to train and measure adapters on: data, training loop, evaluation.

Used by the demo and by composition reports: disjoint regions keep *weights* apart, not *skills*
(every adapter still reads the same activations), so a composed model is measured on every
member's skill and compared with that member alone.

A skill is a generator of ``(prompt, answer)`` pairs; the loss and the accuracy are taken on the
answer tokens only (teacher forced: "exact" means every answer token is the argmax, which is what
greedy decoding of the answer would produce).
"""

from __future__ import annotations

import random
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from sbora_reg.training import encode, run_steps

Example = tuple[str, str]

# Evaluation examples are drawn with this seed; training uses small seeds (0, 1, ...).
HELD_OUT_SEED = 10_000


@dataclass(frozen=True)
class Skill:
    """A named generator of (prompt, answer) examples."""

    name: str
    description: str
    make: Callable[[random.Random], Example]

    def examples(self, n: int, seed: int) -> list[Example]:
        rng = random.Random(f"{self.name}:{seed}")
        return [self.make(rng) for _ in range(n)]


def _addition(rng: random.Random) -> Example:
    a, b = rng.randint(10, 99), rng.randint(10, 99)
    return f"{a}+{b}=", f"{a + b}"


def _sorting(rng: random.Random) -> Example:
    digits = [rng.randint(0, 9) for _ in range(5)]
    return "sort " + " ".join(map(str, digits)) + ":", " " + " ".join(map(str, sorted(digits)))


SKILLS: dict[str, Skill] = {
    "add": Skill("add", "two-digit addition: '23+45=' -> '68'", _addition),
    "sort": Skill("sort", "sort five digits: 'sort 3 9 1 7 2:' -> ' 1 2 3 7 9'", _sorting),
}


@dataclass(frozen=True)
class SkillScore:
    """Answer-token loss (nats per token) and exact-match rate on held-out examples."""

    loss: float
    exact: float
    n: int


def _batches(examples: list[Example], size: int) -> Iterator[list[Example]]:
    for i in range(0, len(examples), size):
        yield examples[i : i + size]


def train(
    model: nn.Module,
    tokenizer,
    skill: Skill,
    *,
    steps: int,
    batch_size: int = 16,
    lr: float = 2e-3,
    seed: int = 0,
    on_step: Callable[[int, float], None] | None = None,
) -> list[float]:
    """Train the model's trainable parameters on ``skill``; returns the loss of every step.

    ``on_step(step, loss)``; the loop itself is ``training.run_steps`` (shared with `train`).
    """
    device = next(model.parameters()).device
    data = skill.examples(steps * batch_size, seed=seed)
    batches = (encode(tokenizer, batch, device) for batch in _batches(data, batch_size))
    hook = (lambda step, _total, loss: on_step(step, loss)) if on_step is not None else None
    return run_steps(model, batches, steps=steps, lr=lr, on_step=hook)


def evaluate(
    model: nn.Module, tokenizer, skill: Skill, *, n: int = 128, seed: int = HELD_OUT_SEED
) -> SkillScore:
    """Held-out answer-token loss and exact-match rate (seed differs from training's)."""
    return score(model, tokenizer, skill.examples(n, seed=seed))


@torch.no_grad()
def score(model: nn.Module, tokenizer, examples: Sequence[Any]) -> SkillScore:
    """Answer-token loss (nats/token) and exact-match rate of ``model`` on ``examples``.

    ``examples`` are ``(prompt, answer)`` pairs or ``training.Example`` objects.
    """
    device = next(model.parameters()).device
    model.eval()
    total_loss, total_tokens, exact = 0.0, 0, 0
    for batch in _batches(list(examples), 32):
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


def retention(base: SkillScore, alone: SkillScore, composed: SkillScore) -> float:
    """Share of a skill's loss improvement (base -> alone) that survives in the composed model."""
    gained = base.loss - alone.loss
    if gained <= 0:
        return float("nan")
    return (base.loss - composed.loss) / gained
