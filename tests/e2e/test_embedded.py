"""Embedded mode's input checks: an unknown execution is bad input. Runs on real lab hosts are
in tests/lab/test_embedded.py.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.conftest import base_env, run_vmfarm


@pytest.fixture
def embedded_env(tmp_path: Path) -> dict[str, str]:
    return base_env(VMFARM_HOME=str(tmp_path / "home"))


def test_status_of_an_unknown_execution_is_bad_input(embedded_env: dict[str, str]) -> None:
    res = run_vmfarm("status", "nope", env=embedded_env)
    assert res.returncode == 2
    assert "no execution 'nope'" in res.stderr
