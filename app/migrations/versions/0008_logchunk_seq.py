"""log chunks: one row per (host step run, sequence number), so a retried write is insert-only

Revision ID: 0008
Revises: 0007
Create Date: 2026-12-01 09:20:00
"""
from alembic import op


revision = '0008'
down_revision = '0007'
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table('logchunk', schema=None) as batch_op:
        batch_op.create_unique_constraint('uq_logchunk_host_step_run_id_seq',
                                          ['host_step_run_id', 'seq'])


def downgrade() -> None:
    with op.batch_alter_table('logchunk', schema=None) as batch_op:
        batch_op.drop_constraint('uq_logchunk_host_step_run_id_seq', type_='unique')
