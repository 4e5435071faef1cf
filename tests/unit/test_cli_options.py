"""Every enum option of the CLI is validated before anything is read or done."""

from __future__ import annotations

from click.testing import CliRunner

from cli.main import main


def test_an_unknown_execution_status_is_refused_with_the_valid_ones() -> None:
    res = CliRunner().invoke(main, ["executions", "--status", "BOGUS"])
    assert res.exit_code == 2
    said = res.output.lower()
    assert "invalid value for '--status'" in said and "'rollback_failed'" in said
