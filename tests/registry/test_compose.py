"""compose: merged checkpoints against a dense float32 reference, atomic output, every refusal."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from tests import tiny
from transformers import (
    AutoModelForCausalLM,
    GPT2LMHeadModel,
    LlamaForCausalLM,
)

from sbora_reg.errors import (
    AdapterFormatError,
    FingerprintMismatchError,
    OverlapError,
    QuantizationError,
    SboraRegError,
)
from sbora_reg.registry.checkpoint import INDEX_NAME, ShardWriter
from sbora_reg.registry.compose import MANIFEST_NAME, Member, compose_members
from sbora_reg.registry.ranges import parse_ranges
from sbora_reg.sbora.adapter import Adapter, AdapterModule
from sbora_reg.sbora.config import SBoRAConfig
from sbora_reg.sbora.fingerprint import dir_fingerprint, dir_module_table

Q = "model.layers.{}.self_attn.q_proj"
V = "model.layers.{}.self_attn.v_proj"


def save_llama(path: Path, dtype: torch.dtype = torch.float32, shard: str = "5GB") -> Path:
    torch.manual_seed(0)
    config = tiny.llama("l64", vocab_size=100, tie_word_embeddings=False)
    LlamaForCausalLM(config).to(dtype).save_pretrained(path, max_shard_size=shard)
    (path / "tokenizer_config.json").write_text('{"model_max_length": 64}')
    return path


def make_adapter(base: Path, plan: dict[str, tuple[str, list[int]]], seed: int) -> Adapter:
    """An adapter with random factors: ``plan`` maps module -> (variant, indices)."""
    table = dir_module_table(base)
    g = torch.Generator().manual_seed(seed)
    modules = {}
    for name, (variant, idx) in plan.items():
        kind, (out, inp) = table[name]
        r = len(idx)
        a = torch.randn(r, inp, generator=g) if variant in ("fb", "lora") else None
        b = torch.randn(out, r, generator=g) if variant in ("fa", "lora") else None
        indices = None if variant == "lora" else torch.tensor(sorted(idx), dtype=torch.int64)
        modules[name] = AdapterModule(name, variant, kind, (out, inp), 0.5 + seed, indices, a, b)
    config = SBoRAConfig(variant="fa", r=4, alpha=8.0, target_modules=("q_proj", "v_proj"))
    return Adapter(config, modules, base_fingerprint=dir_fingerprint(base))


def members(*adapters: Adapter) -> list[Member]:
    return [Member(f"task{i}", 1, f"{i:064x}", a) for i, a in enumerate(adapters)]


def read_all(folder: Path) -> dict[str, torch.Tensor]:
    tensors: dict[str, torch.Tensor] = {}
    index = folder / INDEX_NAME
    names = set(json.loads(index.read_text())["weight_map"].values()) if index.is_file() else ()
    for file in sorted(folder / n for n in names) or sorted(folder.glob("*.safetensors")):
        tensors.update(load_file(file))
    return tensors


def reference(base: Path, ms: list[Member], dtype: torch.dtype | None = None):  # type: ignore[no-untyped-def]
    """Base + Σ ΔW in float32, members in order, then cast; plus each tensor's touched mask."""
    weights = read_all(base)
    expected, masks = {}, {}
    for name, w in weights.items():
        target = dtype if dtype is not None and w.is_floating_point() else w.dtype
        expected[name], masks[name] = w.to(target), torch.zeros(w.shape, dtype=torch.bool)
    for m in ms:
        for module, mod in m.adapter.modules.items():
            key = f"{module}.weight"
            delta = m.adapter.delta(module)  # (out, in) float32
            touched = torch.zeros(mod.shape, dtype=torch.bool)
            if mod.variant == "fa":
                touched[:, mod.indices] = True
            elif mod.variant == "fb":
                touched[mod.indices, :] = True
            else:
                touched[:] = True
            if mod.kind == "conv1d":
                delta, touched = delta.T, touched.T
            acc = expected.get(f"_acc_{key}", weights[key].float())
            expected[f"_acc_{key}"] = acc + delta
            masks[key] |= touched
    for key in [k for k in expected if k.startswith("_acc_")]:
        name = key[len("_acc_") :]
        expected[name] = expected.pop(key).to(expected[name].dtype)
    return weights, expected, masks


