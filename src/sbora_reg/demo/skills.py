"""The demo's procedural skills: generators of ``(prompt, answer)`` pairs, and their training.

Disjoint regions keep *weights* apart, not *skills* (every adapter still reads the same
activations), so the demo measures the composed model on every skill (``sbora.scoring``).
"""

from __future__ import annotations

import random
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from torch import nn

from sbora_reg.sbora.scoring import batches
from sbora_reg.sbora.training import encode, run_steps

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


def train(
    model: nn.Module,
    tokenizer: Any,
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
    encoded = (encode(tokenizer, batch, device) for batch in batches(data, batch_size))
    hook = (lambda step, _total, loss: on_step(step, loss)) if on_step is not None else None
    return run_steps(model, encoded, steps=steps, lr=lr, on_step=hook)
