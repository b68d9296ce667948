"""CLI verb: eval (an adapter version's skill on its stored probe set)."""

from __future__ import annotations

from pathlib import Path

import click

from sbora_reg.cli import main
from sbora_reg.cli.common import console, echo_json, open_registry


@main.command("eval")
@click.argument("ref", metavar="NAME[@V]")
@click.option(
    "--checkpoint",
    type=click.Path(exists=True, file_okay=False, path_type=Path),
    help="Also score this compose output (merged checkpoint or composed adapter).",
)
@click.option("--json", "as_json", is_flag=True, help="Print the scores as JSON.")
@click.pass_context
def eval_cmd(ctx: click.Context, ref: str, checkpoint: Path | None, as_json: bool) -> None:
    """Exact match and answer loss of NAME[@V] on its probe set: base, alone (and composed)."""
    from sbora_reg.registry.retention import RetentionRow, evaluate

    with open_registry(ctx) as registry:
        result = evaluate(registry, ref, checkpoint)
    if as_json:
        echo_json(result.to_json())
        return
    if result.composed is not None:
        from sbora_reg.cli.tables import retention_table

        row = RetentionRow(result.member, result.base, result.alone, result.composed)
        console().print(retention_table([row], f"{result.member} on its probe set"))
        return
    click.echo(
        f"{result.member} on {result.base.n} probe examples: exact match "
        f"{result.base.exact:.0%} (base) -> {result.alone.exact:.0%} (alone); answer loss "
        f"{result.base.loss:.3f} -> {result.alone.loss:.3f}"
    )


@main.command()
@click.argument("refs", nargs=-1, required=True, metavar="NAME[@V]...")
@click.option("--png", type=click.Path(dir_okay=False, path_type=Path), help="Also draw it.")
@click.option("--json", "as_json", is_flag=True, help="Print the matrices as JSON.")
@click.pass_context
def interference(
    ctx: click.Context, refs: tuple[str, ...], png: Path | None, as_json: bool
) -> None:
    """Crosstalk ‖ΔW_j X_i‖ / ‖ΔW_i X_i‖ of adapters on each other's probe inputs.

    Row i: the activations of task i's probe set; column j: adapter j. Overall and per module
    (--json). Disjoint regions do not make it 0: every adapter reads every task's activations.
    """
    from sbora_reg.registry import interference as crosstalk

    with open_registry(ctx) as registry:
        result = crosstalk.interference(registry, refs)
    if png is not None:
        crosstalk.plot(result, png)
    if as_json:
        echo_json({**result.to_json(), "png": str(png) if png else None})
        return
    from rich.table import Table

    table = Table(
        title="crosstalk on each task's probe inputs (row: inputs of task, column: adapter)"
    )
    table.add_column("task inputs")
    for name in result.members:
        table.add_column(name, justify="right")
    for name, row in zip(result.members, result.overall, strict=True):
        table.add_row(name, *("n/a" if v != v else f"{v:.3f}" for v in row))
    console().print(table)
    if png is not None:
        click.echo(f"picture: {png}")
