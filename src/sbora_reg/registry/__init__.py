"""The registry: SQLAlchemy models, the store, regions, blobs (see ``store.Registry``)."""

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
