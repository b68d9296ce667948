"""Training-step benchmark: PEFT LoRA vs SBoRA-FA vs SBoRA-FB vs the frozen model, one process.

A Llama built from a config (hidden 512, intermediate 1376, 4 layers, 8 heads, vocab 8000), batch
4×256 tokens, r=16 (alpha 32) on q,k,v,o,gate,up,down. One round runs one step of every config in
turn (interleaved, so machine noise hits all of them alike); the report gives median step times
and their ratios against LoRA, trainable-parameter counts checked exactly against out·r (FA),
r·in (FB) and r·(in+out) (LoRA), the unmerged inference overhead of FA over the plain model, and
the peak memory of a training step.

A step is forward + loss + backward + AdamW step. "frozen" is the model without an adapter with
gradients flowing to the input embeddings: the activation-gradient work every adapter needs, a
lower bound.

Peak memory: on CUDA, ``torch.cuda.max_memory_allocated`` around the steps. On CPU (glibc), the
bytes the C heap has handed out and not freed (``mallinfo2``: arenas + mmapped blocks) are sampled
before and after every aten op of the steps; the report is the peak minus the level just before
the first step: activations, gradients and optimizer state, not the weights. RSS is not used: it
keeps freed pages and made the configs differ by allocator noise.

    python benchmarks/train_step.py            # 10 rounds
    python benchmarks/train_step.py --quick    # 3 rounds, 1 memory step
    python benchmarks/train_step.py --steps 20 --threads 1
"""

from __future__ import annotations

import argparse
import ctypes
import gc
import statistics
import time
from collections.abc import Callable

import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode
from transformers import LlamaConfig, LlamaForCausalLM

from sbora_reg import sbora

TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
R, ALPHA = 16, 32.0
BATCH, SEQ = 4, 256
CONFIGS = ("lora", "fa", "fb", "frozen")


def llama_config() -> LlamaConfig:
    return LlamaConfig(
        hidden_size=512,
        intermediate_size=1376,
        num_hidden_layers=4,
        num_attention_heads=8,
        num_key_value_heads=8,
        vocab_size=8000,
        max_position_embeddings=SEQ,
    )


def base_model(device: torch.device) -> LlamaForCausalLM:
    torch.manual_seed(0)
    return LlamaForCausalLM(llama_config()).to(device)


def adapted(kind: str, device: torch.device) -> nn.Module:
    """A fresh model with the adapter ``kind`` (frozen base, trainable adapter only)."""
    model = base_model(device)
    if kind == "lora":
        from peft import LoraConfig, get_peft_model

        cfg = LoraConfig(r=R, lora_alpha=ALPHA, target_modules=list(TARGETS), lora_dropout=0.0)
        return get_peft_model(model, cfg)
    if kind in ("fa", "fb"):
        cfg = sbora.SBoRAConfig(variant=kind, r=R, alpha=ALPHA, target_modules=TARGETS)
        return sbora.inject(model, cfg)
    model.requires_grad_(False)
    model.enable_input_require_grads()  # backprop through every layer, as adapters need
    return model


def expected_trainable(kind: str) -> int:
    """Trainable parameters from the shapes alone: FA out·r, FB r·in, LoRA r·(in+out)."""
    with torch.device("meta"):
        table = sbora.fingerprint.module_table(LlamaForCausalLM(llama_config()))
    shapes = [s for n, (_, s) in table.items() if n.rsplit(".", 1)[-1] in TARGETS]
    per = {"fa": lambda o, i: o * R, "fb": lambda o, i: R * i, "lora": lambda o, i: R * (o + i)}
    return sum(per[kind](o, i) for o, i in shapes) if kind in per else 0


def trainable(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def make_step(model: nn.Module, ids: torch.Tensor) -> Callable[[], None]:
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-4) if params else None
    model.train()

    def step() -> None:
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        if opt is not None:
            opt.step()
            opt.zero_grad(set_to_none=True)

    return step


def make_infer(model: nn.Module, ids: torch.Tensor) -> Callable[[], None]:
    model.eval()

    def infer() -> None:
        with torch.inference_mode():
            model(input_ids=ids)

    return infer


def timed(fn: Callable[[], None], device: torch.device) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - start


def interleave(fns: dict[str, Callable[[], None]], rounds: int, device: torch.device):
    for fn in fns.values():  # warm-up, not timed
        fn()
    times: dict[str, list[float]] = {k: [] for k in fns}
    for _ in range(rounds):
        for name, fn in fns.items():
            times[name].append(timed(fn, device))
    return times


