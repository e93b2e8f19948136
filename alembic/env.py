"""Alembic environment for hwprune's own tables.

Optuna keeps its own migrations in the default ``alembic_version`` table of the same database, so
hwprune uses ``hwprune_alembic_version`` and only ever looks at tables named ``hwprune_*``.
The URL comes from the caller (``hwprune db upgrade``), ``-x db=URL`` or ``HWPRUNE_DB``; the
artifact store (where 0004 moves the ONNX bytes) from the caller, ``-x artifacts=URL`` or
``HWPRUNE_ARTIFACTS``, else its default for the database.
"""

from __future__ import annotations

from typing import Any

from sqlalchemy import create_engine, pool

from alembic import context
from search.config import artifacts_url, db_url
from search.storage.migrate import VERSION_TABLE
from search.storage.models import TABLE_PREFIX, Base

config = context.config


def _url() -> str:
    url = config.attributes.get("url") or context.get_x_argument(as_dictionary=True).get("db")
    return db_url(str(url) if url else None)


# Migrations that move data out of the database (0004) find the artifact store here.
config.attributes.setdefault(
    "artifacts_url", context.get_x_argument(as_dictionary=True).get("artifacts") or artifacts_url(_url()))


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
