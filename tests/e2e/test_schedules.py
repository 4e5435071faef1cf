"""`vmfarm schedules` lists the schedules with their next run, as a user runs it. The parser and
the file are in tests/unit/test_schedules.py.
"""

from __future__ import annotations

import json
import subprocess
import sys
from datetime import UTC, datetime
from pathlib import Path
from zoneinfo import ZoneInfo

from app.schedules import (
    Cron,
)
from tests.conftest import REPO, base_env

VMFARM = [
    sys.executable,
    "-c",
    "import sys; from cli.main import main; sys.argv[0] = 'vmfarm'; main()",
]


# --- cron expressions ----------------------------------------------------------------------------


# --- the schedules file --------------------------------------------------------------------------


def write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


# --- the tick ------------------------------------------------------------------------------------


# --- vmfarm schedules -----------------------------------------------------------------------------


def test_vmfarm_schedules_lists_them_with_their_next_run(tmp_path: Path) -> None:
    f = write(
        tmp_path / "s.yaml",
        """
schedules:
  - {name: nightly, cron: "0 2 * * *", files: [p.yaml], pipeline: app}
  - {name: paris, cron: "30 8 * * mon-fri", timezone: Europe/Paris, files: [p.yaml]}
  - {name: paused, cron: "@hourly", files: [p.yaml], enabled: false}
""",
    )
    write(tmp_path / "p.yaml", "")
    env = base_env(VMFARM_HOME=str(tmp_path / "home"), VMFARM_SCHEDULES_FILE=str(f))
    before = datetime.now(UTC)
    res = subprocess.run(
        [*VMFARM, "schedules", "-o", "json"],
        env=env,
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert res.returncode == 0, res.stderr
    data = json.loads(res.stdout)
    assert data["file"] == str(f)
    rows = {r["name"]: r for r in data["schedules"]}
    assert list(rows) == ["nightly", "paris", "paused"]
    for name, tz in (("nightly", UTC), ("paris", ZoneInfo("Europe/Paris"))):
        cron = Cron.parse(rows[name]["cron"])
        expect = cron.next_after(before, tz)
        assert expect is not None
        got = datetime.fromisoformat(rows[name]["next_run"].replace("Z", "+00:00"))
        assert got in (expect, cron.next_after(expect, tz))  # a minute may have passed
        assert datetime.fromisoformat(rows[name]["next_run_local"]) == got
    assert rows["paris"]["timezone"] == "Europe/Paris" and rows["paris"]["pipeline"] is None
    assert rows["nightly"]["files"] == [str(tmp_path / "p.yaml")]
    assert rows["paused"]["enabled"] is False and rows["paused"]["next_run"] is None
    assert rows["nightly"]["last"] is None and rows["nightly"]["missing_files"] == []

    text = subprocess.run(
        [*VMFARM, "schedules"], env=env, cwd=REPO, capture_output=True, text=True, timeout=120
    )
    assert text.returncode == 0, text.stderr
    assert "nightly" in text.stdout and "0 2 * * *" in text.stdout
    assert "disabled" in text.stdout and "Europe/Paris" in text.stdout

    write(f, "- {name: a, cron: '61 * * * *', files: [p.yaml]}\n")
    bad = subprocess.run(
        [*VMFARM, "schedules"], env=env, cwd=REPO, capture_output=True, text=True, timeout=120
    )
    assert bad.returncode == 2 and "minute: 61 is out of range" in bad.stderr
    none = subprocess.run(
        [*VMFARM, "schedules", "-o", "json"],
        env={**env, "VMFARM_SCHEDULES_FILE": ""},
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert none.returncode == 0 and json.loads(none.stdout) == {"file": None, "schedules": []}


# --- the tick on a real control worker ------------------------------------------------------------
