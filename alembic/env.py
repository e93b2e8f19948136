"""Alembic environment for hwprune's own tables.

Optuna keeps its own migrations in the default ``alembic_version`` table of the same database, so
hwprune uses ``hwprune_alembic_version`` and only ever looks at tables named ``hwprune_*``.
The URL comes from the caller (``hwprune db upgrade``), ``-x db=URL`` or ``HWPRUNE_DB``.
"""

from __future__ import annotations

import os
from typing import Any

from sqlalchemy import create_engine, pool

from alembic import context
from search.storage.models import TABLE_PREFIX, Base

VERSION_TABLE = "hwprune_alembic_version"

config = context.config


def _url() -> str:
    url = config.attributes.get("url") or context.get_x_argument(as_dictionary=True).get("db")
    return str(url or os.environ.get("HWPRUNE_DB") or "sqlite:///hwprune.db")


def _include_name(name: str | None, type_: str, _parent: Any) -> bool:
    if type_ == "table":
        return bool(name) and (name.startswith(TABLE_PREFIX) and name != VERSION_TABLE)
    return True


def _configure(**kwargs: Any) -> None:
    context.configure(
        target_metadata=Base.metadata,
        version_table=VERSION_TABLE,
        include_name=_include_name,
        render_as_batch=True,  # SQLite can only alter tables by copying them
        compare_type=True,
        **kwargs,
    )


def run_migrations_offline() -> None:
    _configure(url=_url(), literal_binds=True)
    with context.begin_transaction():
        context.run_migrations()


def run_migrations_online() -> None:
    connection = config.attributes.get("connection")
    if connection is not None:
        _configure(connection=connection)
        with context.begin_transaction():
            context.run_migrations()
        return
    engine = create_engine(_url(), poolclass=pool.NullPool)
    with engine.connect() as connection:
        _configure(connection=connection)
        with context.begin_transaction():
            context.run_migrations()


if context.is_offline_mode():
    run_migrations_offline()
else:
    run_migrations_online()
