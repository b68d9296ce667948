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
