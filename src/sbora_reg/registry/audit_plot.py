"""The audit picture: layers x module types, each cell a thumbnail of that weight.

Every thumbnail is the module's ``(out, in)`` weight scaled to a square: a task's FA columns are
vertical stripes in its colour, FB rows horizontal stripes, a LoRA fills the square. Cells two
tasks both touch are painted red, computed exactly (a pixel is red only if it holds a truly shared
cell). Untouched modules are light grey; grid positions the base lacks stay white.
"""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np

from sbora_reg.registry.usage import ModuleUsage, UsageReport

_LAYER = re.compile(r"^(?P<prefix>.*?)\.(?P<layer>\d+)\.(?P<kind>.+)$")
RED = np.array([0.86, 0.08, 0.08])
UNTOUCHED = np.array([0.90, 0.90, 0.90])
# Task colours: matplotlib's tab10 without its red, then tab20b.
_PALETTE = [
    "#1f77b4", "#ff7f0e", "#2ca02c", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f", "#bcbd22",
    "#17becf", "#393b79", "#637939", "#8c6d31", "#7b4173", "#5254a3", "#8ca252", "#bd9e39",
]  # fmt: skip


def _split(name: str) -> tuple[str, str]:
    """``model.layers.3.self_attn.q_proj`` -> (``3``, ``self_attn.q_proj``); else ("-", name)."""
    m = _LAYER.match(name)
    return (m["layer"], m["kind"]) if m else ("-", name)


def _pixels(indices: np.ndarray, dim: int, px: int) -> np.ndarray:
    """(px,) bool: which thumbnail pixels hold at least one of ``indices`` out of ``dim``."""
    out = np.zeros(px, dtype=bool)
    out[(np.asarray(indices, dtype=np.int64) * px) // dim] = True
    return out


def _tile_mask(usage: ModuleUsage, px: int) -> np.ndarray:
    out, inn = usage.shape
    if usage.lora:
        return np.ones((px, px), dtype=bool)
    rows, cols = _pixels(usage.rows, out, px), _pixels(usage.cols, inn, px)
    return rows[:, None] | cols[None, :]


def _shared_mask(a: ModuleUsage, b: ModuleUsage, px: int) -> np.ndarray:
    """Pixels holding a cell both usages touch: rows R1&R2, columns C1&C2, R1xC2 and R2xC1."""
    if a.lora:
        return _tile_mask(b, px)
    if b.lora:
        return _tile_mask(a, px)
    out, inn = a.shape

    def rp(idx: np.ndarray) -> np.ndarray:
        return _pixels(idx, out, px)

    def cp(idx: np.ndarray) -> np.ndarray:
        return _pixels(idx, inn, px)

    return (
        rp(np.intersect1d(a.rows, b.rows))[:, None]
        | cp(np.intersect1d(a.cols, b.cols))[None, :]
        | (rp(a.rows)[:, None] & cp(b.cols)[None, :])
        | (rp(b.rows)[:, None] & cp(a.cols)[None, :])
    )


def render_usage(report: UsageReport, px: int = 40, gap: int = 4) -> tuple[np.ndarray, list, list]:
    """The picture as an RGB array (H, W, 3) plus row labels (layers) and column labels (kinds)."""
    from matplotlib.colors import to_rgb

    touched = {m for g in report.groups for m in g.modules}
    kinds = sorted({_split(m)[1] for m in touched})
    layers = sorted(
        {_split(m)[0] for m in report.module_shapes if _split(m)[1] in kinds},
        key=lambda x: (x == "-", int(x) if x.isdigit() else 0),
    )
    colours = [np.array(to_rgb(_PALETTE[i % len(_PALETTE)])) for i in range(len(report.groups))]
    step = px + gap
    image = np.ones((len(layers) * step + gap, len(kinds) * step + gap, 3))
    where = {
        (layer, kind): (i, j) for i, layer in enumerate(layers) for j, kind in enumerate(kinds)
    }
    for name in report.module_shapes:
        pos = where.get(_split(name))
        if pos is None:
            continue
        tile = np.broadcast_to(UNTOUCHED, (px, px, 3)).copy()
        users = [(g, c) for g, c in zip(report.groups, colours, strict=True) if name in g.modules]
        for group, colour in users:
            tile[_tile_mask(group.modules[name], px)] = colour
        for k, (a, _) in enumerate(users):
            for b, _ in users[k + 1 :]:
                tile[_shared_mask(a.modules[name], b.modules[name], px)] = RED
        y, x = gap + pos[0] * step, gap + pos[1] * step
        image[y : y + px, x : x + px] = tile
    return image, layers, kinds


def plot_usage(report: UsageReport, path: str | Path, px: int = 40) -> Path:
    """Write the audit picture (PNG, or any format matplotlib infers from the suffix)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.patches import Patch

    image, layers, kinds = render_usage(report, px=px)
    step = px + 4
    tile_in = 0.5  # inches per thumbnail, legend and labels beside it
    height = 2.0 + tile_in * len(layers)
    width = 4.5 + tile_in * len(kinds) + 0.1 * max((len(g.name) for g in report.groups), default=0)
    fig = Figure(figsize=(width, height), dpi=110)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)
    ax.imshow(image, interpolation="nearest", aspect="equal")
    ax.set_xticks(
        [4 + j * step + px / 2 for j in range(len(kinds))], kinds, rotation=30, ha="right"
    )
    ax.set_yticks([4 + i * step + px / 2 for i in range(len(layers))], layers)
    ax.set_xlabel("module (thumbnail: rows = out, columns = in)")
    ax.set_ylabel("layer")
    ax.tick_params(length=0)
    for spine in ax.spines.values():
        spine.set_visible(False)
    share = report.cells / report.total_weights if report.total_weights else 0.0
    ax.set_title(
        f"{Path(report.base).name}: {len(report.groups)} task(s) touch {report.cells:,} of "
        f"{report.total_weights:,} weights ({share:.3%})",
        fontsize=10,
    )
    handles = [
        Patch(color=_PALETTE[i % len(_PALETTE)], label=f"{g.name} ({g.share:.3%})")
        for i, g in enumerate(report.groups)
    ]
    handles += [
        Patch(color=(0.86, 0.08, 0.08), label="shared by 2+ tasks"),
        Patch(facecolor=(0.9, 0.9, 0.9), edgecolor="0.6", label="untouched"),
    ]
    ax.legend(handles=handles, loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize=8)
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path)
    return path
