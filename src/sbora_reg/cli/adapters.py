"""CLI verbs: add, list, show, rm, gc (adapters in the registry)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING

import click

from sbora_reg.cli import main
from sbora_reg.cli.common import console, echo_json, human_size, open_registry, parse_tags

if TYPE_CHECKING:
    from rich.table import Table

    from sbora_reg.registry import AdapterDetail, AdapterRecord


def _tags(tags: dict[str, str]) -> str:
    return ",".join(f"{k}={v}" for k, v in sorted(tags.items()))


@main.command()
@click.argument("path", type=click.Path(path_type=Path))
@click.option("--name", help="Adapter name (default: the directory name).")
@click.option("--task", help="Task the adapter was trained for.")
@click.option("--base", help="Base model: a local model directory or a registered base name.")
@click.option("--tag", "tags", multiple=True, callback=parse_tags, help="KEY=VALUE (repeatable).")
@click.option(
    "--probe",
    type=click.Path(dir_okay=False, path_type=Path),
    help="Held-out prompt/answer JSONL to store with the version (`eval`, `compose --measure`).",
)
@click.option("--json", "as_json", is_flag=True, help="Print the record as JSON.")
@click.pass_context
def add(
    ctx: click.Context,
    path: Path,
    name: str | None,
    task: str | None,
    base: str | None,
    tags: dict[str, str],
    probe: Path | None,
    as_json: bool,
) -> None:
    """Register an adapter directory (native SBoRA or PEFT LoRA) as NAME@VERSION."""
    with open_registry(ctx) as registry:
        record = registry.add(path, name=name, task=task, base=base, tags=tags, probe=probe)
    if as_json:
        echo_json(record.to_json())
    else:
        click.echo(f"{record.ref}  {record.variant} r={record.rank}  sha256 {record.sha256[:12]}")


@main.command("list")
@click.option("--base", help="Only adapters on this base (name, path or fingerprint).")
@click.option("--task", help="Only adapters for this task.")
@click.option("--tag", "tags", multiple=True, callback=parse_tags, help="KEY=VALUE (repeatable).")
@click.option("--json", "as_json", is_flag=True, help="Print exact JSON.")
@click.pass_context
def list_(
    ctx: click.Context, base: str | None, task: str | None, tags: dict[str, str], as_json: bool
) -> None:
    """List registered adapter versions."""
    with open_registry(ctx) as registry:
        records = registry.list(base=base, task=task, tags=tags)
    if as_json:
        echo_json([r.to_json() for r in records])
    else:
        console().print(_list_table(records))


def _list_table(records: list[AdapterRecord]) -> Table:
    from rich.table import Table

    table = Table("adapter", "task", "variant", "rank", "base", "tags", "size", "created")
    for r in records:
        table.add_row(
            r.ref,
            r.task or "",
            r.variant,
            str(r.rank),
            Path(r.base).name or r.base,
            _tags(r.tags),
            human_size(r.size),
            r.created.strftime("%Y-%m-%d %H:%M"),
        )
    return table


@main.command()
@click.argument("ref", metavar="NAME[@VERSION]")
@click.option("--verify", "check", is_flag=True, help="Re-hash its stored files first.")
@click.option("--json", "as_json", is_flag=True, help="Print exact JSON.")
@click.pass_context
def show(ctx: click.Context, ref: str, check: bool, as_json: bool) -> None:
    """Show one adapter version (latest by default) and the regions it touches per module."""
    with open_registry(ctx) as registry:
        if check:
            record = registry.resolve(ref)
            registry.verified_blob(record.sha256, record.ref)
            registry.probe_path(record)  # re-hashes the probe set when there is one
        detail = registry.show(ref)
    if as_json:
        echo_json(detail.to_json())
    else:
        _print_detail(detail)


def _print_detail(detail: AdapterDetail) -> None:
    from rich.table import Table

    from sbora_reg.registry.ranges import format_ranges

    r = detail.record
    out = console()
    for key, value in [
        ("adapter", r.ref),
        ("task", r.task or ""),
        ("variant", f"{r.variant} ({r.format})"),
        ("rank / alpha", f"{r.rank} / {r.alpha:g}"),
        ("base", f"{r.base} ({r.base_fingerprint[:12]})"),
        ("sha256", r.sha256),
        ("size", human_size(r.size)),
        ("created", r.created.isoformat()),
        ("tags", _tags(r.tags)),
        ("metadata", json.dumps(r.metadata, sort_keys=True)),
        ("hub", ", ".join(f"{h.direction} {h.repo}@{h.commit[:12]}" for h in detail.hub)),
    ]:
        out.print(f"[bold]{key:>13}[/bold]  {value}", highlight=False)
    table = Table("module", "variant", "shape", "count", "indices")
    for name, region in sorted(detail.regions.items()):
        indices = "all cells" if region.variant == "lora" else format_ranges(region.indices)
        table.add_row(
            name,
            f"{region.variant} ({region.axis})",
            f"{region.shape[0]}x{region.shape[1]}",
            str(region.indices.size),
            indices,
        )
    out.print(table)


@main.command()
@click.argument("ref", metavar="NAME[@VERSION]")
@click.pass_context
def rm(ctx: click.Context, ref: str) -> None:
    """Remove NAME@VERSION, or every version of NAME; `gc` frees the files."""
    with open_registry(ctx) as registry:
        removed = registry.rm(ref)
    for record in removed:
        click.echo(f"removed {record.ref}")


@main.command()
@click.pass_context
def gc(ctx: click.Context) -> None:
    """Delete stored adapter files that no adapter version refers to."""
    with open_registry(ctx) as registry:
        result = registry.gc()
    click.echo(
        f"freed {len(result.blobs_removed)} blob(s), {human_size(result.bytes_freed)}"
        + (f"; removed {result.temp_removed} stale temp dir(s)" if result.temp_removed else "")
    )


@main.command()
@click.argument("refs", nargs=-1, metavar="[NAME[@V]]...")
@click.option("--all", "every", is_flag=True, help="Every version in the registry.")
@click.option("--json", "as_json", is_flag=True, help="Print one row per blob as JSON.")
@click.pass_context
def verify(ctx: click.Context, refs: tuple[str, ...], every: bool, as_json: bool) -> None:
    """Re-hash the stored files (adapter and probe set) of the named versions, or of --all, and
    report each blob; exit 1 when any is damaged or missing."""
    if bool(refs) == every:
        raise click.UsageError("name the versions to verify, or pass --all")
    with open_registry(ctx) as registry:
        rows = registry.verify(None if every else list(refs))
    bad = [r for r in rows if not r["ok"]]
    if as_json:
        echo_json(rows)
    else:
        for r in rows:
            state = "ok" if r["ok"] else f"DAMAGED: {r['problem']}"
            click.echo(f"{r['ref']:<24} {r['kind']:<10} {r['sha256'][:12]}  {state}")
        click.echo(f"{len(rows) - len(bad)} of {len(rows)} blobs ok")
    if bad:
        raise click.exceptions.Exit(1)
