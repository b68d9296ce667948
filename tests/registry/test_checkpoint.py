"""Streamed safetensors I/O: shard planning, the hand-written shard format, atomic directories."""

from __future__ import annotations

import hashlib
import json
import time
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file, save_file

from sbora_reg.errors import AdapterFormatError, SboraRegError
from sbora_reg.registry import checkpoint
from sbora_reg.registry.checkpoint import (
    INDEX_NAME,
    Backlog,
    OutSpec,
    ShardWriter,
    atomic_dir,
    open_checkpoint,
    parse_size,
    plan_output,
    plan_shards,
    shard_names,
)


def _tensors() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return {
        "a.weight": torch.randn(7, 5, generator=g),
        "b.weight": torch.randn(3, 9, generator=g).bfloat16(),
        "c.half": torch.randn(4, generator=g).half(),
        "d.ids": torch.arange(6, dtype=torch.int64).reshape(2, 3),
        "e.mask": torch.tensor([True, False, True]),
        "f.scalar": torch.tensor(2.5),
    }


def test_parse_size_units() -> None:
    assert parse_size("500MB") == 500 * 10**6
    assert parse_size("5GB") == 5 * 10**9
    assert parse_size("2GiB") == 2 * 2**30
    assert parse_size("1.5kb") == 1500
    assert parse_size("123") == 123
    for bad in ("", "five", "-3MB", "0", "3XB"):
        with pytest.raises(SboraRegError):
            parse_size(bad)


def test_plan_shards_respects_limit_and_order() -> None:
    specs = [OutSpec(f"t{i}", "F32", (n,)) for i, n in enumerate([10, 10, 30, 5, 5, 5])]
    plan = plan_shards(specs, 100)  # bytes: 40 40 120 20 20 20
    assert [s.name for shard in plan for s in shard] == [s.name for s in specs]
    assert [[s.name for s in shard] for shard in plan] == [["t0", "t1"], ["t2"], ["t3", "t4", "t5"]]
    assert shard_names(1) == ["model.safetensors"]
    assert shard_names(3)[2] == "model-00003-of-00003.safetensors"


def _split(path: Path, files: dict[str, list[str]]) -> Path:
    """A checkpoint directory with ``_tensors()`` split over ``files`` and an index."""
    tensors = _tensors()
    path.mkdir()
    for file, names in files.items():
        save_file({n: tensors[n] for n in names}, path / file, metadata={"format": "pt"})
    weight_map = {n: file for file, names in files.items() for n in names}
    index = {"metadata": {"total_size": 0}, "weight_map": weight_map}
    (path / INDEX_NAME).write_text(json.dumps(index))
    return path


def test_plan_output_keeps_the_base_layout_unless_a_size_is_given(tmp_path: Path) -> None:
    files = {"part-b.safetensors": ["a.weight", "d.ids"], "part-a.safetensors": ["b.weight"]}
    files["part-c.safetensors"] = ["c.half", "e.mask", "f.scalar"]
    ckpt = open_checkpoint(_split(tmp_path / "base", files))
    # a cast changes the sizes, not the layout
    specs = [OutSpec(t.name, "F16" if t.dtype == "F32" else t.dtype, t.shape) for t in ckpt.tensors]
    layout = {file: sorted(s.name for s in shard) for file, shard in plan_output(ckpt, specs, None)}
    assert layout == {file: sorted(names) for file, names in files.items()}
    planned = plan_output(ckpt, specs, 60)
    assert [file for file, _ in planned] == shard_names(len(planned))
    assert [s.name for _, shard in planned for s in shard] == [s.name for s in specs]
    assert max(sum(s.nbytes for s in shard) for _, shard in planned if len(shard) > 1) <= 60


def test_plan_output_of_one_file_is_model_safetensors(tmp_path: Path) -> None:
    """An index over one shard, under any name, becomes a plain ``model.safetensors``."""
    ckpt = open_checkpoint(_split(tmp_path / "base", {"weights-1.safetensors": [*_tensors()]}))
    specs = [OutSpec(t.name, t.dtype, t.shape) for t in ckpt.tensors]
    ((file, shard),) = plan_output(ckpt, specs, None)
    assert (file, shard) == ("model.safetensors", specs)


def test_shard_writer_output_is_read_by_safetensors(tmp_path: Path) -> None:
    tensors = _tensors()
    src = tmp_path / "src.safetensors"
    save_file(tensors, src)
    entries = {e.name: e for e in open_checkpoint_single(src).tensors}
    specs = [OutSpec(n, entries[n].dtype, tuple(t.shape)) for n, t in tensors.items()]
    writer = ShardWriter(tmp_path / "out.safetensors", specs, {"format": "pt"})
    for i, (name, t) in enumerate(tensors.items()):
        if i % 2:
            writer.copy_raw(name, entries[name])  # raw bytes from the source file
        else:
            writer.write_tensor(name, t)
    writer.close().result()
    back = load_file(tmp_path / "out.safetensors")
    assert back.keys() == tensors.keys()
    for name, t in tensors.items():
        assert back[name].dtype == t.dtype and torch.equal(back[name], t), name


def open_checkpoint_single(file: Path):  # type: ignore[no-untyped-def]
    folder = file.parent / "ck"
    folder.mkdir(exist_ok=True)
    (folder / "model.safetensors").write_bytes(file.read_bytes())
    ck = open_checkpoint(folder)
    return ck


