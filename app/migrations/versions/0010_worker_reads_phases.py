"""The worker role reads phase records (a retry scheduled on a region worker reads its phase's
hosts and lanes); grants applied again from app/dbroles.py.

Revision ID: 0010
Revises: 0009
"""

from alembic import op

revision = "0010"
down_revision = "0009"
branch_labels = None
depends_on = None


def upgrade() -> None:
    from app.dbroles import apply

    apply(op.get_bind())  # PostgreSQL only; idempotent (see app/dbroles.py)


def downgrade() -> None:
    bind = op.get_bind()
    if bind.dialect.name == "postgresql":
        bind.exec_driver_sql("REVOKE SELECT ON phaserun FROM vmfarm_worker")
