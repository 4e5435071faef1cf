"""webhook deliveries: one row per trigger and delivery id (a repeated delivery starts nothing)

Revision ID: 0017
Revises: 0011
"""

import sqlalchemy as sa
import sqlmodel
from alembic import op

revision = "0017"
down_revision = "0011"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "webhookdelivery",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("trigger_id", sqlmodel.sql.sqltypes.AutoString(length=128), nullable=False),
        sa.Column("delivery_id", sqlmodel.sql.sqltypes.AutoString(length=160), nullable=False),
        sa.Column("received_at", sa.DateTime(), nullable=False),
        sa.Column("outcome", sqlmodel.sql.sqltypes.AutoString(length=16), nullable=False),
        sa.Column("execution_id", sqlmodel.sql.sqltypes.AutoString(length=32), nullable=True),
        sa.Column("detail", sqlmodel.sql.sqltypes.AutoString(length=1000), nullable=False),
        sa.PrimaryKeyConstraint("id"),
        sa.UniqueConstraint("trigger_id", "delivery_id"),
    )
    op.create_index("ix_webhookdelivery_trigger_id", "webhookdelivery", ["trigger_id"])
    from app.dbroles import apply

    apply(op.get_bind())  # the server alone reads and writes it (PostgreSQL only)


def downgrade() -> None:
    op.drop_index("ix_webhookdelivery_trigger_id", table_name="webhookdelivery")
    op.drop_table("webhookdelivery")
