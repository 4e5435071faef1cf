"""Fuzzing ``vmfarm validate FILE`` in a subprocess, as a user runs it: on generated bad files
(tests/unit/test_fuzz.py's generators) it exits 2 with ``file:line`` on stderr and no traceback,
and so it does on the inputs that once escaped as tracebacks (``BUGS``, ``BUG_REASONS`` there).
Runs are deterministic like the in-process properties of tests/unit/test_fuzz.py.
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
from hypothesis import assume, given

from app.definitions import load
from app.errors import SpecError, SpecErrors
from tests.conftest import REPO
from tests.unit.test_fuzz import (
    _bug_params,
    _profile,
    bundle_dir,
    mutated_good_file,
    unless_known_bug,
)

# --- through the command line ---------------------------------------------------------------------


def _validate_cli(path: Path, *args: str) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("VMFARM_")}
    env.update(PYTHONPATH=str(REPO), NO_COLOR="1")
    with tempfile.TemporaryDirectory(prefix="vmfarm-fuzz-home-") as home:
        env["VMFARM_HOME"] = home
        return subprocess.run(
            [sys.executable, "-m", "cli.main", "validate", str(path), *args],
            cwd=path.parent,
            env=env,
            capture_output=True,
            text=True,
            timeout=120,
            check=False,
        )


@_profile(10)
@given(file=mutated_good_file())
def test_validate_cli_refuses_bad_files_with_file_and_line(file: tuple[str, str]) -> None:
    name, text = file
    with bundle_dir(name, text) as root:
        # Only files the loader refuses with a position are interesting here.
        first: SpecError | None = None
        try:
            with unless_known_bug():
                load([root])
        except (SpecError, SpecErrors) as exc:
            first = (exc.errors if isinstance(exc, SpecErrors) else [exc])[0]
        assume(first is not None and first.line > 0)
        assert first is not None
        proc = _validate_cli(root)
        assert proc.returncode == 2, proc.stdout + proc.stderr
        assert "Traceback" not in proc.stderr, proc.stderr
        assert f"{first.file}:{first.line}:" in proc.stderr, proc.stderr


# --- bugs found by the properties (fixed; these keep them fixed) -----------------------------


@pytest.mark.parametrize(("name", "text", "sets", "lines"), _bug_params(cli=True))
def test_found_bug_through_validate_exits_2_with_file_and_line(
    name: str, text: str, sets: dict[str, str], lines: range
) -> None:
    with bundle_dir(name, text) as root:
        proc = _validate_cli(root, *[a for k, v in sets.items() for a in ("--set", f"{k}={v}")])
        assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
        assert proc.returncode == 2, proc.stdout + proc.stderr
        assert any(f"{root / name}:{n}:" in proc.stderr for n in lines), proc.stderr
