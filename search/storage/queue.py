"""Remote agents and their job queue, on hwprune's tables.

A job moves ``queued -> leased -> done``; a lease that expires puts it back (its attempt is
spent), and past ``max_attempts`` it is ``failed`` with its last error. Leasing is one
``UPDATE ... WHERE id = (the oldest queued job of the profile) AND status = 'queued'``, atomic on
SQLite (one writer at a time) and on PostgreSQL, where ``FOR UPDATE SKIP LOCKED`` in the
sub-select also keeps concurrent agents off each other's rows. A result is accepted once, from
the agent that holds the lease, and in the same transaction filed in the measurement cache; the
same agent posting it again is told it was already accepted.

A job has a kind: ``measure`` (one artifact, its result cached) or ``batch`` (a lookup table's
layers and plans, measured in one lease; its figures stay on the job). An agent gets only the
kinds it says it runs (``latency_models.wire.job_kinds``); a job that no live agent of its profile
can run is failed, with a message saying so, rather than left queued for nobody.

Everything here is SQLAlchemy Core: the hub runs these statements for every request, and the
ORM's unit of work cost more than the statements themselves.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import secrets
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager, nullcontext
from dataclasses import dataclass
from typing import Any

from sqlalchemy import (
    Connection,
    DateTime,
    Engine,
    Integer,
    Row,
    Table,
    Text,
    bindparam,
    case,
    func,
    insert,
    or_,
    select,
    update,
)
from sqlalchemy.exc import IntegrityError

import search.storage.cache as cache  # the submodule itself: no import of the package from inside it
from latency_models import JobState, JobStatus, MeasurementKey, MeasurementResult
from latency_models.store import Outcome, Role
from latency_models.wire import (
    AGENT_NAME,
    BATCH,
    MEASURE,
    BatchResultBody,
    BatchSpec,
    clean_text,
    job_kinds,
    result_from_json,
    result_to_json,
)
from search.errors import ConfigError, StorageError
from search.storage.models import AgentRow, JobRow, utcnow
from search.storage.session import core_transaction

QUEUED, LEASED, DONE, FAILED = JobStatus.QUEUED, JobStatus.LEASED, JobStatus.DONE, JobStatus.FAILED
AGENT, READER = Role.AGENT, Role.READER
MAX_ERROR_CHARS = 2000
# An agent's ``last_seen`` is written at most this often by leases: liveness is judged over tens
# of seconds, and on SQLite every write waits for the one writer.
SEEN_EVERY_S = 1.0
# An agent seen within this long counts as live when the hub asks whether any agent can run a
# job kind (the search's default for a live agent, search.study.runtime).
LIVE_S = 60.0

JOBS: Table = JobRow.__table__  # type: ignore[assignment]
AGENTS: Table = AgentRow.__table__  # type: ignore[assignment]

# The statements of every request, built once with named parameters: building and hashing a
# statement per call cost about as much as running it.
_AGENT_BY_TOKEN = select(AGENTS).where(AGENTS.c.token_hash == bindparam("p_token"))
_JOB_BY_ID = select(JOBS).where(JOBS.c.id == bindparam("p_job"))
_HELD = (JOBS.c.id == bindparam("p_job"), JOBS.c.status == LEASED, JOBS.c.lease_agent_id == bindparam("p_agent"))
_MARK_DONE = update(JOBS).where(*_HELD).values(
    status=DONE, result_json=bindparam("p_result", type_=Text), done_by_agent_id=bindparam("p_done_by", type_=Integer),
    lease_expires_at=None, updated_at=bindparam("p_now", type_=DateTime))
_COUNT_DONE = update(AGENTS).where(AGENTS.c.id == bindparam("p_agent")).values(
    jobs_done=AGENTS.c.jobs_done + 1, last_seen=bindparam("p_now", type_=DateTime))
_SEEN = update(AGENTS).where(AGENTS.c.id == bindparam("p_agent")).values(last_seen=bindparam("p_now", type_=DateTime))
_QUEUED_KINDS = select(JOBS.c.kind).where(JOBS.c.status == QUEUED, JOBS.c.profile == bindparam("p_profile")).distinct()


def _take_oldest(*, postgres: bool) -> Any:
    """Lease the oldest queued job of a profile in one statement (the sub-select skips rows
    that concurrent leases hold locked, on PostgreSQL); returns the job's row."""
    c = JOBS.c
    oldest = (select(c.id).where(c.status == QUEUED, c.profile == bindparam("p_profile"),
                                 c.kind.in_(bindparam("p_kinds", expanding=True))).order_by(c.id).limit(1))
    if postgres:
        oldest = oldest.with_for_update(skip_locked=True)
    return (update(JOBS).where(c.id == oldest.scalar_subquery(), c.status == QUEUED)
            .values(status=LEASED, lease_agent_id=bindparam("p_holder", type_=Integer), attempts=c.attempts + 1,
                    lease_expires_at=bindparam("p_expires", type_=DateTime),
                    updated_at=bindparam("p_now", type_=DateTime))
            .returning(*JOBS.c))


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
    role: Role = AGENT

    def is_live(self, within_s: float) -> bool:
        return (not self.revoked and self.last_seen is not None
                and (_now() - self.last_seen).total_seconds() <= within_s)


