"""Tables shared by several verbs."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from rich.table import Table

    from sbora_reg.registry.retention import RetentionRow


def retention_table(rows: Sequence[RetentionRow], title: str, label: str = "member") -> Table:
    """Each row's skill on the base, alone and composed, and the share of its gain kept."""
    from rich.table import Table

    table = Table(title=title)
    for col in (label, "loss: base → alone → composed", "exact: base → alone → composed"):
        table.add_column(col)
    table.add_column("kept", justify="right")
    for r in rows:
        kept = "n/a" if math.isnan(r.retention) else f"{r.retention:.0%}"
        table.add_row(
            r.member,
            f"{r.base.loss:.3f} → {r.alone.loss:.3f} → {r.composed.loss:.3f}",
            f"{r.base.exact:.0%} → {r.alone.exact:.0%} → {r.composed.exact:.0%}",
            kept,
        )
    return table
