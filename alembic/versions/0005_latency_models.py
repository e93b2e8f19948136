"""latency models (lookup tables, learned predictors) as versioned fitted states

Revision ID: 0005
Revises: 0004
Create Date: 2026-12-01 19:40:00.000000
"""

from __future__ import annotations

import sqlalchemy as sa

from alembic import op

revision = "0005"
down_revision = "0004"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table('hwprune_latency_models',
    sa.Column('id', sa.Integer(), nullable=False),
    sa.Column('name', sa.String(length=200), nullable=False),
    sa.Column('version', sa.Integer(), nullable=False),
    sa.Column('kind', sa.String(length=50), nullable=False),
    sa.Column('profile', sa.String(length=100), nullable=False),
    sa.Column('profile_fingerprint', sa.String(length=16), nullable=False),
    sa.Column('base_fingerprint', sa.String(length=64), nullable=False),
    sa.Column('n_samples', sa.Integer(), nullable=False),
    sa.Column('held_out_json', sa.Text(), nullable=True),
    sa.Column('state_json', sa.Text(), nullable=False),
    sa.Column('created_at', sa.DateTime(), nullable=False),
    sa.PrimaryKeyConstraint('id'),
    sa.UniqueConstraint('name', 'version', name='uq_hwprune_latency_models_version')
    )
    with op.batch_alter_table('hwprune_latency_models', schema=None) as batch_op:
        batch_op.create_index(batch_op.f('ix_hwprune_latency_models_name'), ['name'], unique=False)


def downgrade() -> None:
    with op.batch_alter_table('hwprune_latency_models', schema=None) as batch_op:
        batch_op.drop_index(batch_op.f('ix_hwprune_latency_models_name'))
    op.drop_table('hwprune_latency_models')
