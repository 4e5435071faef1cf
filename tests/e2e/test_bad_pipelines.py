"""Bad pipeline files, as a user meets them on the command line.

Every case of ``tests/data/bad/cases.yaml`` runs the real ``vmfarm`` in a subprocess, in embedded
mode with its own ``VMFARM_HOME``: it must exit 2, name ``file:line:`` of the problem with the
field and a helpful message on stderr, and record no execution. Nothing here needs a network:
a bad input is refused before any host is contacted.
"""

from __future__ import annotations

import json
import os
import sqlite3
import subprocess
import sys
from contextlib import closing
from pathlib import Path
from typing import Any

import pytest
import yaml

REPO = Path(__file__).resolve().parents[2]
DATA = REPO / "tests" / "data"
CASES: list[dict[str, Any]] = yaml.safe_load((DATA / "bad" / "cases.yaml").read_text())["cases"]


def vmfarm(*args: str, home: Path) -> subprocess.CompletedProcess[str]:
    """``vmfarm ARGS`` from tests/data (file names as the cases write them), embedded mode."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("VMFARM_")}
    env.update(VMFARM_HOME=str(home), PYTHONPATH=str(REPO), NO_COLOR="1")
    return subprocess.run(
        [sys.executable, "-m", "cli.main", *args],
        cwd=DATA,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


def executions_recorded(home: Path) -> int:
    """Rows in the ledger's execution table; no ledger at all counts as none."""
    db = home / "vmfarm.db"
    if not db.exists():
        return 0
    with closing(sqlite3.connect(db)) as conn:
        try:
            return int(conn.execute("SELECT count(*) FROM execution").fetchone()[0])
        except sqlite3.OperationalError:  # the ledger was created but has no table yet
            return 0


def bad_file(case: dict[str, Any]) -> str:
    bad = [str(f) for f in case["files"] if str(f).startswith("bad/")]
    assert len(bad) == 1, f"case {case['id']}: pass exactly one file from bad/"
    return bad[0]


def set_args(case: dict[str, Any]) -> list[str]:
    return [a for kv in case.get("set") or [] for a in ("--set", kv)]


def assert_refused(case: dict[str, Any], proc: subprocess.CompletedProcess[str]) -> None:
    """Exit 2 and one error naming the bad file's line, the field and the message."""
    where = f"{bad_file(case)}:{case['line']}:"
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert "Traceback" not in proc.stderr
    errors = [ln for ln in proc.stderr.splitlines() if ln.startswith("error: ")]
    assert len(errors) == 1, f"one problem, one error; got:\n{proc.stderr}"
    (error,) = errors
    assert error.startswith(f"error: {where}"), f"expected {where} in:\n{error}"
    assert case["field"] in error, error
    assert case["message"] in error, error
    assert "nothing was run" in proc.stderr


@pytest.mark.parametrize("case", CASES, ids=[c["id"] for c in CASES])
def test_run_refuses_bad_input(case: dict[str, Any], tmp_path: Path) -> None:
    home = tmp_path / "home"
    proc = vmfarm("run", *case["files"], *set_args(case), home=home)
    assert_refused(case, proc)
    assert not [ln for ln in proc.stderr.splitlines() if ln.startswith("execution ")]
    assert executions_recorded(home) == 0


VALIDATE_CASES = [c for c in CASES if c.get("validate", True)]


@pytest.mark.parametrize("case", VALIDATE_CASES, ids=[c["id"] for c in VALIDATE_CASES])
def test_validate_refuses_bad_input(case: dict[str, Any], tmp_path: Path) -> None:
    proc = vmfarm("validate", *case["files"], *set_args(case), home=tmp_path / "home")
    assert_refused(case, proc)
    assert "valid:" not in proc.stdout


def test_corpus_covers_each_bad_file_once() -> None:
    on_disk = {f"bad/{p.name}" for p in (DATA / "bad").glob("*.yaml") if p.name != "cases.yaml"}
    used = [bad_file(c) for c in CASES]
    assert len(used) == len(set(used))
    assert set(used) == on_disk
    assert len(CASES) >= 20


