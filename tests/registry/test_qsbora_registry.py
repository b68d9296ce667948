"""A QSBoRA adapter goes through the registry and the CLI like any other adapter.

Its base is the unquantised checkpoint (same fingerprint); how the base was quantised is training
metadata that ``add`` keeps and ``show --json`` reports.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

pytest.importorskip("bitsandbytes")

from click.testing import CliRunner  # noqa: E402
from tests import tiny
from transformers import LlamaForCausalLM  # noqa: E402

from sbora_reg import sbora  # noqa: E402
from sbora_reg.cli import main  # noqa: E402
from sbora_reg.sbora import quant  # noqa: E402
from sbora_reg.sbora.fingerprint import dir_fingerprint  # noqa: E402


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    cfg = tiny.llama("l64", num_hidden_layers=1, vocab_size=53)
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("qsbora-base") / "tiny"
    LlamaForCausalLM(cfg).save_pretrained(path)
    return path


def test_qsbora_adapter_registers_against_the_unquantised_base(checkpoint, tmp_path):
    model = quant.load_quantized(
        checkpoint, bits=4, quant_type="fp4", double_quant=False, compute_dtype=torch.float32
    )
    config = sbora.SBoRAConfig(variant="fb", r=4, alpha=8.0, target_modules=("o_proj",))
    sbora.inject(model, config)
    with torch.no_grad():
        model.model.layers[0].self_attn.o_proj.sbora_A.normal_()
    adapter = sbora.extract(model)
    adapter.save(tmp_path / "qsbora")
    db = str(tmp_path / "reg.db")
    runner = CliRunner()
    added = runner.invoke(
        main,
        [
            "--db",
            db,
            "add",
            str(tmp_path / "qsbora"),
            "--name",
            "q",
            "--base",
            str(checkpoint),
            "--json",
        ],
    )
    assert added.exit_code == 0, added.output
    shown = runner.invoke(main, ["--db", db, "show", "q", "--json"])
    assert shown.exit_code == 0, shown.output
    text = json.dumps(json.loads(shown.output))
    assert dir_fingerprint(checkpoint) in text
    assert '"quantization": "bnb-fp4"' in text and '"compute_dtype": "float32"' in text
    assert adapter.sha256() in text
