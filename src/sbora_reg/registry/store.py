"""The registry: base models, adapter versions, touched regions and content-addressed blobs.

``Registry.open(url_or_path)`` opens (and creates or migrates) a SQLite file or a server database.
Adding an adapter stages and hashes its files and parses them with no transaction open, publishes
the blob with one rename, and only then records it in one short write transaction that also
checks the blob is still there (``gc`` removes blobs inside its own write transaction, so the two
never interleave). Everything returned is a plain dataclass from ``records``.
"""

from __future__ import annotations

import builtins
import logging
import os
import shutil
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from sqlalchemy import delete, insert, select, update
from sqlalchemy.orm import Session

from sbora_reg import faults, migrations
from sbora_reg.errors import (
    CorruptBlobError,
    NotFoundError,
    RegistryError,
)
from sbora_reg.registry import bases as base_rows
from sbora_reg.registry import footprints, hub_refs, indexblob
from sbora_reg.registry import models as m
from sbora_reg.registry import queries as q
from sbora_reg.registry.blobs import BlobStore, dir_size
from sbora_reg.registry.database import DEFAULT_BUSY_TIMEOUT_S, Database, locate
from sbora_reg.registry.names import (
    check_hub_id,
    check_hub_name,
    check_name,
    check_tags,
    hub_id_from_config,
    parse_ref,
)
from sbora_reg.registry.reading import (
    AdapterSummary,
    adapter_files,
    check_fits,
    detect_format,
    summarise,
)
from sbora_reg.registry.records import (
    AdapterDetail,
    AdapterRecord,
    BaseRecord,
    GcResult,
    Region,
    SchemaStatus,
)
from sbora_reg.registry.region_table import RegionTable
from sbora_reg.sbora.files import restore_swapped, stale_temps

log = logging.getLogger(__name__)

PROBE_FILE = "probe.jsonl"


class _BlobVanished(Exception):
    """The staged blob was removed by a concurrent ``gc`` before it was recorded."""


def _is_local_model(name: str) -> bool:
    return (Path(name).expanduser() / "config.json").is_file()


