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

from latency_models import Measurement
from search.config import DEFAULT_DB, artifacts_url
from search.errors import ConfigError, SearchNotFoundError, StorageError
from search.storage.artifacts import ArtifactStore
from search.storage.migrate import _safe, ensure_schema
from search.storage.models import ArtifactRow, JobRow, MeasurementRow, SearchRow
from search.storage.queue import LEASED, QUEUED
from search.storage.session import transaction


@dataclass(frozen=True, slots=True)
class SearchRecord:
    """A search's stored definition: its config, fingerprints and base-model figures."""

    name: str
    study_name: str
    config: dict[str, Any]
    base_fingerprint: str
    space_fingerprint: str
    space: dict[str, Any]
    base: dict[str, Any]
    versions: dict[str, str]
    created_at: dt.datetime


@dataclass(frozen=True, slots=True)
class CachedMeasurement:
    """A measurement from the cache, with its ratio to the reference it was paired with."""

    measurement: Measurement
    ratio: float | None
    ratio_ci: tuple[float, float] | None


def _sqlite_pragmas(connection: Any, _record: Any) -> None:
    # WAL lets readers (searches, the hub) proceed while one writer commits, and NORMAL
    # synchronisation skips an fsync per commit (still crash-safe in WAL mode): the job queue
    # commits several times per round trip.
    cursor = connection.cursor()
    cursor.execute("PRAGMA journal_mode=WAL")
    cursor.execute("PRAGMA synchronous=NORMAL")
    cursor.close()


def make_engine(url: str) -> Engine:
    """An engine for ``url``; SQLite waits for locks instead of failing at once."""
    try:
        if url.startswith("sqlite"):
            engine = create_engine(url, connect_args={"timeout": 60})
            event.listen(engine, "connect", _sqlite_pragmas)
            return engine
        return create_engine(url, pool_pre_ping=True)
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

    def _session(self) -> AbstractContextManager[Session]:
        return transaction(self._sessions, _safe(self.url))

    def close(self) -> None:
        self.engine.dispose()

    # --- searches ---------------------------------------------------------------------------

    def add_search(self, record: SearchRecord) -> None:
        row = SearchRow(
            name=record.name,
            study_name=record.study_name,
            config_json=json.dumps(record.config, sort_keys=True),
            base_fingerprint=record.base_fingerprint,
            space_fingerprint=record.space_fingerprint,
            space_json=json.dumps(record.space, sort_keys=True),
            base_json=json.dumps(record.base, sort_keys=True),
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
        """Artifacts that queued or leased measurement jobs need (the candidate and its reference)."""
        with self._session() as session:
            rows = session.execute(
                select(JobRow.artifact_sha256, JobRow.reference_sha256).where(JobRow.status.in_((QUEUED, LEASED)))
            ).all()
        return {sha for row in rows for sha in row if sha}

    # --- measurement cache ------------------------------------------------------------------

    def find_measurement(
        self, signature: str, profile_fingerprint: str, reference_sha256: str = ""
    ) -> CachedMeasurement | None:
        with self._session() as session:
            row = session.scalars(
                select(MeasurementRow).where(
                    MeasurementRow.signature == signature,
                    MeasurementRow.profile_fingerprint == profile_fingerprint,
                    MeasurementRow.reference_sha256 == reference_sha256,
                )
            ).one_or_none()
            return None if row is None else _cached(row)

    def put_measurement(
        self,
        *,
        signature: str,
        profile_fingerprint: str,
        measurement: Measurement,
        reference_sha256: str = "",
        ratio: float | None = None,
        ratio_ci: tuple[float, float] | None = None,
    ) -> CachedMeasurement:
        """Cache a measurement; if another worker cached this key first, theirs is returned."""
        m = measurement
        row = MeasurementRow(
            signature=signature, profile=m.profile, profile_fingerprint=profile_fingerprint,
            reference_sha256=reference_sha256, artifact_sha256=m.artifact_sha256,
            median_us=m.median_us, p10_us=m.p10_us, p90_us=m.p90_us, mean_us=m.mean_us,
            stdev_us=m.stdev_us, n=m.n, ci_low_us=m.ci_low_us, ci_high_us=m.ci_high_us,
            ratio=ratio, ratio_ci_low=ratio_ci[0] if ratio_ci else None,
            ratio_ci_high=ratio_ci[1] if ratio_ci else None, converged=m.converged,
            backend=m.backend, backend_version=m.backend_version, device=m.device,
        )
        try:
            with self._session() as session:
                session.add(row)
        except IntegrityError:
            existing = self.find_measurement(signature, profile_fingerprint, reference_sha256)
            if existing is not None:
                return existing
            raise StorageError("measurement cache insert failed and no row exists") from None
        return CachedMeasurement(m, ratio, ratio_ci)

    def reference_median_us(self, artifact_sha256: str, profile_fingerprint: str) -> float | None:
        """The cached unpaired median of ``artifact_sha256`` on these profile settings (a search's
        base model), against which a paired ratio can be checked; None when not cached."""
        with self._session() as session:
            return session.scalars(
                select(MeasurementRow.median_us).where(
                    MeasurementRow.artifact_sha256 == artifact_sha256,
                    MeasurementRow.profile_fingerprint == profile_fingerprint,
                    MeasurementRow.reference_sha256 == "",
                ).limit(1)
            ).first()

    def count_measurements(self) -> int:
        with self._session() as session:
            return int(session.scalar(select(func.count()).select_from(MeasurementRow)) or 0)


def _search_record(row: SearchRow) -> SearchRecord:
    return SearchRecord(
        name=row.name, study_name=row.study_name, config=json.loads(row.config_json),
        base_fingerprint=row.base_fingerprint, space_fingerprint=row.space_fingerprint,
        space=json.loads(row.space_json), base=json.loads(row.base_json),
        versions=json.loads(row.versions_json), created_at=row.created_at,
    )


def _cached(row: MeasurementRow) -> CachedMeasurement:
    measurement = Measurement(
        profile=row.profile, backend=row.backend, backend_version=row.backend_version,
        device=row.device, threads=None, median_us=row.median_us, p10_us=row.p10_us,
        p90_us=row.p90_us, mean_us=row.mean_us, stdev_us=row.stdev_us, n=row.n,
        ci_low_us=row.ci_low_us, ci_high_us=row.ci_high_us, converged=row.converged,
        elapsed_s=0.0, artifact_sha256=row.artifact_sha256, settings_fingerprint=row.profile_fingerprint,
    )
    ratio_ci = (
        (row.ratio_ci_low, row.ratio_ci_high)
        if row.ratio_ci_low is not None and row.ratio_ci_high is not None
        else None
    )
    return CachedMeasurement(measurement, row.ratio, ratio_ci)
