"""One transaction per unit of work, with database errors mapped to ``StorageError``."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

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
