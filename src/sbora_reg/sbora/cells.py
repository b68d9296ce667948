"""Which weight cells an update may touch, in the ``(out, in)`` frame: the one cells rule.

SBoRA-FA with ``count`` columns touches every row of them (``out·count`` cells), SBoRA-FB with
``count`` rows every column of them (``count·in``), a plain LoRA every cell (``out·in``). Torch
free, so that the registry counts cells without importing torch; ``touched`` works elementwise
on numpy arrays of variant codes, shapes and counts.
"""

from __future__ import annotations

from typing import Any

import numpy as np

FA, FB, LORA = 0, 1, 2
VARIANT_CODES = {"fa": FA, "fb": FB, "lora": LORA}


def touched(code: Any, out: Any, inn: Any, count: Any) -> Any:
    """Cells touched, for variant ``code`` (FA/FB/LORA), shape ``(out, inn)`` and ``count``
    indices; scalars or numpy arrays (broadcast)."""
    return np.where(code == FA, out * count, np.where(code == FB, count * inn, out * inn))


def cells(variant: str, shape: tuple[int, int], count: int) -> int:
    """Cells one module's update touches (FA out·count, FB count·in, LoRA out·in)."""
    return int(touched(VARIANT_CODES[variant], shape[0], shape[1], count))
