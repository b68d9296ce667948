"""DDP: 2 CPU processes on gloo with per-rank batch B train the adapter of 1 process with 2B."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp
from click.testing import CliRunner

from sbora_reg import sbora
from sbora_reg.cli import main
from sbora_reg.sbora import SBoRAConfig, training

CONFIG = SBoRAConfig(variant="fa", r=4, alpha=8, target_modules=("q_proj", "v_proj", "up_proj"))
PER_RANK = 3


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _worker(rank: int, world: int, port: int, base: str, data: str, work: str) -> None:
    os.environ.update(
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
        RANK=str(rank),
        LOCAL_RANK=str(rank),
        WORLD_SIZE=str(world),
    )
    torch.set_num_threads(1)
    result = training.train_adapter(
        base, data, Path(work) / "ddp", config=CONFIG, batch_size=PER_RANK, lr=1e-2, seed=5
    )
    # Test-only: every rank writes what it holds, to compare ranks afterwards.
    result.adapter.save(Path(work) / f"rank{rank}")
    (Path(work) / f"rank{rank}.json").write_text(
        json.dumps({"losses": result.losses, "world": result.world_size, "rank": result.rank})
    )


def test_two_gloo_ranks_equal_one_process_with_double_batch(
    tmp_path: Path, tiny_lm_dir: Path
) -> None:
    # Lengths differ per example (so per-rank token counts differ) and 13 examples with a global
    # batch of 6 leave a last batch of 1: rank 1 then takes part with a zero-weight dummy.
    rows = [{"prompt": "x" * (i % 4), "answer": "y" * (1 + i % 5)} for i in range(13)]
    data = tmp_path / "d.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    mp.spawn(
        _worker,
        args=(2, _free_port(), str(tiny_lm_dir), str(data), str(tmp_path)),
        nprocs=2,
        join=True,
    )
    single = training.train_adapter(
        tiny_lm_dir,
        data,
        tmp_path / "single",
        config=CONFIG,
        batch_size=2 * PER_RANK,
        lr=1e-2,
        seed=5,
    )
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert [r["world"] for r in ranks] == [2, 2] and [r["rank"] for r in ranks] == [0, 1]
    assert len(single.losses) == 3
    for r in ranks:
        torch.testing.assert_close(torch.tensor(r["losses"]), torch.tensor(single.losses))
    rank0, rank1 = (sbora.Adapter.load(tmp_path / f"rank{r}") for r in (0, 1))
    saved = sbora.Adapter.load(tmp_path / "ddp")
    assert saved.sha256() == rank0.sha256() == rank1.sha256()  # identical on both ranks
    assert not any((tmp_path / "ddp").parent.glob(".ddp.*"))
    for name, m in single.adapter.modules.items():
        assert m.b is not None and bool(m.b.abs().sum() > 0)
        torch.testing.assert_close(
            saved.delta(name), single.adapter.delta(name), rtol=1e-4, atol=1e-6
        )


@pytest.mark.slow
def test_cli_under_torchrun_saves_and_prints_once(tmp_path: Path, tiny_lm_dir: Path) -> None:
    rows = [{"text": f"{i} {i * 7 % 10} {'z' * (i % 3)}"} for i in range(10)]
    data = tmp_path / "d.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    args = ["--data", str(data), "--base", str(tiny_lm_dir), "--rank", "4", "--lr", "1e-2",
            "--epochs", "2", "--seed", "1", "--json"]  # fmt: skip
    script = Path(sys.executable).with_name("sbora-reg")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    run = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
         str(script), "train", "--out", str(tmp_path / "ddp"), "--batch-size", "2", *args],
        capture_output=True, text=True, env=env, timeout=300, check=False,
    )  # fmt: skip
    assert run.returncode == 0, run.stderr[-2000:]
    report = json.loads(run.stdout)  # exactly one JSON document: only rank 0 prints
    assert report["world_size"] == 2 and report["steps"] == 6
    single = CliRunner().invoke(
        main, ["train", "--out", str(tmp_path / "one"), "--batch-size", "4", *args]
    )
    assert single.exit_code == 0, single.output
    torch.testing.assert_close(
        torch.tensor(report["losses"]), torch.tensor(json.loads(single.stdout)["losses"])
    )
    ddp, one = sbora.Adapter.load(tmp_path / "ddp"), sbora.Adapter.load(tmp_path / "one")
    assert ddp.indices.keys() == one.indices.keys()
    for name in one.modules:
        torch.testing.assert_close(ddp.delta(name), one.delta(name), rtol=1e-4, atol=1e-6)
