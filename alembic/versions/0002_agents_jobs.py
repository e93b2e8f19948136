"""remote agents and their job queue

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-21 23:52:14.586034
"""

from __future__ import annotations

import sqlalchemy as sa

from alembic import op


revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table('hwprune_agents',
    sa.Column('id', sa.Integer(), nullable=False),
    sa.Column('name', sa.String(length=100), nullable=False),
    sa.Column('profile', sa.String(length=100), nullable=False),
    sa.Column('token_hash', sa.String(length=64), nullable=False),
    sa.Column('revoked', sa.Boolean(), nullable=False),
    sa.Column('jobs_done', sa.Integer(), nullable=False),
    sa.Column('last_seen', sa.DateTime(), nullable=True),
    sa.Column('environment_json', sa.Text(), nullable=True),
    sa.Column('created_at', sa.DateTime(), nullable=False),
    sa.PrimaryKeyConstraint('id'),
    sa.UniqueConstraint('name'),
    sa.UniqueConstraint('token_hash')
    )
    op.create_table('hwprune_jobs',
    sa.Column('id', sa.Integer(), nullable=False),
    sa.Column('status', sa.String(length=16), nullable=False),
    sa.Column('profile', sa.String(length=100), nullable=False),
    sa.Column('profile_fingerprint', sa.String(length=16), nullable=False),
    sa.Column('signature', sa.String(length=64), nullable=False),
    sa.Column('artifact_sha256', sa.String(length=64), nullable=False),
    sa.Column('reference_sha256', sa.String(length=64), nullable=False),
    sa.Column('lease_agent_id', sa.Integer(), nullable=True),
    sa.Column('lease_expires_at', sa.DateTime(), nullable=True),
    sa.Column('attempts', sa.Integer(), nullable=False),
    sa.Column('max_attempts', sa.Integer(), nullable=False),
    sa.Column('last_error', sa.Text(), nullable=True),
    sa.Column('result_json', sa.Text(), nullable=True),
    sa.Column('done_by_agent_id', sa.Integer(), nullable=True),
    sa.Column('created_at', sa.DateTime(), nullable=False),
    sa.Column('updated_at', sa.DateTime(), nullable=False),
    sa.PrimaryKeyConstraint('id'),
    sa.UniqueConstraint('signature', 'profile_fingerprint', 'reference_sha256', name='uq_hwprune_jobs_key')
    )
    with op.batch_alter_table('hwprune_jobs', schema=None) as batch_op:
        batch_op.create_index(batch_op.f('ix_hwprune_jobs_profile'), ['profile'], unique=False)
        batch_op.create_index(batch_op.f('ix_hwprune_jobs_status'), ['status'], unique=False)



def downgrade() -> None:
    with op.batch_alter_table('hwprune_jobs', schema=None) as batch_op:
        batch_op.drop_index(batch_op.f('ix_hwprune_jobs_status'))
        batch_op.drop_index(batch_op.f('ix_hwprune_jobs_profile'))

    op.drop_table('hwprune_jobs')
    op.drop_table('hwprune_agents')
