"""Tables shared by several verbs."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from rich.table import Table

    from sbora_reg.registry.retention import RetentionRow


def retention_table(rows: Sequence[RetentionRow], title: str, label: str = "member") -> Table:
    """Each row's exact match on the base, alone and composed and the share of it kept (first),
    then the answer loss and the share of its gain kept."""
    from rich.table import Table

    table = Table(title=title)
    table.add_column(label)
    table.add_column("exact: base → alone → composed")
    table.add_column("exact kept", justify="right")
    table.add_column("loss: base → alone → composed")
    table.add_column("loss gain kept", justify="right")
    for r in rows:
        table.add_row(
            r.member,
            f"{r.base.exact:.0%} → {r.alone.exact:.0%} → {r.composed.exact:.0%}",
            _share(r.exact_retention),
            f"{r.base.loss:.3f} → {r.alone.loss:.3f} → {r.composed.loss:.3f}",
            _share(r.retention),
        )
    return table


def _share(value: float) -> str:
    return "n/a" if math.isnan(value) else f"{value:.0%}"
