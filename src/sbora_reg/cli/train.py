"""CLI verb: train (an SBoRA adapter on a JSONL file, optionally registered; DDP under torchrun)."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

import click

from sbora_reg.cli import main
from sbora_reg.cli.common import console, echo_json, open_registry, parse_targets, progress

if TYPE_CHECKING:
    from sbora_reg.registry import AdapterRecord
    from sbora_reg.sbora.training import TrainResult


def _main_process() -> bool:
    from sbora_reg.sbora.training import is_main_process

    return is_main_process()


def _threads(value: str) -> int | str:
    """``--threads``: a positive number, or auto (``sbora.training.auto_threads``)."""
    if value == "auto":
        return value
    try:
        threads = int(value)
    except ValueError:
        threads = 0
    if threads < 1:
        raise click.BadParameter(f"{value!r} is neither a positive number nor auto")
    return threads


@main.command()
@click.option(
    "--base",
    required=True,
    type=click.Path(file_okay=False, path_type=Path),
    help="Local model directory (config, weights, tokenizer).",
)
@click.option(
    "--data",
    required=True,
    type=click.Path(dir_okay=False, path_type=Path),
    help='JSONL: {"prompt", "answer"} (loss on the answer) or {"text"} per line.',
)
@click.option(
    "--out",
    required=True,
    type=click.Path(file_okay=False, path_type=Path),
    help="Adapter directory to write.",
)
@click.option(
    "--variant",
    type=click.Choice(["fa", "fb"]),
    help="fa trains columns, fb rows [default: fa, or the --indices file's].",
)
@click.option("--rank", type=click.IntRange(min=1), help="r [default: 16, or the file's].")
@click.option("--alpha", type=float, help="Scale alpha/r [default: 2*rank].")
@click.option(
    "--targets",
    callback=parse_targets,
    help="Comma-separated module names [default: q_proj,v_proj, or the file's].",
)
@click.option(
    "--indices",
    type=click.Path(dir_okay=False, path_type=Path),
    help="Indices file from `sbora-reg allocate` [default with --register: allocate a disjoint "
    "region from the registry; without: the config's seeded default].",
)
@click.option("--steps", type=click.IntRange(min=1), help="Optimizer steps (repeats the data).")
@click.option("--epochs", type=click.IntRange(min=1), help="Passes over the data [default: 1].")
@click.option(
    "--batch-size",
    type=click.IntRange(min=1),
    default=8,
    show_default=True,
    help="Examples per step (per process under torchrun).",
)
@click.option(
    "--lr",
    type=click.FloatRange(min=0, min_open=True),
    default=2e-4,
    show_default=True,
    help="AdamW learning rate (warm-up, then cosine).",
)
@click.option(
    "--seed",
    type=int,
    default=0,
    show_default=True,
    help="Seed of the index draw, the data order and dropout.",
)
@click.option("--bf16", is_flag=True, help="Load the base and train in bfloat16.")
@click.option("--gradient-checkpointing", is_flag=True, help="Trade compute for memory.")
@click.option(
    "--quantize",
    type=click.Choice(["nf4", "fp4", "int8"]),
    help="Train on a bitsandbytes-quantised base (QSBoRA): 4-bit NF4/FP4 with double "
    "quantisation (compute dtype: bfloat16 with --bf16, else float32) or LLM.int8. The adapter "
    "stays in 16/32-bit; merge it with sbora.quant.merge_dequantized.",
)
@click.option(
    "--register",
    "register_as",
    metavar="NAME",
    help="Register the adapter as NAME (consumes a matching reservation).",
)
@click.option("--task", help="Task to record with --register.")
@click.option(
    "--probe",
    type=click.Path(dir_okay=False, path_type=Path),
    help="Held-out prompt/answer JSONL stored with --register (`eval`, `compose --measure`).",
)
@click.option(
    "--holdout/--no-holdout",
    default=True,
    show_default=True,
    help="With --register and no --probe: hold every tenth row of --data (at most 256) out of "
    "training and store those rows as the probe set, for `compose` to calibrate and measure.",
)
@click.option(
    "--threads",
    default="auto",
    show_default=True,
    callback=lambda _ctx, _param, value: _threads(value),
    help="torch intra-op threads: a number, or auto (the cores other runnable processes do not "
    "hold, read at the start and every 10 steps: on a busy machine more threads than free "
    "cores make a step several times slower).",
)
@click.option("--json", "as_json", is_flag=True, help="Print the result as JSON.")
@click.pass_context
def train(
    ctx: click.Context,
    base: Path,
    data: Path,
    out: Path,
    variant: str | None,
    rank: int | None,
    alpha: float | None,
    targets: list[str] | None,
    indices: Path | None,
    steps: int | None,
    epochs: int | None,
    batch_size: int,
    lr: float,
    seed: int,
    bf16: bool,
    gradient_checkpointing: bool,
    quantize: str | None,
    register_as: str | None,
    task: str | None,
    probe: Path | None,
    holdout: bool,
    threads: int | str,
    as_json: bool,
) -> None:
    """Train an SBoRA adapter on a JSONL file; under torchrun, DDP over the processes."""
    import torch

    from sbora_reg.registry.jobs import train_and_register
    from sbora_reg.sbora.training import resolve_config, train_adapter

    if steps is not None and epochs is not None:
        raise click.UsageError("pass --steps or --epochs, not both")
    if (task is not None or probe is not None) and register_as is None:
        raise click.UsageError("--task and --probe are recorded with --register NAME")
    config = resolve_config(
        variant=variant, r=rank, alpha=alpha, target_modules=targets, seed=seed, indices=indices
    )
    options: dict[str, Any] = {
        "config": config, "indices": indices, "steps": steps, "epochs": epochs or 1,
        "batch_size": batch_size, "lr": lr, "seed": seed, "quantize": quantize,
        "dtype": torch.bfloat16 if bf16 else torch.float32,
        "gradient_checkpointing": gradient_checkpointing, "threads": threads,
    }  # fmt: skip
    # the loss bar is for people: only on rank 0
    with progress("loss {task.fields[loss]}", hidden=not _main_process()) as bars:
        bar = bars.add_task("training", total=None, loss="-")

        def on_step(step: int, total: int, loss: float) -> None:
            bars.update(bar, completed=step + 1, total=total, loss=f"{loss:.4f}")

        if register_as is None:
            result, record = train_adapter(base, data, out, on_step=on_step, **options), None
        else:
            err = console(stderr=True, quiet=as_json)
            result, record = train_and_register(
                lambda: open_registry(ctx), register_as, base, data, out, task=task,
                probe=probe, holdout=holdout, on_event=err.print, on_step=on_step, **options,
            )  # fmt: skip
    if result.rank != 0:
        return
    if as_json:
        echo_json({**result.to_json(), "registered": record.to_json() if record else None})
    else:
        _render(result, record)


def _render(result: TrainResult, record: AdapterRecord | None) -> None:
    click.echo(
        f"trained {len(result.losses)} steps on {result.examples} examples: loss "
        f"{result.losses[0]:.4f} -> {result.losses[-1]:.4f}; "
        f"{result.trainable_parameters:,} trainable parameters; adapter {result.adapter_dir}"
    )
    if record is not None:
        click.echo(f"registered {record.ref}  sha256 {record.sha256[:12]}")
