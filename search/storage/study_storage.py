"""Optuna's RDB storage as every hwprune process opens it: heartbeat on, safe claims on SQLite.

Light on purpose (no torch): workers, the hub and the stress tests open it.
"""

from __future__ import annotations

import warnings

import optuna
from optuna.exceptions import ExperimentalWarning
from sqlalchemy import Connection, Engine, event

from search.errors import StorageError


def open_study_storage(db_url: str, *, heartbeat_s: int, grace_s: int, worker: bool = False
                       ) -> optuna.storages.RDBStorage:
    """Optuna's RDB storage with the heartbeat on and a retry for trials whose process died.

    On SQLite, in a ``worker`` (a process that claims trials) every transaction takes the write
    lock at ``BEGIN`` (``BEGIN IMMEDIATE``); elsewhere (status, pareto, the hub) transactions
    begin deferred, so that readers never wait for the lock and a read-only file can be read. Optuna
    claims an enqueued trial (the base, a retry) by reading it WAITING with ``SELECT ... FOR
    UPDATE`` and writing RUNNING in one transaction; SQLite ignores ``FOR UPDATE``, and Python's
    sqlite3 driver starts the transaction only at the write, so two workers could both read
    WAITING and both run the trial (Optuna issue 4621). Holding the lock from ``BEGIN`` makes the
    read and the write one step; PostgreSQL's row lock already does that.

    Raises:
        StorageError: the database cannot be opened.
    """
    sqlite = db_url.startswith("sqlite")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ExperimentalWarning)  # heartbeat: experimental, wanted
        try:
            storage = optuna.storages.RDBStorage(
                db_url,
                # isolation_level=None: the driver issues no BEGIN of its own; ours below does.
                engine_kwargs={"connect_args": {"timeout": 60, "isolation_level": None}} if sqlite else None,
                heartbeat_interval=heartbeat_s,
                grace_period=grace_s,
                heartbeat_stale_trial_callback=optuna.storages.RetryHeartbeatStaleTrialCallback(max_retry=3),
            )
        except Exception as exc:  # SQLAlchemy or driver errors surface as many types
            raise StorageError(f"Optuna cannot open the database: {exc}") from exc
    if sqlite:
        begin_sqlite_transactions(storage.engine, immediate=worker)
    return storage


def begin_sqlite_transactions(engine: Engine, *, immediate: bool) -> None:
    """Begin every transaction on a SQLite ``engine`` opened with ``isolation_level=None``
    ourselves; ``immediate`` takes the write lock at once, so that a read and the write that
    depends on it are atomic."""
    statement = "BEGIN IMMEDIATE" if immediate else "BEGIN"

    def begin(connection: Connection) -> None:
        connection.exec_driver_sql(statement)

    event.listen(engine, "begin", begin)
