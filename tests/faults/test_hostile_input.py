"""Hostile input: fuzzed adapter files, NaN/inf factors, bad names, a 100 MB JSONL line, a base
whose shard index points outside it, a Hub repo whose file names climb out of the download.

Each one is refused with one ``Error:`` line (or, where the library is called directly, one
``SboraRegError``) and changes nothing in the registry.
"""

from __future__ import annotations

import json
import shutil
import struct
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors.torch import load_file, save_file
from tests.faults.conftest import World
from tests.faults.faultlib import (
    assert_one_error,
    assert_whole,
    cli,
    no_finished_output,
    run,
    snapshot,
    tables,
)
from tests.faults.test_kills import compose_args
from tests.hub_server import HubServer

from sbora_reg.errors import SboraRegError
from sbora_reg.registry import Registry

WEIGHTS = "sbora_adapter.safetensors"
FUZZ = settings(
    max_examples=60,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)


def assert_cli_error(result, *needles: str) -> None:  # type: ignore[no-untyped-def]
    """CliRunner's result of a refused command: exit 1, one ``Error:`` line on stderr."""
    assert result.exit_code == 1, result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("Error: "), result.output
    assert result.exception is None or isinstance(result.exception, SystemExit)
    for needle in needles:
        assert needle in lines[0], lines[0]


def _try_add(world: World, folder: Path, before: dict) -> None:
    """Adding ``folder`` either works with sane regions or raises one SboraRegError, no change."""
    with Registry.open(world.db) as reg:
        try:
            rec = reg.add(folder, name="fuzzed", base=str(world.base))
        except SboraRegError as exc:
            assert "\n" not in str(exc)
        else:  # a file that happens to be valid: its regions are in range and distinct
            for region in reg.regions(rec).values():
                idx = region.indices
                assert idx is None or len(set(idx.tolist())) == len(idx)
            reg.rm(rec.ref)
            reg.gc()
            assert snapshot(world.db)["list"] == before["list"]
            return
    assert snapshot(world.db) == before


@pytest.fixture
def victim(world: World) -> tuple[World, Path, bytes]:
    """A copy of adapter ``a``'s folder whose weights file the fuzzers replace."""
    folder = world.root / "victim"
    shutil.copytree(world.root / "src" / "a", folder)
    return world, folder, (folder / WEIGHTS).read_bytes()


@FUZZ
@given(data=st.binary(max_size=512))
def test_fuzzed_bytes_as_the_weights_file(victim, data: bytes) -> None:  # type: ignore[no-untyped-def]
    world, folder, _ = victim
    (folder / WEIGHTS).write_bytes(data)
    _try_add(world, folder, snapshot(world.db))


DTYPES = st.sampled_from(["F32", "F16", "BF16", "I64", "I32", "U8", "BOOL", "F8_E4M3", "X9", ""])
SIZES = st.integers(min_value=-2, max_value=2**62) | st.integers(min_value=0, max_value=64)


@st.composite
def headers(draw: st.DrawFn, names: list[str]) -> bytes:
    """A safetensors header over the real tensor names: odd dtypes, shapes and offsets (huge,
    negative, overlapping, past the end), a declared length that may lie, some data bytes."""
    header: dict = {"__metadata__": {"format": "sbora"}}
    for name in draw(st.lists(st.sampled_from(names), unique=True, min_size=1)):
        header[name] = {
            "dtype": draw(DTYPES),
            "shape": draw(st.lists(SIZES, max_size=3)),
            "data_offsets": [draw(SIZES), draw(SIZES)],
        }
    raw = json.dumps(header).encode()
    declared = draw(st.sampled_from([len(raw), len(raw) + 1, 2**63 - 1, 0]))
    return struct.pack("<Q", declared) + raw + draw(st.binary(max_size=256))


@FUZZ
@given(data=st.data())
def test_fuzzed_safetensors_header(victim, data: st.DataObject) -> None:  # type: ignore[no-untyped-def]
    world, folder, original = victim
    names = sorted(load_file(world.root / "src" / "a" / WEIGHTS))
    (folder / WEIGHTS).write_bytes(data.draw(headers(names)))
    _try_add(world, folder, snapshot(world.db))


@FUZZ
@given(data=st.data())
def test_fuzzed_index_and_factor_tensors(victim, data: st.DataObject) -> None:  # type: ignore[no-untyped-def]
    """Real file layout, hostile contents: duplicate, negative, out-of-range or float indices,
    wrong shapes, NaN and inf factors."""
    world, folder, _ = victim
    tensors = load_file(world.root / "src" / "a" / WEIGHTS)
    key = data.draw(st.sampled_from(sorted(tensors)))
    old = tensors[key]
    if key.endswith("sbora_idx"):
        values = data.draw(st.lists(st.integers(-(2**40), 2**40) | st.integers(-2, 40),
                                    min_size=0, max_size=6))  # fmt: skip
        new = torch.tensor(values, dtype=data.draw(st.sampled_from([torch.int64, torch.float32])))
        if data.draw(st.booleans()) and new.numel():
            new = new.reshape(1, -1)
    else:
        bad = data.draw(st.sampled_from([float("nan"), float("inf"), -float("inf"), 1e38]))
        shape = data.draw(st.sampled_from([tuple(old.shape), (old.shape[0],), (1, 1), (0,)]))
        new = torch.zeros(shape).fill_(bad)
    tensors[key] = new
    metadata = json.loads((folder / "sbora_config.json").read_text())
    meta = {"format": "sbora"}
    if metadata.get("base_fingerprint"):
        meta["base_fingerprint"] = metadata["base_fingerprint"]
    save_file(tensors, folder / WEIGHTS, metadata=meta)
    _try_add(world, folder, snapshot(world.db))


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_non_finite_factors_are_refused(world: World, bad: float) -> None:
    folder = world.root / "nan"
    shutil.copytree(world.root / "src" / "a", folder)
    tensors = load_file(folder / WEIGHTS)
    key = next(k for k in tensors if k.endswith("sbora_B"))
    tensors[key][0, 0] = bad
    meta = json.loads((folder / "sbora_config.json").read_text())
    fingerprint = meta["base_fingerprint"]
    save_file(
        tensors, folder / WEIGHTS, metadata={"format": "sbora", "base_fingerprint": fingerprint}
    )
    before = snapshot(world.db)
    assert_cli_error(cli(world.db, "add", str(folder), "--name", "nan"), "finite")
    assert_whole(world.db, before)


