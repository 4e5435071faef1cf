"""execution parent: the execution (and stage) that started a chained pipeline's run

Revision ID: 0018
Revises: 0017
"""

import sqlalchemy as sa
import sqlmodel
from alembic import op

revision = "0018"
down_revision = "0017"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("execution", schema=None) as batch_op:
        batch_op.add_column(
            sa.Column(
                "parent_execution_id",
                sqlmodel.sql.sqltypes.AutoString(length=32),
                nullable=True,
            )
        )
        batch_op.add_column(sa.Column("parent_stage", sa.Integer(), nullable=True))
        batch_op.create_index(
            "ix_execution_parent_execution_id", ["parent_execution_id"], unique=False
        )


def downgrade() -> None:
    with op.batch_alter_table("execution", schema=None) as batch_op:
        batch_op.drop_index("ix_execution_parent_execution_id")
        batch_op.drop_column("parent_stage")
        batch_op.drop_column("parent_execution_id")
