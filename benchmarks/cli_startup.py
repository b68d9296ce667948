"""Start-up of the registry's read commands, as whole processes, against Python's own floor.

    python benchmarks/cli_startup.py [--rounds 7]

Builds a small registry (two adapters on a tiny base) in a temporary directory, then times, in
interleaved rounds, each command as a fresh process next to three anchors run the same way:
``python -c pass`` (the interpreter), ``python -c "import sqlalchemy.orm"`` (the database layer
every registry command needs) and ``python -c "import torch"`` (what every command paid before).
Prints the median wall time of each and its ratio to the torch import.
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # the suite's helpers: tests.registry.registry_factory


def _registry(tmp: Path) -> str:
    from tests.registry.registry_factory import make_adapter, make_base

    from sbora_reg.registry import Registry

    base = make_base(tmp / "base")
    db = str(tmp / "reg.db")
    with Registry.open(db) as reg:
        for name, variant, seed in (("a", "fa", 1), ("b", "fb", 2)):
            make_adapter(tmp / name, base, variant, seed=seed)
            reg.add(tmp / name, name=name, base=str(base))
    return db


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=7)
    args = parser.parse_args()
    py = sys.executable
    cli = [py, "-m", "sbora_reg.cli"]
    with tempfile.TemporaryDirectory() as tmp:
        db = _registry(Path(tmp))
        runs = {
            "python -c pass": [py, "-c", "pass"],
            "python -c 'import sqlalchemy.orm'": [py, "-c", "import sqlalchemy.orm"],
            "python -c 'import torch'": [py, "-c", "import torch"],
            "sbora-reg --help": [*cli, "--help"],
            "sbora-reg list": [*cli, "--db", db, "list"],
            "sbora-reg show a": [*cli, "--db", db, "show", "a"],
            "sbora-reg overlap a b": [*cli, "--db", db, "overlap", "a", "b"],
            "sbora-reg db current": [*cli, "--db", db, "db", "current"],
        }
        times: dict[str, list[float]] = {name: [] for name in runs}
        for _ in range(args.rounds):
            for name, command in runs.items():  # interleaved: load drifts hit all alike
                start = time.perf_counter()
                subprocess.run(command, check=True, capture_output=True)
                times[name].append(time.perf_counter() - start)
    torch_s = statistics.median(times["python -c 'import torch'"])
    print(f"{'command':40} {'median':>8} {'x import torch':>15}")
    for name, values in times.items():
        med = statistics.median(values)
        print(f"{name:40} {med:7.3f}s {med / torch_s:14.2f}")


if __name__ == "__main__":
    main()
