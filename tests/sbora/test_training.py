"""Training: HF Trainer, a plain bf16 torch loop, and gradient checkpointing."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from tests.sbora.sbora_refs import randomise_adapter
from transformers import Trainer, TrainingArguments

from sbora_reg import sbora
from sbora_reg.sbora import SBoRAConfig

ALL7 = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def pattern_batch(n: int, seed: int = 0) -> torch.Tensor:
    """Sequences that count up mod 101 from a random start: easy to learn, hard to guess."""
    start = torch.randint(0, 101, (n, 1), generator=torch.Generator().manual_seed(seed))
    return (start + torch.arange(16)) % 101


def loss_of(model: torch.nn.Module, ids: torch.Tensor) -> float:
    with torch.no_grad():
        return float(model(input_ids=ids, labels=ids).loss)


class _Rows(torch.utils.data.Dataset):
    def __init__(self, ids: torch.Tensor) -> None:
        self.ids = ids

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"input_ids": self.ids[i], "labels": self.ids[i]}


def test_trainer_lowers_loss_and_changes_only_adapter_tensors(make_llama, tmp_path: Path) -> None:
    # FA here; FB trains in the plain loop below (the Trainer path is the same for both)
    model = sbora.inject(
        make_llama(), SBoRAConfig(variant="fa", r=8, alpha=16, target_modules=ALL7)
    )
    before = {k: v.clone() for k, v in model.state_dict().items()}
    held_out = pattern_batch(16, seed=99)
    start = loss_of(model, held_out)
    args = TrainingArguments(
        output_dir=str(tmp_path),
        use_cpu=True,
        report_to="none",
        save_strategy="no",
        logging_strategy="no",
        max_steps=12,
        per_device_train_batch_size=8,
        learning_rate=2e-2,
        disable_tqdm=True,
        seed=0,
    )
    Trainer(model=model, args=args, train_dataset=_Rows(pattern_batch(96))).train()
    model.eval()
    assert loss_of(model, held_out) < start - 0.1
    after = model.state_dict()
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed and all(k.rsplit(".", 1)[-1] in ("sbora_A", "sbora_B") for k in changed)


@pytest.mark.parametrize("variant", ["fa", "fb"])
def test_plain_bf16_loop_trains(variant, make_llama) -> None:
    model = make_llama().to(torch.bfloat16)
    sbora.inject(model, SBoRAConfig(variant=variant, r=8, alpha=16, target_modules=ALL7))
    params = list(sbora.trainable_parameters(model).values())
    assert params and all(p.dtype == torch.bfloat16 for p in params)
    opt = torch.optim.AdamW(params, lr=2e-2)
    held_out = pattern_batch(16, seed=99)
    start = loss_of(model, held_out)
    model.train()
    for step in range(12):
        ids = pattern_batch(8, seed=step)
        model(input_ids=ids, labels=ids).loss.backward()
        opt.step()
        opt.zero_grad()
    model.eval()
    assert loss_of(model, held_out) < start - 0.1


@pytest.mark.parametrize("variant", ["fa", "fb"])
def test_gradient_checkpointing_gives_the_same_grads(variant, make_llama) -> None:
    grads = []
    for checkpointing in (False, True):
        model = sbora.inject(
            make_llama(), SBoRAConfig(variant=variant, r=4, alpha=8, target_modules=ALL7)
        )
        randomise_adapter(model, seed=1)
        model.train()
        if checkpointing:
            model.gradient_checkpointing_enable()
            model.enable_input_require_grads()
        ids = pattern_batch(4, seed=5)
        model(input_ids=ids, labels=ids).loss.backward()
        grads.append({n: p.grad for n, p in sbora.trainable_parameters(model).items()})
    plain, ckpt = grads
    assert plain.keys() == ckpt.keys()
    assert all(g is not None and bool(g.abs().sum() > 0) for g in plain.values())
    for name in plain:
        torch.testing.assert_close(ckpt[name], plain[name], rtol=1e-5, atol=1e-7)
