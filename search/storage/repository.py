"""Records in, records out: the only code that touches hwprune's ORM rows."""

from __future__ import annotations

import datetime as dt
import json
from contextlib import AbstractContextManager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sqlalchemy import Engine, create_engine, event, func, select
from sqlalchemy.engine import make_url
from sqlalchemy.exc import ArgumentError, IntegrityError, SQLAlchemyError
from sqlalchemy.orm import Session, sessionmaker

import search.storage.cache as cache  # the submodule itself: no import of the package from inside it
from latency_models import JobState, MeasurementKey, MeasurementResult
from latency_models.wire import BatchSpec
from search.config import DEFAULT_DB, SearchConfig, artifacts_url
from search.errors import ConfigError, SearchNotFoundError, StorageError
from search.storage.artifacts import ArtifactStore
from search.storage.migrate import _safe, ensure_schema
from search.storage.models import ArtifactRow, JobRow, MeasurementRow, SearchRow
from search.storage.queue import LEASED, QUEUED, JobQueue
from search.storage.record import BaseFigures
from search.storage.session import core_transaction, transaction


@dataclass(frozen=True, slots=True)
class SearchRecord:
    """A search's stored definition: its config, fingerprints and base-model figures."""

    name: str
    study_name: str
    config: SearchConfig
    base_fingerprint: str
    space_fingerprint: str
    space: dict[str, Any]
    base: BaseFigures
    versions: dict[str, str]
    created_at: dt.datetime


POOL_SIZE = 16


def _sqlite_pragmas(connection: Any, _record: Any) -> None:
    # WAL lets readers (searches, the hub) proceed while one writer commits, and NORMAL
    # synchronisation skips an fsync per commit (still crash-safe in WAL mode): the job queue
    # commits twice per round trip.
    cursor = connection.cursor()
    cursor.execute("PRAGMA journal_mode=WAL")
    cursor.execute("PRAGMA synchronous=NORMAL")
    cursor.close()


SQLITE_HEADER = b"SQLite format 3\x00"


def check_database_url(url: str) -> None:
    """Refuse a ``--db`` that can never work before anything is stored: not a URL, a driver this
    installation lacks, or a SQLite path that is a folder, lies in a missing folder or holds a
    file that is not a database. (A server that cannot be reached is a failure at run time.)

    Raises:
        ConfigError: the URL, naming it and the fix.
    """
    try:
        parsed = make_url(url)
        parsed.get_dialect().import_dbapi()  # the driver, which an extra or the user installs
    except (ArgumentError, ValueError) as exc:
        raise ConfigError(f"--db {url!r} is not a database URL ({exc}); e.g. {DEFAULT_DB}") from None
    except ImportError as exc:
        raise ConfigError(f"--db {_safe(url)!r}: its driver is not installed ({exc}); install it "
                          "(e.g. pip install psycopg for postgresql://) or use sqlite:///FILE") from None
    if parsed.get_backend_name() == "sqlite":
        _check_sqlite_path(url, parsed.database, uri=bool(parsed.query.get("uri")))


def _check_sqlite_path(url: str, database: str | None, *, uri: bool) -> None:
    if database in (None, "", ":memory:") or uri:
        return
    path = Path(str(database))
    if path.is_dir():
        raise ConfigError(f"--db {url!r} names a folder; give a file in it, e.g. sqlite:///{path / 'hwprune.db'}")
    if not path.parent.is_dir():
        raise ConfigError(f"--db {url!r}: folder {str(path.parent)!r} does not exist; create it or give "
                          "another path")
    if path.is_file() and path.stat().st_size > 0:
        try:
            with path.open("rb") as file:
                header = file.read(len(SQLITE_HEADER))
        except OSError as exc:
            raise ConfigError(f"--db {url!r} cannot be read ({exc.strerror}); give a file you can read") from None
        if header != SQLITE_HEADER:
            raise ConfigError(f"--db {url!r} is not a SQLite database; give a new file or an hwprune database")


