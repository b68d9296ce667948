"""What the verbs share: the registry of ``--db``, JSON output, tags, sizes, progress bars.

Nothing heavy is imported here or at the top of any command module: ``sbora-reg --help`` and the
registry's read commands start without torch, transformers or even SQLAlchemy until they run.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any

import click

if TYPE_CHECKING:
    from rich.console import Console
    from rich.progress import Progress

    from sbora_reg.registry import Registry


@contextmanager
def open_registry(ctx: click.Context, migrate: bool = True) -> Iterator[Registry]:
    """The registry named by the global ``--db`` (or ``SBORA_REG_DB``), closed afterwards."""
    from sbora_reg.registry import Registry

    with Registry.open(ctx.find_root().obj["db"], migrate=migrate) as registry:
        yield registry


def parse_tags(_ctx: click.Context, _param: click.Parameter, values: tuple[str, ...]) -> dict:
    tags: dict[str, str] = {}
    for item in values:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise click.BadParameter(f"{item!r}: write tags as KEY=VALUE")
        tags[key] = value
    return tags


def parse_targets(
    _ctx: click.Context, _param: click.Parameter, value: str | None
) -> list[str] | None:
    """``--targets q_proj,v_proj`` as a list of module names."""
    if value is None:
        return None
    names = [t.strip() for t in value.split(",") if t.strip()]
    if not names:
        raise click.BadParameter("give module names such as q_proj,v_proj")
    return names


def echo_json(data: Any) -> None:
    click.echo(json.dumps(data, indent=2, sort_keys=True))


def human_size(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return str(n)  # pragma: no cover


def console(stderr: bool = False, quiet: bool = False) -> Console:
    from rich.console import Console

    return Console(stderr=stderr, quiet=quiet)


def progress(*fields: str, label: str = "{task.description}", hidden: bool = False) -> Progress:
    """A bar on stderr, only on a terminal and never when ``hidden`` (JSON, dry runs, rank > 0).

    ``fields`` are task fields shown after the bar, e.g. ``"loss {task.fields[loss]}"``.
    """
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeRemainingColumn,
    )

    err = console(stderr=True)
    return Progress(
        TextColumn(label),
        BarColumn(),
        MofNCompleteColumn(),
        TimeRemainingColumn(),
        *(TextColumn(f, style="dim") for f in fields),
        console=err,
        transient=True,
        disable=hidden or not err.is_terminal,
    )
