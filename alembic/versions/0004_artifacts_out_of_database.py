"""ONNX bytes out of the database, into the artifact store

Revision ID: 0004
Revises: 0003
Create Date: 2026-12-01 19:30:00.000000

Every stored blob is moved (not dropped) into the artifact store: a trial's ONNX can be re-made
from its plan, but only where torch and the model's plugin are installed, and the hub that serves
a queued job's artifact to an agent has neither; a base model's export may also no longer
reproduce its sha256 under newer torch. Moving loses nothing. A blob whose bytes do not match its
sha256 is corrupt and dropped (a re-made export replaces it). One blob is read at a time, so a
database of many GB migrates in little memory. Then the column goes.
"""

from __future__ import annotations

import hashlib
import logging

import sqlalchemy as sa

from alembic import context, op

revision = "0004"
down_revision = "0003"
branch_labels = None
depends_on = None

logger = logging.getLogger("alembic.runtime.migration")

_artifacts = sa.table("hwprune_artifacts", sa.column("sha256", sa.String), sa.column("size_bytes", sa.Integer),
                      sa.column("content", sa.LargeBinary))


def _store() -> object:
    from search.storage.artifacts import ArtifactStore

    return ArtifactStore(str(context.config.attributes["artifacts_url"]))


def upgrade() -> None:
    if not context.is_offline_mode():  # an offline SQL script cannot carry the bytes anywhere
        bind = op.get_bind()
        names = bind.execute(sa.select(_artifacts.c.sha256)).scalars().all()
        store = _store() if names else None
        for sha256 in names:
            content = bind.execute(sa.select(_artifacts.c.content).where(_artifacts.c.sha256 == sha256)).scalar_one()
            content = bytes(content)
            if hashlib.sha256(content).hexdigest() != sha256:
                logger.warning("dropping artifact %s: its bytes do not match its sha256", sha256[:12])
                bind.execute(sa.delete(_artifacts).where(_artifacts.c.sha256 == sha256))
                continue
            store.put_bytes(content, sha256)  # type: ignore[attr-defined]
        if names:
            logger.info("moved %d artifacts to %s", len(names), store)
    with op.batch_alter_table("hwprune_artifacts", schema=None) as batch_op:
        batch_op.drop_column("content")


def downgrade() -> None:
    # Back into the database: rows whose file the store no longer holds (pruned) are dropped, as
    # the old schema cannot name an artifact without its bytes.
    with op.batch_alter_table("hwprune_artifacts", schema=None) as batch_op:
        batch_op.add_column(sa.Column("content", sa.LargeBinary(), nullable=True))
    if not context.is_offline_mode():
        bind = op.get_bind()
        names = bind.execute(sa.select(_artifacts.c.sha256)).scalars().all()
        store = _store() if names else None
        for sha256 in names:
            content = store.read_bytes(sha256)  # type: ignore[attr-defined]
            if content is None:
                bind.execute(sa.delete(_artifacts).where(_artifacts.c.sha256 == sha256))
            else:
                bind.execute(sa.update(_artifacts).where(_artifacts.c.sha256 == sha256).values(content=content))
    with op.batch_alter_table("hwprune_artifacts", schema=None) as batch_op:
        batch_op.alter_column("content", existing_type=sa.LargeBinary(), nullable=False)
