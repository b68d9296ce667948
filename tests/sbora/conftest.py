"""Fixtures: tiny Llama and GPT-2 models built from a config, fresh copies per test."""

from __future__ import annotations

import copy
from collections.abc import Callable

import pytest
import torch
from tests.sbora.sbora_refs import GPT2, LLAMA
from transformers import GPT2LMHeadModel, LlamaForCausalLM


@pytest.fixture(scope="session")
def llama_base() -> LlamaForCausalLM:
    torch.manual_seed(1234)
    return LlamaForCausalLM(LLAMA).eval()


@pytest.fixture
def make_llama(llama_base: LlamaForCausalLM) -> Callable[[], LlamaForCausalLM]:
    """Fresh copies of one tiny Llama (the same weights every time)."""
    return lambda: copy.deepcopy(llama_base)


@pytest.fixture(scope="session")
def gpt2_base() -> GPT2LMHeadModel:
    torch.manual_seed(99)
    return GPT2LMHeadModel(GPT2).eval()


@pytest.fixture
def make_gpt2(gpt2_base: GPT2LMHeadModel) -> Callable[[], GPT2LMHeadModel]:
    return lambda: copy.deepcopy(gpt2_base)


@pytest.fixture
def token_ids() -> torch.Tensor:
    """(2, 9) token ids valid for both tiny models."""
    return torch.randint(0, 89, (2, 9), generator=torch.Generator().manual_seed(7))
