"""Named fault points for the fault-injection tests (``tests/faults``): ``SBORA_REG_FAULT``.

Code that writes something a crash could leave half done calls ``point("event")`` at the
moment worth interrupting. Unset (as always outside tests) a point costs one environment lookup.
``SBORA_REG_FAULT="EVENT[#N]:ACTION[,EVENT[#N]:ACTION...]"`` makes the N-th arrival (default the
first) of this process at ``EVENT`` do ACTION:

- ``kill``: SIGKILL this process at once (no ``finally``, no cleanup: as the OOM killer would);
- ``stall``: create the file ``$SBORA_REG_FAULT_DIR/EVENT`` and wait until it is removed, so a
  test can act while the process stands exactly there (kill it, or race another command), then
  let it go on.

Events (where each is reached):

- ``out.staged``: an output's temp folder ``OUT.tmp-<pid>-*`` exists, still empty
  (``sbora.files.atomic_dir``: compose, adapter save, train output);
- ``out.rename``: every file of the output is in its temp folder, the rename is next;
- ``out.swap``: with ``--force``, the old output moved aside, the new one not yet in place;
- ``merge.tensor``: a merged tensor was written to its shard (once per tensor);
- ``compose.loaded``: compose resolved and loaded its members, nothing written yet;
- ``compose.record``: the composed output is in place, the composition not yet recorded;
- ``db.commit``: a write transaction did its work and is about to commit (once per transaction);
- ``db.committed``: a write transaction committed, the code after it has not run;
- ``gc.remove``: gc committed and is about to delete what it detached;
- ``migrate.step``: one migration ran, inside the migrating transaction (once per revision);
- ``pull.downloaded``: pull checked every downloaded file, nothing registered yet.
"""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

ENV = "SBORA_REG_FAULT"
DIR_ENV = "SBORA_REG_FAULT_DIR"
_seen: dict[str, int] = {}


def _actions(spec: str, event: str) -> list[tuple[int, str]]:
    """The (arrival, action) pairs of ``spec`` for ``event``."""
    found = []
    for item in spec.split(","):
        where, _, action = item.strip().rpartition(":")
        name, _, nth = where.partition("#")
        if name == event:
            found.append((int(nth) if nth else 1, action))
    return found


def point(event: str) -> None:
    """Act as ``SBORA_REG_FAULT`` says when this process reaches ``event`` (see the module)."""
    spec = os.environ.get(ENV)
    if not spec:
        return
    _seen[event] = arrival = _seen.get(event, 0) + 1
    for nth, action in _actions(spec, event):
        if nth != arrival:
            continue
        if action == "kill":
            os.kill(os.getpid(), signal.SIGKILL)
        elif action == "stall":
            flag = Path(os.environ.get(DIR_ENV, ".")) / event
            flag.write_text(str(os.getpid()))
            while flag.exists():
                time.sleep(0.02)