def assert_exact(out: Path, base: Path, ms: list[Member], dtype: torch.dtype | None = None) -> None:
    got = read_all(out)
    weights, expected, masks = reference(base, ms, dtype)
    assert got.keys() == weights.keys()
    changed = 0
    for name, w in weights.items():
        outside = ~masks[name]
        assert torch.equal(got[name][outside], w[outside].to(got[name].dtype)), name
        assert got[name].dtype == expected[name].dtype, name
        assert torch.equal(got[name], expected[name]), name
        changed += int(masks[name].any())
    assert changed == len({k for m in ms for k in m.adapter.modules})


@pytest.fixture(scope="module")
def llama(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return save_llama(tmp_path_factory.mktemp("base") / "llama")


def test_fa_fa_disjoint_merge_is_exact(llama: Path, tmp_path: Path) -> None:
    perm = torch.randperm(64, generator=torch.Generator().manual_seed(1)).tolist()
    a = make_adapter(llama, {Q.format(0): ("fa", perm[:4]), V.format(1): ("fa", perm[:3])}, 1)
    b = make_adapter(llama, {Q.format(0): ("fa", perm[4:9]), Q.format(1): ("fa", perm[9:11])}, 2)
    ms = members(a, b)
    result = compose_members(ms, llama, tmp_path / "out", command="test")
    assert_exact(tmp_path / "out", llama, ms)
    assert result.tensors_changed == 3 and result.overlap_cells == 0
    assert result.output_sha256 and set(result.files) >= {"model.safetensors", "config.json"}
    assert (tmp_path / "out" / "tokenizer_config.json").is_file()
    assert (tmp_path / "out" / "generation_config.json").is_file()


def test_fb_fb_and_mixed_modules(llama: Path, tmp_path: Path) -> None:
    a = make_adapter(llama, {V.format(0): ("fb", [0, 5, 7]), Q.format(0): ("fa", [1, 2])}, 3)
    b = make_adapter(llama, {V.format(0): ("fb", [1, 6, 30]), Q.format(1): ("fb", [9])}, 4)
    ms = members(a, b)
    compose_members(ms, llama, tmp_path / "out", command="test")
    assert_exact(tmp_path / "out", llama, ms)


def test_overlap_refused_then_summed(llama: Path, tmp_path: Path) -> None:
    a = make_adapter(llama, {Q.format(0): ("fa", [1, 2, 3])}, 5)
    b = make_adapter(llama, {Q.format(0): ("fa", [3, 4])}, 6)
    c = make_adapter(llama, {Q.format(1): ("fb", [3, 4]), V.format(1): ("lora", [0, 1])}, 7)
    d = make_adapter(llama, {Q.format(1): ("fa", [0])}, 8)
    with pytest.raises(OverlapError, match=r"task0@1 & task1@1: 64 cells"):
        compose_members(members(a, b), llama, tmp_path / "out", command="test")
    # Overlap is checked across all members, not only neighbours: task0 and task3 clash here.
    e = make_adapter(llama, {Q.format(0): ("fa", [2])}, 9)
    with pytest.raises(OverlapError, match="task0@1 & task2@1"):
        compose_members(members(a, c, e), llama, tmp_path / "out", command="test")
    assert not (tmp_path / "out").exists()
    ms = members(a, b, c, d)
    result = compose_members(ms, llama, tmp_path / "out", allow_overlap=True, command="t")
    assert result.overlap_cells == 64 + 2
    assert_exact(tmp_path / "out", llama, ms)
    manifest = json.loads((tmp_path / "out" / MANIFEST_NAME).read_text())
    assert manifest["allow_overlap"] is True


def test_sharded_base_bf16_out_and_logits(tmp_path: Path) -> None:
    base = save_llama(tmp_path / "base", shard="60KB")
    assert (base / INDEX_NAME).is_file()
    a = make_adapter(base, {Q.format(0): ("fa", [0, 9]), V.format(1): ("fb", [3])}, 1)
    b = make_adapter(base, {Q.format(0): ("fa", [5]), Q.format(1): ("fb", [0, 1, 2])}, 2)
    ms = members(a, b)
    out = tmp_path / "out"
    compose_members(ms, base, out, dtype="bfloat16", shard_size="40KB", command="test")
    index = json.loads((out / INDEX_NAME).read_text())
    assert len(set(index["weight_map"].values())) > 2
    assert_exact(out, base, ms, torch.bfloat16)
    config = json.loads((out / "config.json").read_text())
    assert config["dtype"] == "bfloat16"
    model = AutoModelForCausalLM.from_pretrained(out, dtype=torch.bfloat16)
    assert model.model.layers[0].self_attn.q_proj.weight.dtype == torch.bfloat16


def test_a_sharded_base_gives_the_same_files_by_default(tmp_path: Path) -> None:
    """Without ``shard_size`` every tensor lands in the output file named like the base's."""
    base = save_llama(tmp_path / "base", shard="60KB")
    a = make_adapter(base, {Q.format(0): ("fa", [0, 9]), V.format(1): ("fb", [3])}, 1)
    ms = members(a)
    out = tmp_path / "out"
    result = compose_members(ms, base, out, command="test")
    assert (
        json.loads((out / INDEX_NAME).read_text())["weight_map"]
        == (json.loads((base / INDEX_NAME).read_text())["weight_map"])
    )
    shards = sorted(p.name for p in base.glob("*.safetensors"))
    assert len(shards) > 2
    assert sorted(p.name for p in out.glob("*.safetensors")) == shards
    assert {*shards, INDEX_NAME} <= set(result.files)
    assert_exact(out, base, ms)
    AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)