class _Mallinfo2(ctypes.Structure):
    _fields_ = [
        (n, ctypes.c_size_t)
        for n in (
            "arena",
            "ordblks",
            "smblks",
            "hblks",
            "hblkhd",
            "usmblks",
            "fsmblks",
            "uordblks",
            "fordblks",
            "keepcost",
        )
    ]


_LIBC = ctypes.CDLL("libc.so.6")
_LIBC.mallinfo2.restype = _Mallinfo2


def heap_in_use() -> int:
    """Bytes the C heap has handed out and not freed (all arenas + mmapped blocks; glibc)."""
    m = _LIBC.mallinfo2()
    return int(m.uordblks + m.hblkhd)


class _PeakHeap(TorchDispatchMode):
    """Samples the live C-heap size around every aten op (forward, backward and optimizer)."""

    def __init__(self) -> None:
        super().__init__()
        self.peak = heap_in_use()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # type: ignore[no-untyped-def]
        self.peak = max(self.peak, heap_in_use())
        out = func(*args, **(kwargs or {}))
        self.peak = max(self.peak, heap_in_use())
        return out


def peak_memory_mb(model: nn.Module, ids: torch.Tensor, steps: int) -> float:
    """Peak memory of ``steps`` training steps above what was live before them."""
    step = make_step(model, ids)
    gc.collect()
    if ids.device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
        for _ in range(steps):
            step()
        torch.cuda.synchronize()
        return (torch.cuda.max_memory_allocated() - before) / 2**20
    before = heap_in_use()
    with _PeakHeap() as mode:
        for _ in range(steps):
            step()
    return (mode.peak - before) / 2**20


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--steps", type=int, default=None, help="timed rounds (default 10, quick 3)")
    ap.add_argument("--quick", action="store_true", help="3 rounds and 1 memory step")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument(
        "--threads", type=int, default=None, help="torch CPU threads (default: torch's)"
    )
    args = ap.parse_args()
    device = torch.device(args.device)
    if args.threads:
        # on a shared CPU, a second OpenMP thread that gets descheduled stalls every small matmul
        torch.set_num_threads(args.threads)
    rounds = args.steps or (3 if args.quick else 10)
    mem_steps = 1 if args.quick else 2

    ids = torch.randint(0, 8000, (BATCH, SEQ), generator=torch.Generator().manual_seed(0))
    ids = ids.to(device)
    models = {k: adapted(k, device) for k in CONFIGS}
    print(
        f"device {device}, torch threads {torch.get_num_threads()}, {rounds} rounds, "
        f"batch {BATCH}x{SEQ}, r={R}, targets {','.join(TARGETS)}"
    )

    print("\ntrainable parameters (checked against the shapes)")
    for kind, model in models.items():
        have, want = trainable(model), expected_trainable(kind)
        flag = "exact" if have == want else f"MISMATCH (expected {want:,})"
        print(f"  {kind:7s} {have:>12,}  {flag}")

    times = interleave({k: make_step(m, ids) for k, m in models.items()}, rounds, device)
    med = {k: statistics.median(v) for k, v in times.items()}
    print("\ntraining step (median of interleaved rounds)")
    print(f"  {'config':7s} {'seconds':>9s} {'x LoRA':>8s} {'median of per-round ratios':>28s}")
    for kind in CONFIGS:
        per_round = statistics.median(
            a / b for a, b in zip(times[kind], times["lora"], strict=True)
        )
        print(f"  {kind:7s} {med[kind]:9.4f} {med[kind] / med['lora']:8.3f} {per_round:28.3f}")

    over = {k: med[k] - med["frozen"] for k in ("lora", "fa", "fb")}
    print(
        "  adapter cost above the frozen model: "
        + ", ".join(f"{k} {over[k] / over['lora']:.2f}x LoRA's" for k in ("fa", "fb"))
    )

    plain = base_model(device)
    infer = interleave(
        {"plain": make_infer(plain, ids), "fa": make_infer(models["fa"], ids)}, rounds, device
    )
    p, f = statistics.median(infer["plain"]), statistics.median(infer["fa"])
    print(
        f"\nunmerged FA inference: plain {p:.4f}s, FA {f:.4f}s, overhead {100 * (f / p - 1):+.1f}%"
    )

    print(
        f"\npeak step memory above the live model ({mem_steps} steps, "
        f"{'cuda max_memory_allocated' if device.type == 'cuda' else 'glibc heap in use'})"
    )
    mem = {k: peak_memory_mb(m, ids, mem_steps) for k, m in models.items()}
    for kind in CONFIGS:
        print(f"  {kind:7s} {mem[kind]:9.1f} MiB  {mem[kind] / mem['lora']:6.3f}x LoRA")


if __name__ == "__main__":
    main()
