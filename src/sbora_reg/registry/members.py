"""Registered adapters loaded as composition members (from this machine's blobs or the Hub)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

from sbora_reg.errors import ConfigError
from sbora_reg.registry.hub import local_blob
from sbora_reg.registry.merge import Member
from sbora_reg.registry.reading import detect_format
from sbora_reg.registry.records import AdapterRecord
from sbora_reg.sbora.adapter import Adapter

if TYPE_CHECKING:
    from sbora_reg.registry.store import Registry


def load_members(registry: Registry, refs: Sequence[str]) -> list[tuple[AdapterRecord, Member]]:
    """Resolve ``name[@version]`` refs and load each adapter from its stored blob."""
    loaded: list[tuple[AdapterRecord, Member]] = []
    for ref in refs:
        record = registry.resolve(ref)
        if any(r.id == record.id for r, _ in loaded):
            raise ConfigError(f"{record.ref} is named twice: list each member once")
        blob = local_blob(registry, record)  # fetched from its Hub commit when not here
        fmt = detect_format(blob)
        adapter = Adapter.load(blob) if fmt == "sbora" else Adapter.from_peft(blob)
        # The registry checked the adapter against its base when it was added.
        adapter.base_fingerprint = adapter.base_fingerprint or record.base_fingerprint
        loaded.append((record, Member(record.name, record.version, record.sha256, adapter)))
    return loaded
