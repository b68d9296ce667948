"""Functional interference between adapters: how much adapter j writes into task i's computation.

Disjoint regions keep weights apart, not skills: adapter j still reads task i's activations and
adds ``ΔW_j x_i`` to every module it adapts. On task i's probe inputs ``X_i`` (the activations
that reach each module when the base reads task i's probe prompts and answers), per module ``m``

    crosstalk[i][j][m] = ‖X_i ΔW_j(m)ᵀ‖_F / ‖X_i ΔW_i(m)ᵀ‖_F

(Orthogonal Adaptation's ``‖ΔW_j X_i‖``, normalised by task i's own update), and overall the
same ratio with the squared norms summed over all modules. The diagonal is 1; 0 means j is
invisible to task i; values near 1 mean j changes task i's computation as much as i itself.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from sbora_reg.errors import ConfigError
from sbora_reg.registry.members import load_members
from sbora_reg.sbora.activations import module_inputs
from sbora_reg.sbora.training import load_examples, load_model

if TYPE_CHECKING:
    from sbora_reg.registry.store import Registry
    from sbora_reg.sbora.adapter import Adapter

MAX_ROWS = 4096  # activation rows kept per (task, module): enough for a norm, bounded memory


@dataclass(frozen=True)
class Interference:
    """The crosstalk matrix of some adapters, overall and per module (NaN where undefined)."""

    members: list[str]  # row i: task i's inputs; column j: adapter j
    overall: list[list[float]]
    modules: dict[str, list[list[float]]]
    tokens: list[int]  # activation rows used per task

    def to_json(self) -> dict[str, Any]:
        def clean(matrix: list[list[float]]) -> list[list[float | None]]:
            return [[None if math.isnan(v) else v for v in row] for row in matrix]

        return {
            "members": self.members,
            "tokens": self.tokens,
            "overall": clean(self.overall),
            "modules": {name: clean(mat) for name, mat in sorted(self.modules.items())},
        }


def _capture_inputs(
    model: nn.Module, tokenizer: Any, examples: Sequence[Any], modules: Sequence[str]
) -> dict[str, torch.Tensor]:
    """Rows of the inputs each named module receives on ``examples`` (≤ MAX_ROWS each)."""
    seen: dict[str, list[torch.Tensor]] = {name: [] for name in modules}
    counts = dict.fromkeys(modules, 0)

    def keep(name: str, rows: torch.Tensor) -> None:
        rows = rows[: MAX_ROWS - counts[name]]
        if rows.shape[0]:
            seen[name].append(rows)
            counts[name] += rows.shape[0]

    module_inputs(model, tokenizer, examples, modules, keep)
    return {name: torch.cat(parts) for name, parts in seen.items() if parts}


def crosstalk(
    adapters: Sequence[tuple[str, Adapter]], inputs: Sequence[dict[str, torch.Tensor]]
) -> Interference:
    """The crosstalk matrix from each task's captured module inputs (see the module docstring)."""
    n = len(adapters)
    names = sorted({m for _, a in adapters for m in a.modules})
    per_module = {m: [[math.nan] * n for _ in range(n)] for m in names}
    overall = [[math.nan] * n for _ in range(n)]
    # dense ΔW (out, in) of every adapter's modules, built once for all rows
    deltas = [{m: adapter.delta(m) for m in adapter.modules} for _, adapter in adapters]
    for i, (_, own) in enumerate(adapters):
        norms = [[0.0] * len(names) for _ in range(n)]  # ‖X_i ΔW_jᵀ‖² per j, per module
        for k, module in enumerate(names):
            x = inputs[i].get(module)
            if x is None:
                continue
            for j in range(n):
                if module in deltas[j]:
                    norms[j][k] = float((x @ deltas[j][module].T).square().sum())
            if module in own.modules and norms[i][k] > 0:
                for j in range(n):
                    per_module[module][i][j] = math.sqrt(norms[j][k] / norms[i][k])
        own_total = sum(norms[i])
        if own_total > 0:
            overall[i] = [math.sqrt(sum(norms[j]) / own_total) for j in range(n)]
    tokens = [max((x.shape[0] for x in inp.values()), default=0) for inp in inputs]
    return Interference([ref for ref, _ in adapters], overall, per_module, tokens)


def interference(registry: Registry, refs: Sequence[str]) -> Interference:
    """The crosstalk matrix of registered versions on their stored probe sets (one base)."""
    loaded = load_members(registry, refs)
    if len(loaded) < 2:
        raise ConfigError("interference compares two or more adapters: name them all")
    bases = {record.base for record, _ in loaded}
    if len(bases) > 1:
        raise ConfigError(f"the adapters sit on different bases ({', '.join(sorted(bases))})")
    sets = []
    for record, _ in loaded:
        probe = registry.probe_path(record)
        if probe is None:
            raise ConfigError(
                f"{record.ref} has no probe set: add one with `sbora-reg add DIR --probe FILE`"
            )
        sets.append(load_examples(probe))
    base, tokenizer = load_model(Path(bases.pop()), torch.float32, torch.device("cpu"))
    modules = sorted({m for _, member in loaded for m in member.adapter.modules})
    inputs = [_capture_inputs(base, tokenizer, examples, modules) for examples in sets]
    return crosstalk([(r.ref, member.adapter) for r, member in loaded], inputs)


def plot(result: Interference, path: str | Path) -> Path:
    """The overall matrix as a heatmap PNG (rows: task inputs; columns: adapters)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n = len(result.members)
    fig, ax = plt.subplots(figsize=(2 + 0.9 * n, 1.5 + 0.8 * n))
    image = ax.imshow(result.overall, cmap="magma_r", vmin=0)
    ax.set_xticks(range(n), result.members, rotation=45, ha="right")
    ax.set_yticks(range(n), result.members)
    ax.set_xlabel("adapter j")
    ax.set_ylabel("inputs of task i")
    for i in range(n):
        for j in range(n):
            value = result.overall[i][j]
            text = "n/a" if math.isnan(value) else f"{value:.2f}"
            ax.text(j, i, text, ha="center", va="center", fontsize=8, color="tab:blue")
    fig.colorbar(image, ax=ax, label="‖ΔW_j X_i‖ / ‖ΔW_i X_i‖")
    ax.set_title("crosstalk on each task's probe inputs")
    fig.tight_layout()
    out = Path(path)
    fig.savefig(out, dpi=120)
    plt.close(fig)
    return out
