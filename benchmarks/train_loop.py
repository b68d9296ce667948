"""Training-loop benchmark: ``training.run_steps`` vs a plain Hugging Face loop, one process.

Both train the same SBoRA-FA adapter (r=16 on q,k,v,o,gate,up,down) of a Llama built from a config
(hidden 256, intermediate 688, 4 layers, vocab 2000) on the same right-padded batches (8×64
tokens, answer-only labels). The reference is what users write: ``model(**batch).loss.backward()``
with AdamW. ``run_steps`` adds what DDP equivalence needs: the loss summed over tokens and divided
by the global token count (one float64 all-reduce per step under DDP, none here). Rounds alternate
the two loops so machine noise hits both; the report is the median time per step and the ratio.

    python benchmarks/train_loop.py            # 5 rounds of 8 steps
    python benchmarks/train_loop.py --rounds 2 --steps 4
"""

from __future__ import annotations

import argparse
import copy
import statistics
import time

import torch
from transformers import LlamaConfig, LlamaForCausalLM

from sbora_reg import sbora
from sbora_reg.sbora import SBoRAConfig, training

ALL7 = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def _batches(n: int, vocab: int) -> list[dict[str, torch.Tensor]]:
    gen = torch.Generator().manual_seed(0)
    out = []
    for _ in range(n):
        ids = torch.randint(3, vocab, (8, 64), generator=gen)
        lengths = torch.randint(32, 65, (8,), generator=gen)
        mask = (torch.arange(64) < lengths[:, None]).long()
        labels = ids.masked_fill(mask == 0, -100)
        labels[:, :16] = -100  # a 16-token prompt without loss
        out.append({"input_ids": ids, "attention_mask": mask, "labels": labels})
    return out


def _reference(model: torch.nn.Module, batches: list[dict[str, torch.Tensor]], lr: float) -> None:
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr)
    model.train()
    for batch in batches:
        model(**batch).loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: default)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    cfg = LlamaConfig(
        hidden_size=256,
        intermediate_size=688,
        num_hidden_layers=4,
        num_attention_heads=8,
        num_key_value_heads=4,
        vocab_size=2000,
        max_position_embeddings=128,
    )
    torch.manual_seed(0)
    base = LlamaForCausalLM(cfg).eval()
    config = SBoRAConfig(variant="fa", r=16, alpha=32, target_modules=ALL7)
    batches = _batches(args.steps, cfg.vocab_size)

    # Same loss at the start: the two loops optimise the same objective on one process.
    probe = sbora.inject(copy.deepcopy(base), config)
    with torch.no_grad():
        nll, count = training._token_nll(probe, batches[0])
        hf = float(probe(**batches[0]).loss)
    print(f"step-0 loss: run_steps {float(nll) / count:.6f}  HF {hf:.6f}")

    times: dict[str, list[float]] = {"run_steps": [], "hf loop": []}
    for _ in range(args.rounds):
        for name in times:
            model = sbora.inject(copy.deepcopy(base), config)
            start = time.perf_counter()
            if name == "run_steps":
                training.run_steps(model, iter(batches), steps=len(batches), lr=1e-3)
            else:
                _reference(model, batches, lr=1e-3)
            times[name].append((time.perf_counter() - start) / len(batches))
    med = {name: statistics.median(t) for name, t in times.items()}
    for name, t in med.items():
        print(f"{name:>10}: {t * 1e3:8.1f} ms/step (median of {args.rounds} rounds)")
    print(f"ratio run_steps / hf loop: {med['run_steps'] / med['hf loop']:.3f}")


if __name__ == "__main__":
    main()
