"""`sbora-reg push` / `pull` through CliRunner against the loopback Hub."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from click.testing import CliRunner, Result
from tests.hub_server import HubServer
from tests.registry.registry_factory import make_adapter

from sbora_reg.cli import main

TOKEN = "hf_cli_test_token"


@pytest.fixture
def server(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setenv("HF_TOKEN", TOKEN)
    with HubServer(tmp_path / "hub", token=TOKEN) as running:
        monkeypatch.setenv("HF_ENDPOINT", running.url)  # the default when --endpoint is absent
        yield running


def run(db: Path, *args: str) -> Result:
    return CliRunner().invoke(main, ["--db", str(db), *args])


def test_push_then_pull_with_json_and_the_endpoint_from_the_environment(
    server: HubServer, tmp_path: Path, tiny_lm_dir: Path
) -> None:
    db, other = tmp_path / "a.db", tmp_path / "b.db"
    for reg in (db, other):
        added = run(reg, "base", "add", str(tiny_lm_dir), "--hub-id", "acme/tiny-llama")
        assert added.exit_code == 0, added.output
    make_adapter(tmp_path / "a", tiny_lm_dir, "fb", seed=2, targets=("k_proj",))
    assert run(db, "add", str(tmp_path / "a"), "--name", "sorter").exit_code == 0
    pushed = run(db, "push", "sorter", "--repo", "acme/sorter", "--json")
    assert pushed.exit_code == 0, pushed.output
    commit = json.loads(pushed.stdout)["commit"]
    again = run(db, "push", "sorter@1", "--repo", "acme/sorter")
    assert again.exit_code == 0 and "no new commit" in again.output
    shown = json.loads(run(db, "show", "sorter", "--json").stdout)
    assert shown["hub"][0]["commit"] == commit
    pulled = run(other, "pull", "acme/sorter", "--name", "sorter", "--json")
    assert pulled.exit_code == 0, pulled.output
    assert json.loads(pulled.stdout)["adapter"]["ref"] == "sorter@1"
    assert "already" in run(other, "pull", f"acme/sorter@{commit}").output
    assert TOKEN not in pushed.output + pulled.output


def test_bad_push_and_pull_input(server: HubServer, tmp_path: Path, tiny_lm_dir: Path) -> None:
    db = tmp_path / "a.db"
    make_adapter(tmp_path / "a", tiny_lm_dir, "fa", seed=1, targets=("q_proj",))
    assert (
        run(db, "add", str(tmp_path / "a"), "--name", "a", "--base", str(tiny_lm_dir)).exit_code
        == 0
    )
    assert run(db, "push", "--repo", "acme/x").exit_code == 2  # neither NAME nor --path
    for args in (
        ["push", "a", "--repo", "not-a-repo-id"],
        ["push", "nosuch", "--repo", "acme/x"],
        ["pull", "acme/nosuch"],
        ["pull", "bad id"],
        ["push", "a", "--repo", "acme/x", "--endpoint", "http://127.0.0.1:9"],  # nothing listens
    ):
        result = run(db, *args)
        assert result.exit_code == 1, (args, result.output)
        lines = result.output.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("Error: "), (args, result.output)


def test_a_hub_that_does_not_answer_is_a_timeout_error(
    server: HubServer, tmp_path: Path, tiny_lm_dir: Path
) -> None:
    from huggingface_hub import get_session

    db = tmp_path / "a.db"
    assert run(db, "base", "add", str(tiny_lm_dir), "--hub-id", "acme/tiny-llama").exit_code == 0
    server.stall("GET", r"^/api/models/", seconds=3)
    try:
        result = run(db, "pull", "acme/anything", "--timeout", "0.5")
    finally:
        get_session().timeout = None  # this test process shares the client with other tests
    assert result.exit_code == 1, result.output
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("Error: pull acme/anything"), result.output
