"""Unit fixtures: nothing here starts a service."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest


@pytest.fixture
def ledger(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    """An empty SQLite ledger under tmp_path, with no VMFARM_* setting from outside."""
    from app.db import reset_engines
    from app.settings import get_settings

    for key in list(os.environ):
        if key.startswith("VMFARM_"):
            monkeypatch.delenv(key)
    monkeypatch.setenv("VMFARM_HOME", str(tmp_path / "home"))
    monkeypatch.chdir(tmp_path)
    get_settings.cache_clear()
    reset_engines()
    yield tmp_path / "home"
    reset_engines()
    get_settings.cache_clear()
