"""Train an SBoRA adapter on a JSONL file: one loop for one process or many (DDP).

Data: one JSON object per line, ``{"prompt": ..., "answer": ...}`` (loss on the answer tokens and
EOS only) or ``{"text": ...}`` (loss on every token and EOS). Nothing is unpickled.

The loss of a step is the mean token NLL over the whole *global* batch. Under DDP every rank
holds a shard of it, so each rank backpropagates ``sum_of_its_token_nll * world / global_tokens``;
DDP's gradient average then gives exactly the gradient of the global mean, and W ranks with
per-rank batch B train the same adapter as one process with batch W·B.
"""

from __future__ import annotations

import json
import logging
import math
import os
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

import torch
import torch.distributed as dist
from torch import nn

from sbora_reg import sbora
from sbora_reg.errors import ConfigError, DataError
from sbora_reg.sbora import SBoRAConfig

log = logging.getLogger(__name__)

DEFAULT_TARGETS = ("q_proj", "v_proj")
MAX_LINE_BYTES = 1 << 20  # one example per line; a longer one is a broken file, not a prompt
StepHook = Callable[[int, int, float], None]  # (step, total steps, loss)


@dataclass(frozen=True)
class Example:
    """One training example; the loss covers ``answer`` (and EOS) only."""

    prompt: str
    answer: str


@dataclass(frozen=True)
class TrainResult:
    """What a training run produced (on every rank; only rank 0 wrote ``adapter_dir``)."""

    losses: list[float]
    adapter_dir: Path
    trainable_parameters: int
    adapter: sbora.Adapter
    examples: int
    rank: int = 0
    world_size: int = 1

    def to_json(self) -> dict[str, object]:
        return {
            "adapter": str(self.adapter_dir),
            "trainable_parameters": self.trainable_parameters,
            "steps": len(self.losses),
            "examples": self.examples,
            "world_size": self.world_size,
            "first_loss": self.losses[0] if self.losses else None,
            "final_loss": self.losses[-1] if self.losses else None,
            "losses": self.losses,
        }


# ---- data -----------------------------------------------------------------------------------
def _example(line: str, where: str) -> Example:
    try:
        row = json.loads(line)
    except json.JSONDecodeError as exc:
        raise DataError(f"{where} is not valid JSON ({exc.msg})") from None
    if not isinstance(row, dict):
        raise DataError(f"{where} must be a JSON object, not {type(row).__name__}")
    if "text" in row and "prompt" not in row and "answer" not in row:
        text = row["text"]
        if not isinstance(text, str) or not text:
            raise DataError(f"{where}: 'text' must be a non-empty string")
        return Example("", text)
    prompt, answer = row.get("prompt"), row.get("answer")
    if not isinstance(prompt, str) or not isinstance(answer, str) or not answer:
        raise DataError(
            f"{where} needs string 'prompt' and non-empty 'answer' keys, or one 'text' key"
        )
    return Example(prompt, answer)


def load_examples(path: str | os.PathLike[str]) -> list[Example]:
    """Read a JSONL training file; raise ``DataError`` naming the first bad line."""
    path = Path(path)
    examples = []
    try:
        with open(path, "rb") as fh:
            # read at most one byte past the limit per line: a huge line is never held whole
            for n, raw in enumerate(iter(lambda: fh.readline(MAX_LINE_BYTES + 1), b""), start=1):
                if len(raw) > MAX_LINE_BYTES and not raw.endswith(b"\n"):
                    raise DataError(
                        f"{path} line {n} is longer than {MAX_LINE_BYTES >> 20} MiB: write one "
                        "prompt/answer object per line"
                    )
                line = raw.decode("utf-8")
                if line.strip():
                    examples.append(_example(line, f"{path} line {n}"))
    except FileNotFoundError:
        raise DataError(f"training data {path} does not exist") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise DataError(f"cannot read training data {path}: {exc}") from None
    if not examples:
        raise DataError(f"training data {path} holds no examples: write one JSON object per line")
    return examples


