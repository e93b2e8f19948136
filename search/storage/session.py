"""One transaction per unit of work, with database errors mapped to ``StorageError``."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

from sqlalchemy import Connection, Engine
from sqlalchemy.exc import IntegrityError, SQLAlchemyError
from sqlalchemy.orm import Session, sessionmaker

from search.errors import StorageError


@contextmanager
def transaction(sessions: sessionmaker[Session], where: str) -> Iterator[Session]:
    """Commit on success, roll back on error. ``IntegrityError`` propagates as is: callers use
    it to detect a concurrent writer that got there first."""
    session = sessions()
    try:
        yield session
        session.commit()
    except IntegrityError:
        session.rollback()
        raise
    except SQLAlchemyError as exc:
        session.rollback()
        raise StorageError(f"database error on {where}: {exc}") from exc
    finally:
        session.close()


@contextmanager
def core_transaction(engine: Engine, where: str) -> Iterator[Connection]:
    """``transaction`` for Core statements, without the ORM's unit of work (the job queue's hot
    path runs a few statements per request, where the ORM's bookkeeping was most of the cost)."""
    try:
        with engine.begin() as connection:
            yield connection
    except IntegrityError:
        raise
    except SQLAlchemyError as exc:
        raise StorageError(f"database error on {where}: {exc}") from exc
