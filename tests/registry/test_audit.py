"""Audit: usage arithmetic against dense masks, and the checkpoint diff finding planted changes."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file
from tests import tiny
from transformers import GPT2LMHeadModel, LlamaForCausalLM

from sbora_reg import sbora
from sbora_reg.errors import AdapterFormatError
from sbora_reg.registry.audit import audit_checkpoint, audit_merged
from sbora_reg.registry.audit_plot import plot_usage, render_usage
from sbora_reg.registry.compose import compose
from sbora_reg.registry.manifest import MANIFEST_NAME, read_manifest
from sbora_reg.registry.overlap import Region
from sbora_reg.registry.ranges import format_ranges
from sbora_reg.registry.store import Registry
from sbora_reg.registry.usage import ModuleUsage, usage, usage_from_regions


def _dense(regions: list[Region], shape: tuple[int, int]) -> np.ndarray:
    m = np.zeros(shape, dtype=bool)
    for r in regions:
        if r.variant == "fa":
            m[:, r.indices] = True
        elif r.variant == "fb":
            m[r.indices, :] = True
        else:
            m[:] = True
    return m


def _random_region(rng: np.random.Generator, shape: tuple[int, int]) -> Region:
    variant = str(rng.choice(["fa", "fb", "lora"], p=[0.45, 0.45, 0.1]))
    dim = shape[1] if variant == "fa" else shape[0]
    idx = np.sort(rng.choice(dim, size=int(rng.integers(1, dim)), replace=False))
    return Region(variant, shape, idx if variant != "lora" else np.zeros(0, np.int64))


def test_module_usage_cells_and_shared_match_dense_masks() -> None:
    rng = np.random.default_rng(0)
    shape = (7, 11)
    for _ in range(200):
        ra = [_random_region(rng, shape) for _ in range(int(rng.integers(1, 4)))]
        rb = [_random_region(rng, shape) for _ in range(int(rng.integers(1, 4)))]
        ua, ub = ModuleUsage(shape), ModuleUsage(shape)
        for r in ra:
            ua = ua.add(r)
        for r in rb:
            ub = ub.add(r)
        da, db = _dense(ra, shape), _dense(rb, shape)
        assert ua.cells == int(da.sum())
        np.testing.assert_array_equal(ua.mask(), da)
        assert ua.shared(ub) == ub.shared(ua) == int((da & db).sum())


def test_usage_groups_share_and_overlaps() -> None:
    shapes = {"l.0.q": (8, 6), "l.0.v": (4, 6), "l.1.q": (8, 6), "emb": (10, 6)}
    a = {
        "l.0.q": Region("fa", (8, 6), np.array([0, 1])),
        "l.1.q": Region("fb", (8, 6), np.array([3])),
    }
    b = {"l.0.q": Region("fb", (8, 6), np.array([2, 5]))}
    c = {"l.0.v": Region("lora", (4, 6), np.arange(4))}
    report = usage_from_regions(
        "base", "fp", shapes, {"t1": {"a@1": a, "b@1": b}, "t2": {"c@1": c}}
    )
    total = 8 * 6 * 2 + 4 * 6 + 10 * 6
    assert report.total_weights == total
    t1, t2 = report.groups
    expected = int(_dense(list(a.values())[:1] + [b["l.0.q"]], (8, 6)).sum()) + 6
    assert t1.cells == expected and t1.share == pytest.approx(expected / total)
    assert t1.modules["l.0.q"].to_json()["cols"] == "0-1"
    assert t1.modules["l.0.q"].to_json()["rows"] == "2,5"
    assert t2.cells == 24 and report.overlaps == {}
    assert report.cells == t1.cells + t2.cells
    data = json.loads(json.dumps(report.to_json()))
    assert [g["name"] for g in data["groups"]] == ["t1", "t2"]
    both = usage_from_regions("base", "fp", shapes, {"x": {"a@1": a}, "y": {"b@1": b}})
    assert both.overlaps == {("x", "y"): {"l.0.q": 2 * 2}}  # FA cols x FB rows


def test_picture_marks_overlaps_red_and_draws_each_task(tmp_path: Path) -> None:
    shapes = {f"model.layers.{i}.self_attn.{k}": (32, 32) for i in range(3) for k in ("q", "v")}
    a = {n: Region("fa", s, np.arange(0, 8)) for n, s in shapes.items() if n.endswith("q")}
    b = {n: Region("fa", s, np.arange(16, 24)) for n, s in shapes.items()}
    report = usage_from_regions("base", "fp", shapes, {"math": {"a@1": a}, "code": {"b@1": b}})
    image, layers, kinds = render_usage(report, px=32)
    red = np.all(np.isclose(image, [0.86, 0.08, 0.08]), axis=-1)
    assert layers == ["0", "1", "2"] and kinds == ["self_attn.q", "self_attn.v"]
    assert not red.any()  # disjoint columns: nothing shared
    c = {n: Region("fb", s, np.array([4])) for n, s in shapes.items() if n.endswith("q")}
    report = usage_from_regions(
        "base", "fp", shapes, {"math": {"a@1": a}, "code": {"b@1": b}, "x": {"c@1": c}}
    )
    image, _, _ = render_usage(report, px=32)
    red = np.all(np.isclose(image, [0.86, 0.08, 0.08]), axis=-1)
    # FB row 4 crosses 16 FA columns in each of 3 q_proj thumbnails: 48 red pixels, no more.
    assert int(red.sum()) == 3 * 16
    path = plot_usage(report, tmp_path / "audit.png")
    import matplotlib.image as mpimg

    png = mpimg.imread(path)
    assert png.shape[0] > 200 and png.shape[1] > 300
    colours = {tuple(np.round(px[:3], 2)) for px in png.reshape(-1, png.shape[-1])}
    assert len(colours) > 10


# --------------------------------------------------------------------------- checkpoints


def _llama_dir(path: Path, shard: str | None = None) -> Path:
    torch.manual_seed(0)
    config = tiny.llama("l32")
    model = LlamaForCausalLM(config)
    kwargs = {"max_shard_size": shard} if shard else {}
    model.save_pretrained(path, **kwargs)
    return path


def _adapter(base: Path, out: Path, variant: str, idx: list[int], targets: tuple[str, ...]):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(base)
    config = sbora.SBoRAConfig(variant=variant, r=len(idx), alpha=4, target_modules=targets)
    names = [n for n, _ in model.named_modules() if config.matches(n)]
    sbora.inject(model, config, indices={n: idx for n in names})
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.normal_()
    adapter = sbora.extract(model)
    adapter.save(out)
    return out


@pytest.fixture(scope="module")
def merged(tmp_path_factory: pytest.TempPathFactory) -> dict:
    root = tmp_path_factory.mktemp("audit")
    base = _llama_dir(root / "base", shard="20KB")  # sharded with an index file
    assert (base / "model.safetensors.index.json").is_file()
    reg = Registry.open(root / "reg.db")
    a = reg.add(
        _adapter(base, root / "a", "fa", [1, 5, 9], ("q_proj",)),
        name="a",
        task="math",
        base=str(base),
    )
    b = reg.add(
        _adapter(base, root / "b", "fb", [0, 7], ("v_proj", "down_proj")),
        name="b",
        task="code",
        base=str(base),
    )
    result = compose(reg, [a.ref, b.ref], base, root / "merged", "merged")
    reg.close()
    return {"root": root, "base": base, "db": root / "reg.db", "out": Path(result.out)}


def _copy(src: Path, dst: Path) -> Path:
    import shutil

    shutil.copytree(src, dst)
    return dst


def _plant(ckpt: Path, tensor: str, index: tuple[int, ...]) -> None:
    """Change one weight of ``tensor`` in whichever shard holds it."""
    for file in ckpt.glob("*.safetensors"):
        tensors = load_file(file)
        if tensor in tensors:
            tensors[tensor][index] += 1.0
            save_file(tensors, file, metadata={"format": "pt"})
            return
    raise AssertionError(tensor)


def test_merged_checkpoint_is_explained_by_its_manifest(merged: dict) -> None:
    declared = read_manifest(merged["out"])
    assert declared is not None and "model.layers.0.self_attn.q_proj" in declared
    result = audit_checkpoint(merged["out"], merged["base"])
    assert result.clean and result.unexplained == 0
    # Every declared cell actually changed (random nonzero factors): 2 layers of
    # q_proj (32 x 3 columns), v_proj (2 rows x 32), down_proj (2 rows x 48).
    assert result.changed == result.explained == 2 * (32 * 3 + 2 * 32 + 2 * 48)
    with Registry.open(merged["db"]) as reg:
        both = audit_merged(merged["out"], merged["base"], reg, "both")
        from_registry = audit_merged(merged["out"], merged["base"], reg, "registry")
    assert both.clean and from_registry.clean and len(both.sources) == 2


def test_planted_changes_are_found(merged: dict, tmp_path: Path) -> None:
    bad = _copy(merged["out"], tmp_path / "bad")
    _plant(bad, "model.layers.1.self_attn.q_proj.weight", (4, 2))  # column 2 is not declared
    _plant(bad, "model.layers.0.self_attn.q_proj.weight", (3, 5))  # column 5 is declared
    _plant(bad, "model.layers.0.input_layernorm.weight", (7,))  # no region covers norms
    result = audit_checkpoint(bad, merged["base"])
    assert not result.clean and result.unexplained == 2
    found = {f.tensor: f for f in result.findings}
    assert set(found) == {
        "model.layers.1.self_attn.q_proj.weight",
        "model.layers.0.input_layernorm.weight",
    }
    q = found["model.layers.1.self_attn.q_proj.weight"]
    assert (q.rows, q.cols, q.unexplained) == ("4", "2", 1)
    assert q.changed == 32 * 3 + 1
    assert found["model.layers.0.input_layernorm.weight"].rows == "7"


def test_missing_manifest_and_reshaped_tensors(merged: dict, tmp_path: Path) -> None:
    plain = _copy(merged["out"], tmp_path / "plain")
    (plain / MANIFEST_NAME).unlink()
    with pytest.raises(AdapterFormatError, match="sbora_manifest.json"):
        audit_checkpoint(plain, merged["base"])
    empty = audit_checkpoint(plain, merged["base"], declared={})
    assert empty.unexplained == empty.changed > 0


def test_conv1d_regions_are_transposed(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = GPT2LMHeadModel(tiny.gpt2("g16", vocab_size=30))
    base = tmp_path / "base"
    model.save_pretrained(base)
    config = sbora.SBoRAConfig(variant="fa", r=2, alpha=2, target_modules=("c_attn",))
    name = "transformer.h.0.attn.c_attn"
    sbora.inject(model, config, indices={name: [3, 11]})
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.normal_()
    adapter = sbora.extract(model)
    sbora.merge(model)
    merged = tmp_path / "merged"
    sbora.unload(model).save_pretrained(merged)
    manifest = {
        "format": "sbora-manifest",
        "members": [
            {
                "name": "g",
                "version": 1,
                "regions": {
                    name: {"variant": "fa", "kind": "conv1d", "shape": [48, 16], "indices": "3,11"}
                },
            }
        ],
    }
    (merged / MANIFEST_NAME).write_text(json.dumps(manifest))
    result = audit_checkpoint(merged, base)
    assert adapter.modules[name].kind == "conv1d"
    assert result.clean and result.changed == 2 * 48  # stored rows 3 and 11 of (16, 48)
    _plant(merged, f"{name}.weight", (3, 0))  # inside stored row 3: declared
    _plant(merged, f"{name}.weight", (4, 3))  # stored row 4 = input column 4: not declared
    result = audit_checkpoint(merged, base)
    assert [(f.tensor, f.rows, f.cols) for f in result.findings] == [(f"{name}.weight", "4", "3")]


def test_registry_usage_groups_by_task(merged: dict) -> None:
    with Registry.open(merged["db"]) as reg:
        report = usage(reg, str(merged["base"]))
        by_adapter = usage(reg, str(merged["base"]), by="adapter", adapters=["a"])
    assert [g.name for g in report.groups] == ["code", "math"]
    math = report.groups[1]
    assert math.modules["model.layers.0.self_attn.q_proj"].to_json()["cols"] == format_ranges(
        [1, 5, 9]
    )
    assert math.cells == 2 * 32 * 3 and report.overlaps == {}
    assert [g.name for g in by_adapter.groups] == ["a@1"]
