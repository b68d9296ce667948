"""The registry: SQLAlchemy models, the store, regions, blobs (see ``store.Registry``).

Names load on first use (PEP 562): importing a torch-free part such as ``registry.manifest``
does not import SQLAlchemy, and nothing here imports torch.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from sbora_reg._lazy import lazy_names

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


__getattr__, __dir__ = lazy_names(__name__, _WHERE)
