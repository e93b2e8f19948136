"""Schema management: upgrade with Alembic, and refuse a database at another schema."""

from __future__ import annotations

from pathlib import Path

from sqlalchemy import Engine, inspect
from sqlalchemy.exc import SQLAlchemyError

from search.errors import SchemaError, StorageError

VERSION_TABLE = "hwprune_alembic_version"


def _migrations_dir() -> Path:
    """The Alembic scripts: inside the package in a wheel (the build copies the top-level
    ``alembic/`` to ``search/storage/migrations``), else the source tree's (editable installs)."""
    here = Path(__file__).resolve().parent
    for candidate in (here / "migrations", here.parents[1] / "alembic"):
        if (candidate / "env.py").is_file():
            return candidate
    return here / "migrations"


ALEMBIC_DIR = _migrations_dir()


def _config(url: str, artifacts: str | None = None) -> object:
    from alembic.config import Config

    if not (ALEMBIC_DIR / "env.py").is_file():
        raise StorageError(
            f"hwprune's migrations are missing from {ALEMBIC_DIR}: reinstall hwprune "
            "(pip install --force-reinstall 'hwprune[search]')"
        )
    config = Config()
    config.set_main_option("script_location", str(ALEMBIC_DIR))
    config.attributes["url"] = url
    if artifacts is not None:
        config.attributes["artifacts_url"] = artifacts
    return config


def head_revision() -> str:
    from alembic.script import ScriptDirectory

    head = ScriptDirectory.from_config(_config("sqlite://")).get_current_head()  # type: ignore[arg-type]
    if head is None:
        raise StorageError(f"no migrations found in {ALEMBIC_DIR}")
    return head


def current_revision(engine: Engine) -> str | None:
    """The revision recorded in ``hwprune_alembic_version``, or None for a new database."""
    from alembic.runtime.migration import MigrationContext

    try:
        with engine.connect() as connection:
            context = MigrationContext.configure(connection, opts={"version_table": VERSION_TABLE})
            return context.get_current_revision()
    except SQLAlchemyError as exc:
        raise StorageError(f"cannot read the schema version of {engine.url!r}: {exc}") from exc


def upgrade(url: str, revision: str = "head", *, artifacts: str | None = None) -> None:
    """Apply hwprune's migrations up to ``revision``; Optuna's tables are not touched.
    ``artifacts`` is the artifact store 0004 moves stored ONNX bytes into (default: the
    database's, ``search.config.artifacts_url``)."""
    from alembic.util import CommandError

    from alembic import command

    try:
        command.upgrade(_config(url, artifacts), revision)  # type: ignore[arg-type]
    except CommandError as exc:
        # e.g. a database at a revision this hwprune does not know (written by a newer one)
        raise SchemaError(f"cannot migrate {_safe(url)}: {exc}; upgrade hwprune, or use a new database") from None
    except SQLAlchemyError as exc:
        raise StorageError(f"migrating {_safe(url)} failed: {exc}") from exc


def ensure_schema(engine: Engine, url: str) -> None:
    """Create hwprune's tables in a new database; refuse one at another revision.

    Raises:
        SchemaError: the database is at an older or unknown revision, with the command to run.
    """
    current = current_revision(engine)
    head = head_revision()
    if current == head:
        return
    if current is None:
        names = set(inspect(engine).get_table_names())
        if any(n.startswith("hwprune_") and n != VERSION_TABLE for n in names):
            raise SchemaError(
                f"database {_safe(url)} has hwprune tables but no schema version: "
                "it was not created by hwprune's migrations; use a new database"
            )
        upgrade(url)
        return
    from alembic.script import ScriptDirectory

    known = {s.revision for s in ScriptDirectory.from_config(_config(url)).walk_revisions()}  # type: ignore[arg-type]
    if current in known and _holds_nothing(engine):
        # A process killed while it created a new database leaves it part-migrated and empty
        # (the fault matrix's SIGKILLs found this): finishing the migration loses nothing.
        upgrade(url)
        return
    if current in known:
        raise SchemaError(
            f"database schema at {current}, this hwprune expects {head}: "
            f"run `hwprune db upgrade --db {_safe(url)}` (stored trials are kept)"
        )
    raise SchemaError(
        f"database schema at {current}, which this hwprune does not know (it expects {head}): "
        "it was written by a newer hwprune; upgrade hwprune"
    )


def _holds_nothing(engine: Engine) -> bool:
    """True when every hwprune table that exists is empty."""
    from sqlalchemy import text

    with engine.connect() as connection:
        for name in inspect(connection).get_table_names():
            if name.startswith("hwprune_") and name != VERSION_TABLE:
                if connection.execute(text(f'SELECT 1 FROM "{name}" LIMIT 1')).first() is not None:
                    return False
    return True


def _safe(url: str) -> str:
    """The URL without its password, for messages."""
    from sqlalchemy.engine import make_url

    try:
        return make_url(url).render_as_string(hide_password=True)
    except Exception:
        return "<database>"
