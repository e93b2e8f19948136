"""batch jobs: a job's kind, its batch (layers and plans) and how far its agent has got

Revision ID: 0006
Revises: 0005
Create Date: 2026-12-01 22:40:00.000000
"""

from __future__ import annotations

import sqlalchemy as sa

from alembic import op

revision = "0006"
down_revision = "0005"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table('hwprune_jobs', schema=None) as batch_op:
        batch_op.add_column(sa.Column('kind', sa.String(length=16), server_default='measure', nullable=False))
        batch_op.add_column(sa.Column('payload_json', sa.Text(), nullable=True))
        batch_op.add_column(sa.Column('progress', sa.Integer(), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table('hwprune_jobs', schema=None) as batch_op:
        batch_op.drop_column('progress')
        batch_op.drop_column('payload_json')
        batch_op.drop_column('kind')
