"""CLI verbs: overlap (which weights registered adapters share), allocate (disjoint regions) and
reservations (the live ones; release one)."""

from __future__ import annotations

import sys
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import click

from sbora_reg.cli import main
from sbora_reg.cli.common import console, echo_json, open_registry, parse_targets

if TYPE_CHECKING:
    from rich.table import Table

    from sbora_reg.registry.allocate import Allocation
    from sbora_reg.registry.overlap import PairOverlap
    from sbora_reg.registry.overlap_queries import AgainstAll

OVERLAP_EXIT = 3


def _pairs_table(pairs: Sequence[PairOverlap], title: str) -> Table:
    from rich.table import Table

    table = Table(title=title)
    for col in ("A", "B", "shared cells", "module", "cells"):
        table.add_column(col, overflow="fold", justify="right" if "cells" in col else "left")
    for p in pairs:
        if not p.comparable:
            table.add_row(p.a, p.b, "-", f"[yellow]not compared: {p.reason}[/]", "")
            continue
        total = f"[red]{p.total:,}[/]" if p.overlaps else "0"
        rows = [(module, f"{cells:,}") for module, cells in p.modules.items()]
        for k, (module, cells_text) in enumerate(rows or [("(disjoint)", "")]):
            first = k == 0
            table.add_row(
                p.a if first else "",
                p.b if first else "",
                total if first else "",
                module,
                cells_text,
            )
    return table


def _against_table(report: AgainstAll, limit: int) -> Table:
    """The ``limit`` adapters sharing the most with the query (0: all), one row each."""
    from rich.table import Table

    shown = report.top(limit or None)
    title = f"{report.query} vs {report.compared} adapters: {len(report.found)} overlapping"
    if len(shown) < len(report.found):
        title += f" (the {len(shown)} sharing most; --limit 0 or --json for all)"
    table = Table(title=title)
    for col in ("adapter", "shared cells", "modules", "most shared"):
        table.add_column(col, overflow="fold", justify="right" if col != "most shared" else "left")
    for p in shown:
        most = sorted(p.modules.items(), key=lambda kv: -kv[1])[:3]
        text = ", ".join(f"{module} {cells:,}" for module, cells in most)
        more = len(p.modules) - len(most)
        table.add_row(
            p.b, f"[red]{p.total:,}[/]", str(len(p.modules)), text + (", ..." * bool(more))
        )
    return table


@main.command()
@click.argument("refs", nargs=-1)
@click.option(
    "--against-all",
    "against",
    metavar="NAME",
    help="Compare NAME with every other adapter on its base.",
)
@click.option(
    "--limit",
    type=click.IntRange(min=0),
    default=20,
    show_default=True,
    help="With --against-all: list the adapters sharing most (0: all); --json lists all.",
)
@click.option(
    "--check",
    is_flag=True,
    help=f"Exit with status {OVERLAP_EXIT} when any two adapters share a weight.",
)
@click.option("--json", "as_json", is_flag=True, help="Print the report as JSON.")
@click.pass_context
def overlap(
    ctx: click.Context,
    refs: tuple[str, ...],
    against: str | None,
    limit: int,
    check: bool,
    as_json: bool,
) -> None:
    """Shared weights of every pair of REFS (NAME or NAME@VERSION), per module and in total.

    FA/FA share out*|C1&C2| cells, FB/FB |R1&R2|*in, FA/FB always |R|*|C|, anything/LoRA all of
    the other's cells. Adapters on different base models are never compared. With --check the
    exit status is 3 when any overlap exists (0 when none): for scripts and CI.
    """
    if bool(against) == bool(refs) or (refs and len(refs) < 2):
        raise click.UsageError("pass two or more adapters, or --against-all NAME")
    from sbora_reg.registry.overlap_queries import overlap_against_all, overlap_refs

    with open_registry(ctx) as registry:
        if against:
            report = overlap_against_all(registry, against)
            found = bool(report.found)
            if as_json:
                echo_json({**report.to_json(), "overlap": found})
            else:
                console().print(_against_table(report, limit))
        else:
            pairs = overlap_refs(registry, refs)
            found = any(p.overlaps for p in pairs)
            if as_json:
                echo_json({"pairs": [p.to_json() for p in pairs], "overlap": found})
            else:
                console().print(_pairs_table(pairs, "Shared weights"))
    if check and found:
        sys.exit(OVERLAP_EXIT)


