"""The quick head check names Alembic's head (no database needed). The migrations themselves
run on SQLite and PostgreSQL in tests/service/test_migrations.py.
"""

from __future__ import annotations

from pathlib import Path

from sqlalchemy import create_engine

import app.models  # noqa: F401  (registers the tables)
from app.db import migrate


def test_the_quick_head_check_names_alembics_head(tmp_path: Path) -> None:
    from alembic.config import Config
    from alembic.script import ScriptDirectory

    from app.db import at_head, head_revision

    cfg = Config()
    cfg.set_main_option("script_location", "app:migrations")
    assert head_revision() == ScriptDirectory.from_config(cfg).get_current_head()
    engine = create_engine(f"sqlite:///{tmp_path / 'ledger.db'}")
    try:
        assert not at_head(engine)  # empty database: the upgrade must run
        migrate(engine)
        assert at_head(engine)
    finally:
        engine.dispose()
