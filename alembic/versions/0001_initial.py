"""initial schema: searches, artifacts, measurement cache

Revision ID: 0001
Revises: 
Create Date: 2026-11-21 23:38:45.774944
"""

from __future__ import annotations

import sqlalchemy as sa

from alembic import op


revision = "0001"
down_revision = None
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table('hwprune_artifacts',
    sa.Column('sha256', sa.String(length=64), nullable=False),
    sa.Column('size_bytes', sa.Integer(), nullable=False),
    sa.Column('content', sa.LargeBinary(), nullable=False),
    sa.Column('created_at', sa.DateTime(), nullable=False),
    sa.PrimaryKeyConstraint('sha256')
    )
    op.create_table('hwprune_measurements',
    sa.Column('id', sa.Integer(), nullable=False),
    sa.Column('signature', sa.String(length=64), nullable=False),
    sa.Column('profile', sa.String(length=100), nullable=False),
    sa.Column('profile_fingerprint', sa.String(length=16), nullable=False),
    sa.Column('reference_sha256', sa.String(length=64), nullable=False),
    sa.Column('artifact_sha256', sa.String(length=64), nullable=False),
    sa.Column('median_us', sa.Float(), nullable=False),
    sa.Column('p10_us', sa.Float(), nullable=False),
    sa.Column('p90_us', sa.Float(), nullable=False),
    sa.Column('mean_us', sa.Float(), nullable=False),
    sa.Column('stdev_us', sa.Float(), nullable=False),
    sa.Column('n', sa.Integer(), nullable=False),
    sa.Column('ci_low_us', sa.Float(), nullable=False),
    sa.Column('ci_high_us', sa.Float(), nullable=False),
    sa.Column('ratio', sa.Float(), nullable=True),
    sa.Column('ratio_ci_low', sa.Float(), nullable=True),
    sa.Column('ratio_ci_high', sa.Float(), nullable=True),
    sa.Column('converged', sa.Boolean(), nullable=False),
    sa.Column('backend', sa.String(length=50), nullable=False),
    sa.Column('backend_version', sa.String(length=50), nullable=False),
    sa.Column('device', sa.String(length=200), nullable=False),
    sa.Column('created_at', sa.DateTime(), nullable=False),
    sa.PrimaryKeyConstraint('id'),
    sa.UniqueConstraint('signature', 'profile_fingerprint', 'reference_sha256', name='uq_hwprune_measurements_key')
    )
    with op.batch_alter_table('hwprune_measurements', schema=None) as batch_op:
        batch_op.create_index(batch_op.f('ix_hwprune_measurements_signature'), ['signature'], unique=False)

    op.create_table('hwprune_searches',
    sa.Column('id', sa.Integer(), nullable=False),
    sa.Column('name', sa.String(length=100), nullable=False),
    sa.Column('study_name', sa.String(length=200), nullable=False),
    sa.Column('config_json', sa.Text(), nullable=False),
    sa.Column('base_fingerprint', sa.String(length=64), nullable=False),
    sa.Column('space_fingerprint', sa.String(length=16), nullable=False),
    sa.Column('space_json', sa.Text(), nullable=False),
    sa.Column('base_json', sa.Text(), nullable=False),
    sa.Column('versions_json', sa.Text(), nullable=False),
    sa.Column('created_at', sa.DateTime(), nullable=False),
    sa.PrimaryKeyConstraint('id'),
    sa.UniqueConstraint('name')
    )


def downgrade() -> None:
    op.drop_table('hwprune_searches')
    with op.batch_alter_table('hwprune_measurements', schema=None) as batch_op:
        batch_op.drop_index(batch_op.f('ix_hwprune_measurements_signature'))

    op.drop_table('hwprune_measurements')
    op.drop_table('hwprune_artifacts')