def _render_allocation(alloc: Allocation) -> None:
    from rich.table import Table

    table = Table(title=f"Reservation {alloc.reservation_id}: {alloc.variant} r={alloc.rank}")
    table.add_column("module", overflow="fold")
    table.add_column("columns" if alloc.variant == "fa" else "rows", overflow="fold")
    for name, ranges in alloc.to_json()["modules"].items():
        table.add_row(name, ranges)
    console().print(table)
    if alloc.path:
        click.echo(f"indices file: {alloc.path}")


@main.command("allocate")
@click.option("--base", required=True, help="Registered base: name, path or fingerprint.")
@click.option(
    "--variant",
    type=click.Choice(["fa", "fb"]),
    required=True,
    help="fa reserves input columns, fb output rows.",
)
@click.option("--rank", type=click.IntRange(min=1), required=True, help="Indices per module.")
@click.option(
    "--targets",
    required=True,
    callback=parse_targets,
    help="Comma-separated module names, matched as SBoRAConfig.target_modules.",
)
@click.option("--task", help="Task the reservation is for.")
@click.option("--seed", type=int, help="Seed of the random draw among the free indices.")
@click.option(
    "--out",
    type=click.Path(dir_okay=False, path_type=Path),
    help="Write the indices file here (for sbora.inject / sbora-reg train).",
)
@click.option(
    "--allow-cross-variant",
    is_flag=True,
    help="Reserve even where other-variant or LoRA adapters already sit (they will "
    "overlap the new task; only same-variant disjointness is guaranteed).",
)
@click.option("--json", "as_json", is_flag=True, help="Print the reservation as JSON.")
@click.pass_context
def allocate_cmd(
    ctx: click.Context,
    base: str,
    variant: str,
    rank: int,
    targets: list[str],
    task: str | None,
    seed: int | None,
    out: Path | None,
    allow_cross_variant: bool,
    as_json: bool,
) -> None:
    """Reserve RANK indices per target module, disjoint from every adapter and reservation."""
    from sbora_reg.registry.allocate import allocate

    with open_registry(ctx) as registry:
        alloc = allocate(
            registry,
            base,
            variant=variant,
            rank=rank,
            targets=targets,
            task=task,
            seed=seed,
            out=out,
            allow_cross_variant=allow_cross_variant,
        )
    for warning in alloc.warnings:
        click.echo(f"Warning: {warning}", err=True)
    if as_json:
        echo_json(alloc.to_json())
    else:
        _render_allocation(alloc)


@main.command("reservations")
@click.option(
    "--release",
    "release_id",
    type=int,
    metavar="ID",
    help="Free live reservation ID (one a killed allocate or train left, or no longer wanted).",
)
@click.option("--json", "as_json", is_flag=True, help="Print exact JSON.")
@click.pass_context
def reservations_cmd(ctx: click.Context, release_id: int | None, as_json: bool) -> None:
    """Live reservations: allocated indices that no registered adapter uses yet."""
    from rich.table import Table

    from sbora_reg.registry.allocate import live_reservations, release

    with open_registry(ctx) as registry:
        if release_id is not None:
            release(registry, release_id)
        rows = live_reservations(registry)
    if as_json:
        echo_json(rows)
        return
    if release_id is not None:
        click.echo(f"released reservation {release_id}")
    columns = ("id", "base", "task", "variant", "rank", "created")
    table = Table(title="Live reservations")
    for col in columns:
        table.add_column(col, overflow="fold")
    for row in rows:
        table.add_row(*("" if row[c] is None else str(row[c]) for c in columns))
    console().print(table)
