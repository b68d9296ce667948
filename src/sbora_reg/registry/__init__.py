"""The registry: SQLAlchemy models, the store, regions, blobs (see ``store.Registry``).

Names load on first use (PEP 562): importing a torch-free part such as ``registry.manifest``
does not import SQLAlchemy, and nothing here imports torch.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from sbora_reg.registry.records import (
        AdapterDetail,
        AdapterRecord,
        BaseModule,
        BaseRecord,
        GcResult,
        Region,
        SchemaStatus,
    )
    from sbora_reg.registry.store import Registry

_WHERE = {
    "AdapterDetail": "records",
    "AdapterRecord": "records",
    "BaseModule": "records",
    "BaseRecord": "records",
    "GcResult": "records",
    "Region": "records",
    "SchemaStatus": "records",
    "Registry": "store",
}

__all__ = [
    "AdapterDetail",
    "AdapterRecord",
    "BaseModule",
    "BaseRecord",
    "GcResult",
    "Region",
    "Registry",
    "SchemaStatus",
]


def __getattr__(name: str) -> Any:
    module = _WHERE.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f"{__name__}.{module}"), name)
    globals()[name] = value
    return value
