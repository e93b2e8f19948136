"""Storage: hwprune's SQL tables (Alembic-migrated) beside Optuna's RDB storage."""

from __future__ import annotations

from search.storage.migrate import current_revision, ensure_schema, head_revision, upgrade
from search.storage.repository import Repository, SearchRecord, make_engine

__all__ = [
    "Repository",
    "SearchRecord",
    "current_revision",
    "ensure_schema",
    "head_revision",
    "make_engine",
    "upgrade",
]
