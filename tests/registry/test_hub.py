"""Hub sync with the real huggingface_hub client against a Hub-compatible server on 127.0.0.1.

push: one commit with native files, a PEFT view and a card; unchanged content makes no commit;
the commit is recorded on the version. pull: files checked against the Hub's hashes, registered
with provenance, the same commit twice a no-op. Faults leave registry and repo as they were.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from huggingface_hub import HfApi, snapshot_download
from huggingface_hub.repocard import metadata_load
from tests.hub_server import HubServer
from tests.registry.registry_factory import make_adapter

from sbora_reg import sbora
from sbora_reg.errors import HubError
from sbora_reg.registry import Registry, hub
from sbora_reg.registry.hub_refs import listed

TOKEN = "hf_sbora_reg_test_token"
REPO = "acme/tiny-fa"
EVERY_FILE = sorted(
    [
        "README.md",
        "adapter_config.json",
        "adapter_model.safetensors",
        "sbora_config.json",
        "sbora_adapter.safetensors",
    ]
)


@pytest.fixture
def server(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setenv("HF_TOKEN", TOKEN)  # the client's own token lookup
    with HubServer(tmp_path / "hub", token=TOKEN) as running:
        yield running


@pytest.fixture
def registry(tmp_path: Path, tiny_lm_dir: Path):
    with Registry.open(tmp_path / "reg.db") as reg:
        reg.add_base(tiny_lm_dir, label="tiny", hub_id="acme/tiny-llama")
        make_adapter(tmp_path / "a", tiny_lm_dir, "fa", seed=1, targets=("q_proj", "v_proj"))
        reg.add(tmp_path / "a", name="math", task="arith", base="tiny")
        yield reg


def fresh_registry(tmp_path: Path, tiny_lm_dir: Path, name: str) -> Registry:
    reg = Registry.open(tmp_path / f"{name}.db")
    reg.add_base(tiny_lm_dir, hub_id="acme/tiny-llama")
    return reg


def test_push_is_one_commit_with_native_peft_and_card_then_unchanged_is_no_commit(
    server: HubServer, registry: Registry
) -> None:
    result = hub.push(registry, "math", REPO, endpoint=server.url)
    assert result.changed and result.files == EVERY_FILE
    assert server.commits(REPO)[0] == result.commit
    stored = server.files(REPO)
    assert sorted(stored) == sorted([*EVERY_FILE, ".gitattributes"])  # the Hub's first commit
    blob = registry.blob_path(registry.resolve("math").sha256)
    for name in ("sbora_config.json", "sbora_adapter.safetensors"):
        assert stored[name] == (blob / name).read_bytes()  # the registered bytes, unchanged
    card = stored["README.md"].decode()
    assert card.startswith("---\n")
    (Path(registry.data_dir) / "card.md").write_text(card)
    meta = metadata_load(Path(registry.data_dir) / "card.md")
    assert meta["base_model"] == "acme/tiny-llama"
    assert meta["library_name"] == "peft"
    assert meta["tags"] == ["sbora", "sbora-fa", "arith"]
    assert "model.layers.0.self_attn.q_proj" in card
    detail = registry.show("math").to_json()
    assert [(h["direction"], h["repo"], h["commit"]) for h in detail["hub"]] == [
        ("push", REPO, result.commit)
    ]
    commits = server.commits(REPO)
    again = hub.push(registry, "math@1", REPO, endpoint=server.url)
    assert not again.changed and again.commit == result.commit
    assert server.commits(REPO) == commits  # byte-stable card: nothing new to commit
    assert len(registry.show("math").hub) == 1


def test_the_peft_view_loads_in_stock_peft_with_the_adapters_outputs(
    server: HubServer,
    registry: Registry,
    tiny_lm_dir: Path,
) -> None:
    import peft
    from transformers import AutoModelForCausalLM

    hub.push(registry, "math", REPO, endpoint=server.url)
    # PEFT would download by repo id from the client's import-time endpoint (HF_ENDPOINT baked
    # into its URL template), so the repo's PEFT view is fetched with the client first.
    local = snapshot_download(REPO, endpoint=server.url, allow_patterns=["adapter_*"])
    ids = torch.randint(3, 90, (2, 9), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        base = AutoModelForCausalLM.from_pretrained(tiny_lm_dir)
        got = peft.PeftModel.from_pretrained(base, local)(ids).logits
        blob = registry.blob_path(registry.resolve("math").sha256)
        fresh = AutoModelForCausalLM.from_pretrained(tiny_lm_dir)
        want = sbora.Adapter.load(blob).apply(fresh)(ids).logits
    torch.testing.assert_close(got, want, rtol=0, atol=1e-5)


def test_pull_registers_the_same_adapter_with_provenance_once(
    server: HubServer, registry: Registry, tmp_path: Path, tiny_lm_dir: Path
) -> None:
    pushed = hub.push(registry, "math", REPO, endpoint=server.url)
    with fresh_registry(tmp_path, tiny_lm_dir, "other") as other:
        pulled = hub.pull(other, REPO, endpoint=server.url)
        assert pulled.new and pulled.commit == pushed.commit
        record = pulled.record
        assert (record.name, record.sha256) == ("tiny-fa", registry.resolve("math").sha256)
        assert record.provenance["repo"] == REPO and record.provenance["commit"] == pushed.commit
        assert "token" not in json.dumps(record.to_json()).lower()
        again = hub.pull(other, f"{REPO}@{pushed.commit}", endpoint=server.url)
        assert not again.new and again.record.ref == record.ref
        assert [r.ref for r in other.list()] == ["tiny-fa@1"]
        assert [(h.direction, h.commit) for h in other.show("tiny-fa").hub] == [
            ("pull", pushed.commit)
        ]


def test_a_plain_peft_lora_repo_pulls_as_touching_every_cell(
    server: HubServer, tmp_path: Path, tiny_lm_dir: Path
) -> None:
    make_adapter(tmp_path / "lora", tiny_lm_dir, "lora", seed=3, targets=("q_proj",))
    sbora.Adapter.load(tmp_path / "lora").to_peft(tmp_path / "peft")
    (tmp_path / "peft" / "README.md").write_text("---\nbase_model: acme/tiny-llama\n---\n")
    api = HfApi(endpoint=server.url)
    api.create_repo("acme/plain-lora", exist_ok=True)
    api.upload_folder(repo_id="acme/plain-lora", folder_path=tmp_path / "peft")
    with fresh_registry(tmp_path, tiny_lm_dir, "lora") as reg:
        pulled = hub.pull(reg, "acme/plain-lora", name="lora", endpoint=server.url)
        assert pulled.record.variant == "lora" and pulled.record.format == "peft"
        regions = reg.show("lora").regions
        assert regions and all(r.variant == "lora" for r in regions.values())


def test_a_corrupted_download_is_refused_named_and_evicted(
    server: HubServer, registry: Registry, tmp_path: Path, tiny_lm_dir: Path
) -> None:
    # content of its own: the HF cache holds no good copy of it from another test
    make_adapter(tmp_path / "c", tiny_lm_dir, "fa", seed=11, targets=("up_proj",))
    registry.add(tmp_path / "c", name="fresh", base="tiny")
    hub.push(registry, "fresh", REPO, endpoint=server.url)
    server.corrupt(REPO, "sbora_adapter.safetensors")
    with fresh_registry(tmp_path, tiny_lm_dir, "other") as other:
        with pytest.raises(HubError, match="sbora_adapter.safetensors.*corrupted") as caught:
            hub.pull(other, REPO, endpoint=server.url)
        assert "\n" not in str(caught.value)
        assert other.list() == []
        repo_cache = Path(_hf_cache()) / "models--acme--tiny-fa"
        snapshot = repo_cache / "snapshots" / server.commits(REPO)[0]
        assert (snapshot / "sbora_config.json").exists()  # downloaded and good: kept
        assert not (snapshot / "sbora_adapter.safetensors").exists()  # evicted: link and blob
        info = HfApi(endpoint=server.url).model_info(REPO, files_metadata=True)
        (listed_file,) = [f for f in info.siblings if f.rfilename == "sbora_adapter.safetensors"]
        assert not (repo_cache / "blobs" / listed_file.lfs.sha256).exists()


def _hf_cache() -> str:
    from huggingface_hub import constants

    return constants.HF_HUB_CACHE


def test_faults_leave_registry_and_repo_as_they_were_and_a_retry_succeeds(
    server: HubServer, registry: Registry, tmp_path: Path, tiny_lm_dir: Path
) -> None:
    hub.push(registry, "math", REPO, endpoint=server.url)
    make_adapter(tmp_path / "b", tiny_lm_dir, "fa", seed=5, targets=("q_proj",))
    registry.add(tmp_path / "b", name="math", base="tiny")  # math@2
    commits = server.commits(REPO)
    server.fail("POST", r"/commit/", status=500)
    with pytest.raises(HubError, match="push to acme/tiny-fa") as caught:
        hub.push(registry, "math@2", REPO, endpoint=server.url)
    assert "\n" not in str(caught.value)
    assert server.commits(REPO) == commits
    assert registry.show("math@2").hub == []
    assert hub.push(registry, "math@2", REPO, endpoint=server.url).changed
    # pull: a failing download, then the retry
    with fresh_registry(tmp_path, tiny_lm_dir, "other") as other:
        server.fail("GET", r"/resolve/", status=403)  # 403: not retried by the client
        with pytest.raises(HubError, match="pull"):
            hub.pull(other, REPO, endpoint=server.url)
        assert other.list() == []
        assert hub.pull(other, REPO, endpoint=server.url).new


def test_private_and_missing_repos_are_one_line_errors(
    server: HubServer,
    registry: Registry,
    tmp_path: Path,
    tiny_lm_dir: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    hub.push(registry, "math", "acme/secret", private=True, endpoint=server.url)
    monkeypatch.delenv("HF_TOKEN")
    with fresh_registry(tmp_path, tiny_lm_dir, "other") as other:
        for repo, message in (("acme/secret", "private"), ("acme/nosuch", "does not exist")):
            with pytest.raises(HubError, match=message) as caught:
                hub.pull(other, repo, endpoint=server.url)
            assert "\n" not in str(caught.value) and TOKEN not in str(caught.value)
        assert other.list() == []


def test_pull_needs_a_base_it_can_name(
    server: HubServer, registry: Registry, tmp_path: Path, tiny_lm_dir: Path
) -> None:
    hub.push(registry, "math", REPO, endpoint=server.url)
    with Registry.open(tmp_path / "empty.db") as empty:
        with pytest.raises(HubError, match="acme/tiny-llama.*base add"):
            hub.pull(empty, REPO, endpoint=server.url)
        assert empty.list() == []
        pulled = hub.pull(empty, REPO, base=str(tiny_lm_dir), endpoint=server.url)
        assert pulled.new and pulled.record.base == str(tiny_lm_dir.resolve())


def test_push_of_a_compose_output_records_the_commit_on_the_composition(
    server: HubServer, registry: Registry, tmp_path: Path, tiny_lm_dir: Path
) -> None:
    from sbora_reg.registry.compose import compose

    result = compose(registry, ["math"], tiny_lm_dir, tmp_path / "adapter-out", "adapter")
    pushed = hub.push_dir(registry, tmp_path / "adapter-out", "acme/composed", endpoint=server.url)
    assert pushed.changed and pushed.composition_id == result.composition_id
    assert "sbora_manifest.json" in server.files("acme/composed")
    with registry.read() as session:
        refs = listed(session, composition_id=result.composition_id)
    assert [(r.repo, r.commit) for r in refs] == [("acme/composed", pushed.commit)]


def test_an_upload_that_fails_midway_changes_nothing_and_a_retry_succeeds(
    server: HubServer, registry: Registry
) -> None:
    # 403 on the LFS PUT: the client does not retry it (a 5xx would be retried with backoff)
    server.fail("PUT", r"/_lfs/", status=403)
    with pytest.raises(HubError, match="push to acme/tiny-fa") as caught:
        hub.push(registry, "math", REPO, endpoint=server.url)
    assert "\n" not in str(caught.value)
    assert "sbora_adapter.safetensors" not in server.files(REPO)  # the repo exists, still empty
    assert registry.show("math").hub == []
    assert hub.push(registry, "math", REPO, endpoint=server.url).changed


def test_a_team_registry_composes_on_one_machine_what_another_pushed(
    server: HubServer, db_url: str, tmp_path: Path, tiny_lm_dir: Path
) -> None:
    """One database, two data dirs as two machines: A adds and pushes, B composes."""
    from sbora_reg.errors import NotFoundError
    from sbora_reg.registry.compose import compose

    a = Registry.open(db_url, data_dir=tmp_path / "machine-a")
    b = Registry.open(db_url, data_dir=tmp_path / "machine-b")
    try:
        a.add_base(tiny_lm_dir, hub_id="acme/tiny-llama")
        for name, target, seed in (("q", "q_proj", 1), ("v", "v_proj", 2), ("k", "k_proj", 3)):
            make_adapter(tmp_path / name, tiny_lm_dir, "fa", seed=seed, targets=(target,))
            a.add(tmp_path / name, name=name, base=str(tiny_lm_dir))
        hub.push(a, "q", "acme/q", endpoint=server.url)
        hub.push(a, "v", "acme/v", endpoint=server.url)
        assert not b.blobs.path(b.resolve("q").sha256).exists()
        with pytest.raises(NotFoundError, match="never pushed"):
            compose(b, ["q", "k"], tiny_lm_dir, tmp_path / "b-out", command="t")
        on_b = compose(b, ["q", "v"], tiny_lm_dir, tmp_path / "b-out", command="t")
        on_a = compose(a, ["q", "v"], tiny_lm_dir, tmp_path / "a-out", command="t")
        assert on_b.output_sha256 == on_a.output_sha256  # the same merged bytes on both machines
        assert b.blobs.path(b.resolve("q").sha256).is_dir()  # fetched once, now stored on B
    finally:
        a.close()
        b.close()


def test_push_to_a_branch_and_pull_from_it(
    server: HubServer, registry: Registry, tmp_path: Path, tiny_lm_dir: Path
) -> None:
    main_commit = hub.push(registry, "math", REPO, endpoint=server.url).commit
    make_adapter(tmp_path / "b", tiny_lm_dir, "fa", seed=9, targets=("q_proj",))
    registry.add(tmp_path / "b", name="math", base="tiny")  # math@2
    dev = hub.push(registry, "math@2", REPO, revision="dev", endpoint=server.url)
    assert dev.changed and dev.revision == "dev"
    assert server.commits(REPO)[0] == main_commit  # main did not move
    assert server.commits(REPO, branch="dev")[0] == dev.commit
    with fresh_registry(tmp_path, tiny_lm_dir, "other") as other:
        pulled = hub.pull(other, f"{REPO}@dev", endpoint=server.url)
        assert pulled.commit == dev.commit
        assert pulled.record.sha256 == registry.resolve("math@2").sha256