def make_engine(url: str) -> Engine:
    """An engine for ``url``; SQLite waits for locks instead of failing at once.

    Raises:
        ConfigError: a URL that can never work (``check_database_url``).
    """
    check_database_url(url)
    try:
        # Connections are opened as needed and kept up to POOL_SIZE: past the pool, each one
        # would be opened and closed again per transaction (a new PostgreSQL backend each time),
        # which cost the hub more than its statements under 20 agents.
        if url.startswith("sqlite"):
            engine = create_engine(url, connect_args={"timeout": 60}, pool_size=POOL_SIZE)
            event.listen(engine, "connect", _sqlite_pragmas)
            return engine
        return create_engine(url, pool_pre_ping=True, pool_size=POOL_SIZE)
    except (SQLAlchemyError, ImportError, ValueError) as exc:
        raise StorageError(f"cannot use database {url!r}: {exc}") from exc


def require_database(url: str) -> None:
    """Refuse a SQLite file that does not exist, for commands that only read: connecting would
    create it (and a typo in ``--db`` would silently show an empty database).

    Raises:
        ConfigError: the URL is malformed, or names a SQLite file that does not exist.
    """
    try:
        parsed = make_url(url)
    except (ArgumentError, ValueError) as exc:
        raise ConfigError(f"--db {url!r} is not a database URL ({exc}); e.g. {DEFAULT_DB}") from None
    if parsed.get_backend_name() != "sqlite" or parsed.database in (None, "", ":memory:"):
        return
    if not Path(parsed.database).is_file():
        raise ConfigError(
            f"no database file {parsed.database!r}: check --db or HWPRUNE_DB "
            "(a database is created by `hwprune search start` or `hwprune db upgrade`)"
        )


