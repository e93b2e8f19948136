"""Storage: hwprune's SQL tables (Alembic-migrated) beside Optuna's RDB storage."""

from __future__ import annotations

from search.storage.migrate import current_revision, ensure_schema, head_revision, upgrade
from search.storage.repository import CachedMeasurement, Repository, SearchRecord, make_engine

__all__ = [
    "CachedMeasurement",
    "Repository",
    "SearchRecord",
    "current_revision",
    "ensure_schema",
    "head_revision",
    "make_engine",
    "upgrade",
]
