"""agent roles (reader tokens) and flagged results on jobs

Revision ID: 0003
Revises: 0002
Create Date: 2026-11-23 21:30:00.000000
"""

from __future__ import annotations

import sqlalchemy as sa

from alembic import op

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table('hwprune_agents', schema=None) as batch_op:
        batch_op.add_column(sa.Column('role', sa.String(length=16), server_default='agent', nullable=False))
    with op.batch_alter_table('hwprune_jobs', schema=None) as batch_op:
        batch_op.add_column(sa.Column('flagged_json', sa.Text(), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table('hwprune_jobs', schema=None) as batch_op:
        batch_op.drop_column('flagged_json')
    with op.batch_alter_table('hwprune_agents', schema=None) as batch_op:
        batch_op.drop_column('role')
