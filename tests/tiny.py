"""The one table of tiny model configs the suite builds (nothing is downloaded).

Each entry is a shape family; a test names one and overrides what it needs (a vocabulary, a
layer count), so the shapes a test relies on read at the call site: ``tiny.llama("l64",
vocab_size=97)``.
"""

from __future__ import annotations

from typing import Any

from transformers import GPT2Config, LlamaConfig

LLAMA: dict[str, dict[str, Any]] = {
    # hidden 64, MLP 128: the registry's and the quantisation tests' base
    "l64": dict(
        hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, vocab_size=128,
    ),
    # hidden 64, MLP 96: the method's tests and the char-level LM that learns (tests/conftest.py)
    "l64-96": dict(
        hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, vocab_size=101, max_position_embeddings=64,
    ),
    # hidden 32, MLP 48: CLI and audit tests, small enough to diff every weight
    "l32": dict(
        hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=2,
        num_key_value_heads=2, vocab_size=30,
    ),
}  # fmt: skip
GPT2: dict[str, dict[str, Any]] = {
    "g16": dict(n_embd=16, n_layer=1, n_head=2, vocab_size=32),  # Conv1D layout checks
    "g48": dict(n_embd=48, n_layer=2, n_head=4, vocab_size=89, n_positions=32),
}


def llama(name: str, **overrides: Any) -> LlamaConfig:
    """The ``LLAMA[name]`` config with ``overrides``."""
    return LlamaConfig(**{**LLAMA[name], **overrides})


def gpt2(name: str, **overrides: Any) -> GPT2Config:
    """The ``GPT2[name]`` config with ``overrides``."""
    return GPT2Config(**{**GPT2[name], **overrides})
