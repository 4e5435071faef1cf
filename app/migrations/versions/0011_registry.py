"""the registry: versions of Environments, Infrastructures, Services, Connectors, Templates and
Pipelines kept by the server (append-only), and the versions each execution used; the worker
role reads both (grants applied again from app/dbroles.py)

Revision ID: 0011
Revises: 0010
"""

import sqlalchemy as sa
import sqlmodel
from alembic import op

revision = "0011"
down_revision = "0010"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "registryversion",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("kind", sqlmodel.sql.sqltypes.AutoString(length=32), nullable=False),
        sa.Column("ident", sqlmodel.sql.sqltypes.AutoString(length=255), nullable=False),
        sa.Column("version", sa.Integer(), nullable=False),
        sa.Column("text", sa.Text(), nullable=False),
        sa.Column("author", sqlmodel.sql.sqltypes.AutoString(length=255), nullable=False),
        sa.Column("token_id", sqlmodel.sql.sqltypes.AutoString(length=32), nullable=True),
        sa.Column("env_type", sqlmodel.sql.sqltypes.AutoString(length=32), nullable=True),
        sa.Column("env_ref", sqlmodel.sql.sqltypes.AutoString(length=255), nullable=True),
        sa.Column("created_at", sa.DateTime(), nullable=False),
        sa.PrimaryKeyConstraint("id"),
        sa.UniqueConstraint("kind", "ident", "version"),
    )
    with op.batch_alter_table("registryversion", schema=None) as batch_op:
        batch_op.create_index(batch_op.f("ix_registryversion_kind"), ["kind"], unique=False)
        batch_op.create_index(batch_op.f("ix_registryversion_ident"), ["ident"], unique=False)
    op.create_table(
        "registryuse",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("execution_id", sqlmodel.sql.sqltypes.AutoString(length=32), nullable=False),
        sa.Column("kind", sqlmodel.sql.sqltypes.AutoString(length=32), nullable=False),
        sa.Column("ident", sqlmodel.sql.sqltypes.AutoString(length=255), nullable=False),
        sa.Column("version", sa.Integer(), nullable=False),
        sa.ForeignKeyConstraint(["execution_id"], ["execution.id"]),
        sa.PrimaryKeyConstraint("id"),
        sa.UniqueConstraint("execution_id", "kind", "ident"),
    )
    with op.batch_alter_table("registryuse", schema=None) as batch_op:
        batch_op.create_index(
            batch_op.f("ix_registryuse_execution_id"), ["execution_id"], unique=False
        )
    from app.dbroles import apply

    apply(op.get_bind())  # PostgreSQL only; idempotent (see app/dbroles.py)


def downgrade() -> None:
    with op.batch_alter_table("registryuse", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_registryuse_execution_id"))
    op.drop_table("registryuse")
    with op.batch_alter_table("registryversion", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_registryversion_ident"))
        batch_op.drop_index(batch_op.f("ix_registryversion_kind"))
    op.drop_table("registryversion")