def encode(
    tokenizer, examples: Sequence[Example | tuple[str, str]], device: torch.device
) -> dict[str, torch.Tensor]:
    """Right-padded batch with labels = -100 everywhere except the answer tokens (+ EOS)."""
    rows, labels = [], []
    for prompt, answer in ((e.prompt, e.answer) if isinstance(e, Example) else e for e in examples):
        p = tokenizer(prompt, add_special_tokens=False).input_ids if prompt else []
        a = tokenizer(answer, add_special_tokens=False).input_ids + [tokenizer.eos_token_id]
        rows.append(p + a)
        labels.append([-100] * len(p) + a)
    width = max(map(len, rows))
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    ids = torch.full((len(rows), width), pad, dtype=torch.long)
    lab = torch.full((len(rows), width), -100, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, (r, lb) in enumerate(zip(rows, labels, strict=True)):
        ids[i, : len(r)] = torch.tensor(r)
        lab[i, : len(lb)] = torch.tensor(lb)
        mask[i, : len(r)] = 1
    return {
        "input_ids": ids.to(device),
        "labels": lab.to(device),
        "attention_mask": mask.to(device),
    }


def global_batches(
    n: int, batch_size: int, *, seed: int, steps: int | None, epochs: int
) -> list[list[int]]:
    """Example indices of every step: a seeded shuffle per epoch, the last batch may be short.

    With ``steps`` the epochs repeat until that many batches; otherwise ``epochs`` passes.
    """
    out: list[list[int]] = []
    epoch = 0
    while (steps is None and epoch < epochs) or (steps is not None and len(out) < steps):
        gen = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
        order = torch.randperm(n, generator=gen).tolist()
        out.extend(order[i : i + batch_size] for i in range(0, n, batch_size))
        epoch += 1
    return out[:steps] if steps is not None else out


# ---- the loop -------------------------------------------------------------------------------
def _token_nll(model: nn.Module, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, int]:
    """Summed NLL over label tokens (next-token targets) and how many there are."""
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    logits, labels = logits[:, :-1].float(), batch["labels"][:, 1:]  # predict token t+1
    nll = nn.functional.cross_entropy(
        logits.reshape(-1, logits.shape[-1]), labels.reshape(-1), reduction="sum"
    )
    return nll, int((labels != -100).sum())


def cosine_schedule(steps: int, warmup: int = 10) -> Callable[[int], float]:
    """Linear warm-up over ``warmup`` steps, then cosine decay to zero at ``steps``."""
    return lambda s: min(1.0, (s + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * s / steps))


def run_steps(
    model: nn.Module,
    batches: Iterable[dict[str, torch.Tensor]],
    *,
    steps: int,
    lr: float,
    on_step: StepHook | None = None,
) -> list[float]:
    """AdamW on the trainable parameters, one step per batch; returns every step's loss.

    A batch is what ``encode`` returns, optionally with ``"weight"`` (0 for a dummy shard that
    must only take part in DDP's collectives). Under an initialised process group the loss is
    normalised by the token count of the whole global batch (see the module docstring).
    """
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise ConfigError("the model has no trainable parameters: inject an adapter first")
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, cosine_schedule(steps))
    distributed = dist.is_available() and dist.is_initialized()
    world = dist.get_world_size() if distributed else 1
    model.train()
    losses: list[float] = []
    for step, batch in enumerate(batches):
        nll, count = _token_nll(model, batch)
        if "weight" in batch:
            nll, count = nll * batch["weight"], int(count * float(batch["weight"]))
        # (2,) on the loss's device: NCCL reduces only CUDA tensors
        stats = torch.stack(
            [nll.detach().double(), torch.tensor(float(count), device=nll.device).double()]
        )
        if distributed:
            dist.all_reduce(stats)  # (global NLL sum, global token count)
        total = max(stats[1].item(), 1.0)
        (nll * (world / total)).backward()
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        losses.append(stats[0].item() / total)
        if on_step is not None:
            on_step(step, steps, losses[-1])
    model.eval()
    return losses


# ---- threads --------------------------------------------------------------------------------