def test_base_shards_named_without_a_suffix_are_merged_not_copied(tmp_path: Path) -> None:
    """The output keeps the base's shard names; the side-file copy must not put the base's
    unmerged shard back over the merged one."""
    base = save_llama(tmp_path / "base", shard="60KB")
    index = json.loads((base / INDEX_NAME).read_text())
    renamed = {old: f"part-{k}" for k, old in enumerate(sorted(set(index["weight_map"].values())))}
    for old, new in renamed.items():
        (base / old).rename(base / new)
    index["weight_map"] = {t: renamed[f] for t, f in index["weight_map"].items()}
    (base / INDEX_NAME).write_text(json.dumps(index))
    ms = members(make_adapter(base, {Q.format(0): ("fa", [0, 9]), V.format(1): ("fb", [3])}, 1))
    out = tmp_path / "out"
    compose_members(ms, base, out, command="test")
    assert sorted(p.name for p in out.glob("part-*")) == sorted(renamed.values())
    assert_exact(out, base, ms)


def test_merged_model_logits_equal_dense_reference(llama: Path, tmp_path: Path) -> None:
    a = make_adapter(llama, {Q.format(0): ("fa", [0, 9]), V.format(1): ("fb", [3])}, 1)
    b = make_adapter(llama, {Q.format(1): ("fa", [5]), V.format(0): ("fb", [0, 1, 2])}, 2)
    compose_members(members(a, b), llama, tmp_path / "out", command="test")
    ref = AutoModelForCausalLM.from_pretrained(llama, dtype=torch.float32)
    with torch.no_grad():
        for adapter in (a, b):
            for name in adapter.modules:
                ref.get_submodule(name).weight += adapter.delta(name)
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "out", dtype=torch.float32)
    ids = torch.randint(0, 100, (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(merged(ids).logits, ref(ids).logits, rtol=0, atol=1e-6)


def test_conv1d_regions_are_transposed(tmp_path: Path) -> None:
    torch.manual_seed(0)
    config = tiny.gpt2("g16", n_embd=32, n_layer=2, vocab_size=50, n_positions=32)
    GPT2LMHeadModel(config).save_pretrained(tmp_path / "gpt2")
    base = tmp_path / "gpt2"
    a = make_adapter(base, {"transformer.h.0.attn.c_attn": ("fa", [1, 4])}, 1)
    b = make_adapter(base, {"transformer.h.1.mlp.c_fc": ("fb", [2, 7, 100])}, 2)
    ms = members(a, b)
    compose_members(ms, base, tmp_path / "out", command="test")
    assert_exact(tmp_path / "out", base, ms)


def test_member_of_another_base_is_refused(llama: Path, tmp_path: Path) -> None:
    a = make_adapter(llama, {Q.format(0): ("fa", [1])}, 1)
    a.base_fingerprint = "0" * 64
    with pytest.raises(FingerprintMismatchError, match="another base model"):
        compose_members(members(a), llama, tmp_path / "out", command="test")
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("damage", ["missing", "truncated"])
def test_broken_base_shard_gives_error_and_no_output(tmp_path: Path, damage: str) -> None:
    base = save_llama(tmp_path / "base", shard="60KB")
    a = make_adapter(base, {Q.format(0): ("fa", [1])}, 1)
    shard = sorted(base.glob("model-*.safetensors"))[1]
    if damage == "missing":
        shard.unlink()
    else:
        shard.write_bytes(shard.read_bytes()[:-100])
    with pytest.raises(AdapterFormatError, match=damage):
        compose_members(members(a), base, tmp_path / "out", command="test")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["base"]


def test_interrupted_compose_leaves_nothing(
    llama: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    a = make_adapter(llama, {Q.format(0): ("fa", [1])}, 1)
    calls = []
    original = ShardWriter.copy_raw

    def failing(self, name, entry, patch=None):  # type: ignore[no-untyped-def]
        calls.append(name)
        if len(calls) == 5:
            raise KeyboardInterrupt
        return original(self, name, entry, patch)

    monkeypatch.setattr(ShardWriter, "copy_raw", failing)
    with pytest.raises(KeyboardInterrupt):
        compose_members(members(a), llama, tmp_path / "out", shard_size="50KB", command="t")
    assert list(tmp_path.iterdir()) == []


def test_quantised_base_weight_is_refused(tmp_path: Path) -> None:
    base = save_llama(tmp_path / "base")
    weights = load_file(base / "model.safetensors")
    weights[f"{Q.format(0)}.weight"] = weights[f"{Q.format(0)}.weight"].to(torch.int8)
    save_file(weights, base / "model.safetensors", metadata={"format": "pt"})
    a = make_adapter(base, {Q.format(0): ("fa", [1])}, 1)
    with pytest.raises(QuantizationError, match="I8"):
        compose_members(members(a), base, tmp_path / "out", dry_run=True)


def test_dry_run_writes_nothing_and_out_is_protected(llama: Path, tmp_path: Path) -> None:
    a = make_adapter(llama, {Q.format(0): ("fa", [1])}, 1)
    result = compose_members(members(a), llama, tmp_path / "out", dry_run=True)
    assert result.dry_run and result.tensors_changed == 1 and result.total_bytes > 0
    assert list(tmp_path.iterdir()) == []
    with pytest.raises(SboraRegError, match="--dtype applies to --format merged only"):
        compose_members(members(a), llama, tmp_path / "out", "adapter", dtype="bfloat16")
    with pytest.raises(SboraRegError, match="unknown format"):
        compose_members(members(a), llama, tmp_path / "out", "gguf")
    (tmp_path / "out").mkdir()
    with pytest.raises(SboraRegError, match="already exists"):
        compose_members(members(a), llama, tmp_path / "out", command="t")
    compose_members(members(a), llama, tmp_path / "out", force=True, command="t")
    assert (tmp_path / "out" / "model.safetensors").is_file()


def test_manifest_and_model_card(llama: Path, tmp_path: Path) -> None:
    a = make_adapter(llama, {Q.format(0): ("fa", [1, 2, 3, 9])}, 1)
    b = make_adapter(llama, {Q.format(1): ("lora", [0, 1])}, 2)
    compose_members(members(a, b), llama, tmp_path / "out", command="sbora-reg compose x y")
    manifest = json.loads((tmp_path / "out" / MANIFEST_NAME).read_text())
    assert [m["name"] for m in manifest["members"]] == ["task0", "task1"]
    region = manifest["members"][0]["regions"][Q.format(0)]
    assert region["variant"] == "fa" and region["shape"] == [64, 64]
    assert parse_ranges(region["indices"]).tolist() == [1, 2, 3, 9]
    assert manifest["members"][1]["regions"][Q.format(1)]["indices"] is None
    card = (tmp_path / "out" / "README.md").read_text()
    assert card.startswith("---\nbase_model:") and "- sbora" in card
    assert "sbora-reg compose x y" in card and f"{1:064x}" in card
