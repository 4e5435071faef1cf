"""artifact triggers: each trigger's last poll, and one row per trigger and build it saw

Revision ID: 0019
Revises: 0018
"""

import sqlalchemy as sa
import sqlmodel
from alembic import op

revision = "0019"
down_revision = "0018"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "artifactpoll",
        sa.Column("trigger_id", sqlmodel.sql.sqltypes.AutoString(length=128), nullable=False),
        sa.Column("polled_at", sa.DateTime(), nullable=False),
        sa.Column("ok_at", sa.DateTime(), nullable=True),
        sa.Column("error", sqlmodel.sql.sqltypes.AutoString(length=1000), nullable=False),
        sa.Column("primed", sa.Boolean(), nullable=False),
        sa.Column("source", sqlmodel.sql.sqltypes.AutoString(length=64), nullable=False),
        sa.PrimaryKeyConstraint("trigger_id"),
    )
    op.create_table(
        "artifactbuild",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("trigger_id", sqlmodel.sql.sqltypes.AutoString(length=128), nullable=False),
        sa.Column("build", sqlmodel.sql.sqltypes.AutoString(length=1024), nullable=False),
        sa.Column("seen_at", sa.DateTime(), nullable=False),
        sa.Column("outcome", sqlmodel.sql.sqltypes.AutoString(length=16), nullable=False),
        sa.Column("execution_id", sqlmodel.sql.sqltypes.AutoString(length=32), nullable=True),
        sa.Column("detail", sqlmodel.sql.sqltypes.AutoString(length=1000), nullable=False),
        sa.PrimaryKeyConstraint("id"),
        sa.UniqueConstraint("trigger_id", "build"),
    )
    op.create_index("ix_artifactbuild_trigger_id", "artifactbuild", ["trigger_id"])
    from app.dbroles import apply

    apply(op.get_bind())  # the server alone reads and writes them (PostgreSQL only)


def downgrade() -> None:
    op.drop_index("ix_artifactbuild_trigger_id", table_name="artifactbuild")
    op.drop_table("artifactbuild")
    op.drop_table("artifactpoll")