def _runnable_others() -> int | None:
    """Runnable tasks on the machine besides this one (``/proc/loadavg``), or None off Linux."""
    try:
        running = int(Path("/proc/loadavg").read_text().split()[3].split("/")[0])
    except (OSError, ValueError, IndexError):
        return None
    return max(0, running - 1)  # the reader itself is running


def auto_threads(samples: int = 5, interval: float = 0.05) -> int:
    """Intra-op threads for a training step: the cores this process may use, less those other
    runnable tasks hold now (the least seen over ``samples`` reads, ``interval`` s apart).

    Threads beyond the free cores make every op wait for a thread the scheduler has parked:
    measured on 2 cores beside one busy process, a SmolLM2 step takes several times longer with
    2 threads than with 1 (``benchmarks/train_threads.py``); on an idle machine all cores win.
    """
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    cores = cores or 1
    seen = []
    for i in range(samples):
        if i:
            time.sleep(interval)
        others = _runnable_others()
        if others is None:
            return cores
        seen.append(others)
    return max(1, cores - min(seen))


THREADS_RECHECK_STEPS = 10  # under threads="auto", the load is read again every this many steps


@contextmanager
def intra_op_threads(threads: int | str | None) -> Iterator[None]:
    """Torch's intra-op threads for the block, then the previous setting: a number, ``"auto"``
    (``auto_threads()`` now; ``follow_load`` adjusts it as the load changes) or None (as is)."""
    if threads is None:
        yield
        return
    if threads == "auto":
        threads = auto_threads()
    if not isinstance(threads, int) or threads < 1:
        raise ConfigError(f"threads must be a number of at least 1 or 'auto', not {threads!r}")
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def follow_load(on_step: StepHook | None) -> StepHook:
    """``on_step``, after re-reading the machine's load every ``THREADS_RECHECK_STEPS`` steps
    and setting the intra-op threads to ``auto_threads()`` (another job may have started or
    ended since training began)."""

    def hook(step: int, total: int, loss: float) -> None:
        if (step + 1) % THREADS_RECHECK_STEPS == 0:
            threads = auto_threads(samples=3, interval=0.02)
            if threads != torch.get_num_threads():
                log.info("intra-op threads %d -> %d (load)", torch.get_num_threads(), threads)
                torch.set_num_threads(threads)
        if on_step is not None:
            on_step(step, total, loss)

    return hook


# ---- distributed ----------------------------------------------------------------------------
def world_info() -> tuple[int, int]:
    """(rank, world size) of this process: from torch.distributed or the torchrun env."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1"))


def is_main_process() -> bool:
    """Whether this process is rank 0 (the one that saves, registers and prints)."""
    return world_info()[0] == 0


@contextmanager
def _process_group() -> Iterator[tuple[int, int]]:
    """Join torchrun's process group when WORLD_SIZE > 1 (gloo on CPU, nccl on CUDA)."""
    rank, world = world_info()
    started = False
    if world > 1 and not dist.is_initialized():
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        dist.init_process_group(backend=backend)
        started = True
        rank, world = dist.get_rank(), dist.get_world_size()
    try:
        yield rank, world
    finally:
        if started:
            dist.destroy_process_group()


def _device(world: int) -> torch.device:
    if not torch.cuda.is_available():
        return torch.device("cpu")
    local = int(os.environ.get("LOCAL_RANK", "0")) if world > 1 else 0
    torch.cuda.set_device(local)
    return torch.device("cuda", local)


