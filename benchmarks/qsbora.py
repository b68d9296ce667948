"""QSBoRA-FA vs PEFT QLoRA on the same 4-bit (NF4) Llama: step time and peak memory, interleaved.

Both methods train the same targets at the same rank on two copies of one NF4-quantised
checkpoint (a Llama built from a config; nothing is downloaded). Steps alternate between the
two, and the order flips every step, so machine noise hits both alike. Also prints the 4-bit
model's weight memory against fp32.

Memory on CPU: the process's peak resident set (VmHWM) is reset before each step
(/proc/self/clear_refs) and read after it; "step peak" is that peak minus the resident set at
the start of the step (activations, gradients, optimiser state, transient dequantised weights).
glibc is told to return large blocks at once (MALLOC_MMAP_THRESHOLD_), so one method's freed
memory does not hide the other's. On CUDA the allocator's own peak is used instead.

    .venv/bin/python benchmarks/qsbora.py            # about 3 minutes on 2 CPU cores
    .venv/bin/python benchmarks/qsbora.py --help
"""

from __future__ import annotations

import argparse
import ctypes
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Callable

# Large blocks straight from mmap, so that freeing returns them to the OS (see docstring).
if os.environ.get("MALLOC_MMAP_THRESHOLD_") is None and sys.platform == "linux":
    os.environ["MALLOC_MMAP_THRESHOLD_"] = "65536"
    os.execv(sys.executable, [sys.executable, *sys.argv])

import torch  # noqa: E402
from torch import nn  # noqa: E402

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--hidden", type=int, default=384)
    p.add_argument("--intermediate", type=int, default=1024)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--heads", type=int, default=6)
    p.add_argument("--vocab", type=int, default=4096)
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--seq", type=int, default=128)
    p.add_argument("--rank", type=int, default=16)
    p.add_argument("--targets", default="q_proj,k_proj,v_proj,up_proj,down_proj")
    p.add_argument("--compute-dtype", choices=sorted(DTYPES), default="float32")
    p.add_argument("--gradient-checkpointing", action="store_true")
    p.add_argument("--steps", type=int, default=6)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    return p.parse_args()


# ----------------------------------------------------------------------------------- memory


def _status(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"{field} not in /proc/self/status")


class PeakMeter:
    """Peak extra memory of one block of work (CPU: resident set; CUDA: allocator)."""

    def __init__(self, device: str) -> None:
        self.cuda = device.startswith("cuda")
        self._libc = None if self.cuda else ctypes.CDLL("libc.so.6")

    def start(self) -> int:
        if self.cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            return torch.cuda.memory_allocated()
        assert self._libc is not None
        self._libc.malloc_trim(0)
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # resets VmHWM to the current resident set
        return _status("VmRSS")

    def peak(self) -> int:
        if self.cuda:
            torch.cuda.synchronize()
            return torch.cuda.max_memory_allocated()
        return _status("VmHWM")


def tensor_bytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


def quant_state_bytes(state: object) -> int:
    """Bytes of a bitsandbytes QuantState's tensors (block scales, nested state, code)."""
    total = 0
    for value in vars(state).values():
        if isinstance(value, torch.Tensor):
            total += tensor_bytes(value)
        elif type(value).__name__ == "QuantState":
            total += quant_state_bytes(value)
    return total


def weight_bytes(model: nn.Module) -> int:
    """Bytes of all parameters and buffers, 4-bit block scales included."""
    total = sum(tensor_bytes(b) for b in model.buffers())
    for p in model.parameters():
        total += tensor_bytes(p)
        state = getattr(p, "quant_state", None)
        if state is not None:
            total += quant_state_bytes(state)
        scb = getattr(p, "SCB", None)
        if isinstance(scb, torch.Tensor):
            total += tensor_bytes(scb)
    return total


def linear_bytes(model: nn.Module) -> tuple[int, int]:
    """(bytes as stored, bytes in fp32) of the model's quantised linear layers."""
    from sbora_reg.sbora import quant

    stored = dense = 0
    for module in model.modules():
        if quant.is_quantized(module):
            stored += weight_bytes(module)
            dense += 4 * (module.in_features * module.out_features)
            if module.bias is not None:
                dense += 4 * module.bias.numel()
    return stored, dense


# ----------------------------------------------------------------------------------- models


def make_checkpoint(args: argparse.Namespace, path: str) -> None:
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        hidden_size=args.hidden,
        intermediate_size=args.intermediate,
        num_hidden_layers=args.layers,
        num_attention_heads=args.heads,
        num_key_value_heads=args.heads,
        vocab_size=args.vocab,
        max_position_embeddings=max(args.seq, 128),
    )
    torch.manual_seed(0)
    LlamaForCausalLM(config).save_pretrained(path)


def load_4bit(path: str, args: argparse.Namespace) -> nn.Module:
    from sbora_reg.sbora import quant

    model = quant.load_quantized(
        path,
        bits=4,
        quant_type="nf4",
        double_quant=True,
        compute_dtype=DTYPES[args.compute_dtype],
        device_map=args.device,
    )
    return model