NAMES = ["a\x1b[31m", "tab\there", "new\nline", "\u0430dapter", "ａ", "a\u200bb", "nul\x00", ""]


@pytest.mark.parametrize("name", NAMES, ids=[repr(n) for n in NAMES])
def test_hostile_names_are_refused_everywhere_a_name_enters(world: World, name: str) -> None:
    before = snapshot(world.db)
    folder = str(world.root / "src" / "a")
    data = world.root / "d.jsonl"
    data.write_text('{"prompt": "1+1=", "answer": "2"}\n')
    commands = [
        ["add", folder, "--name", name],
        ["add", folder, "--name", "ok", "--task", name],
        ["pull", "acme/x", "--name", name, "--endpoint", "http://127.0.0.1:9"],
        ["train", "--base", str(world.base), "--data", str(data), "--out",
         str(world.root / "o"), "--register", name],
    ]  # fmt: skip
    if name:  # an empty tag key is a usage error (exit 2)
        commands.append(["add", folder, "--name", "ok", "--tag", f"{name}=v"])
    for args in commands:
        assert_cli_error(cli(world.db, *args))
    no_finished_output(world.root / "o")
    assert_whole(world.db, before)


@pytest.mark.parametrize("where", ["probe", "train"])
def test_a_jsonl_file_with_a_100_mb_line(world: World, tiny_lm_dir: Path, where: str) -> None:
    big = world.root / "big.jsonl"
    with open(big, "w") as fh:
        fh.write('{"prompt": "1+1=", "answer": "2"}\n')
        fh.write('{"prompt": "' + "x" * (100 * 1024 * 1024) + '", "answer": "2"}\n')
    before = snapshot(world.db)
    if where == "probe":
        done = run(world.db, "add", str(world.root / "src" / "a"), "--name", "p", "--probe",
                   str(big))  # fmt: skip
    else:
        done = run(world.db, "train", "--base", str(tiny_lm_dir), "--data", str(big), "--out",
                   str(world.root / "o"), "--steps", "1", "--register", "t")  # fmt: skip
        no_finished_output(world.root / "o")
    assert_one_error(done, "line 2")
    assert_whole(world.db, before)


@pytest.mark.parametrize("outside", ["../outside.safetensors", "/abs/outside.safetensors",
                                     "sub/../../outside.safetensors"])  # fmt: skip
def test_a_base_whose_shard_index_points_outside_it(world: World, outside: str) -> None:
    base = world.root / "base"
    shutil.copytree(world.base, base)
    index_path = base / "model.safetensors.index.json"
    index = json.loads(index_path.read_text())
    first = sorted(set(index["weight_map"].values()))[0]
    if not outside.startswith("/"):
        shutil.copy(base / first, world.root / "outside.safetensors")  # it exists, and is valid
    index["weight_map"] = {
        k: (outside if v == first else v) for k, v in index["weight_map"].items()
    }
    index_path.write_text(json.dumps(index))
    before = snapshot(world.db)
    out = world.root / "out"
    args = compose_args(world, out)
    args[args.index("--base") + 1] = str(base)
    assert_cli_error(cli(world.db, *args), "outside")
    no_finished_output(out)
    assert_whole(world.db, before)


def test_a_hub_repo_with_file_names_that_climb_out(
    world: World, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The Hub lists ``../x`` and ``/abs`` beside the adapter: pull downloads only the adapter's
    own file names, so nothing is written outside the cache, and registers it."""
    monkeypatch.setenv("HF_TOKEN", "hf_t")
    with HubServer(tmp_path / "hub", token="hf_t") as hub:
        assert cli(world.db, "push", "a", "--repo", "acme/a", "--endpoint", hub.url).exit_code == 0
        repo = hub._repos["acme/a"]
        head = repo["commits"][repo["branches"]["main"]]
        evil = {"../escape.txt": b"x", "/tmp/sbora-abs-escape.txt": b"y",
                "sub/../../escape2.txt": b"z"}  # fmt: skip
        for path, data in evil.items():
            head["files"][path] = hub._store_content(data, lfs=False)
        from huggingface_hub import HfApi

        listed_files = HfApi(endpoint=hub.url, token="hf_t").list_repo_files("acme/a")
        assert set(evil) <= set(listed_files)  # the client sees the hostile names
        other = tmp_path / "other.db"
        assert cli(other, "base", "add", str(world.base)).exit_code == 0
        pulled = run(other, "pull", "acme/a", "--name", "pulled", "--base", str(world.base),
                     "--endpoint", hub.url)  # fmt: skip
        assert pulled.returncode == 0, pulled.stderr
    assert [r[0] for r in tables(other)["adapter_names"]] == ["pulled"]
    assert not Path("/tmp/sbora-abs-escape.txt").exists()
    hf_home = Path(__import__("os").environ["HF_HOME"])
    assert not list(hf_home.parent.glob("escape*.txt")) and not list(hf_home.glob("escape*.txt"))
    assert_whole(other, None)
