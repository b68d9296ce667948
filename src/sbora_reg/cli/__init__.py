"""The ``sbora-reg`` command line: flat verbs as in git, thin commands, one error handler.

Each verb lives in the module of its group; this module owns the root group, the global options
and the one place where a library error becomes ``Error: ...`` and exit status 1.
"""

from __future__ import annotations

import logging
import sys
from typing import Any

import click

from sbora_reg import __version__
from sbora_reg.errors import SboraRegError


class _Root(click.Group):
    """Root group that turns library errors into one line on stderr and exit 1."""

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except SboraRegError as exc:
            click.echo(f"Error: {exc}", err=True)
            sys.exit(1)


@click.group(cls=_Root, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="sbora-reg")
@click.option(
    "--db",
    envvar="SBORA_REG_DB",
    default=None,
    metavar="PATH|URL",
    help="Registry database: a SQLite file path or a SQLAlchemy URL "
    "(postgresql+psycopg://...). Default: sbora-reg.db in the user data directory.",
)
@click.option("-v", "--verbose", is_flag=True, help="Log what the library does.")
@click.pass_context
def main(ctx: click.Context, db: str | None, verbose: bool) -> None:
    """SBoRA adapters as modules of one model: register, check overlap, allocate, compose."""
    logging.basicConfig(level=logging.INFO if verbose else logging.WARNING)
    ctx.ensure_object(dict)
    ctx.obj["db"] = db


def _register_commands() -> None:
    # Importing a command module attaches its verbs to ``main``.
    from sbora_reg.cli import (  # noqa: F401
        adapters,
        audit,
        bases,
        compose,
        db,
        demo,
        hub,
        measure,
        overlap,
        train,
    )


_register_commands()
