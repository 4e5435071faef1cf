"""ledger roles: vmfarm_server, vmfarm_worker, vmfarm_readonly; the audit trail append-only

Revision ID: 0009
Revises: 0008
Create Date: 2026-12-01 09:30:00
"""
from alembic import op


revision = '0009'
down_revision = '0008'
branch_labels = None
depends_on = None


def upgrade() -> None:
    from app.dbroles import apply

    apply(op.get_bind())  # PostgreSQL only; see app/dbroles.py


def downgrade() -> None:
    bind = op.get_bind()
    if bind.dialect.name != "postgresql":
        return
    op.execute('DROP TRIGGER IF EXISTS auditevent_append_only ON "auditevent"')
    op.execute('DROP TRIGGER IF EXISTS auditevent_no_truncate ON "auditevent"')
    op.execute('DROP FUNCTION IF EXISTS vmfarm_append_only()')
