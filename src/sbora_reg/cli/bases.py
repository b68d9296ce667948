"""CLI verbs: base add, base list (base models on their own, before any adapter)."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import click

from sbora_reg.cli import main
from sbora_reg.cli.common import console, echo_json, open_registry

if TYPE_CHECKING:
    from rich.table import Table

    from sbora_reg.registry import BaseRecord


@main.group()
def base() -> None:
    """Base models: register one (to allocate on it first), list them."""


@base.command("add")
@click.argument("path", type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.option("--name", "label", help="A short name to refer to it by (default: its path).")
@click.option(
    "--hub-id",
    metavar="OWNER/NAME",
    help="Its id on the Hub, named as base_model in model cards "
    "[default: the config's _name_or_path when it is such an id].",
)
@click.option("--json", "as_json", is_flag=True, help="Print the record as JSON.")
@click.pass_context
def add(
    ctx: click.Context, path: Path, label: str | None, hub_id: str | None, as_json: bool
) -> None:
    """Register the local model directory PATH (config.json is all that is read)."""
    with open_registry(ctx) as registry:
        record = registry.add_base(path, label=label, hub_id=hub_id)
    if as_json:
        echo_json(record.to_json())
    else:
        hub = f"  hub {record.hub_id}" if record.hub_id else ""
        click.echo(
            f"{record.label or record.name}  {len(record.modules)} modules  "
            f"fingerprint {record.fingerprint[:12]}{hub}"
        )


@base.command("list")
@click.option("--json", "as_json", is_flag=True, help="Print exact JSON.")
@click.pass_context
def list_(ctx: click.Context, as_json: bool) -> None:
    """List registered base models."""
    with open_registry(ctx) as registry:
        records = registry.bases()
    if as_json:
        echo_json([r.to_json() for r in records])
        return
    console().print(_table(records))


def _table(records: list[BaseRecord]) -> Table:
    from rich.table import Table

    table = Table("name", "path", "hub id", "modules", "fingerprint", "created")
    for r in records:
        table.add_row(
            r.label or "",
            r.name,
            r.hub_id or "",
            str(len(r.modules)),
            r.fingerprint[:12],
            r.created.strftime("%Y-%m-%d %H:%M"),
        )
    return table