class Registry:
    """A registry database and its blob directory."""

    def __init__(self, db: Database, data_dir: Path) -> None:
        self.db = db
        self.data_dir = data_dir
        self.blobs = BlobStore(data_dir / "blobs")

    @classmethod
    def open(
        cls,
        url_or_path: str | os.PathLike[str] | None = None,
        *,
        data_dir: str | os.PathLike[str] | None = None,
        busy_timeout_s: float = DEFAULT_BUSY_TIMEOUT_S,
        migrate: bool = True,
    ) -> Registry:
        """Open a registry (default: ``sbora-reg.db`` in the user data directory).

        A new database is created at the newest schema and an older one upgraded; a database
        from a newer sbora-reg raises SchemaError. ``migrate=False`` only opens it.
        """
        location = locate(url_or_path, Path(data_dir) if data_dir is not None else None)
        db = Database(location, busy_timeout_s)
        try:
            if migrate:
                migrations.ensure_current(db)
        except BaseException:
            db.dispose()
            raise
        return cls(db, location.data_dir)

    def close(self) -> None:
        self.db.dispose()

    def __enter__(self) -> Registry:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @property
    def location(self) -> str:
        return self.db.location.display

    def schema(self) -> SchemaStatus:
        """The database's schema revision and the newest one this code knows."""
        return SchemaStatus(migrations.current_revision(self.db), migrations.head_revision())

    def upgrade(self) -> tuple[SchemaStatus, SchemaStatus]:
        """Upgrade the schema to the newest revision (under the lock): (before, after)."""
        before = self.schema()
        migrations.upgrade(self.db)
        return before, self.schema()

    @contextmanager
    def write(self) -> Iterator[Session]:
        """``with registry.write() as session:`` one write transaction (BEGIN IMMEDIATE)."""
        with self.db.write() as session:
            yield session

    @contextmanager
    def read(self) -> Iterator[Session]:
        with self.db.read() as session:
            yield session

    # Bases ---------------------------------------------------------------------------------

    def add_base(
        self,
        path_or_name: str | os.PathLike[str],
        revision: str | None = None,
        *,
        label: str | None = None,
        hub_id: str | None = None,
    ) -> BaseRecord:
        """Register a base model from a local transformers directory (config.json only).

        ``label`` is a short name of its own (the Hub's name grammar); ``hub_id``
        (``owner/name``) is what model cards name as ``base_model``, by default the config's
        ``_name_or_path`` when it is such an id. Registering the same directory again returns
        the existing record, with ``label``/``hub_id`` set when given (its config is not read
        again: register a changed model from another path).
        """
        from sbora_reg.sbora.fingerprint import dir_module_table, fingerprint_table

        text = str(path_or_name)
        if label is not None:
            check_hub_name(label, "base name")
        if hub_id is not None:
            check_hub_id(hub_id)
        if not _is_local_model(text):
            try:
                return self._label_base(self.get_base(text), label, hub_id)
            except NotFoundError:
                raise NotFoundError(
                    f"{text} is neither a registered base nor a local model directory with "
                    "config.json: download the model (config.json is enough) and pass its path"
                ) from None
        name = str(Path(text).expanduser().resolve())
        with self.read() as session:
            known = base_rows.by_name(session, name)
        if known is not None:
            return self._label_base(self._base_by_id(known), label, hub_id)
        hub_id = hub_id or hub_id_from_config(Path(name))
        table = dir_module_table(name)  # file I/O before the write transaction
        with self.write() as session:
            base_id = base_rows.insert_or_check(
                session, name, fingerprint_table(table), table,
                revision=revision, label=label, hub_id=hub_id,
            )  # fmt: skip
        return self._base_by_id(base_id)

    def _label_base(self, base: BaseRecord, label: str | None, hub_id: str | None) -> BaseRecord:
        """``base`` with ``label``/``hub_id`` recorded where given and different."""
        changes = {
            key: value
            for key, value in (("label", label), ("hub_id", hub_id))
            if value is not None and value != getattr(base, key)
        }
        if not changes:
            return base
        with self.write() as session:
            base_rows.set_labels(session, base.id, changes)
        return self._base_by_id(base.id)

    def get_base(self, name_or_fingerprint: str) -> BaseRecord:
        """A registered base by name (its local path), label, Hub id or shape fingerprint."""
        paths = [name_or_fingerprint]
        if _is_local_model(name_or_fingerprint):
            paths.append(str(Path(name_or_fingerprint).expanduser().resolve()))
        with self.read() as session:
            base_id = base_rows.find(session, name_or_fingerprint, paths)
        if base_id is None:
            raise NotFoundError(
                f"no base model {name_or_fingerprint!r} in the registry: register it with "
                "`sbora-reg base add PATH` (or add an adapter with --base PATH)"
            )
        return self._base_by_id(base_id)

    def bases(self) -> builtins.list[BaseRecord]:
        with self.read() as session:
            return [base_rows.record(session, i) for i in base_rows.all_ids(session)]

    def _base_by_id(self, base_id: int) -> BaseRecord:
        with self.read() as session:
            return base_rows.record(session, base_id)

    # Adding --------------------------------------------------------------------------------

    def add(
        self,
        path: str | os.PathLike[str],
        name: str | None = None,
        task: str | None = None,
        base: str | None = None,
        tags: dict[str, str] | None = None,
        metadata: dict[str, Any] | None = None,
        provenance: dict[str, Any] | None = None,
        probe: str | os.PathLike[str] | None = None,
    ) -> AdapterRecord:
        """Register the adapter directory ``path`` (native SBoRA or PEFT LoRA).

        Identical content already registered under ``name`` returns that version; new content
        under an existing name becomes its next version. ``base`` (a registered base, a local
        model directory or a fingerprint) defaults to the base the adapter names. ``probe``
        (prompt/answer JSONL) is checked before anything is stored and kept as the version's
        probe set (``set_probe``).
        """
        if probe is not None:
            _check_probe(probe)
        src = Path(path).expanduser()
        name = check_name(name if name is not None else src.resolve().name)
        if task is not None:
            check_name(task, "task")
        tags = check_tags(tags)
        fmt = detect_format(src)
        files = adapter_files(src, fmt)
        provenance = provenance or {"source": "local", "path": str(src.resolve())}
        for _attempt in range(3):
            tmp, sha, size = self.blobs.stage(files)
            try:
                summary = summarise(tmp, fmt)
                base_rec = self._base_for(summary, base, src)
                check_fits(summary, base_rec)
                self.blobs.publish(tmp, sha)
            finally:
                shutil.rmtree(tmp, ignore_errors=True)
            try:
                record = self.register(
                    summary,
                    sha,
                    size,
                    name=name,
                    base=base_rec,
                    task=task,
                    tags=tags,
                    metadata=metadata,
                    provenance=provenance,
                )
                return record if probe is None else self._store_probe(record, probe)
            except _BlobVanished:
                log.info("blob %s was collected while adding %s; writing it again", sha, name)
        raise RegistryError(f"could not add {src}: a concurrent gc kept removing its blob; retry")

    def _base_for(self, summary: AdapterSummary, base: str | None, src: Path) -> BaseRecord:
        if base is not None:
            return self.add_base(base) if _is_local_model(base) else self.get_base(base)
        if summary.base_fingerprint:
            try:
                return self.get_base(summary.base_fingerprint)
            except NotFoundError:
                pass
        if summary.base_model:
            try:
                return self.add_base(summary.base_model)
            except NotFoundError:
                pass
        raise NotFoundError(
            f"cannot tell which registered base model {src} is for: pass --base PATH "
            "(a local model directory with config.json)"
        )

    def register(
        self,
        summary: AdapterSummary,
        sha256: str,
        size: int,
        *,
        name: str,
        base: BaseRecord,
        task: str | None = None,
        tags: dict[str, str] | None = None,
        metadata: dict[str, Any] | None = None,
        provenance: dict[str, Any] | None = None,
    ) -> AdapterRecord:
        """Record an adapter whose files are already stored as blob ``sha256``.

        ``add`` calls this after staging; benchmarks call it directly to skip file hashing.
        """
        name = check_name(name)
        tags = check_tags(tags)
        regions = [
            _region_row(base.modules[mod_name].id, mod)
            for mod_name, mod in sorted(summary.modules.items())
        ]
        with self.write() as session:
            existing = session.scalar(
                select(m.Adapter.id).where(m.Adapter.name == name, m.Adapter.sha256 == sha256)
            )
            if existing is not None:
                adapter_id = existing
            else:
                if not self.blobs.path(sha256).is_dir():
                    raise _BlobVanished(sha256)
                adapter_id = self._insert(
                    session,
                    summary,
                    sha256,
                    size,
                    name,
                    base,
                    task,
                    tags,
                    {**summary.metadata, **(metadata or {})},
                    provenance or {},
                    regions,
                )
        return self._records(q.adapter_select().where(m.Adapter.id == adapter_id))[0]

    def _insert(
        self,
        session: Session,
        summary: AdapterSummary,
        sha256: str,
        size: int,
        name: str,
        base: BaseRecord,
        task: str | None,
        tags: dict[str, str],
        metadata: dict[str, Any],
        provenance: dict[str, Any],
        regions: list[dict[str, Any]],
    ) -> int:
        summary_indices = {
            base.modules[name].id: mod.indices for name, mod in summary.modules.items()
        }
        if session.get(m.Blob, sha256) is None:
            session.add(m.Blob(sha256=sha256, size=size))
        last = session.scalar(select(m.AdapterName.last_version).where(m.AdapterName.name == name))
        version = (last or 0) + 1
        if last is None:
            session.add(m.AdapterName(name=name, last_version=version))
        else:
            session.execute(
                update(m.AdapterName).where(m.AdapterName.name == name).values(last_version=version)
            )
        session.flush()  # the blob and name rows must exist before the adapter refers to them
        row = m.Adapter(
            name=name,
            version=version,
            base_id=base.id,
            task=task,
            format=summary.format,
            variant=summary.variant,
            rank=summary.rank,
            alpha=summary.alpha,
            target_modules=list(summary.target_modules),
            sha256=sha256,
            size=size,
            meta=metadata,
            provenance=provenance,
        )
        session.add(row)
        session.flush()
        conn = session.connection()  # Core executemany: no ORM bookkeeping per region
        if tags:
            conn.execute(
                insert(m.Base.metadata.tables["tags"]),
                [{"adapter_id": row.id, "key": k, "value": v} for k, v in tags.items()],
            )
        conn.execute(
            insert(m.Base.metadata.tables["regions"]),
            [{**r, "adapter_id": row.id} for r in regions],
        )
        triples = [(r["module_id"], r["variant"], summary_indices[r["module_id"]]) for r in regions]
        # The packed copy that bulk overlap reads, in the same transaction as the regions.
        conn.execute(
            insert(m.Base.metadata.tables["footprints"]),
            [{**footprints.encode(triples), "adapter_id": row.id}],
        )
        q.consume_matching_reservation(session, base.id, row.id, triples)
        return row.id

    # Reading -------------------------------------------------------------------------------

    def resolve(self, ref: str) -> AdapterRecord:
        """``"name"`` (latest version) or ``"name@3"`` -> its record; NotFoundError if absent."""
        name, version = parse_ref(ref)
        query = q.adapter_select().where(m.Adapter.name == name)
        query = (
            query.order_by(m.Adapter.version.desc()).limit(1)
            if version is None
            else query.where(m.Adapter.version == version)
        )
        found = self._records(query)
        if found:
            return found[0]
        versions = [r.version for r in self.list_versions(name)]
        if not versions:
            raise NotFoundError(f"no adapter named {name!r}: see `sbora-reg list`")
        raise NotFoundError(
            f"{name!r} has no version {version} (versions: {', '.join(map(str, versions))})"
        )

    def list_versions(self, name: str) -> builtins.list[AdapterRecord]:
        return self._records(
            q.adapter_select().where(m.Adapter.name == name).order_by(m.Adapter.version)
        )

    def list(
        self,
        base: str | None = None,
        task: str | None = None,
        tags: dict[str, str] | None = None,
    ) -> builtins.list[AdapterRecord]:
        """Every adapter version, optionally filtered by base, task and tags (all must match)."""
        query = q.adapter_select()
        if base is not None:
            query = query.where(m.Adapter.base_id == self.get_base(base).id)
        if task is not None:
            query = query.where(m.Adapter.task == task)
        for key, value in (tags or {}).items():
            query = query.where(
                m.Adapter.id.in_(
                    select(m.Tag.adapter_id).where(m.Tag.key == key, m.Tag.value == value)
                )
            )
        return self._records(query.order_by(m.Adapter.name, m.Adapter.version))

    def adapters_on_base(self, base: str | BaseRecord) -> builtins.list[AdapterRecord]:
        base_rec = base if isinstance(base, BaseRecord) else self.get_base(base)
        return self._records(
            q.adapter_select()
            .where(m.Adapter.base_id == base_rec.id)
            .order_by(m.Adapter.name, m.Adapter.version)
        )

    # Probe sets ----------------------------------------------------------------------------

    def set_probe(self, ref: str, path: str | os.PathLike[str]) -> AdapterRecord:
        """Store ``path`` (JSONL prompt/answer lines) as the probe set of version ``ref``.

        The file is checked first (a bad one changes nothing), stored as a blob holding
        ``probe.jsonl`` (content-addressed, shared by versions with the same set) and named on
        the version; a later call replaces it.
        """
        record = self.resolve(ref)
        _check_probe(path)
        return self._store_probe(record, path)

    def _store_probe(self, record: AdapterRecord, path: str | os.PathLike[str]) -> AdapterRecord:
        import tempfile

        with tempfile.TemporaryDirectory() as tmp_dir:
            copy = Path(tmp_dir) / PROBE_FILE
            shutil.copyfile(path, copy)
            staged, sha256, size = self.blobs.stage([copy])
        with self.write() as session:  # gc detaches blobs under this lock too
            self.blobs.publish(staged, sha256)
            if session.get(m.Blob, sha256) is None:
                session.add(m.Blob(sha256=sha256, size=size))
            session.execute(
                update(m.Adapter).where(m.Adapter.id == record.id).values(probe_sha256=sha256)
            )
        return self.by_id(record.id)

    def probe_path(self, record: AdapterRecord) -> Path | None:
        """The stored probe file of ``record`` (None when it has none)."""
        if record.probe_sha256 is None:
            return None
        return self.verified_blob(record.probe_sha256, f"{record.ref}'s probe set") / PROBE_FILE

    def by_id(self, adapter_id: int) -> AdapterRecord:
        """The adapter version with database id ``adapter_id``."""
        found = self._records(q.adapter_select().where(m.Adapter.id == adapter_id))
        if not found:
            raise NotFoundError(f"no adapter version with id {adapter_id}")
        return found[0]

    def show(self, ref: str) -> AdapterDetail:
        record = self.resolve(ref)
        with self.read() as session:
            hub = hub_refs.listed(session, adapter_id=record.id)
        return AdapterDetail(record, self.regions(record), hub)

    def regions(self, adapter: str | AdapterRecord) -> dict[str, Region]:
        """Per module, the region one adapter touches."""
        record = adapter if isinstance(adapter, AdapterRecord) else self.resolve(adapter)
        found = self._region_rows(m.Region.adapter_id == record.id)
        return found.get(record.id, {})

    def regions_on_base(
        self, base: str | BaseRecord, modules: Iterable[str] | None = None
    ) -> dict[str, dict[str, Region]]:
        """Every region of every adapter on ``base`` in two queries: ref -> module -> Region."""
        base_rec = base if isinstance(base, BaseRecord) else self.get_base(base)
        refs = self._refs_on_base(base_rec)
        cond = m.Adapter.base_id == base_rec.id
        if modules is not None:
            wanted = [base_rec.modules[n].id for n in modules if n in base_rec.modules]
            cond = cond & m.Region.module_id.in_(wanted)
        by_id = self._region_rows(cond, join_adapters=True)
        return {refs[i]: regs for i, regs in by_id.items()}

    def _region_rows(self, cond: Any, join_adapters: bool = False) -> dict[int, dict[str, Region]]:
        with self.db.translate_errors(), self.db.engine.connect() as conn:
            return q.packed_to_regions(q.fetch_packed(conn, cond, join_adapters))

    def region_table(self, base: str | BaseRecord) -> RegionTable:
        """All regions on ``base`` packed as an ``overlap.RegionTable`` (names are refs)."""
        base_rec = base if isinstance(base, BaseRecord) else self.get_base(base)
        with self.db.translate_errors(), self.db.engine.connect() as conn:
            return q.fetch_region_table(conn, base_rec.id, base_rec.fingerprint)

    def footprint_keys(self, base: BaseRecord) -> tuple[dict[int, str], dict[int, str]]:
        """Adapter id -> ref and adapter id -> content sha256 on ``base`` (``q.fetch_keys``)."""
        with self.db.translate_errors(), self.db.engine.connect() as conn:
            return q.fetch_keys(conn, base.id)

    def footprint_rows(
        self, base: BaseRecord, ids: Sequence[int] | None = None
    ) -> builtins.list[Any]:
        """The packed footprint rows of every adapter on ``base``, or of ``ids`` among them
        (``queries.fetch_footprint_rows``)."""
        with self.db.translate_errors(), self.db.engine.connect() as conn:
            return q.fetch_footprint_rows(conn, base.id, ids)

    def index_path(self, base: BaseRecord) -> Path:
        """Where ``postings`` keeps the overlap index of ``base`` (a cache: safe to delete)."""
        return self.data_dir / "cache" / f"overlap-base{base.id}.safetensors"

    def _refs_on_base(self, base: BaseRecord) -> dict[int, str]:
        with self.db.translate_errors(), self.db.engine.connect() as conn:
            return q.fetch_refs(conn, base.id)

    def blob_path(self, sha256: str) -> Path:
        """The directory holding an adapter's stored files."""
        path = self.blobs.path(sha256)
        if not path.is_dir():
            raise NotFoundError(f"blob {sha256} is not in {self.blobs.root}")
        return path

    def verified_blob(self, sha256: str, what: str) -> Path:
        """``blob_path``, after re-hashing its files: ``CorruptBlobError`` naming ``what`` when
        they changed on disk since they were stored (nothing reads a corrupt blob's bytes)."""
        path = self.blob_path(sha256)
        try:
            found = self.blobs.content_sha256(sha256)
        except FileNotFoundError:  # collected by a concurrent gc between the check and the read
            raise NotFoundError(
                f"the stored files of {what} were removed while being read (a concurrent "
                "`sbora-reg gc` after `rm`?): add it again"
            ) from None
        if found != sha256:
            raise CorruptBlobError(
                f"the stored files of {what} ({path}) changed on disk after they were stored: "
                "they no longer hash to their sha256; `sbora-reg verify --all` lists every "
                "damaged blob; remove the version (`sbora-reg rm`) and add it again"
            )
        return path

    def verify(self, refs: Sequence[str] | None = None) -> builtins.list[dict[str, Any]]:
        """Re-hash the stored files of ``refs`` (every version when None), adapters and probe
        sets: one row per blob with ``ok`` and, when not, ``problem``."""
        records = self.list() if refs is None else [self.resolve(r) for r in refs]
        rows = []
        for record in records:
            blobs = [("adapter", record.sha256)]
            if record.probe_sha256:
                blobs.append(("probe set", record.probe_sha256))
            for kind, sha in blobs:
                if not self.blobs.path(sha).is_dir():
                    problem: str | None = "missing from the store"
                else:
                    found = self.blobs.content_sha256(sha)
                    problem = None if found == sha else f"files hash to {found[:12]}"
                rows.append({"ref": record.ref, "kind": kind, "sha256": sha,
                             "ok": problem is None, "problem": problem})  # fmt: skip
        return rows

    def _records(self, query: Any) -> builtins.list[AdapterRecord]:
        with self.db.translate_errors(), self.db.engine.connect() as conn:
            return q.fetch_records(conn, query)

    # Removing ------------------------------------------------------------------------------

    def rm(self, ref: str) -> builtins.list[AdapterRecord]:
        """Remove ``name@version``, or every version of ``name``; blobs stay until ``gc``."""
        name, version = parse_ref(ref)
        targets = [self.resolve(ref)] if version is not None else self.list_versions(name)
        if not targets:
            raise NotFoundError(f"no adapter named {name!r}: see `sbora-reg list`")
        with self.write() as session:
            session.execute(delete(m.Adapter).where(m.Adapter.id.in_([t.id for t in targets])))
        return targets

    def gc(self) -> GcResult:
        """Delete blobs no adapter references, staging dirs left by killed processes, and the
        temp folders killed composes left beside every recorded output (a live one's stay)."""
        detached: builtins.list[tuple[str, Path]] = []
        with self.write() as session:
            referenced = set(session.scalars(select(m.Adapter.sha256).distinct()))
            referenced |= set(
                session.scalars(
                    select(m.Adapter.probe_sha256).where(m.Adapter.probe_sha256.is_not(None))
                )
            )
            recorded = set(session.scalars(select(m.Blob.sha256)))
            doomed = (recorded | set(self.blobs.stored())) - referenced
            for sha in sorted(doomed):
                moved = self.blobs.detach(sha)
                if moved is not None:
                    detached.append((sha, moved))
            if doomed & recorded:
                session.execute(delete(m.Blob).where(m.Blob.sha256.in_(doomed & recorded)))
        faults.point("gc.remove")
        freed = 0
        for _sha, path in detached:
            freed += dir_size(path)
            shutil.rmtree(path, ignore_errors=True)
        stale = self.blobs.stale_temps()
        with self.read() as session:  # what killed composes left beside recorded outputs
            outputs = set(session.scalars(select(m.Composition.output_path).distinct()))
        for out in sorted(o for o in outputs if o):
            restore_swapped(Path(out))  # an output a killed --force compose had moved aside
            stale += stale_temps(Path(out).parent, Path(out).name)
        for path in stale:
            freed += dir_size(path)
            shutil.rmtree(path, ignore_errors=True)
        return GcResult(sorted(doomed), freed, len(stale))


def _check_probe(path: str | os.PathLike[str]) -> None:
    """``DataError`` for a missing, empty or malformed probe file."""
    from sbora_reg.sbora.training import load_examples

    load_examples(path)


def _region_row(module_id: int, mod: Any) -> dict[str, Any]:
    if mod.variant == "lora" or mod.indices is None:
        return {"module_id": module_id, "variant": "lora", "count": 0, "indices": None}
    return {
        "module_id": module_id,
        "variant": mod.variant,
        "count": int(mod.indices.size),
        "indices": indexblob.encode(mod.indices),
    }


__all__: Sequence[str] = ["Registry"]
