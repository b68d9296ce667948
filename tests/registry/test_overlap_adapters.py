"""Overlap of real adapters (Llama and GPT-2 Conv1D) against the nonzero pattern of their ΔW."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from tests import tiny
from transformers import GPT2LMHeadModel, LlamaForCausalLM

from sbora_reg import sbora
from sbora_reg.registry.overlap import Footprint, Region, compare
from sbora_reg.sbora.fingerprint import model_fingerprint


def _llama() -> torch.nn.Module:
    config = tiny.llama("l32", num_hidden_layers=1, num_key_value_heads=1, vocab_size=20)
    return LlamaForCausalLM(config)


def _gpt2() -> torch.nn.Module:
    return GPT2LMHeadModel(tiny.gpt2("g16", vocab_size=20))


def _adapter(make, variant: str, r: int, targets: tuple[str, ...], seed: int) -> sbora.Adapter:
    torch.manual_seed(seed)
    model = make()
    sbora.inject(model, sbora.SBoRAConfig(variant=variant, r=r, alpha=r, target_modules=targets,
                                          seed=seed))  # fmt: skip
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.normal_()  # every trained factor entry nonzero
    return sbora.extract(model)


def _footprint(name: str, base: str, adapter: sbora.Adapter) -> Footprint:
    regions = {
        mod_name: Region(mod.variant, tuple(mod.shape), mod.indices.numpy())
        for mod_name, mod in adapter.modules.items()
    }
    return Footprint(name, base, regions)


@pytest.mark.parametrize(
    ("make", "targets"),
    [(_llama, ("q_proj", "v_proj", "down_proj")), (_gpt2, ("c_attn", "c_proj", "c_fc"))],
)
def test_shared_cells_equal_intersection_of_delta_supports(make, targets) -> None:
    base = model_fingerprint(make())
    adapters = [
        _adapter(make, variant, r, targets, seed)
        for variant, r, seed in [("fa", 6, 0), ("fa", 6, 1), ("fb", 5, 2), ("fb", 7, 3)]
    ]
    fps = [_footprint(f"a{i}", base, a) for i, a in enumerate(adapters)]
    seen_module = False
    for i in range(len(adapters)):
        for j in range(i + 1, len(adapters)):
            report = compare(fps[i], fps[j])
            for module in adapters[i].modules:
                # ΔW is (out, in) whatever the layer stores (Conv1D keeps (in, out)).
                di, dj = adapters[i].delta(module), adapters[j].delta(module)
                expected = int(((di != 0) & (dj != 0)).sum())
                assert report.modules.get(module, 0) == expected, (i, j, module)
                seen_module |= expected > 0
    assert seen_module


def test_conv1d_delta_is_transposed_in_the_checkpoint() -> None:
    """A GPT-2 FA region names input columns of (out, in): stored weight rows of Conv1D."""
    adapter = _adapter(_gpt2, "fa", 3, ("c_attn",), seed=0)
    model = _gpt2()
    name = "transformer.h.0.attn.c_attn"
    before = model.transformer.h[0].attn.c_attn.weight.detach().clone()  # (in, out) = (16, 48)
    adapter.apply(model)
    sbora.merge(model)
    after = sbora.unload(model).transformer.h[0].attn.c_attn.weight.detach()
    changed_rows = torch.nonzero((after != before).any(dim=1)).flatten()
    np.testing.assert_array_equal(changed_rows.numpy(), adapter.modules[name].indices.numpy())
