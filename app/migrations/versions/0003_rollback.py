"""rollback: host step kind, rollback plans, previous execution per instance

Revision ID: 0003
Revises: 0002
Create Date: 2026-11-26 15:00:00
"""
from alembic import op
import sqlalchemy as sa
import sqlmodel


revision = '0003'
down_revision = '0002'
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table('hoststeprun', schema=None) as batch_op:
        batch_op.add_column(sa.Column('kind', sqlmodel.sql.sqltypes.AutoString(length=16),
                                      nullable=False, server_default='deploy'))
    with op.batch_alter_table('execution', schema=None) as batch_op:
        batch_op.add_column(sa.Column('rollback', sa.JSON(), nullable=True))
    with op.batch_alter_table('stagerun', schema=None) as batch_op:
        batch_op.add_column(sa.Column('rollback', sa.JSON(), nullable=True))
    with op.batch_alter_table('instance', schema=None) as batch_op:
        batch_op.add_column(sa.Column('previous_execution_id',
                                      sqlmodel.sql.sqltypes.AutoString(length=32), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table('instance', schema=None) as batch_op:
        batch_op.drop_column('previous_execution_id')
    with op.batch_alter_table('stagerun', schema=None) as batch_op:
        batch_op.drop_column('rollback')
    with op.batch_alter_table('execution', schema=None) as batch_op:
        batch_op.drop_column('rollback')
    with op.batch_alter_table('hoststeprun', schema=None) as batch_op:
        batch_op.drop_column('kind')