@pytest.mark.parametrize("kernel_copy", [True, False])
def test_copy_raw_with_patch(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, kernel_copy: bool
) -> None:
    if not kernel_copy:
        monkeypatch.setattr("sbora_reg.registry.checkpoint._copy_file_range", None)
    tensors = _tensors()
    src = tmp_path / "src.safetensors"
    save_file(tensors, src)
    entries = {e.name: e for e in open_checkpoint_single(src).tensors}
    specs = [OutSpec(n, entries[n].dtype, tuple(t.shape)) for n, t in tensors.items()]
    writer = ShardWriter(tmp_path / "out.safetensors", specs, {})

    def double_row_1(t: torch.Tensor) -> None:  # changes the mapped output in place
        t[1] *= 2

    for name in tensors:
        writer.copy_raw(
            name, entries[name], double_row_1 if name in ("a.weight", "b.weight") else None
        )
    digest = writer.close().result()
    back = load_file(tmp_path / "out.safetensors")
    for name, t in tensors.items():
        want = t.clone()
        if name in ("a.weight", "b.weight"):
            want[1] *= 2
        assert torch.equal(back[name], want), name
    assert digest == hashlib.sha256((tmp_path / "out.safetensors").read_bytes()).hexdigest()


class _CountingBacklog(Backlog):
    """A backlog that remembers the most bytes it ever held at once."""

    def __init__(self, limit: int) -> None:
        super().__init__(limit)
        self.most = 0

    def take(self, n: int) -> None:
        super().take(n)
        self.most = max(self.most, self._pending)


def test_shards_sharing_a_backlog_hash_right_and_stay_within_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    read_back = checkpoint._hash_range

    def slow(*args: Any) -> Any:  # a hasher slower than the copies: the bound has to hold
        job = read_back(*args)
        return lambda sha: (time.sleep(0.005), job(sha))

    monkeypatch.setattr(checkpoint, "_hash_range", slow)
    tensors = _tensors()
    src = tmp_path / "src.safetensors"
    save_file(tensors, src)
    entries = {e.name: e for e in open_checkpoint_single(src).tensors}
    specs = [OutSpec(n, entries[n].dtype, tuple(t.shape)) for n, t in tensors.items()]
    limit = 64  # a.weight (140 bytes) is bigger: it waits until the backlog is empty
    backlog = _CountingBacklog(limit)
    closing = {}
    for k in range(3):  # shards finished while the next is written, as a merge writes them
        out = tmp_path / f"out{k}.safetensors"
        writer = ShardWriter(out, specs, {}, backlog)
        for name in tensors:
            writer.copy_raw(name, entries[name])
        closing[out] = writer.close()
    aborted = ShardWriter(tmp_path / "gone.safetensors", specs, {}, backlog)
    aborted.copy_raw("a.weight", entries["a.weight"])
    aborted.abort()  # a cancelled read-back gives its bytes back too
    for out, digest in closing.items():
        assert digest.result() == hashlib.sha256(out.read_bytes()).hexdigest()
        assert load_file(out).keys() == tensors.keys()
    biggest = max(e.nbytes for e in entries.values())
    assert biggest > limit and 0 < backlog.most <= biggest
    backlog.take(limit)  # everything given back: a full limit fits again at once
    assert backlog._pending == limit


def test_shard_writer_refuses_unplanned_tensor(tmp_path: Path) -> None:
    writer = ShardWriter(tmp_path / "x.safetensors", [OutSpec("a", "F32", (2,))], {})
    with pytest.raises(SboraRegError):
        writer.write_tensor("b", torch.zeros(2))
    with pytest.raises(SboraRegError):
        writer.write_tensor("a", torch.zeros(3))
    with pytest.raises(SboraRegError):
        writer.close()  # "a" was never written
    writer.abort()


def _sharded(tmp_path: Path) -> Path:
    names = list(_tensors())
    files = {"model-00001-of-00002.safetensors": names[:3]}
    files["model-00002-of-00002.safetensors"] = names[3:]
    return _split(tmp_path / "base", files)


def test_open_sharded_checkpoint(tmp_path: Path) -> None:
    ck = open_checkpoint(_sharded(tmp_path))
    assert sorted(t.name for t in ck.tensors) == sorted(_tensors())
    assert len(ck.files) == 2
    assert ck.total_size == sum(t.numel() * t.element_size() for t in _tensors().values())


def test_missing_and_truncated_shards_are_refused(tmp_path: Path) -> None:
    folder = _sharded(tmp_path)
    shard = folder / "model-00002-of-00002.safetensors"
    data = shard.read_bytes()
    shard.write_bytes(data[:-3])
    with pytest.raises(AdapterFormatError, match="truncated"):
        open_checkpoint(folder)
    shard.unlink()
    with pytest.raises(AdapterFormatError, match="missing"):
        open_checkpoint(folder)
    shard.write_bytes(b"\x00" * 4)
    with pytest.raises(AdapterFormatError):
        open_checkpoint(folder)
    with pytest.raises(AdapterFormatError, match=r"no model\.safetensors"):
        open_checkpoint(tmp_path)


def test_atomic_dir_appears_only_on_success(tmp_path: Path) -> None:
    out = tmp_path / "out"
    with pytest.raises(RuntimeError), atomic_dir(out) as tmp:
        (tmp / "half").write_text("x")
        raise RuntimeError("interrupted")
    assert list(tmp_path.iterdir()) == []
    with atomic_dir(out) as tmp:
        (tmp / "done").write_text("1")
    assert [p.name for p in tmp_path.iterdir()] == ["out"]
    with pytest.raises(SboraRegError, match="already exists"), atomic_dir(out):
        pass
    with atomic_dir(out, force=True) as tmp:
        (tmp / "new").write_text("2")
    assert sorted(p.name for p in out.iterdir()) == ["new"]
    assert [p.name for p in tmp_path.iterdir()] == ["out"]