class Repository:
    """hwprune's tables in one database, and its artifact store. Checks the schema when opened.
    It is the ``latency_models.MeasurementStore`` of meters: the measurement cache and, through
    ``jobs``, the queue of remote measurement jobs.

    Args:
        url: the database's SQLAlchemy URL.
        artifacts: the artifact store's folder or fsspec URL; default ``search.config.artifacts_url``.
        migrate: create the tables of a new database, refuse one at another schema.
    """

    def __init__(self, url: str, *, artifacts: str | None = None, migrate: bool = True) -> None:
        self.url = url
        self.artifacts = ArtifactStore(artifacts or artifacts_url(url))
        self.engine = make_engine(url)
        if migrate:
            try:
                ensure_schema(self.engine, url)
            except SQLAlchemyError as exc:
                raise StorageError(f"cannot reach database {_safe(url)}: {exc}") from exc
        self._sessions = sessionmaker(self.engine, expire_on_commit=False)
        self.jobs = JobQueue(self.engine)

    def _session(self) -> AbstractContextManager[Session]:
        return transaction(self._sessions, _safe(self.url))

    def close(self) -> None:
        self.engine.dispose()

    # --- searches ---------------------------------------------------------------------------

    def add_search(self, record: SearchRecord) -> None:
        row = SearchRow(
            name=record.name,
            study_name=record.study_name,
            config_json=json.dumps(record.config.model_dump(mode="json"), sort_keys=True),
            base_fingerprint=record.base_fingerprint,
            space_fingerprint=record.space_fingerprint,
            space_json=json.dumps(record.space, sort_keys=True),
            base_json=json.dumps(record.base.to_dict(), sort_keys=True),
            versions_json=json.dumps(record.versions, sort_keys=True),
            created_at=record.created_at,
        )
        try:
            with self._session() as session:
                session.add(row)
        except IntegrityError as exc:
            raise StorageError(f"a search named {record.name!r} already exists") from exc

    def find_search(self, name: str) -> SearchRecord | None:
        with self._session() as session:
            row = session.scalars(select(SearchRow).where(SearchRow.name == name)).one_or_none()
            return None if row is None else _search_record(row)

    def get_search(self, name: str) -> SearchRecord:
        record = self.find_search(name)
        if record is None:
            known = ", ".join(r.name for r in self.list_searches()) or "(none)"
            raise SearchNotFoundError(f"no search named {name!r} in {_safe(self.url)}; searches: {known}")
        return record

    def update_budget(self, name: str, *, trials: int | None, timeout_s: float | None) -> None:
        """Record a resumed search's new trial count and time budget (the rest never changes)."""
        with self._session() as session:
            row = session.scalars(select(SearchRow).where(SearchRow.name == name)).one()
            config = json.loads(row.config_json)
            config.update(trials=trials, timeout_s=timeout_s)
            row.config_json = json.dumps(config, sort_keys=True)

    def list_searches(self) -> list[SearchRecord]:
        with self._session() as session:
            return [_search_record(r) for r in session.scalars(select(SearchRow).order_by(SearchRow.id))]

    # --- artifacts --------------------------------------------------------------------------

    def put_artifact(self, sha256: str, content: bytes) -> None:
        """Store ONNX bytes under their sha256 (checked); storing the same bytes twice is harmless."""
        self.artifacts.put_bytes(content, sha256)
        self._name_artifact(sha256, len(content))

    def put_artifact_file(self, path: Path, sha256: str) -> None:
        """Store the ONNX file at ``path`` under its sha256 (checked)."""
        self.artifacts.put_file(path, sha256)
        self._name_artifact(sha256, path.stat().st_size)

    def _name_artifact(self, sha256: str, size_bytes: int) -> None:
        # The row says the artifact was made (for accounting); the bytes live in the store.
        try:
            with self._session() as session:
                if session.get(ArtifactRow, sha256) is None:
                    session.add(ArtifactRow(sha256=sha256, size_bytes=size_bytes))
        except IntegrityError:
            pass  # another worker named the same bytes first

    def get_artifact(self, sha256: str) -> bytes | None:
        """The artifact's bytes from the store, or None: it was pruned (re-make it from its plan)."""
        return self.artifacts.read_bytes(sha256)

    def jobs_artifacts(self) -> set[str]:
        """Artifacts that queued or leased measurement jobs need (the candidate and its reference,
        a batch's plans)."""
        with self._session() as session:
            rows = session.execute(
                select(JobRow.artifact_sha256, JobRow.reference_sha256, JobRow.payload_json)
                .where(JobRow.status.in_((QUEUED, LEASED)))
            ).all()
        plans = {sha for row in rows if row.payload_json
                 for sha in BatchSpec.model_validate_json(row.payload_json).plans}
        return {sha for row in rows for sha in row[:2] if sha} | plans

    # --- measurements: the MeasurementStore protocol of latency_models -------------------

    def find_measurement(self, key: MeasurementKey) -> MeasurementResult | None:
        with core_transaction(self.engine, _safe(self.url)) as connection:
            return cache.find_result(connection, key)

    def put_measurement(self, key: MeasurementKey, result: MeasurementResult) -> MeasurementResult:
        """Cache ``result``; if another worker cached this key first, theirs is returned."""
        with core_transaction(self.engine, _safe(self.url)) as connection:
            if cache.insert_result(connection, key, result):
                return result
            existing = cache.find_result(connection, key)
        if existing is None:
            raise StorageError("measurement cache insert failed and no row exists")
        return existing

    def submit_job(self, key: MeasurementKey, *, profile: str, artifact_sha256: str) -> int:
        return self.jobs.submit(signature=key.signature, profile=profile, profile_fingerprint=key.profile_fingerprint,
                                artifact_sha256=artifact_sha256, reference_sha256=key.reference_sha256)

    def job_state(self, job_id: int) -> JobState | None:
        return self.jobs.state(job_id)

    def reference_median_us(self, artifact_sha256: str, profile_fingerprint: str) -> float | None:
        """The cached unpaired median of ``artifact_sha256`` on these profile settings (a search's
        base model), against which a paired ratio can be checked; None when not cached."""
        with core_transaction(self.engine, _safe(self.url)) as connection:
            return cache.reference_median_us(connection, artifact_sha256, profile_fingerprint)

    def count_measurements(self) -> int:
        with self._session() as session:
            return int(session.scalar(select(func.count()).select_from(MeasurementRow)) or 0)


def _search_record(row: SearchRow) -> SearchRecord:
    return SearchRecord(
        name=row.name, study_name=row.study_name, config=SearchConfig.from_stored(json.loads(row.config_json)),
        base_fingerprint=row.base_fingerprint, space_fingerprint=row.space_fingerprint,
        space=json.loads(row.space_json), base=BaseFigures.from_dict(json.loads(row.base_json)),
        versions=json.loads(row.versions_json), created_at=row.created_at,
    )