@dataclass(frozen=True, slots=True)
class JobRecord:
    id: int
    status: JobStatus
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
    result: MeasurementResult | None
    done_by_agent_id: int | None
    flagged: dict[str, Any] | None = None
    kind: str = MEASURE
    batch: BatchSpec | None = None  # a batch job's work
    batch_result: BatchResultBody | None = None  # a done batch job's figures
    progress: int | None = None  # a batch's measurements done so far, by its agent's count

    @property
    def key(self) -> MeasurementKey:
        """The cache key this job's result is filed under."""
        return MeasurementKey(self.signature, self.profile_fingerprint, self.reference_sha256)


# Asked by ``complete`` about a result before it is accepted: it gets the job and a lookup of the
# base model's cached median; it raises to refuse the result (nothing is written) or returns why
# the result is implausible (it is flagged), or None to accept it.
Judge = Callable[[JobRecord, Callable[[], float | None]], str | None]


class JobQueue:
    """Agents and jobs in one database (the engine of a ``Repository``)."""

    def __init__(self, engine: Engine, *, expire_every_s: float = 0.5) -> None:
        self.engine = engine
        self._postgres = engine.dialect.name == "postgresql"
        # Looking for expired leases on every lease call costs two UPDATEs; twice a second is
        # plenty next to leases that last seconds to minutes.
        self._expire_every_s = expire_every_s
        self._expired_at = 0.0
        self._take = _take_oldest(postgres=self._postgres)
        # SQLite has one writer at a time, and a connection that finds the database locked
        # sleeps for milliseconds before it retries: the hub's threads take turns here instead,
        # which costs microseconds. PostgreSQL locks rows, so its writers go in parallel.
        self._writers: AbstractContextManager[Any] = (threading.Lock() if engine.dialect.name == "sqlite"
                                                      else nullcontext())

    def _begin(self) -> AbstractContextManager[Connection]:
        return core_transaction(self.engine, "the job queue")

    @contextmanager
    def _write(self) -> Iterator[Connection]:
        """A transaction that writes (see ``_writers``)."""
        with self._writers, core_transaction(self.engine, "the job queue") as connection:
            yield connection

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
            with self._write() as connection:
                connection.execute(insert(AGENTS).values(name=name, profile=profile if role == AGENT else "",
                                                         role=role, token_hash=hash_token(token)))
        except IntegrityError:
            raise ConfigError(f"an agent named {name!r} exists: revoke it or choose another name") from None
        return token

    def revoke_agent(self, name: str) -> None:
        with self._write() as connection:
            agent_id = connection.execute(select(AGENTS.c.id).where(AGENTS.c.name == name)).scalar()
            if agent_id is None:
                raise ConfigError(f"no agent named {name!r}; see hwprune agents list")
            connection.execute(update(AGENTS).where(AGENTS.c.id == agent_id).values(revoked=True))
            # Its leases go back to the queue at once, without spending an attempt.
            connection.execute(
                update(JOBS).where(JOBS.c.lease_agent_id == agent_id, JOBS.c.status == LEASED)
                .values(status=QUEUED, lease_agent_id=None, lease_expires_at=None,
                        attempts=JOBS.c.attempts - 1, updated_at=_now())
            )

    def list_agents(self) -> list[AgentRecord]:
        with self._begin() as connection:
            return [_agent(r) for r in connection.execute(select(AGENTS).order_by(AGENTS.c.id))]

    def authenticate(self, token: str) -> AgentRecord | None:
        """The agent a token belongs to, unless unknown or revoked."""
        with self._begin() as connection:
            row = connection.execute(_AGENT_BY_TOKEN, {"p_token": hash_token(token)}).first()
        return None if row is None or row.revoked else _agent(row)

    def touch(self, agent_id: int, *, environment: dict[str, Any] | None = None,
              job_id: int | None = None, lease_s: float | None = None, progress: int | None = None) -> bool:
        """Record that an agent is alive; extend its lease on ``job_id`` (and note how far a batch
        has got). False: lease lost."""
        now = _now()
        values: dict[str, Any] = {"last_seen": now}
        if environment is not None:
            # Shown in `hwprune agents list`: no terminal escapes, nothing long, a few keys.
            cleaned = {clean_text(str(k), 64): clean_text(str(v), 500) for k, v in list(environment.items())[:32]}
            values["environment_json"] = json.dumps(cleaned, sort_keys=True)
        with self._write() as connection:
            connection.execute(update(AGENTS).where(AGENTS.c.id == agent_id).values(**values))
            if job_id is None or lease_s is None:
                return True
            extended: dict[str, Any] = {"lease_expires_at": now + dt.timedelta(seconds=lease_s), "updated_at": now}
            if progress is not None:
                extended["progress"] = progress
            result = connection.execute(
                update(JOBS).where(JOBS.c.id == job_id, JOBS.c.status == LEASED, JOBS.c.lease_agent_id == agent_id)
                .values(**extended)
            )
            return bool(result.rowcount)

    def live_agents(self, profile: str, within_s: float) -> list[AgentRecord]:
        return [a for a in self.list_agents() if a.profile == profile and a.is_live(within_s)]

    # --- jobs -------------------------------------------------------------------------------

    def submit(self, *, signature: str, profile: str, profile_fingerprint: str, artifact_sha256: str,
               reference_sha256: str = "", max_attempts: int = 3) -> int:
        """Queue a measurement, or join the job already made for the same key.

        A failed job of that key is queued again with fresh attempts (a new trial asked).
        """
        c = JOBS.c
        key = (c.signature == signature, c.profile_fingerprint == profile_fingerprint,
               c.reference_sha256 == reference_sha256)
        for _ in range(3):
            with self._write() as connection:
                found = connection.execute(select(c.id, c.status).where(*key)).first()
                if found is not None:
                    if found.status == FAILED:
                        connection.execute(update(JOBS).where(c.id == found.id, c.status == FAILED)
                                           .values(status=QUEUED, attempts=0, last_error=None, updated_at=_now()))
                    return int(found.id)
            try:
                with self._write() as connection:
                    added = connection.execute(
                        insert(JOBS).values(status=QUEUED, profile=profile, profile_fingerprint=profile_fingerprint,
                                            signature=signature, artifact_sha256=artifact_sha256,
                                            reference_sha256=reference_sha256, max_attempts=max_attempts)
                    )
                    return int(added.inserted_primary_key[0])  # type: ignore[index]
            except IntegrityError:
                continue  # another worker queued the same key: join it
        raise StorageError("could not queue a measurement job (conflicting writers)")

    def submit_batch(self, *, profile: str, profile_fingerprint: str, base_sha256: str, batch: BatchSpec,
                     max_attempts: int = 3) -> int:
        """Queue a batch job (``batch``'s layers and plans, the plans paired with ``base_sha256``):
        always a new job, never an earlier build's figures again."""
        # The key columns are unique per job: a random signature keeps every batch its own.
        signature = hashlib.sha256(f"batch:{secrets.token_hex(16)}".encode()).hexdigest()
        with self._write() as connection:
            added = connection.execute(
                insert(JOBS).values(status=QUEUED, kind=BATCH, profile=profile, profile_fingerprint=profile_fingerprint,
                                    signature=signature, artifact_sha256=base_sha256, reference_sha256="",
                                    payload_json=batch.model_dump_json(), max_attempts=max_attempts)
            )
            return int(added.inserted_primary_key[0])  # type: ignore[index]

    def cancel(self, job_id: int, reason: str) -> bool:
        """Fail a job that is still queued or leased (its submitter stopped waiting), so that no
        agent measures it for nobody; its holder's next heartbeat hears the lease is lost."""
        c = JOBS.c
        with self._write() as connection:
            changed = connection.execute(
                update(JOBS).where(c.id == job_id, c.status.in_((QUEUED, LEASED)))
                .values(status=FAILED, last_error=clean_text(reason, MAX_ERROR_CHARS), lease_agent_id=None,
                        lease_expires_at=None, updated_at=_now())
            )
            return bool(changed.rowcount)

    def get(self, job_id: int) -> JobRecord | None:
        with self._begin() as connection:
            row = connection.execute(_JOB_BY_ID, {"p_job": job_id}).first()
        return None if row is None else _job(row)

    def state(self, job_id: int) -> JobState | None:
        """Where a job stands, for the meter waiting on it."""
        job = self.get(job_id)
        return None if job is None else JobState(job.id, job.status, job.result, job.last_error)

    def _expire(self, connection: Connection, now: dt.datetime) -> None:
        expired = (JOBS.c.status == LEASED, JOBS.c.lease_expires_at < now)
        connection.execute(
            update(JOBS).where(*expired, JOBS.c.attempts >= JOBS.c.max_attempts)
            .values(status=FAILED, lease_agent_id=None, updated_at=now,
                    last_error="lease expired on every attempt (agents died or timed out)")
        )
        connection.execute(
            update(JOBS).where(*expired)
            .values(status=QUEUED, lease_agent_id=None, lease_expires_at=None, updated_at=now,
                    last_error="lease expired")
        )

    def lease(self, agent: AgentRecord, lease_s: float) -> JobRecord | None:
        """Give ``agent`` the oldest queued job of its profile of a kind it runs, or None; marks
        the agent seen. Queued jobs that no live agent of the profile can run are failed."""
        kinds = sorted(job_kinds(agent.environment))
        for _ in range(5):
            now = _now()
            with self._write() as connection:
                if agent.last_seen is None or (now - agent.last_seen).total_seconds() >= SEEN_EVERY_S:
                    connection.execute(_SEEN, {"p_agent": agent.id, "p_now": now})
                if time.monotonic() - self._expired_at >= self._expire_every_s:
                    self._expire(connection, now)
                    self._expired_at = time.monotonic()
                taken = connection.execute(self._take, {
                    "p_profile": agent.profile, "p_holder": agent.id, "p_now": now, "p_kinds": kinds,
                    "p_expires": now + dt.timedelta(seconds=lease_s)}).first()
                if taken is not None:
                    return _job(taken)
                # Nothing taken: the queue is empty, or (PostgreSQL) every queued row was locked
                # by another lease at that instant, or (SQLite) taken between select and update,
                # or what is queued is of a kind this agent does not run.
                queued = set(connection.execute(_QUEUED_KINDS, {"p_profile": agent.profile}).scalars())
                foreign = queued.difference(kinds)
                if foreign:
                    self._fail_unrunnable(connection, agent, foreign, now)
                if not queued.intersection(kinds):
                    return None
        return None  # lost every race: the caller polls again

    def _fail_unrunnable(self, connection: Connection, agent: AgentRecord, foreign: set[str],
                         now: dt.datetime) -> None:
        """Fail the queued jobs of ``agent``'s profile whose kind no live agent of it runs."""
        peers = connection.execute(
            select(AGENTS.c.environment_json).where(
                AGENTS.c.profile == agent.profile, AGENTS.c.role == AGENT, AGENTS.c.revoked.is_(False),
                AGENTS.c.last_seen >= now - dt.timedelta(seconds=LIVE_S))
        ).scalars().all()
        runnable = set().union(*(job_kinds(json.loads(env) if env else None) for env in peers))
        for kind in sorted(foreign - runnable):
            reason = (f"no live agent of profile {agent.profile!r} runs {clean_text(kind, 16)!r} jobs: agent "
                      f"{agent.name!r} runs only {', '.join(sorted(job_kinds(agent.environment)))}; update "
                      "hwprune on the device (agents of this version run measure and batch jobs)")
            connection.execute(
                update(JOBS).where(JOBS.c.status == QUEUED, JOBS.c.profile == agent.profile, JOBS.c.kind == kind)
                .values(status=FAILED, last_error=reason, updated_at=now)
            )

    def complete(self, agent: AgentRecord, job_id: int, result: MeasurementResult, *,
                 judge: Judge | None = None) -> tuple[Outcome, JobRecord | None]:
        """Accept a result once, from the lease holder: in one transaction the job is marked
        done with its result, the agent's count goes up and the result is filed in the cache
        under the job's key (a failure anywhere leaves none of these).

        ``judge`` (see ``Judge``) is asked first, inside the transaction: it may refuse the
        result by raising (nothing is written) or flag it as implausible, in which case the
        result is kept on the job for inspection, never cached, and the job queued again (or
        failed past the attempt cap), like a failure. Returns the outcome and the job as found.
        """
        now = _now()
        with self._write() as connection:
            row = connection.execute(_JOB_BY_ID, {"p_job": job_id}).first()
            if row is None:
                return Outcome.UNKNOWN, None
            job = _job(row)
            if job.status == DONE:
                return (Outcome.DUPLICATE if job.done_by_agent_id == agent.id else Outcome.NOT_HOLDER), job
            if job.status != LEASED or job.lease_agent_id != agent.id:
                return Outcome.NOT_HOLDER, job
            doubt = None if judge is None else judge(
                job, lambda: cache.reference_median_us(connection, job.reference_sha256, job.profile_fingerprint))
            if doubt is not None:
                return self._flag(connection, agent, job, result, doubt, now), job
            done = connection.execute(_MARK_DONE, {"p_job": job_id, "p_agent": agent.id, "p_done_by": agent.id,
                                                   "p_result": result_to_json(result), "p_now": now})
            if done.rowcount != 1:
                return Outcome.NOT_HOLDER, job
            connection.execute(_COUNT_DONE, {"p_agent": agent.id, "p_now": now})
            cache.insert_result(connection, job.key, result)
            return Outcome.ACCEPTED, job

    def complete_batch(self, agent: AgentRecord, job_id: int, result: BatchResultBody, *,
                       check: Callable[[JobRecord], None] | None = None) -> Outcome:
        """Accept a batch job's figures once, from the lease holder; they stay on the job (a
        batch is not an architecture: nothing goes to the measurement cache). ``check`` may
        refuse the figures by raising, before anything is written."""
        now = _now()
        with self._write() as connection:
            row = connection.execute(_JOB_BY_ID, {"p_job": job_id}).first()
            if row is None:
                return Outcome.UNKNOWN
            job = _job(row)
            if job.status == DONE:
                return Outcome.DUPLICATE if job.done_by_agent_id == agent.id else Outcome.NOT_HOLDER
            if job.status != LEASED or job.lease_agent_id != agent.id:
                return Outcome.NOT_HOLDER
            if check is not None:
                check(job)
            done = connection.execute(_MARK_DONE, {"p_job": job_id, "p_agent": agent.id, "p_done_by": agent.id,
                                                   "p_result": result.model_dump_json(), "p_now": now})
            if done.rowcount != 1:
                return Outcome.NOT_HOLDER
            connection.execute(_COUNT_DONE, {"p_agent": agent.id, "p_now": now})
            if job.batch is not None:  # every measurement is in: the last heartbeat may have said less
                connection.execute(update(JOBS).where(JOBS.c.id == job_id)
                                   .values(progress=len(job.batch.layers) + len(job.batch.plans)))
            return Outcome.ACCEPTED

    def _flag(self, connection: Connection, agent: AgentRecord, job: JobRecord, result: MeasurementResult,
              reason: str, now: dt.datetime) -> Outcome:
        flagged = json.dumps({"reason": reason, "agent": agent.name, "result": json.loads(result_to_json(result))},
                             sort_keys=True, allow_nan=False)
        changed = connection.execute(
            update(JOBS).where(JOBS.c.id == job.id, JOBS.c.status == LEASED, JOBS.c.lease_agent_id == agent.id)
            .values(flagged_json=flagged, status=FAILED if job.attempts >= job.max_attempts else QUEUED,
                    last_error=clean_text(f"implausible result from agent {agent.name}: {reason}", MAX_ERROR_CHARS),
                    lease_agent_id=None, lease_expires_at=None, updated_at=now)
        )
        return Outcome.FLAGGED if changed.rowcount == 1 else Outcome.NOT_HOLDER

    def fail(self, agent: AgentRecord, job_id: int, error: str) -> Outcome:
        """The holder could not measure: queue again, or fail past the attempt cap."""
        c = JOBS.c
        with self._write() as connection:
            changed = connection.execute(
                update(JOBS).where(c.id == job_id, c.status == LEASED, c.lease_agent_id == agent.id)
                .values(status=case((c.attempts >= c.max_attempts, FAILED), else_=QUEUED),
                        last_error=clean_text(error, MAX_ERROR_CHARS), lease_agent_id=None,
                        lease_expires_at=None, updated_at=_now())
            )
            if changed.rowcount == 1:
                return Outcome.ACCEPTED
            exists = connection.execute(select(c.id).where(c.id == job_id)).first() is not None
            return Outcome.NOT_HOLDER if exists else Outcome.UNKNOWN

    def release(self, agent: AgentRecord, job_id: int) -> Outcome:
        """Give a leased job back unmeasured (agent shutting down); the attempt is not spent."""
        c = JOBS.c
        with self._write() as connection:
            result = connection.execute(
                update(JOBS).where(c.id == job_id, c.status == LEASED, c.lease_agent_id == agent.id)
                .values(status=QUEUED, lease_agent_id=None, lease_expires_at=None,
                        attempts=c.attempts - 1, updated_at=_now())
            )
            if result.rowcount == 1:
                return Outcome.ACCEPTED
            exists = connection.execute(select(c.id).where(c.id == job_id)).first() is not None
            return Outcome.NOT_HOLDER if exists else Outcome.UNKNOWN

    def holds_artifact(self, agent: AgentRecord, sha256: str) -> bool:
        """True when ``agent`` holds a lease on a job that needs ``sha256`` (a batch's plans too)."""
        c = JOBS.c
        with self._begin() as connection:
            found = connection.execute(
                select(c.id).where(c.status == LEASED, c.lease_agent_id == agent.id,
                                   or_(c.artifact_sha256 == sha256, c.reference_sha256 == sha256)).limit(1)
            ).first()
            if found is not None:
                return True
            batches = connection.execute(
                select(c.payload_json).where(c.status == LEASED, c.lease_agent_id == agent.id, c.kind == BATCH)
            ).scalars().all()
        return any(sha256 in BatchSpec.model_validate_json(p).plans for p in batches if p)

    def counts(self) -> dict[str, int]:
        with self._begin() as connection:
            rows = connection.execute(select(JOBS.c.status, func.count()).group_by(JOBS.c.status)).all()
        return {str(status): int(count) for status, count in rows}

    def jobs(self) -> list[JobRecord]:
        with self._begin() as connection:
            return [_job(r) for r in connection.execute(select(JOBS).order_by(JOBS.c.id))]


