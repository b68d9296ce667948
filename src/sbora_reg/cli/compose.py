"""CLI verb: compose (registered adapters -> one merged checkpoint, adapter or PEFT adapter)."""

from __future__ import annotations

import shlex
import sys
from pathlib import Path
from typing import TYPE_CHECKING

import click

from sbora_reg.cli import main
from sbora_reg.cli.common import console, echo_json, open_registry, progress
from sbora_reg.errors import SboraRegError
from sbora_reg.registry.manifest import FORMATS, OUT_DTYPE_NAMES

if TYPE_CHECKING:
    from sbora_reg.registry.compose import ComposeResult
    from sbora_reg.registry.retention import RetentionRow


def _shard_size(_ctx: click.Context, _param: click.Parameter, value: str | None) -> int | None:
    from sbora_reg.registry.checkpoint import parse_size

    try:
        return None if value is None else parse_size(value)
    except SboraRegError as exc:
        raise click.BadParameter(str(exc)) from None


def _render(result: ComposeResult) -> None:
    from rich.table import Table

    table = Table("member", "version", "modules", "sha256")
    for m in result.members:
        table.add_row(m["name"], str(m["version"]), str(m["modules"]), (m["sha256"] or "")[:12])
    console().print(table)
    size = f"{result.total_bytes / 1e6:.1f} MB"
    if result.dry_run:
        click.echo(f"Dry run: every check passed; would write {result.out} ({size}).")
    else:
        changed = f", {result.tensors_changed}/{result.tensors} tensors changed" * (
            result.format == "merged"
        )
        click.echo(f"Wrote {result.out} ({result.format}, {size}{changed})")
        click.echo(f"sha256 {result.output_sha256}  composition #{result.composition_id}")
    calibration = result.calibration or {}
    if calibration.get("method", "none") != "none":
        rows = sum(calibration.get("rows", {}).values())
        click.echo(f"Calibrated ({calibration['method']}) on {rows} probe rows of the members.")
    elif calibration.get("reason"):
        click.echo(f"Not calibrated: {calibration['reason']}.")
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
@click.option(
    "--dtype", type=click.Choice(OUT_DTYPE_NAMES), help="Cast floating weights (merged only)."
)
@click.option(
    "--shard-size",
    callback=_shard_size,
    help="Largest output shard, e.g. 500MB (merged only) [default: the base's own files, each "
    "tensor in the file of the same name].",
)
@click.option("--dry-run", is_flag=True, help="Run every check, write nothing.")
@click.option("--force", is_flag=True, help="Replace an existing --out.")
@click.option(
    "--eval",
    "evals",
    multiple=True,
    metavar="NAME[@V]=FILE.jsonl",
    callback=lambda _c, _p, v: _eval_pairs(v),
    help="Measure how much of this member's skill survives: answer loss and exact match on FILE "
    "(JSONL prompt/answer lines) for the base, the member alone, and the composition. Repeat "
    "per member.",
)
@click.option(
    "--measure",
    is_flag=True,
    help="Score every member that has a stored probe set (like --eval with its file) and record "
    "base / alone / composed exact match on the composition.",
)
@click.option(
    "--calibrate",
    type=click.Choice(["auto", "lsq", "match", "tune", "none"]),
    default="auto",
    show_default=True,
    help="lsq: before merging, re-solve each member's factors on its own region so that the sum "
    "does on every member's probe inputs what that member alone does there (least squares on "
    "the base's activations; regions never change). tune: lsq, then 100 steps per member of "
    "distillation from each member alone through the whole composed model (its next-token "
    "distributions at every position and its hidden states; the best measured, see the README; "
    "minutes on a CPU). match: lsq against each member alone's module outputs, iterated. auto: "
    "tune when every member has a probe set. none: the plain sum of deltas.",
)
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
    shard_size: int | None,
    dry_run: bool,
    force: bool,
    evals: dict[str, str],
    measure: bool,
    calibrate: str,
    as_json: bool,
) -> None:
    """Compose registered adapters onto BASE: checked for overlap, written atomically, recorded."""
    from sbora_reg.registry.compose import compose

    command = shlex.join(["sbora-reg", *sys.argv[1:]])
    err = console(stderr=True, quiet=as_json)
    with (
        open_registry(ctx) as registry,
        progress("{task.fields[tensor]}", hidden=as_json or dry_run) as bar,
    ):
        task = bar.add_task("compose", total=None, tensor="")

        def on_tensor(done: int, total: int, name: str) -> None:  # shown again after calibration
            bar.update(task, completed=done, total=total, tensor=name, visible=True)

        def on_measure(member: str) -> None:
            bar.update(task, visible=False)
            err.print(f"Measuring {member}: base, alone, composed ...")

        def on_calibrate(member: str) -> None:
            bar.update(task, visible=False)
            err.print(f"Calibrating: reading {member}'s probe inputs ...")

        result = compose(
            registry, refs, base, out, fmt, dtype=dtype, shard_size=shard_size,
            allow_overlap=allow_overlap, force=force, dry_run=dry_run, command=command,
            progress=on_tensor, measure=evals, measure_probes=measure, on_measure=on_measure,
            calibrate=calibrate, on_calibrate=on_calibrate,
        )  # fmt: skip
    if as_json:
        echo_json(result.to_dict())
    else:
        _render(result)
        _render_retention(result.retention)


def _eval_pairs(values: tuple[str, ...]) -> dict[str, str]:
    pairs = {}
    for value in values:
        ref, sep, path = value.partition("=")
        if not sep or not ref or not path:
            raise click.BadParameter(f"{value!r} is not NAME[@V]=FILE.jsonl")
        pairs[ref] = path
    return pairs


def _render_retention(rows: list[RetentionRow]) -> None:
    from sbora_reg.cli.tables import retention_table

    if rows:
        title = "How much of each member's skill survived the composition"
        console().print(retention_table(rows, title))
