"""The procedural skills of the demo and of ``benchmarks/interference.py``: generators of
``(prompt, answer)`` pairs, seeded, so training, probe and evaluation sets never share a draw.

Disjoint regions keep *weights* apart, not *skills* (every adapter still reads the same
activations), so the demo measures the composed model on every skill (``sbora.scoring``).
"""

from __future__ import annotations

import json
import random
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

Example = tuple[str, str]

# Training examples use small seeds (0, 1, ...); probe sets and evaluation sets their own.
PROBE_SEED, EVAL_SEED = 10_000, 20_000
HELD_OUT_SEED = EVAL_SEED


@dataclass(frozen=True)
class Skill:
    """A named generator of (prompt, answer) examples."""

    name: str
    description: str
    make: Callable[[random.Random], Example]

    def examples(self, n: int, seed: int) -> list[Example]:
        rng = random.Random(f"{self.name}:{seed}")
        return [self.make(rng) for _ in range(n)]

    def write(self, path: Path, n: int, seed: int) -> Path:
        """``n`` examples as a JSONL prompt/answer file (what `sbora-reg train` reads)."""
        path.parent.mkdir(parents=True, exist_ok=True)
        rows = self.examples(n, seed)
        path.write_text("".join(json.dumps({"prompt": p, "answer": a}) + "\n" for p, a in rows))
        return path


WORDS = [
    "cup", "fish", "car", "red", "tree", "moon", "salt", "boat",
    "lamp", "rain", "door", "milk", "king", "sand", "wolf", "bell",
]  # fmt: skip


def _add(rng: random.Random) -> Example:
    a, b = rng.randint(10, 99), rng.randint(10, 99)
    return f"Add: {a}+{b}=", f"{a + b}"


def _sort(rng: random.Random) -> Example:
    nums = rng.sample(range(1, 100), 3)
    return f"Sort: {' '.join(map(str, nums))} ->", " " + " ".join(map(str, sorted(nums)))


def _last(rng: random.Random) -> Example:
    words = rng.sample(WORDS, 4)
    return f"Last word of: {' '.join(words)} ->", f" {words[-1]}"


def _max(rng: random.Random) -> Example:
    nums = rng.sample(range(1, 100), 4)
    return f"Max of: {' '.join(map(str, nums))} ->", f" {max(nums)}"


def _rev(rng: random.Random) -> Example:
    words = rng.sample(WORDS, 3)
    return f"Reverse: {' '.join(words)} ->", " " + " ".join(reversed(words))


def _upper(rng: random.Random) -> Example:
    word, n = rng.choice(WORDS), rng.randint(1, 9)
    return f"Upper: {word} {n} ->", f" {word.upper()} {n}"


SKILLS: dict[str, Skill] = {
    s.name: s
    for s in (
        Skill("add", "two-digit addition: 'Add: 77+57=' -> '134'", _add),
        Skill("sort", "sort three numbers: 'Sort: 57 15 1 ->' -> ' 1 15 57'", _sort),
        Skill("last", "last of four words: 'Last word of: cup fish car red ->' -> ' red'", _last),
        Skill("max", "largest of four numbers: 'Max of: 3 71 12 9 ->' -> ' 71'", _max),
        Skill("rev", "three words reversed: 'Reverse: cup fish car ->' -> ' car fish cup'", _rev),
        Skill("upper", "a word in capitals: 'Upper: fish 3 ->' -> ' FISH 3'", _upper),
    )
}