def _agent(row: Row[Any]) -> AgentRecord:
    r = row._mapping
    return AgentRecord(id=r["id"], name=r["name"], profile=r["profile"], revoked=r["revoked"],
                       jobs_done=r["jobs_done"], last_seen=r["last_seen"],
                       environment=json.loads(r["environment_json"]) if r["environment_json"] else None,
                       role=Role(r["role"]))


def _job(row: Row[Any]) -> JobRecord:
    r = row._mapping
    batch = r["kind"] == BATCH
    return JobRecord(
        id=r["id"], status=JobStatus(r["status"]), profile=r["profile"], profile_fingerprint=r["profile_fingerprint"],
        signature=r["signature"], artifact_sha256=r["artifact_sha256"], reference_sha256=r["reference_sha256"],
        lease_agent_id=r["lease_agent_id"], lease_expires_at=r["lease_expires_at"], attempts=r["attempts"],
        max_attempts=r["max_attempts"], last_error=r["last_error"],
        result=result_from_json(r["result_json"]) if r["result_json"] and not batch else None,
        done_by_agent_id=r["done_by_agent_id"],
        flagged=json.loads(r["flagged_json"]) if r["flagged_json"] else None,
        kind=r["kind"], progress=r["progress"],
        batch=BatchSpec.model_validate_json(r["payload_json"]) if batch and r["payload_json"] else None,
        batch_result=BatchResultBody.model_validate_json(r["result_json"]) if batch and r["result_json"] else None,
    )