def sbora_fa(path: str, args: argparse.Namespace) -> nn.Module:
    from sbora_reg import sbora
    from sbora_reg.sbora import quant

    model = quant.prepare_for_training(
        load_4bit(path, args), gradient_checkpointing=args.gradient_checkpointing
    )
    targets = tuple(args.targets.split(","))
    config = sbora.SBoRAConfig(
        variant="fa", r=args.rank, alpha=2.0 * args.rank, target_modules=targets
    )
    return sbora.inject(model, config)


def peft_qlora(path: str, args: argparse.Namespace) -> nn.Module:
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training

    model = prepare_model_for_kbit_training(
        load_4bit(path, args), use_gradient_checkpointing=args.gradient_checkpointing
    )
    config = LoraConfig(
        r=args.rank,
        lora_alpha=2 * args.rank,
        target_modules=args.targets.split(","),
        lora_dropout=0.0,
        bias="none",
        task_type="CAUSAL_LM",
    )
    return get_peft_model(model, config)


# ----------------------------------------------------------------------------------- run


def make_step(model: nn.Module, ids: torch.Tensor) -> Callable[[], float]:
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-4)
    model.train()

    def step() -> float:
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss.item()

    return step


def main() -> None:
    args = parse_args()
    meter = PeakMeter(args.device)
    with tempfile.TemporaryDirectory() as path:
        make_checkpoint(args, path)
        from transformers import LlamaForCausalLM

        fp32 = LlamaForCausalLM.from_pretrained(path, dtype=torch.float32)
        fp32_bytes = weight_bytes(fp32)
        del fp32
        q4 = load_4bit(path, args)
        q4_bytes, (q4_linear, fp32_linear) = weight_bytes(q4), linear_bytes(q4)
        del q4
        models = {"SBoRA-FA": sbora_fa(path, args), "QLoRA": peft_qlora(path, args)}

    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, args.vocab, (args.batch, args.seq), generator=g).to(args.device)
    steps = {name: make_step(m, ids) for name, m in models.items()}
    times: dict[str, list[float]] = {n: [] for n in models}
    peaks: dict[str, list[int]] = {n: [] for n in models}
    order = list(models)
    for i in range(args.warmup + args.steps):
        for name in order if i % 2 == 0 else reversed(order):
            base = meter.start()
            t0 = time.perf_counter()
            steps[name]()
            if meter.cuda:
                torch.cuda.synchronize()
            elapsed = time.perf_counter() - t0
            peak = meter.peak() - base
            if i >= args.warmup:
                times[name].append(elapsed)
                peaks[name].append(peak)

    trainable = {
        n: sum(p.numel() for p in m.parameters() if p.requires_grad) for n, m in models.items()
    }
    print(
        f"model: Llama hidden {args.hidden}, intermediate {args.intermediate}, "
        f"{args.layers} layers, vocab {args.vocab}; NF4 + double quant, compute "
        f"{args.compute_dtype}; rank {args.rank} on {args.targets}; batch {args.batch}x"
        f"{args.seq}; gradient checkpointing {'on' if args.gradient_checkpointing else 'off'}; "
        f"{args.steps} timed steps after {args.warmup} warm-up, interleaved; "
        f"device {args.device}, {torch.get_num_threads()} threads"
    )
    head = f"{'method':<10} {'trainable':>11} {'step s median':>14} {'min':>8}"
    print(f"{head} {'step peak MiB (max)':>20}")
    for name in models:
        print(
            f"{name:<10} {trainable[name]:>11,} {statistics.median(times[name]):>14.4f} "
            f"{min(times[name]):>8.4f} {max(peaks[name]) / 2**20:>20.1f}"
        )
    t_ratio = statistics.median(times["SBoRA-FA"]) / statistics.median(times["QLoRA"])
    t_min_ratio = min(times["SBoRA-FA"]) / min(times["QLoRA"])
    m_ratio = max(peaks["SBoRA-FA"]) / max(peaks["QLoRA"])
    total = {n: q4_bytes + max(peaks[n]) for n in models}
    print(
        f"step time   SBoRA-FA / QLoRA = {t_ratio:.3f} (median), {t_min_ratio:.3f} (min)"
        "   (goal <= 0.85)"
    )
    print(f"step peak   SBoRA-FA / QLoRA = {m_ratio:.3f}   (goal <= 1.00)")
    print(
        f"weights + step peak: SBoRA-FA {total['SBoRA-FA'] / 2**20:.1f} MiB, QLoRA "
        f"{total['QLoRA'] / 2**20:.1f} MiB, ratio {total['SBoRA-FA'] / total['QLoRA']:.3f}"
    )
    print(
        f"weights     4-bit {q4_bytes / 2**20:.1f} MiB / fp32 {fp32_bytes / 2**20:.1f} MiB "
        f"= {q4_bytes / fp32_bytes:.3f} (embeddings and head stay fp32)"
    )
    print(
        f"linear layers only: 4-bit {q4_linear / 2**20:.1f} MiB / fp32 "
        f"{fp32_linear / 2**20:.1f} MiB = {q4_linear / fp32_linear:.3f}"
    )


if __name__ == "__main__":
    main()