def test_missing_input_is_accepted_by_validate(tmp_path: Path) -> None:
    """validate does not require runtime inputs; run (above) refuses the same files."""
    (case,) = [c for c in CASES if c["id"] == "missing_input"]
    proc = vmfarm("validate", *case["files"], *set_args(case), home=tmp_path / "home")
    assert proc.returncode == 0, proc.stderr
    assert "runtime input: pipeline.bad_example.variables.colour" in proc.stdout


def test_good_set_validates(tmp_path: Path) -> None:
    proc = vmfarm("validate", "good", home=tmp_path / "home")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith("valid: 4 document(s) in 4 file(s)")


def test_good_set_lists_its_runtime_input_as_json(tmp_path: Path) -> None:
    proc = vmfarm("validate", "--output", "json", "good", home=tmp_path / "home")
    assert proc.returncode == 0, proc.stderr
    summary = json.loads(proc.stdout)
    assert summary["valid"] is True
    assert summary["services"] == ["hello_app"]
    assert summary["environments"] == ["test_env"]
    assert summary["infrastructures"] == ["test_hosts"]
    assert summary["pipelines"] == ["hello"]
    assert summary["inputs"] == [{"name": "service.hello_app.artifacts.primary.spec.tag"}]


def test_good_set_with_its_input_given_has_nothing_left_to_ask(tmp_path: Path) -> None:
    proc = vmfarm("validate", "-o", "json", "good", "--set", "tag=1.0", home=tmp_path / "home")
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout)["inputs"] == []


def test_reference_examples_validate(tmp_path: Path) -> None:
    proc = vmfarm("validate", "-o", "json", "reference", home=tmp_path / "home")
    assert proc.returncode == 0, proc.stderr
    summary = json.loads(proc.stdout)
    assert summary["pipelines"] == ["vm_deployment_pipeline"]
    assert summary["infrastructures"] == ["aws_ec2_infrastructure", "aws_prod_infra"]
    assert summary["inputs"] == [{"name": "service.web_app_vm.artifacts.primary.spec.tag"}]


def test_validate_json_reports_the_position(tmp_path: Path) -> None:
    (case,) = [c for c in CASES if c["id"] == "unknown_field"]
    proc = vmfarm("validate", "-o", "json", *case["files"], home=tmp_path / "home")
    assert proc.returncode == 2
    (error,) = json.loads(proc.stdout)["errors"]
    assert error["file"] == bad_file(case)
    assert error["line"] == case["line"]
    assert error["field"].endswith("step.spec.enviromentVariables")
    assert case["message"] in error["message"]


def test_unknown_set_key_names_the_known_inputs(tmp_path: Path) -> None:
    home = tmp_path / "home"
    proc = vmfarm("run", "good", "--set", "tga=1.0", home=home)
    assert proc.returncode == 2
    assert "no runtime input <+input> is named 'tga'" in proc.stderr
    assert "service.hello_app.artifacts.primary.spec.tag" in proc.stderr
    assert executions_recorded(home) == 0


def test_several_problems_are_reported_together(tmp_path: Path) -> None:
    home = tmp_path / "home"
    proc = vmfarm(
        "run",
        "good/service.yaml",
        "good/environment.yaml",
        "bad/infra_port_abc.yaml",
        "bad/bad_timeout.yaml",
        "--set",
        "tag=1.0",
        home=home,
    )
    assert proc.returncode == 2
    errors = [ln for ln in proc.stderr.splitlines() if ln.startswith("error: ")]
    assert [e.split(":")[1].strip() for e in errors] == [
        "bad/bad_timeout.yaml",
        "bad/infra_port_abc.yaml",
    ]
    assert "2 errors; nothing was run." in proc.stderr
    assert executions_recorded(home) == 0
