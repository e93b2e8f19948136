"""Latency models in the database: each save is a new version of a named model; loading takes the
newest. Searches, workers and the hub share them (one table, ``hwprune_latency_models``)."""

from __future__ import annotations

import datetime as dt
import json
from dataclasses import dataclass
from typing import Any

from sqlalchemy import Engine, func, select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import sessionmaker

from latency_models.predictors import HeldOutError, LatencyModel, from_state
from search.errors import ConfigError, StorageError
from search.storage.models import LatencyModelRow
from search.storage.session import transaction


@dataclass(frozen=True, slots=True)
class StoredLatencyModel:
    """One saved version of a latency model and what it is for."""

    name: str
    version: int
    kind: str
    profile: str
    profile_fingerprint: str
    base_fingerprint: str
    n_samples: int
    held_out: HeldOutError | None
    state: dict[str, Any]
    created_at: dt.datetime

    def model(self) -> LatencyModel:
        return from_state(self.state)


class LatencyModelStore:
    """Save and load latency models on a database engine (the schema is the caller's to check)."""

    def __init__(self, engine: Engine) -> None:
        self._sessions = sessionmaker(engine, expire_on_commit=False)

    def save(self, name: str, model: LatencyModel, *, profile: str, profile_fingerprint: str,
             base_fingerprint: str) -> StoredLatencyModel:
        """Store ``model`` as the next version of ``name`` (a concurrent save retries once)."""
        state = model.to_state()
        held = None if model.held_out is None else model.held_out.to_dict()
        for _ in range(3):
            try:
                with transaction(self._sessions, "latency models") as session:
                    latest = session.scalar(select(func.max(LatencyModelRow.version))
                                            .where(LatencyModelRow.name == name)) or 0
                    row = LatencyModelRow(
                        name=name, version=latest + 1, kind=model.kind, profile=profile,
                        profile_fingerprint=profile_fingerprint, base_fingerprint=base_fingerprint,
                        n_samples=len(model.samples), held_out_json=None if held is None else json.dumps(held),
                        state_json=json.dumps(state))
                    session.add(row)
                    session.flush()
                    return _record(row)
            except IntegrityError:
                continue  # another worker saved this version first: take the next one
        raise StorageError(f"could not save latency model {name!r}: versions keep colliding")

    def latest(self, name: str) -> StoredLatencyModel | None:
        with transaction(self._sessions, "latency models") as session:
            row = session.scalars(select(LatencyModelRow).where(LatencyModelRow.name == name)
                                  .order_by(LatencyModelRow.version.desc()).limit(1)).first()
            return None if row is None else _record(row)

    def get(self, name: str, *, profile: str | None = None) -> StoredLatencyModel:
        """The newest version of ``name``.

        Raises:
            ConfigError: no model of that name (the message lists the names there are), or it
                belongs to another profile than ``profile``.
        """
        found = self.latest(name)
        if found is None:
            known = ", ".join(self.names()) or "(none)"
            raise ConfigError(f"no latency model named {name!r}; latency models: {known} "
                              "(build one with `hwprune latency-model build`)")
        if profile is not None and found.profile != profile:
            raise ConfigError(f"latency model {name!r} is for profile {found.profile!r}, not {profile!r}")
        return found

    def names(self) -> list[str]:
        with transaction(self._sessions, "latency models") as session:
            return list(session.scalars(select(LatencyModelRow.name).distinct().order_by(LatencyModelRow.name)))

    def for_target(self, *, profile_fingerprint: str, base_fingerprint: str) -> list[StoredLatencyModel]:
        """The newest version of every model for this base model on these profile settings."""
        with transaction(self._sessions, "latency models") as session:
            rows = session.scalars(select(LatencyModelRow).where(
                LatencyModelRow.profile_fingerprint == profile_fingerprint,
                LatencyModelRow.base_fingerprint == base_fingerprint,
            ).order_by(LatencyModelRow.name, LatencyModelRow.version.desc())).all()
            newest: dict[str, StoredLatencyModel] = {}
            for row in rows:
                newest.setdefault(row.name, _record(row))
            return list(newest.values())


def _record(row: LatencyModelRow) -> StoredLatencyModel:
    return StoredLatencyModel(
        name=row.name, version=row.version, kind=row.kind, profile=row.profile,
        profile_fingerprint=row.profile_fingerprint, base_fingerprint=row.base_fingerprint,
        n_samples=row.n_samples,
        held_out=None if row.held_out_json is None else HeldOutError.from_dict(json.loads(row.held_out_json)),
        state=json.loads(row.state_json), created_at=row.created_at,
    )