def _shard(batch: list[int], rank: int, world: int) -> tuple[list[int], float]:
    """This rank's contiguous slice of a global batch; an empty slice runs one dummy example."""
    per = -(-len(batch) // world)
    mine = batch[rank * per : (rank + 1) * per]
    return (mine, 1.0) if mine else (batch[:1], 0.0)


# ---- the whole job --------------------------------------------------------------------------
def config_for_indices(
    indices: str | os.PathLike[str],
    *,
    variant: str | None = None,
    r: int | None = None,
    alpha: float | None = None,
    target_modules: Sequence[str] | None = None,
    seed: int = 0,
) -> SBoRAConfig:
    """An ``SBoRAConfig`` that fits an allocated indices file: what is not given comes from it.

    Given values that disagree with the file raise ``ConfigError`` (variant, rank).
    """
    found, meta = sbora.read_indices_file(Path(indices))
    have_variant = meta.get("variant")
    if variant is not None and variant != have_variant:
        raise ConfigError(
            f"{indices} holds {have_variant!r} indices but --variant is {variant!r}: "
            "drop --variant or allocate indices for it"
        )
    ranks = {int(t.numel()) for t in found.values()}
    if len(ranks) != 1:
        raise ConfigError(f"{indices} holds index sets of different sizes {sorted(ranks)}")
    rank = ranks.pop()
    if r is not None and r != rank:
        raise ConfigError(f"{indices} reserves {rank} indices per module but --rank is {r}")
    return SBoRAConfig(
        variant=str(have_variant),
        r=rank,
        alpha=alpha if alpha is not None else 2.0 * rank,
        target_modules=tuple(target_modules) if target_modules else tuple(sorted(found)),
        seed=seed,
    )


def resolve_config(
    *,
    variant: str | None = None,
    r: int | None = None,
    alpha: float | None = None,
    target_modules: Sequence[str] | None = None,
    seed: int = 0,
    indices: str | os.PathLike[str] | None = None,
) -> SBoRAConfig:
    """The config `sbora-reg train` uses: defaults FA, r=16, alpha=2r, q_proj,v_proj; with an
    indices file, what is not given comes from the file (see ``config_for_indices``)."""
    if indices is not None:
        return config_for_indices(
            indices, variant=variant, r=r, alpha=alpha, target_modules=target_modules, seed=seed
        )
    r = 16 if r is None else r
    return SBoRAConfig(
        variant=variant or "fa",
        r=r,
        alpha=alpha if alpha is not None else 2.0 * r,
        target_modules=tuple(target_modules or DEFAULT_TARGETS),
        seed=seed,
    )


QUANTIZE_CHOICES = ("nf4", "fp4", "int8")


def load_model(
    base_dir: Path, dtype: torch.dtype, device: torch.device, quantize: str | None = None
) -> tuple[nn.Module, Any]:
    """The causal LM and its tokenizer from one local directory.

    ``quantize`` (nf4 | fp4 | int8) loads the linear layers through bitsandbytes (4-bit with
    double quantisation and ``dtype`` as compute dtype, or LLM.int8), prepared for training.
    """
    from transformers import AutoTokenizer

    if not (base_dir / "config.json").is_file():
        raise ConfigError(f"{base_dir} is not a model directory (no config.json)")
    try:
        tokenizer = AutoTokenizer.from_pretrained(base_dir)
    except (OSError, ValueError) as exc:
        raise ConfigError(f"cannot load a tokenizer from {base_dir}: {exc}") from None
    if tokenizer.eos_token_id is None:
        raise ConfigError(f"the tokenizer in {base_dir} has no EOS token")
    if quantize is not None:
        return _load_quantized(base_dir, dtype, device, quantize), tokenizer
    return load_causal_lm(base_dir, dtype).to(device), tokenizer


def load_causal_lm(path: str | os.PathLike[str], dtype: torch.dtype = torch.float32) -> nn.Module:
    """A local causal LM (no tokenizer) in ``dtype``, with a one-line error."""
    from transformers import AutoModelForCausalLM

    try:
        model: nn.Module = AutoModelForCausalLM.from_pretrained(path, dtype=dtype)
    except (OSError, ValueError) as exc:
        raise ConfigError(f"cannot load a causal LM from {path}: {exc}") from None
    return model


def _load_quantized(
    base_dir: Path, dtype: torch.dtype, device: torch.device, quantize: str
) -> nn.Module:
    from sbora_reg.sbora import quant

    if quantize not in QUANTIZE_CHOICES:
        raise ConfigError(
            f"quantize must be one of {', '.join(QUANTIZE_CHOICES)}, not {quantize!r}"
        )
    placement = {"device_map": {"": device.index}} if device.type == "cuda" else {}
    model = quant.load_quantized(
        base_dir,
        bits=8 if quantize == "int8" else 4,
        quant_type="nf4" if quantize == "int8" else quantize,
        double_quant=True,
        compute_dtype=dtype,
        dtype=dtype,
        **placement,
    )
    # checkpointing, when asked, is turned on by train_adapter for both kinds of base
    return quant.prepare_for_training(model, gradient_checkpointing=False)


def train_adapter(
    base_dir: str | os.PathLike[str],
    data: str | os.PathLike[str] | Sequence[Example],
    out_dir: str | os.PathLike[str],
    *,
    config: SBoRAConfig,
    indices: str | os.PathLike[str] | None = None,
    steps: int | None = None,
    epochs: int = 1,
    batch_size: int = 8,
    lr: float = 2e-4,
    seed: int = 0,
    dtype: torch.dtype = torch.float32,
    gradient_checkpointing: bool = False,
    quantize: str | None = None,
    threads: int | str | None = None,
    on_step: StepHook | None = None,
) -> TrainResult:
    """Train an SBoRA adapter on ``base_dir`` and save it (atomically) to ``out_dir``.

    ``indices``: an allocated indices file (variant and base fingerprint must match). Under
    torchrun (WORLD_SIZE > 1) ``batch_size`` is per rank, batches are sharded by rank, gradients
    are averaged by DDP and only rank 0 writes ``out_dir``. Deterministic for a ``seed``.
    ``quantize`` (nf4 | fp4 | int8) trains on a bitsandbytes-quantised base (QSBoRA, see
    ``load_model``); the adapter stays in 16/32-bit and records how its base was quantised.
    ``threads``: torch's intra-op threads while training: a number, ``"auto"`` (the cores other
    runnable processes do not hold, read at the start and every ``THREADS_RECHECK_STEPS``
    steps) or None (torch's setting).
    """
    if (steps is not None and steps < 1) or epochs < 1 or batch_size < 1:
        raise ConfigError("steps, epochs and batch_size must be positive")
    if dtype not in (torch.float32, torch.bfloat16):
        raise ConfigError(f"dtype must be float32 or bfloat16, not {dtype}")
    examples = list(data) if not isinstance(data, str | os.PathLike) else load_examples(data)
    base_dir, out_dir = Path(base_dir), Path(out_dir)
    with intra_op_threads(threads), _process_group() as (rank, world):
        device = _device(world)
        torch.manual_seed(seed)  # adapter dropout
        model, tokenizer = load_model(base_dir, dtype, device, quantize)
        sbora.inject(model, config, indices=None if indices is None else Path(indices))
        if gradient_checkpointing:
            # non-reentrant: works with frozen inputs and with DDP
            cast(Any, model).activation_checkpointing_enable(
                activation_checkpointing_kwargs={"use_reentrant": False}
            )
        plan = global_batches(
            len(examples), batch_size * world, seed=seed, steps=steps, epochs=epochs
        )
        trained: nn.Module = model
        if world > 1:
            trained = nn.parallel.DistributedDataParallel(
                model, device_ids=[device.index] if device.type == "cuda" else None
            )

        def batches() -> Iterator[dict[str, torch.Tensor]]:
            for ids in plan:
                mine, weight = _shard(ids, rank, world)
                batch = encode(tokenizer, [examples[i] for i in mine], device)
                yield {**batch, "weight": torch.tensor(weight)} if weight != 1.0 else batch

        hook = follow_load(on_step) if threads == "auto" else on_step
        losses = run_steps(trained, batches(), steps=len(plan), lr=lr, on_step=hook)
        adapter = sbora.extract(model)
        adapter.base_model = str(base_dir)
        if rank == 0:
            adapter.save(out_dir)
            log.info("saved the adapter to %s", out_dir)
        if world > 1:
            dist.barrier()
    return TrainResult(
        losses=losses,
        adapter_dir=out_dir,
        trainable_parameters=adapter.num_parameters(),
        adapter=adapter,
        examples=len(examples),
        rank=rank,
        world_size=world,
    )
