"""Shared fixture: a tiny char-level Llama with its tokenizer saved as a local model directory.

Built offline from a config and a ``tokenizers`` WordLevel vocabulary of printable ASCII, so
``AutoModelForCausalLM`` / ``AutoTokenizer.from_pretrained(dir)`` work as on a real checkpoint.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch


def build_tiny_lm(target: Path, seed: int = 0) -> Path:
    """Write a 2-layer, hidden-64 Llama and a char-level fast tokenizer into ``target``."""
    from tokenizers import Regex, Tokenizer, models, pre_tokenizers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    specials = ["<pad>", "<eos>", "<unk>"]
    vocab = {tok: i for i, tok in enumerate(specials + [chr(c) for c in range(32, 127)])}
    core = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.Split(Regex("."), "isolated")
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=core, pad_token="<pad>", eos_token="<eos>", unk_token="<unk>"
    )
    config = LlamaConfig(
        hidden_size=64,
        intermediate_size=96,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=len(vocab),
        max_position_embeddings=64,
        pad_token_id=0,
        eos_token_id=1,
        bos_token_id=1,
    )
    torch.manual_seed(seed)
    LlamaForCausalLM(config).save_pretrained(target)
    tokenizer.save_pretrained(target)
    return target


@pytest.fixture(scope="session")
def tiny_lm_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A local model directory (config, safetensors weights, tokenizer); do not modify it."""
    return build_tiny_lm(tmp_path_factory.mktemp("tiny-lm") / "model")
