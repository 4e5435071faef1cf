"""allowSimultaneousDeployments (Harness's infrastructure setting, false by default): while a
stage deploys a service to an infrastructure, a second run deploying the same service there is
refused, naming the execution to wait for; with the setting true it is recorded."""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest

from app.errors import ConfigError

GOOD = Path(__file__).resolve().parents[1] / "data" / "good"


@pytest.fixture
def ledger(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    from app.db import reset_engines
    from app.settings import get_settings

    monkeypatch.setenv("VMFARM_HOME", str(tmp_path / "home"))
    for key in ("VMFARM_DATABASE_URL", "VMFARM_BROKER_URL", "VMFARM_RBAC_FILE"):
        monkeypatch.delenv(key, raising=False)
    get_settings.cache_clear()
    reset_engines()
    yield tmp_path
    reset_engines()
    get_settings.cache_clear()


def _record(files: Path) -> str:
    from app.coordinator import new_execution_id, prepare, record

    ex_id = new_execution_id()
    plan, hosts = prepare([str(files)], pipeline=None, inputs={"tag": "1.0"}, execution_id=ex_id)
    record(plan, hosts, execution_id=ex_id, inputs={"tag": "1.0"}, user="alice", publish=False)
    return ex_id


def _start(ex_id: str) -> None:
    """The first stage is under way (as advance() leaves it once its hosts are planned)."""
    from sqlmodel import select

    from app.db import session_scope
    from app.models import Execution, StageRun, Status

    with session_scope() as s:
        s.get(Execution, ex_id).status = Status.RUNNING  # type: ignore[union-attr]
        run = s.exec(select(StageRun).where(StageRun.execution_id == ex_id)).one()
        run.status = Status.RUNNING
        s.add(run)


def test_a_second_run_to_a_busy_infrastructure_is_refused(ledger: Path) -> None:
    first = _record(GOOD)
    _record(GOOD)  # recorded, not started: it holds nothing yet
    _start(first)
    with pytest.raises(ConfigError) as info:
        _record(GOOD)
    said = str(info.value)
    assert f"by execution {first} (stage 'deploy')" in said
    assert "infrastructure 'test_hosts'" in said and "allowSimultaneousDeployments: true" in said


def test_an_infrastructure_that_allows_it_takes_both(ledger: Path) -> None:
    files = ledger / "files"
    shutil.copytree(GOOD, files)
    infra = files / "infrastructure.yaml"
    infra.write_text(
        infra.read_text().replace(
            "  deploymentType: Ssh\n",
            "  deploymentType: Ssh\n  allowSimultaneousDeployments: true\n",
        )
    )
    _start(_record(files))
    assert _record(files)
