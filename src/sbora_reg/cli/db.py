"""CLI verbs: db upgrade, db current (the registry's schema)."""

from __future__ import annotations

import click

from sbora_reg.cli import main
from sbora_reg.cli.common import echo_json, open_registry


@main.group()
def db() -> None:
    """The registry database schema."""


@db.command()
@click.pass_context
def upgrade(ctx: click.Context) -> None:
    """Upgrade the database schema to the newest revision (creating it if empty)."""
    with open_registry(ctx, migrate=False) as registry:
        before, after = registry.upgrade()
    if before.current == after.current:
        click.echo(f"{registry.location}: already at {after.current}")
    else:
        click.echo(f"{registry.location}: upgraded {before.current or 'empty'} -> {after.current}")


@db.command()
@click.option("--json", "as_json", is_flag=True, help="Print exact JSON.")
@click.pass_context
def current(ctx: click.Context, as_json: bool) -> None:
    """Print the schema revision of the database and the newest one this code knows."""
    with open_registry(ctx, migrate=False) as registry:
        status = registry.schema()
    if as_json:
        echo_json({"database": registry.location, **status.to_json()})
    else:
        state = "up to date" if status.up_to_date else f"head is {status.head}"
        click.echo(f"{registry.location}: {status.current or 'empty'} ({state})")
