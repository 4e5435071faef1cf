"""A value from outside the files reaches a real host byte-identical in every quoting context of
a script, as one word, never executed; a value no form can carry intact refuses the run."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import DATA, base_env, run_vmfarm

FILES = [str(DATA / "hostile_values")]


@pytest.fixture
def env(tmp_path: Path) -> dict[str, str]:
    return base_env(VMFARM_HOME=str(tmp_path / "home"))


@pytest.mark.parametrize(
    "note",
    [
        "x /opt/hv/work/keep",  # split in two, it would delete the folder it names
        'it\'s "quoted" $(touch /opt/hv/pwned) `touch /opt/hv/pwned` ${HOME} *\nsecond line',
        "-rf",
    ],
)
def test_a_value_lands_on_the_host_as_given_in_every_context(
    env: dict[str, str], lab: Any, note: str
) -> None:
    # Given a runtime value that is not made of plain characters
    res = run_vmfarm(
        "run", *FILES, str(lab.infrastructure_file), "--set", f"note={note}", "-o", "json", env=env
    )
    # When a script names it bare, in quotes, in here-documents and in an array
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr
    report = json.loads(res.stdout)
    assert report["status"] == "SUCCEEDED"
    for host in lab.hosts:
        out = Path(host.host_dir) / "opt" / "hv"
        # Then every context received exactly the value, as one word
        assert (out / "out" / "bare").read_text() == note
        assert (out / "out" / "single").read_text() == note
        assert (out / "out" / "double").read_text() == note
        assert (out / "out" / "heredoc").read_text() == note + "\n"
        assert (out / "out" / "quoted").read_text() == note + "\n"
        assert (out / "out" / "words").read_text() == "1"
        # and nothing it held was run, nor did it reach past the path it was part of
        assert (out / "work" / "keep" / "keepme").exists()
        assert not (out / "pwned").exists()


def test_a_value_that_would_end_a_quoted_here_document_is_refused(
    env: dict[str, str], lab: Any
) -> None:
    # Given a value one of whose lines is the here-document's delimiter
    res = run_vmfarm(
        "run",
        *FILES,
        str(lab.infrastructure_file),
        "--set",
        "note=ok\nEOF\ntouch /opt/hv/pwned",
        env=env,
    )
    # Then nothing is recorded or run, and the message names the file, the line and why
    assert res.returncode == 2, res.stdout + res.stderr
    assert "pipeline.yaml:" in res.stderr
    assert "would end the quoted here-document <<'EOF'" in res.stderr
    assert all(not (Path(h.host_dir) / "opt" / "hv" / "pwned").exists() for h in lab.hosts)
    ledger = Path(env["VMFARM_HOME"]) / "vmfarm.db"
    if ledger.exists():
        import sqlite3

        with sqlite3.connect(ledger) as db:
            assert db.execute("select count(*) from execution").fetchone() == (0,)
