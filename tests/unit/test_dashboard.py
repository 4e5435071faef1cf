"""configs/grafana/vmfarm.json: valid JSON that Grafana provisions, whose every query is valid
PromQL naming only metrics vmfarm exports, and that shows what an operator looks for."""

from __future__ import annotations

import json
import re
import subprocess
from pathlib import Path
from typing import Any

import yaml

from tests.unit.metric_names import REPO, exported_names, promql_names, tool

DASHBOARD = REPO / "configs" / "grafana" / "vmfarm.json"
PROVISIONING = REPO / "configs" / "grafana" / "provisioning"
# Grafana's variables, as Prometheus would see them once Grafana has substituted them.
_VARIABLES = {"$__rate_interval": "5m", "$__interval": "1m", "$__range": "6h", "$pipeline": ".*"}


def _dashboard() -> dict[str, Any]:
    data = json.loads(DASHBOARD.read_text())
    assert isinstance(data, dict)
    return data


def _panels(dash: dict[str, Any]) -> list[dict[str, Any]]:
    out = []
    for p in dash["panels"]:
        out.append(p)
        out += p.get("panels", [])  # panels of collapsed rows
    return out


def _exprs(dash: dict[str, Any]) -> list[tuple[str, str]]:
    return [(p["title"], t["expr"]) for p in _panels(dash) for t in p.get("targets", [])]


def _concrete(expr: str) -> str:
    for var, value in _VARIABLES.items():
        expr = expr.replace(var, value)
    assert "$" not in expr, f"unknown Grafana variable in {expr}"
    return expr


def test_the_dashboard_is_json_grafana_can_provision() -> None:
    dash = _dashboard()
    assert dash["uid"] == "vmfarm" and dash["title"]
    assert "id" not in dash or dash["id"] is None  # provisioning assigns ids
    ids = [p["id"] for p in _panels(dash)]
    assert len(ids) == len(set(ids)), "panel ids must be unique"
    for p in _panels(dash):
        pos = p["gridPos"]
        assert pos["x"] >= 0 and pos["x"] + pos["w"] <= 24, p["title"]
    [source] = yaml.safe_load((PROVISIONING / "datasources" / "prometheus.yaml").read_text())[
        "datasources"
    ]
    uids = {
        t["datasource"]["uid"] for p in _panels(dash) if p["type"] != "row" for t in p["targets"]
    }
    assert uids == {source["uid"]}  # every query goes to the provisioned Prometheus
    [provider] = yaml.safe_load((PROVISIONING / "dashboards" / "vmfarm.yaml").read_text())[
        "providers"
    ]
    assert provider["type"] == "file" and provider["options"]["path"]


def test_every_query_names_only_metrics_vmfarm_exports(tmp_path: Path) -> None:
    exported = exported_names(tmp_path)
    exprs = _exprs(_dashboard())
    assert len(exprs) >= 20
    for title, expr in exprs:
        used = promql_names(expr)
        assert used, (title, expr)
        assert used <= exported, (title, sorted(used - exported))
    for var in _dashboard()["templating"]["list"]:
        assert promql_names(var["definition"]) <= exported


def test_every_query_is_valid_promql(tmp_path: Path) -> None:
    # promtool parses PromQL when it checks rules: each query becomes a recording rule.
    rules = {
        "groups": [
            {
                "name": "dashboard",
                "rules": [
                    {"record": f"dashboard:query_{i}", "expr": _concrete(expr)}
                    for i, (_title, expr) in enumerate(_exprs(_dashboard()))
                ],
            }
        ]
    }
    path = tmp_path / "dashboard-rules.yaml"
    path.write_text(yaml.safe_dump(rules))
    res = subprocess.run(
        [tool("promtool"), "check", "rules", str(path)], capture_output=True, text=True, timeout=120
    )
    assert res.returncode == 0, res.stdout + res.stderr


def test_it_shows_deployments_durations_queues_workers_rollbacks_and_gates() -> None:
    exprs = " ".join(e for _t, e in _exprs(_dashboard()))
    assert re.search(r"sum by \(status\) \(increase\(vmfarm_executions_finished_total", exprs)
    for hist in ("vmfarm_host_step_duration_seconds", "vmfarm_phase_duration_seconds"):
        for q in ("0.5", "0.95"):
            assert re.search(
                rf"histogram_quantile\({q}, sum by \(le, \w+\) \(rate\({hist}"
                r"_bucket",
                exprs,
            ), (hist, q)
    for name in (
        "vmfarm_queue_depth",
        "vmfarm_queue_consumers",
        "vmfarm_workers",
        "vmfarm_rollbacks_total",
        "vmfarm_gate_verdicts_total",
    ):
        assert name in exprs, name
