"""CLI verb: audit (which weights each task touches; what a merged checkpoint really changed)."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import TYPE_CHECKING

import click

from sbora_reg.cli import main
from sbora_reg.cli.common import console, echo_json, open_registry
from sbora_reg.errors import NotFoundError

if TYPE_CHECKING:
    from rich.table import Table

    from sbora_reg.registry.audit import CheckpointAudit
    from sbora_reg.registry.usage import UsageReport

UNEXPLAINED_EXIT = 3


def _usage_table(report: UsageReport) -> Table:
    from rich.table import Table

    from sbora_reg.registry.ranges import format_ranges

    share = report.cells / report.total_weights if report.total_weights else 0.0
    table = Table(
        title=f"{report.base}: {report.cells:,} of {report.total_weights:,} weights ({share:.3%})"
    )
    for col in ("task", "module", "rows", "columns", "weights", "share"):
        table.add_column(
            col, overflow="fold", justify="right" if col in ("weights", "share") else "left"
        )
    for group in report.groups:
        table.add_row(
            f"[bold]{group.name}[/]",
            f"{len(group.adapters)} adapter(s)",
            "",
            "",
            f"[bold]{group.cells:,}[/]",
            f"{group.share:.3%}",
        )
        for name, mod in sorted(group.modules.items()):
            rows = "all (LoRA)" if mod.lora else format_ranges(mod.rows)
            table.add_row(
                "",
                name,
                rows,
                "" if mod.lora else format_ranges(mod.cols),
                f"{mod.cells:,}",
                f"{mod.cells / report.total_weights:.3%}",
            )
    for (a, b), mods in sorted(report.overlaps.items()):
        table.add_row(
            f"[red]{a} & {b}[/]",
            f"{len(mods)} module(s)",
            "",
            "",
            f"[red]{sum(mods.values()):,}[/]",
            "shared",
        )
    return table


def _checkpoint_table(result: CheckpointAudit) -> Table:
    from rich.table import Table

    table = Table(title=f"{result.checkpoint} vs {result.base} ({', '.join(result.sources)})")
    for col in ("tensor", "changed", "unexplained", "rows", "columns", "note"):
        table.add_column(
            col, overflow="fold", justify="right" if col in ("changed", "unexplained") else "left"
        )
    for f in result.findings:
        table.add_row(
            f.tensor, f"{f.changed:,}", f"[red]{f.unexplained:,}[/]", f.rows, f.cols, f.note
        )
    return table


@main.command()
@click.argument("checkpoint", required=False, type=click.Path(file_okay=False, path_type=Path))
@click.option(
    "--base",
    required=True,
    help="Registered base (name, path, fingerprint); with "
    "CHECKPOINT: the base model directory it was merged from.",
)
@click.option("--task", "tasks", multiple=True, help="Only this task (repeatable).")
@click.option("--adapter", "adapters", multiple=True, help="Only this adapter (repeatable).")
@click.option(
    "--by",
    type=click.Choice(["task", "adapter"]),
    default="task",
    show_default=True,
    help="Group the usage report by task or by adapter.",
)
@click.option(
    "--source",
    type=click.Choice(["auto", "manifest", "registry", "both"]),
    default="auto",
    show_default=True,
    help="With CHECKPOINT: where declared regions "
    "come from (auto: the checkpoint's sbora_manifest.json, else the registry).",
)
@click.option(
    "--png",
    type=click.Path(dir_okay=False, path_type=Path),
    help="Also draw layers x modules, coloured by task, overlaps in red.",
)
@click.option("--json", "as_json", is_flag=True, help="Print the report as JSON.")
@click.pass_context
def audit(
    ctx: click.Context,
    checkpoint: Path | None,
    base: str,
    tasks: tuple[str, ...],
    adapters: tuple[str, ...],
    by: str,
    source: str,
    png: Path | None,
    as_json: bool,
) -> None:
    """Which rows/columns each task touches on BASE, or what CHECKPOINT changed beyond them.

    Without CHECKPOINT: per task (or adapter) and module the touched rows and columns as ranges,
    the number of weights and their share of the model. With CHECKPOINT: diff it against the base
    model directory tensor by tensor (streamed) and list every changed weight that no declared
    region explains; exit status 3 when there is any (0 when clean).
    """
    if checkpoint is not None:
        _audit_checkpoint(ctx, checkpoint, base, source, as_json)
        return
    from sbora_reg.registry.audit_plot import plot_usage
    from sbora_reg.registry.usage import usage

    with open_registry(ctx) as registry:
        report = usage(registry, base, by=by, tasks=tasks, adapters=adapters)
    if not report.groups:
        raise NotFoundError(f"no adapters on {report.base} to audit: add some first")
    if png is not None:
        plot_usage(report, png)
    if as_json:
        echo_json({**report.to_json(), "png": str(png) if png else None})
    else:
        console().print(_usage_table(report))
        if png is not None:
            click.echo(f"picture: {png}")


def _audit_checkpoint(
    ctx: click.Context, checkpoint: Path, base: str, source: str, as_json: bool
) -> None:
    from sbora_reg.registry.audit import audit_merged
    from sbora_reg.registry.manifest import MANIFEST_NAME

    has_manifest = (checkpoint / MANIFEST_NAME).is_file()
    if source == "manifest" or (source == "auto" and has_manifest):
        result = audit_merged(checkpoint, base, None, source)
    else:
        with open_registry(ctx) as registry:
            result = audit_merged(checkpoint, base, registry, source)
    if as_json:
        echo_json(result.to_json())
    else:
        if result.findings:
            console().print(_checkpoint_table(result))
        click.echo(
            f"{result.changed_tensors} of {result.tensors} tensors changed, {result.changed:,} "
            f"weights: {result.explained:,} explained, {result.unexplained:,} unexplained"
        )
    if not result.clean:
        sys.exit(UNEXPLAINED_EXIT)
