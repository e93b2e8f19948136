"""Remote agents and their job queue, on hwprune's tables.

A job moves ``queued -> leased -> done``; a lease that expires puts it back (its attempt is
spent), and past ``max_attempts`` it is ``failed`` with its last error. Leasing is a
compare-and-set ``UPDATE ... WHERE status allows it``, atomic on SQLite (one writer at a time)
and on PostgreSQL, where ``FOR UPDATE SKIP LOCKED`` also keeps concurrent agents off each
other's rows. A result is accepted once, from the agent that holds the lease; the same agent
posting it again is told it was already accepted.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import secrets
import time
from contextlib import AbstractContextManager
from dataclasses import dataclass
from typing import Any

from sqlalchemy import Engine, func, or_, select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session, sessionmaker

from latency_models.wire import AGENT_NAME, clean_text
from search.errors import ConfigError, StorageError
from search.storage.models import AgentRow, JobRow, utcnow
from search.storage.session import transaction

QUEUED, LEASED, DONE, FAILED = "queued", "leased", "done", "failed"
AGENT, READER = "agent", "reader"
MAX_ERROR_CHARS = 2000


_now = utcnow


def hash_token(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


@dataclass(frozen=True, slots=True)
class AgentRecord:
    id: int
    name: str
    profile: str
    revoked: bool
    jobs_done: int
    last_seen: dt.datetime | None
    environment: dict[str, Any] | None
    role: str = AGENT

    def is_live(self, within_s: float) -> bool:
        return (not self.revoked and self.last_seen is not None
                and (_now() - self.last_seen).total_seconds() <= within_s)


@dataclass(frozen=True, slots=True)
class JobRecord:
    id: int
    status: str
    profile: str
    profile_fingerprint: str
    signature: str
    artifact_sha256: str
    reference_sha256: str
    lease_agent_id: int | None
    lease_expires_at: dt.datetime | None
    attempts: int
    max_attempts: int
    last_error: str | None
    result: dict[str, Any] | None
    done_by_agent_id: int | None
    flagged: dict[str, Any] | None = None


class Outcome:
    """What happened to a posted result or failure: the hub maps it to an HTTP status."""

    ACCEPTED = "accepted"
    DUPLICATE = "duplicate"  # the same agent posted again: harmless
    FLAGGED = "flagged"  # implausible: kept on the job for inspection, never cached; measured again
    NOT_HOLDER = "not_holder"  # another agent holds (or finished) the job
    UNKNOWN = "unknown"


class JobQueue:
    """Agents and jobs in one database (the engine of a ``Repository``)."""

    def __init__(self, engine: Engine, *, expire_every_s: float = 0.5) -> None:
        self.engine = engine
        self._sessions = sessionmaker(engine, expire_on_commit=False)
        self._postgres = engine.dialect.name == "postgresql"
        # Looking for expired leases on every lease call costs two UPDATEs; twice a second is
        # plenty next to leases that last seconds to minutes.
        self._expire_every_s = expire_every_s
        self._expired_at = 0.0

    def _session(self) -> AbstractContextManager[Session]:
        return transaction(self._sessions, "the job queue")

    # --- agents -----------------------------------------------------------------------------

    def add_agent(self, name: str, profile: str, *, role: str = AGENT) -> str:
        """Register an agent (or, with ``role="reader"``, a token that may only read searches);
        returns its bearer token (only its hash is stored).

        Raises:
            ConfigError: a name that is not a short slug, or one already taken.
        """
        if not AGENT_NAME.match(name):
            raise ConfigError(
                f"agent name {clean_text(name, 40)!r} must be 1-100 letters, digits, '.', '_' or '-', "
                "starting with a letter or digit (e.g. the device's host name)")
        if role not in (AGENT, READER):
            raise ConfigError(f"role must be {AGENT!r} or {READER!r}, got {clean_text(role, 20)!r}")
        token = secrets.token_urlsafe(32)
        try:
            with self._session() as session:
                session.add(AgentRow(name=name, profile=profile if role == AGENT else "", role=role,
                                     token_hash=hash_token(token)))
        except IntegrityError:
            raise ConfigError(f"an agent named {name!r} exists: revoke it or choose another name") from None
        return token

    def revoke_agent(self, name: str) -> None:
        with self._session() as session:
            row = session.scalars(select(AgentRow).where(AgentRow.name == name)).one_or_none()
            if row is None:
                raise ConfigError(f"no agent named {name!r}; see hwprune agents list")
            row.revoked = True
            # Its leases go back to the queue at once, without spending an attempt.
            session.execute(
                update(JobRow).where(JobRow.lease_agent_id == row.id, JobRow.status == LEASED)
                .values(status=QUEUED, lease_agent_id=None, lease_expires_at=None,
                        attempts=JobRow.attempts - 1, updated_at=_now())
            )

    def list_agents(self) -> list[AgentRecord]:
        with self._session() as session:
            return [_agent(r) for r in session.scalars(select(AgentRow).order_by(AgentRow.id))]

    def authenticate(self, token: str) -> AgentRecord | None:
        """The agent a token belongs to, unless unknown or revoked."""
        with self._session() as session:
            row = session.scalars(select(AgentRow).where(AgentRow.token_hash == hash_token(token))).one_or_none()
            return None if row is None or row.revoked else _agent(row)

    def touch(self, agent_id: int, *, environment: dict[str, Any] | None = None,
              job_id: int | None = None, lease_s: float | None = None) -> bool:
        """Record that an agent is alive; extend its lease on ``job_id``. False: lease lost."""
        now = _now()
        with self._session() as session:
            values: dict[str, Any] = {"last_seen": now}
            if environment is not None:
                # Shown in `hwprune agents list`: no terminal escapes, nothing long, a few keys.
                cleaned = {clean_text(str(k), 64): clean_text(str(v), 500) for k, v in list(environment.items())[:32]}
                values["environment_json"] = json.dumps(cleaned, sort_keys=True)
            session.execute(update(AgentRow).where(AgentRow.id == agent_id).values(**values))
            if job_id is None or lease_s is None:
                return True
            result = session.execute(
                update(JobRow).where(JobRow.id == job_id, JobRow.status == LEASED,
                                     JobRow.lease_agent_id == agent_id)
                .values(lease_expires_at=now + dt.timedelta(seconds=lease_s), updated_at=now)
            )
            return bool(result.rowcount)  # type: ignore[attr-defined]

    def live_agents(self, profile: str, within_s: float) -> list[AgentRecord]:
        return [a for a in self.list_agents() if a.profile == profile and a.is_live(within_s)]

    # --- jobs -------------------------------------------------------------------------------

    def submit(self, *, signature: str, profile: str, profile_fingerprint: str, artifact_sha256: str,
               reference_sha256: str = "", max_attempts: int = 3) -> int:
        """Queue a measurement, or join the job already made for the same key.

        A failed job of that key is queued again with fresh attempts (a new trial asked).
        """
        key = (JobRow.signature == signature, JobRow.profile_fingerprint == profile_fingerprint,
               JobRow.reference_sha256 == reference_sha256)
        for _ in range(3):
            with self._session() as session:
                row = session.scalars(select(JobRow).where(*key)).one_or_none()
                if row is not None:
                    if row.status == FAILED:
                        row.status, row.attempts, row.last_error = QUEUED, 0, None
                        row.updated_at = _now()
                    return row.id
            try:
                with self._session() as session:
                    row = JobRow(status=QUEUED, profile=profile, profile_fingerprint=profile_fingerprint,
                                 signature=signature, artifact_sha256=artifact_sha256,
                                 reference_sha256=reference_sha256, max_attempts=max_attempts)
                    session.add(row)
                    session.flush()
                    return row.id
            except IntegrityError:
                continue  # another worker queued the same key: join it
        raise StorageError("could not queue a measurement job (conflicting writers)")

    def get(self, job_id: int) -> JobRecord | None:
        with self._session() as session:
            row = session.get(JobRow, job_id)
            return None if row is None else _job(row)

    def _expire(self, session: Session, now: dt.datetime) -> None:
        expired = (JobRow.status == LEASED, JobRow.lease_expires_at < now)
        session.execute(
            update(JobRow).where(*expired, JobRow.attempts >= JobRow.max_attempts)
            .values(status=FAILED, lease_agent_id=None, updated_at=now,
                    last_error="lease expired on every attempt (agents died or timed out)")
        )
        session.execute(
            update(JobRow).where(*expired)
            .values(status=QUEUED, lease_agent_id=None, lease_expires_at=None, updated_at=now,
                    last_error="lease expired")
        )

    def lease(self, agent: AgentRecord, lease_s: float) -> JobRecord | None:
        """Give ``agent`` the oldest queued job of its profile, or None; marks the agent seen."""
        for _ in range(5):
            now = _now()
            with self._session() as session:
                session.execute(update(AgentRow).where(AgentRow.id == agent.id).values(last_seen=now))
                if time.monotonic() - self._expired_at >= self._expire_every_s:
                    self._expire(session, now)
                    self._expired_at = time.monotonic()
                query = (select(JobRow.id).where(JobRow.status == QUEUED, JobRow.profile == agent.profile)
                         .order_by(JobRow.id).limit(1))
                if self._postgres:
                    query = query.with_for_update(skip_locked=True)
                job_id = session.scalars(query).first()
                if job_id is None:
                    return None
                taken = session.execute(
                    update(JobRow).where(JobRow.id == job_id, JobRow.status == QUEUED)
                    .values(status=LEASED, lease_agent_id=agent.id, attempts=JobRow.attempts + 1,
                            lease_expires_at=now + dt.timedelta(seconds=lease_s), updated_at=now)
                )
                if taken.rowcount == 1:  # type: ignore[attr-defined]
                    row = session.get(JobRow, job_id)
                    session.refresh(row)  # type: ignore[arg-type]
                    return _job(row)  # type: ignore[arg-type]
        return None  # lost every race: the caller polls again

    def complete(self, agent: AgentRecord, job_id: int, result: dict[str, Any]) -> tuple[str, JobRecord | None]:
        """Accept a result once, from the lease holder; returns the outcome and the job."""
        now = _now()
        with self._session() as session:
            row = session.get(JobRow, job_id)
            if row is None:
                return Outcome.UNKNOWN, None
            job = _job(row)
            if row.status == DONE:
                return (Outcome.DUPLICATE if row.done_by_agent_id == agent.id else Outcome.NOT_HOLDER), job
            if row.status != LEASED or row.lease_agent_id != agent.id:
                return Outcome.NOT_HOLDER, job
            done = session.execute(
                update(JobRow).where(JobRow.id == job_id, JobRow.status == LEASED,
                                     JobRow.lease_agent_id == agent.id)
                .values(status=DONE, result_json=json.dumps(result, sort_keys=True, allow_nan=False),
                        done_by_agent_id=agent.id, lease_expires_at=None, updated_at=now)
            )
            if done.rowcount != 1:  # type: ignore[attr-defined]
                return Outcome.NOT_HOLDER, job
            session.execute(update(AgentRow).where(AgentRow.id == agent.id)
                            .values(jobs_done=AgentRow.jobs_done + 1, last_seen=now))
            return Outcome.ACCEPTED, job

    def flag(self, agent: AgentRecord, job_id: int, result: dict[str, Any], reason: str) -> str:
        """The holder posted a result too implausible to trust: keep it on the job with the
        reason, and queue the job again (or fail it past the attempt cap), like a failure."""
        now = _now()
        with self._session() as session:
            row = session.get(JobRow, job_id)
            if row is None:
                return Outcome.UNKNOWN
            if row.status != LEASED or row.lease_agent_id != agent.id:
                return Outcome.NOT_HOLDER
            row.flagged_json = json.dumps({"reason": reason, "agent": agent.name, "result": result},
                                          sort_keys=True, allow_nan=False)
            row.status = FAILED if row.attempts >= row.max_attempts else QUEUED
            row.last_error = clean_text(f"implausible result from agent {agent.name}: {reason}", MAX_ERROR_CHARS)
            row.lease_agent_id = None
            row.lease_expires_at = None
            row.updated_at = now
            return Outcome.FLAGGED

    def fail(self, agent: AgentRecord, job_id: int, error: str) -> str:
        """The holder could not measure: queue again, or fail past the attempt cap."""
        now = _now()
        with self._session() as session:
            row = session.get(JobRow, job_id)
            if row is None:
                return Outcome.UNKNOWN
            if row.status != LEASED or row.lease_agent_id != agent.id:
                return Outcome.NOT_HOLDER
            final = row.attempts >= row.max_attempts
            row.status = FAILED if final else QUEUED
            row.last_error = clean_text(error, MAX_ERROR_CHARS)
            row.lease_agent_id = None
            row.lease_expires_at = None
            row.updated_at = now
            return Outcome.ACCEPTED

    def release(self, agent: AgentRecord, job_id: int) -> str:
        """Give a leased job back unmeasured (agent shutting down); the attempt is not spent."""
        with self._session() as session:
            result = session.execute(
                update(JobRow).where(JobRow.id == job_id, JobRow.status == LEASED,
                                     JobRow.lease_agent_id == agent.id)
                .values(status=QUEUED, lease_agent_id=None, lease_expires_at=None,
                        attempts=JobRow.attempts - 1, updated_at=_now())
            )
            if result.rowcount == 1:  # type: ignore[attr-defined]
                return Outcome.ACCEPTED
            return Outcome.NOT_HOLDER if session.get(JobRow, job_id) is not None else Outcome.UNKNOWN

    def holds_artifact(self, agent: AgentRecord, sha256: str) -> bool:
        """True when ``agent`` holds a lease on a job that needs ``sha256``."""
        with self._session() as session:
            found = session.scalars(
                select(JobRow.id).where(
                    JobRow.status == LEASED, JobRow.lease_agent_id == agent.id,
                    or_(JobRow.artifact_sha256 == sha256, JobRow.reference_sha256 == sha256),
                ).limit(1)
            ).first()
            return found is not None

    def counts(self) -> dict[str, int]:
        with self._session() as session:
            rows = session.execute(select(JobRow.status, func.count()).group_by(JobRow.status)).all()
        return {str(status): int(count) for status, count in rows}

    def jobs(self) -> list[JobRecord]:
        with self._session() as session:
            return [_job(r) for r in session.scalars(select(JobRow).order_by(JobRow.id))]


def _agent(row: AgentRow) -> AgentRecord:
    return AgentRecord(id=row.id, name=row.name, profile=row.profile, revoked=row.revoked,
                       jobs_done=row.jobs_done, last_seen=row.last_seen,
                       environment=json.loads(row.environment_json) if row.environment_json else None,
                       role=row.role)


def _job(row: JobRow) -> JobRecord:
    return JobRecord(
        id=row.id, status=row.status, profile=row.profile, profile_fingerprint=row.profile_fingerprint,
        signature=row.signature, artifact_sha256=row.artifact_sha256,
        reference_sha256=row.reference_sha256, lease_agent_id=row.lease_agent_id,
        lease_expires_at=row.lease_expires_at, attempts=row.attempts, max_attempts=row.max_attempts,
        last_error=row.last_error, result=json.loads(row.result_json) if row.result_json else None,
        done_by_agent_id=row.done_by_agent_id,
        flagged=json.loads(row.flagged_json) if row.flagged_json else None,
    )
