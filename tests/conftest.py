"""Shared fixture: a tiny char-level Llama with its tokenizer saved as a local model directory.

Built offline from a config and a ``tokenizers`` WordLevel vocabulary of printable ASCII, so
``AutoModelForCausalLM`` / ``AutoTokenizer.from_pretrained(dir)`` work as on a real checkpoint.
"""

from __future__ import annotations

import os
import tempfile

# huggingface_hub reads these when it is first imported (transformers imports it), so they are
# set before anything else: a cache of this run's own, no telemetry, no Xet against the test Hub
# (tests/hub_server.py), and never a real token.
os.environ["HF_HOME"] = tempfile.mkdtemp(prefix="sbora-reg-hf-home-")
os.environ["HF_HUB_DISABLE_XET"] = "1"
os.environ["HF_HUB_DISABLE_TELEMETRY"] = "1"
os.environ.pop("HF_TOKEN", None)
# The per-directory fingerprint cache (sbora.fingerprint) of this run, not the user's.
os.environ["SBORA_REG_CACHE"] = tempfile.mkdtemp(prefix="sbora-reg-cache-")

from collections.abc import Iterator  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Any  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402
from tests import tiny  # noqa: E402

# CI sets this (.ci/run): there every component the tests need is installed and started, so a
# skipped test is a failure (a missing PostgreSQL must not pass as "48 skipped").
NO_SKIP = os.environ.get("SBORA_REG_NO_SKIP") == "1"


def build_tiny_lm(target: Path, seed: int = 0) -> Path:
    """Write a 2-layer, hidden-64 Llama and a char-level fast tokenizer into ``target``."""
    from tokenizers import Regex, Tokenizer, models, pre_tokenizers
    from transformers import LlamaForCausalLM, PreTrainedTokenizerFast

    specials = ["<pad>", "<eos>", "<unk>"]
    vocab = {tok: i for i, tok in enumerate(specials + [chr(c) for c in range(32, 127)])}
    core = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.Split(Regex("."), "isolated")
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=core, pad_token="<pad>", eos_token="<eos>", unk_token="<unk>"
    )
    config = tiny.llama(
        "l64-96", vocab_size=len(vocab), pad_token_id=0, eos_token_id=1, bos_token_id=1
    )
    torch.manual_seed(seed)
    LlamaForCausalLM(config).save_pretrained(target)
    tokenizer.save_pretrained(target)
    return target


@pytest.fixture(scope="session")
def tiny_lm_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A local model directory (config, safetensors weights, tokenizer); do not modify it."""
    return build_tiny_lm(tmp_path_factory.mktemp("tiny-lm") / "model")


def pytest_report_header() -> str:
    """Which bitsandbytes CPU path the 4-bit tests can take on this machine."""
    try:
        import bitsandbytes.functional as bnbf
    except ImportError:
        return "bitsandbytes: not installed"
    fused = bnbf.has_avx512bf16()
    paths = (
        "standard and repacked (AVX512-BF16 kernel)" if fused else "standard only (no AVX512-BF16)"
    )
    return f"bitsandbytes 4-bit CPU forward paths tested: {paths}"


def _fail_skip(report: Any) -> None:
    if NO_SKIP and report.skipped and not hasattr(report, "wasxfail"):
        reason = report.longrepr[-1] if isinstance(report.longrepr, tuple) else report.longrepr
        report.outcome = "failed"
        report.longrepr = f"skipped under SBORA_REG_NO_SKIP=1 (CI runs every test): {reason}"


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Iterator[None]:
    outcome: Any = yield
    _fail_skip(outcome.get_result())


@pytest.hookimpl(hookwrapper=True)
def pytest_make_collect_report(collector: pytest.Collector) -> Iterator[None]:
    outcome: Any = yield
    _fail_skip(outcome.get_result())
