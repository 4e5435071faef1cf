"""configs/prometheus/alerts.yaml: valid rules (promtool check rules), every alert proven to
fire and to stay silent (promtool test rules), and only metrics vmfarm exports."""

from __future__ import annotations

import subprocess
from pathlib import Path
from typing import Any

import yaml

from tests.unit.metric_names import REPO, exported_names, promql_names, tool

RULES = REPO / "configs" / "prometheus" / "alerts.yaml"
TESTS = REPO / "configs" / "prometheus" / "tests"


def _alerts() -> list[dict[str, Any]]:
    data = yaml.safe_load(RULES.read_text())
    return [r for g in data["groups"] for r in g["rules"] if "alert" in r]


def test_the_rules_pass_promtool_check_rules() -> None:
    res = subprocess.run(
        [tool("promtool"), "check", "rules", str(RULES)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert res.returncode == 0, res.stdout + res.stderr
    assert f"SUCCESS: {len(_alerts())} rules found" in res.stdout


def test_every_alert_fires_and_stays_silent_in_promtool_test_rules() -> None:
    files = sorted(TESTS.glob("*.yaml"))
    assert files
    res = subprocess.run(
        [tool("promtool"), "test", "rules", *map(str, files)],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=TESTS,
    )
    assert res.returncode == 0, res.stdout + res.stderr
    firing: set[str] = set()
    silent: set[str] = set()
    for f in files:
        for case in yaml.safe_load(f.read_text())["tests"]:
            for check in case.get("alert_rule_test", []):
                (firing if check.get("exp_alerts") else silent).add(check["alertname"])
    names = {a["alert"] for a in _alerts()}
    assert names - firing == set(), "alerts never shown to fire"
    assert names - silent == set(), "alerts never shown to stay silent"


def test_the_alerts_name_only_metrics_vmfarm_exports(tmp_path: Path) -> None:
    exported = exported_names(tmp_path)
    for alert in _alerts():
        used = promql_names(alert["expr"])
        assert used or "up{" in alert["expr"], alert["alert"]
        assert used <= exported, (alert["alert"], used - exported)


def test_every_alert_has_a_severity_and_says_what_to_do() -> None:
    for alert in _alerts():
        assert alert["labels"]["severity"] in ("critical", "warning"), alert["alert"]
        assert alert["annotations"]["summary"] and alert["annotations"]["description"]
