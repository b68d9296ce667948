"""CLI verb: compose (registered adapters -> one merged checkpoint, adapter or PEFT adapter)."""

from __future__ import annotations

import shlex
import sys
from pathlib import Path

import click
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn
from rich.table import Table

from sbora_reg.checkpoint import parse_size
from sbora_reg.cli import main
from sbora_reg.cli.adapters import echo_json, open_registry
from sbora_reg.errors import SboraRegError
from sbora_reg.registry.compose import FORMATS, OUT_DTYPES, ComposeResult, compose


def _shard_size(_ctx: click.Context, _param: click.Parameter, value: str) -> int:
    try:
        return parse_size(value)
    except SboraRegError as exc:
        raise click.BadParameter(str(exc)) from None


def _progress(quiet: bool) -> Progress:
    """A per-tensor bar on stderr, shown only on a terminal."""
    console = Console(stderr=True)
    return Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeRemainingColumn(),
        TextColumn("{task.fields[tensor]}", style="dim"),
        console=console,
        transient=True,
        disable=quiet or not console.is_terminal,
    )


def _render(result: ComposeResult) -> None:
    table = Table("member", "version", "modules", "sha256")
    for m in result.members:
        table.add_row(m["name"], str(m["version"]), str(m["modules"]), (m["sha256"] or "")[:12])
    Console().print(table)
    size = f"{result.total_bytes / 1e6:.1f} MB"
    if result.dry_run:
        click.echo(f"Dry run: every check passed; would write {result.out} ({size}).")
    else:
        changed = f", {result.tensors_changed}/{result.tensors} tensors changed" * (
            result.format == "merged"
        )
        click.echo(f"Wrote {result.out} ({result.format}, {size}{changed})")
        click.echo(f"sha256 {result.output_sha256}  composition #{result.composition_id}")
    if result.overlap_cells:
        click.echo(f"Overlap: {result.overlap_cells} shared cells; their deltas were summed.")


@main.command("compose")
@click.argument("refs", nargs=-1, required=True, metavar="NAME[@V]...")
@click.option(
    "--base",
    required=True,
    type=click.Path(exists=True, file_okay=False, path_type=Path),
    help="Base model directory (safetensors, single file or sharded).",
)
@click.option("--out", required=True, type=click.Path(path_type=Path), help="Output directory.")
@click.option(
    "--format",
    "fmt",
    type=click.Choice(FORMATS),
    default="merged",
    show_default=True,
    help="merged checkpoint, one multi-task SBoRA adapter, or one PEFT LoRA adapter.",
)
@click.option("--allow-overlap", is_flag=True, help="Sum deltas where members share weights.")
@click.option("--dtype", type=click.Choice(list(OUT_DTYPES)), help="Cast floating weights.")
@click.option(
    "--shard-size",
    default="5GB",
    show_default=True,
    callback=_shard_size,
    help="Largest output shard, e.g. 500MB.",
)
@click.option("--dry-run", is_flag=True, help="Run every check, write nothing.")
@click.option("--force", is_flag=True, help="Replace an existing --out.")
@click.option("--json", "as_json", is_flag=True, help="Print the result as JSON.")
@click.pass_context
def compose_cmd(
    ctx: click.Context,
    refs: tuple[str, ...],
    base: Path,
    out: Path,
    fmt: str,
    allow_overlap: bool,
    dtype: str | None,
    shard_size: int,
    dry_run: bool,
    force: bool,
    as_json: bool,
) -> None:
    """Compose registered adapters onto BASE: checked for overlap, written atomically, recorded."""
    command = shlex.join(["sbora-reg", *sys.argv[1:]])
    with open_registry(ctx) as registry, _progress(as_json or dry_run) as bar:
        task = bar.add_task("compose", total=None, tensor="")
        result = compose(
            registry, refs, base, out, fmt, dtype=dtype, shard_size=shard_size,
            allow_overlap=allow_overlap, force=force, dry_run=dry_run, command=command,
            progress=lambda done, total, name: bar.update(task, completed=done, total=total,
                                                          tensor=name),
        )  # fmt: skip
    if as_json:
        echo_json(result.to_dict())
    else:
        _render(result)
