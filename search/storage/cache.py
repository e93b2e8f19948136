"""The measurement cache's rows, as Core statements that run inside a caller's transaction.

The repository (a local meter's measurement) and the job queue (an agent's accepted result, in
the same transaction that marks its job done) both write through ``insert_result``, so a cache
row has one shape whoever measured it.
"""

from __future__ import annotations

from typing import Any

from sqlalchemy import Connection, Row, Table, select
from sqlalchemy.dialects import postgresql, sqlite

from latency_models import Measurement, MeasurementKey, MeasurementResult
from search.storage.models import MeasurementRow

MEASUREMENTS: Table = MeasurementRow.__table__  # type: ignore[assignment]
_KEY = ("signature", "profile_fingerprint", "reference_sha256")
# Built once (the job queue's hot path files a row per accepted result); the values come with
# each execution.
_INSERTS = {
    name: dialect.insert(MEASUREMENTS).on_conflict_do_nothing(index_elements=list(_KEY)).returning(MEASUREMENTS.c.id)
    for name, dialect in (("postgresql", postgresql), ("sqlite", sqlite))
}


def _where(key: MeasurementKey) -> tuple[Any, ...]:
    c = MEASUREMENTS.c
    return (c.signature == key.signature, c.profile_fingerprint == key.profile_fingerprint,
            c.reference_sha256 == key.reference_sha256)


def find_result(connection: Connection, key: MeasurementKey) -> MeasurementResult | None:
    row = connection.execute(select(MEASUREMENTS).where(*_where(key))).first()
    return None if row is None else _result(row)


def insert_result(connection: Connection, key: MeasurementKey, result: MeasurementResult) -> bool:
    """Add ``result`` under ``key`` unless the key is cached already (the first figures stay:
    a concurrent writer's conflict is not an error that would undo the caller's transaction).
    Returns whether the row was added."""
    m = result.measurement
    values = dict(
        signature=key.signature, profile=m.profile, profile_fingerprint=key.profile_fingerprint,
        reference_sha256=key.reference_sha256, artifact_sha256=m.artifact_sha256,
        median_us=m.median_us, p10_us=m.p10_us, p90_us=m.p90_us, mean_us=m.mean_us,
        stdev_us=m.stdev_us, n=m.n, ci_low_us=m.ci_low_us, ci_high_us=m.ci_high_us,
        ratio=result.ratio, ratio_ci_low=result.ratio_ci[0] if result.ratio_ci else None,
        ratio_ci_high=result.ratio_ci[1] if result.ratio_ci else None, converged=m.converged,
        backend=m.backend, backend_version=m.backend_version, device=m.device,
    )
    # RETURNING, not rowcount: with RETURNING in play a driver may report -1 rows.
    return connection.execute(_INSERTS[connection.dialect.name], values).first() is not None


def reference_median_us(connection: Connection, artifact_sha256: str, profile_fingerprint: str) -> float | None:
    """The cached unpaired median of ``artifact_sha256`` on these profile settings (a search's
    base model), against which a paired ratio can be checked; None when not cached."""
    c = MEASUREMENTS.c
    found = connection.execute(
        select(c.median_us).where(c.artifact_sha256 == artifact_sha256, c.profile_fingerprint == profile_fingerprint,
                                  c.reference_sha256 == "").limit(1)
    ).first()
    return None if found is None else float(found[0])


def _result(row: Row[Any]) -> MeasurementResult:
    r = row._mapping
    measurement = Measurement(
        profile=r["profile"], backend=r["backend"], backend_version=r["backend_version"],
        device=r["device"], threads=None, median_us=r["median_us"], p10_us=r["p10_us"],
        p90_us=r["p90_us"], mean_us=r["mean_us"], stdev_us=r["stdev_us"], n=r["n"],
        ci_low_us=r["ci_low_us"], ci_high_us=r["ci_high_us"], converged=r["converged"],
        elapsed_s=0.0, artifact_sha256=r["artifact_sha256"], settings_fingerprint=r["profile_fingerprint"],
    )
    low, high = r["ratio_ci_low"], r["ratio_ci_high"]
    return MeasurementResult(measurement, r["ratio"], (low, high) if low is not None and high is not None else None)
