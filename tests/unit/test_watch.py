"""The watch after deployment (a stage's rollbackStrategy.triggers): how it loads, what is
refused at load with file:line, how one check measures, and the verdict over the checks. The run
itself, against a real Prometheus scraping lab apps, is tests/service/test_watch_run.py.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import pytest

from app.definitions.loader import choose_pipeline, load
from app.definitions.models import RollbackStrategySpec
from app.definitions.models.watch import parse_condition
from app.definitions.resolve import resolve
from app.errors import SpecError, SpecErrors
from app.verify.watch import judge, measure, next_check

DATA = Path(__file__).resolve().parents[1] / "data"
SERVICE = DATA / "strategies" / "service.yaml"
PIPELINE = DATA / "watch" / "pipeline.yaml"
INFRA = """\
apiVersion: v1
kind: Infrastructure
metadata:
  name: lab
  identifier: lab
spec:
  environmentRef: lab
  deploymentType: Ssh
  type: Pdc
  spec:
    region: r1
    connection: {type: SSH, user: root, port: 22}
    hosts:
      - hostname: 127.0.1.201
      - hostname: 127.0.1.202
"""


def files(tmp_path: Path, old: str = "", new: str = "") -> list[Path]:
    text = PIPELINE.read_text()
    if old:
        assert text.count(old) == 1, old
        text = text.replace(old, new)
    (tmp_path / "pipeline.yaml").write_text(text)
    (tmp_path / "infra.yaml").write_text(INFRA)
    return [SERVICE, tmp_path / "pipeline.yaml", tmp_path / "infra.yaml"]


def refused(paths: list[Path], *, plan: bool = False) -> list[SpecError]:
    with pytest.raises((SpecError, SpecErrors)) as info:
        bundle = load(paths, inputs={"tag": "1.0"})
        if plan:
            resolve(bundle, choose_pipeline(bundle, None), execution_id="x")
    exc = info.value
    return exc.errors if isinstance(exc, SpecErrors) else [exc]  # type: ignore[union-attr]


def line_of(path: Path, needle: str) -> int:
    return next(n for n, t in enumerate(path.read_text().split("\n"), 1) if needle in t)


# --- loading ---------------------------------------------------------------------------------


def test_the_reference_triggers_in_a_stage_plan_as_a_watch(tmp_path: Path) -> None:
    # Given the test pipeline: the reference's three triggers in its Deployment stage
    bundle = load(files(tmp_path), inputs={"tag": "1.0"})
    # When it is planned
    plan = resolve(bundle, choose_pipeline(bundle, None), execution_id="x")
    watch = plan.stages[0].watch  # type: ignore[union-attr]
    # Then the plan carries the watch: its window is the longest trigger's, and the health
    # trigger checks what the stage's HealthCheck step checks, on every host
    assert watch is not None
    assert watch.window_seconds() == 12
    assert [t.parsed().threshold for t in watch.triggers] == [0.05, 2.0, 0.8]
    assert watch.health_check is not None
    assert watch.health_check.url == "http://<+instance.hostName>:8080/health"
    assert watch.health_check.expect_body == '"status":"UP"'


@pytest.mark.parametrize(
    ("written", "metric", "op", "threshold", "unit"),
    [
        ("error_rate > 5%", "error_rate", ">", 0.05, "fraction"),
        ("error_rate >= 0.5%", "error_rate", ">=", 0.005, "fraction"),
        ("error_rate > 0.05", "error_rate", ">", 0.05, "fraction"),
        ("avg_response_time > 2000ms", "avg_response_time", ">", 2.0, "seconds"),
        ("avg_response_time > 1.5s", "avg_response_time", ">", 1.5, "seconds"),
        ("health_check_success_rate < 80%", "health_check_success_rate", "<", 0.8, "fraction"),
    ],
)
def test_conditions_read_in_the_metrics_unit(
    written: str, metric: str, op: str, threshold: float, unit: str
) -> None:
    c = parse_condition(written)
    assert (c.metric, c.op, unit) == (metric, op, c.unit)
    assert math.isclose(c.threshold, threshold)


@pytest.mark.parametrize(
    ("old", "new", "says"),
    [
        (
            'condition: "error_rate > 5%"',
            'condition: "user_initiated"',
            "condition user_initiated is not a watch: a person rolls a deployment back with "
            "`vmfarm rollback EXECUTION`",
        ),
        (
            'condition: "error_rate > 5%"',
            'condition: "error_rate > 5"',
            "write the rate as a percentage (5%)",
        ),
        (
            'condition: "avg_response_time > 2000ms"',
            'condition: "avg_response_time > 2000"',
            "give the time's unit (2000ms or 2s)",
        ),
        (
            'condition: "error_rate > 5%"',
            'condition: "cpu_load > 3"',
            "unknown metric cpu_load",
        ),
        (
            'condition: "error_rate > 5%"',
            'condition: "error rate is high"',
            "is not `metric > number`",
        ),
        (
            "action: automatic_rollback\n            - name: Response",
            "action: immediate_rollback\n            - name: Response",
            "action immediate_rollback is not supported",
        ),
        (
            "evaluation_window: 6s",
            "evaluation_window: 2d",
            "must be above 0 and at most 24h",
        ),
        (
            "interval: 1s",
            "interval: 1h",
            "interval '1h' must be at least 0.2s and at most 10m",
        ),
        (
            "lookback: 3s",
            "lookback: 3s\n          rollbackTypes: [{name: Traffic Rollback}]",
            "rollbackTypes is not supported",
        ),
        (
            "lookback: 3s",
            "lookback: 3s\n          alarms: [x]",
            "alarms",
        ),
    ],
)
def test_what_a_watch_cannot_carry_out_is_refused_at_load_with_its_line(
    tmp_path: Path, old: str, new: str, says: str
) -> None:
    paths = files(tmp_path, old, new)
    errors = refused(paths)
    assert any(says in e.message for e in errors), [e.message for e in errors]
    e = next(e for e in errors if says in e.message)
    assert e.file is not None and e.file.endswith("pipeline.yaml")
    assert e.line is not None and e.line >= line_of(paths[1], "rollbackStrategy:")


def test_a_health_trigger_without_any_health_check_to_make_is_refused_at_plan(
    tmp_path: Path,
) -> None:
    # Given the stage without its HealthCheck step, and a watch that gives none either
    text = PIPELINE.read_text()
    cut = text[text.index("              - step:\n                  type: HealthCheck") :]
    paths = files(tmp_path, cut, "")
    # Then planning names the triggers and the two ways to give one
    errors = refused(paths, plan=True)
    assert any(
        "health_check_success_rate needs a health check to make: give "
        "rollbackStrategy.healthCheck.url, or an HTTP HealthCheck step" in e.message
        for e in errors
    ), [e.message for e in errors]
    assert errors[0].line == line_of(paths[1], "health_check_success_rate < 80%")


# --- one check -------------------------------------------------------------------------------


def spec(**extra: Any) -> RollbackStrategySpec:
    data: dict[str, Any] = {
        "interval": "1s",
        "lookback": "1m",
        "triggers": [
            {"name": "errors", "condition": "error_rate > 5%", "evaluation_window": "10s"},
            {"name": "slow", "condition": "avg_response_time > 2s", "evaluation_window": "20s"},
        ],
        **extra,
    }
    return RollbackStrategySpec.model_validate(data)


class Result:
    def __init__(self, ok: bool, error: str | None = None) -> None:
        self.ok, self.error = ok, error


def test_a_check_asks_each_metric_for_the_stage_hosts_since_the_watch_began() -> None:
    asked: list[str] = []

    def query(url: str, q: str, **_: Any) -> float | None:
        asked.append(q)
        return 0.25 if "5.." in q else math.nan  # NaN: no requests, so no latency

    sample = measure(
        spec(),
        url="http://prom",
        instances=["10.0.0.1:8080", "10.0.0.2:8080"],
        health_urls={},
        started=100.0,
        now=107.0,
        query=query,
        check=lambda *a, **k: Result(True),
    )
    # The lookback is the 7 s since the watch began (not the minute: the old version's
    # requests would dilute the new one's errors), over exactly the stage's hosts
    assert all("[7s]" in q and 'instance=~"10\\\\.0\\\\.0\\\\.1:8080|' in q for q in asked)
    assert sample["values"] == {"errors": 0.25, "slow": None}
    assert "health" not in sample


def test_a_check_records_why_a_metric_has_no_number_and_makes_one_health_check_a_host() -> None:
    def broken(url: str, q: str, **_: Any) -> float | None:
        raise OSError("connection refused")

    s = spec(
        triggers=[
            {"name": "errors", "condition": "error_rate > 5%"},
            {"name": "health", "condition": "health_check_success_rate < 80%"},
        ],
        healthCheck={"url": "http://<+instance.hostName>/health"},
    )
    calls: list[tuple[str, int]] = []

    def check(url: str, **kw: Any) -> Result:
        calls.append((url, kw["retries"]))
        return Result(url != "http://b/health", "HTTP 503")

    sample = measure(
        s,
        url="http://prom",
        instances=["a", "b"],
        health_urls={"a": "http://a/health", "b": "http://b/health"},
        started=0.0,
        now=30.0,
        query=broken,
        check=check,
    )
    assert sample["values"] == {"errors": None}
    assert "connection refused" in sample["errors"]["errors"]
    assert calls == [("http://a/health", 1), ("http://b/health", 1)]
    assert sample["health"] == {"passed": 1, "total": 2, "failed": {"b": "HTTP 503"}}


# --- the verdict -----------------------------------------------------------------------------


def at(t: float, errors: float | None, slow: float | None = 0.1) -> dict[str, Any]:
    return {"at": t, "values": {"errors": errors, "slow": slow}}


def test_a_number_past_its_threshold_is_a_breach_with_the_trigger_and_the_number() -> None:
    v = judge(spec(), [at(1, 0.0), at(2, 0.01), at(3, 0.4)], started=0.0, now=3.0)
    assert v["state"] == "breached"
    assert v["reasons"] == [
        "trigger 'errors' (error_rate > 5%): 40.00% at 3s after the stage's last phase (window 10s)"
    ]
    errors = v["triggers"][0]
    assert (errors["last"], errors["worst"], errors["state"]) == (0.4, 0.4, "breached")


def test_at_the_threshold_is_not_past_it() -> None:
    v = judge(spec(), [at(1, 0.05, 2.0)], started=0.0, now=1.0)
    assert v["state"] == "watching" and not v["reasons"]


def test_the_watch_passes_once_its_longest_window_has_passed_without_a_breach() -> None:
    samples = [at(t, 0.01, 0.2) for t in range(1, 21)]
    assert judge(spec(), samples[:15], started=0.0, now=15.0)["state"] == "watching"
    v = judge(spec(), samples, started=0.0, now=20.0)
    assert v["state"] == "passed"
    assert [t["summary"] for t in v["triggers"]] == [
        "errors (error_rate > 5%): last 1.00%, worst 1.00% in 11 check(s)",
        "slow (avg_response_time > 2s): last 200.0 ms, worst 200.0 ms in 20 check(s)",
    ]


def test_a_trigger_is_judged_only_within_its_own_window() -> None:
    # errors' window is 10 s (and one interval of slack for its closing check)
    samples = [at(t, 0.0) for t in range(1, 12)] + [at(15, 0.9)]
    v = judge(spec(), samples, started=0.0, now=15.0)
    assert v["state"] == "watching" and v["triggers"][0]["state"] == "passed"


def test_a_trigger_that_never_got_a_number_in_its_window_is_a_breach() -> None:
    samples = [
        {"at": float(t), "values": {"errors": None, "slow": 0.1}, "errors": {"errors": "timeout"}}
        for t in range(1, 11)
    ]
    assert judge(spec(), samples[:5], started=0.0, now=5.0)["state"] == "watching"
    v = judge(spec(), samples, started=0.0, now=10.0)
    assert v["state"] == "breached"
    assert v["reasons"][0].startswith(
        "trigger 'errors' (error_rate > 5%): no number in 10 check(s) over its 10s window: timeout"
    )


def test_the_health_share_is_over_the_last_lookback_of_checks() -> None:
    s = spec(
        lookback="3s",
        triggers=[{"name": "health", "condition": "health_check_success_rate < 80%"}],
        healthCheck={"url": "http://x/health"},
    )

    def h(t: float, passed: int) -> dict[str, Any]:
        return {"at": t, "values": {}, "health": {"passed": passed, "total": 4}}

    # one host of four fails one check: 11/12 over the last three checks, no breach
    v = judge(s, [h(1, 4), h(2, 4), h(3, 3), h(4, 4)], started=0.0, now=4.0)
    assert v["state"] == "watching"
    # two hosts down for two checks: (4 + 2 + 2) / 12 = 67 % < 80 %
    v = judge(s, [h(1, 4), h(2, 4), h(3, 2), h(4, 2)], started=0.0, now=4.0)
    assert v["state"] == "breached"
    assert "health_check_success_rate < 80%): 66.67% at 4s" in v["reasons"][0]


def test_checks_come_every_interval_and_one_closes_the_window_exactly() -> None:
    s = spec()
    assert next_check(s, started=0.0, now=3.0) == 1.0
    assert math.isclose(next_check(s, started=0.0, now=19.5), 0.5)
    assert next_check(s, started=0.0, now=21.0) == 0.0


# --- a lost check ----------------------------------------------------------------------------


def test_the_reconciler_gives_a_long_overdue_check_a_new_number_and_ends_ended_runs_watches(
    ledger: Path,
) -> None:
    from sqlmodel import select

    from app.coordinator import submit
    from app.coordinator.watch import overdue_watches, watch_inputs
    from app.db import session_scope
    from app.models import Execution, PhaseRun, Status

    # Given two executions watching, their next check due at t=1000 (every 30 s); the second
    # execution was aborted meanwhile
    running, aborted = (
        submit([str(DATA / "good")], inputs={"tag": "1.0"}, publish=False) for _ in range(2)
    )
    with session_scope() as s:
        for ex_id in (running, aborted):
            s.add(
                PhaseRun(
                    execution_id=ex_id,
                    stage_index=0,
                    phase=-1,
                    kind="watch",
                    verdict={"seq": 3, "due": 1000.0, "interval": 30},
                )
            )
        ex = s.get(Execution, aborted)
        assert ex is not None
        ex.status = Status.ABORTED
        s.add(ex)
    # When the reconciler looks before the grace has passed, nothing is sent again
    with session_scope() as s:
        assert overdue_watches(s, now=1000 + 30 + 59) == []
    # Then after it, the running watch's check goes again with a new number
    with session_scope() as s:
        assert overdue_watches(s, now=1000 + 30 + 61) == [(running, 0, 4)]
    with session_scope() as s:
        # the lost check, should it arrive after all, is stale and does nothing
        assert watch_inputs(s, running, 0, 3) is None
        states = {r.execution_id: r.status for r in s.exec(select(PhaseRun)).all()}
    # and the aborted run's watch ended instead of being checked forever
    assert states == {running: Status.RUNNING, aborted: Status.ABORTED}


def test_a_trigger_with_its_own_query_reads_any_metric_in_its_own_unit() -> None:
    s = spec(
        triggers=[
            {
                "name": "queue",
                "condition": "queue_depth > 100",
                "query": 'max(queue_depth{instance=~"$instances"}[$window])',
            }
        ]
    )
    asked: list[str] = []

    def query(url: str, q: str, **_: Any) -> float | None:
        asked.append(q)
        return 150.0

    sample = measure(
        s,
        url="http://prom",
        instances=["a:9"],
        health_urls={},
        started=0.0,
        now=5.0,
        query=query,
        check=lambda *a, **k: Result(True),
    )
    assert asked == ['max(queue_depth{instance=~"a:9"}[5s])']
    v = judge(s, [sample], started=0.0, now=5.0)
    assert v["reasons"] == [
        "trigger 'queue' (queue_depth > 100): 150 at 5s after the stage's last phase (window 5m)"
    ]


def test_plan_shows_the_watch_its_triggers_and_where_it_reads(ledger: Path, tmp_path: Path) -> None:
    from click.testing import CliRunner

    from cli.main import main

    paths = files(tmp_path)
    res = CliRunner().invoke(main, ["plan", *map(str, paths), "--set", "tag=1.0"])
    assert res.exit_code == 0, res.output
    assert (
        "then a watch after deployment for 12s (a check every 1s over the last 3s; Prometheus "
        "not set: give prometheusUrl or VMFARM_PROMETHEUS_URL); a breach rolls the stage back:"
    ) in res.stdout
    assert "    High Error Rate: error_rate > 5% within 12s" in res.stdout
    assert "    Health Check Failure: health_check_success_rate < 80% within 6s" in res.stdout
    assert (
        "    health checks from the control worker: http://<+instance.hostName>:8080/health"
    ) in res.stdout
