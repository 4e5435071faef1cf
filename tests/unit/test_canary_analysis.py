"""Canary analysis (the reference's VERIFICATION step with analysisType, comparisonStrategy and
timeDuration): how it loads, what is refused at load, and the comparison's maths. The run
itself, against a real Prometheus scraping lab apps, is tests/lab/test_canary_analysis_lab.py.
"""

from __future__ import annotations

import math
import shutil
from pathlib import Path
from typing import Any

import pytest

from app.definitions.loader import choose_pipeline, load
from app.definitions.models import CanaryAnalysisSpec, CanaryMetric, StageSpec
from app.definitions.resolve import strategy_of as resolved_strategy
from app.errors import SpecError, SpecErrors
from app.verify.canary import DEFAULT_METRICS, analyse, compare, render_query
from strategies import plan as plan_phases

REFERENCE = Path(__file__).resolve().parents[1] / "data" / "reference"

# shared/reference/harness-vm-deployments.md, "3. Canary Deployment", verbatim.
REFERENCE_CANARY = """\
# Canary Deployment Strategy
canaryDeployment:
  phases:
    - phase:
        name: Canary Phase
        deploymentType: SSH
        computeProviderType: AWS
        infraDefinitionId: aws_prod_infra
        serviceId: web_app_vm
        instanceCount: "10%"
        instanceUnitType: PERCENTAGE
        steps:
          - type: VERIFICATION
            name: Performance Verification
            properties:
              analysisType: Prometheus
              comparisonStrategy: COMPARE_WITH_CURRENT
              timeDuration: "10"
    - phase:
        name: Primary Phase
        deploymentType: SSH
        computeProviderType: AWS
        infraDefinitionId: aws_prod_infra
        serviceId: web_app_vm
        instanceCount: "100%"
        instanceUnitType: PERCENTAGE
"""


def reference_with_canary(tmp_path: Path, old: str = "", new: str = "") -> Path:
    """The reference's files, its pipeline's stage given the reference's canary block."""
    dest = tmp_path / "reference"
    shutil.copytree(REFERENCE, dest)
    pipeline = dest / "pipeline.yaml"
    text = pipeline.read_text()
    block = "".join(f"          {line}\n" for line in REFERENCE_CANARY.splitlines())
    anchor = "          execution:\n"
    assert text.count(anchor) == 1
    if old:
        assert block.count(old) == 1, old
        block = block.replace(old, new)
    pipeline.write_text(text.replace(anchor, block + anchor))
    return pipeline


def strategy_of(folder: Path) -> dict[str, Any]:
    """The stage's strategy as the plan holds it (the reference's Artifactory service needs a
    connector to plan whole, another matter)."""
    bundle = load([folder], inputs={"tag": "1.0"})
    stage = choose_pipeline(bundle, None).model.spec.stages[0].stage
    assert isinstance(stage, StageSpec)
    return resolved_strategy(stage)


def refused(folder: Path) -> list[SpecError]:
    with pytest.raises((SpecError, SpecErrors)) as info:
        load([folder])
    if isinstance(info.value, SpecErrors):
        return info.value.errors
    assert isinstance(info.value, SpecError)
    return [info.value]


# --- loading ---------------------------------------------------------------------------------


def test_the_reference_canary_block_becomes_a_ten_minute_canary_analysis(tmp_path: Path) -> None:
    # Given the reference's canaryDeployment block, verbatim, in a Deployment stage
    pipeline = reference_with_canary(tmp_path)
    # When it is planned
    strategy = strategy_of(pipeline.parent)
    # Then the plan carries the analysis (not "verification: null"): Prometheus, compared
    # with the current version, over 10 minutes, after the canary phase only
    analysis = strategy["verification"]["canaryAnalysis"]
    assert analysis["analysisType"] == "Prometheus"
    assert analysis["comparisonStrategy"] == "COMPARE_WITH_CURRENT"
    assert CanaryAnalysisSpec.model_validate(analysis).window_seconds() == 600
    assert strategy["verifyAfter"] == [0]
    hosts = [f"h{i}" for i in range(20)]
    from app.definitions.plan import StrategyPlan

    phases = plan_phases(StrategyPlan.model_validate(strategy), hosts)
    assert [(p.name, len(p.hosts), p.verify) for p in phases] == [
        ("Canary Phase", 2, True),
        ("Primary Phase", 18, False),
    ]


@pytest.mark.parametrize(
    ("written", "seconds"),
    [('"10"', 600), ("10", 600), ('"0.5"', 30), ("45s", 45), ("2m", 120), ("1h", 3600)],
)
def test_time_duration_is_minutes_unless_it_names_its_unit(written: str, seconds: float) -> None:
    spec = CanaryAnalysisSpec.model_validate(
        {
            "analysisType": "Prometheus",
            "comparisonStrategy": "COMPARE_WITH_CURRENT",
            "timeDuration": __import__("yaml").safe_load(written),
        }
    )
    assert spec.window_seconds() == seconds


@pytest.mark.parametrize(
    ("old", "new", "needle", "says"),
    [
        (
            "analysisType: Prometheus",
            "analysisType: Datadog",
            "analysisType: Datadog",
            "analysisType Datadog is not supported: vmfarm's canary analysis reads Prometheus",
        ),
        (
            "analysisType: Prometheus",
            "analysisType: APP_DYNAMICS",
            "APP_DYNAMICS",
            "analysisType APP_DYNAMICS is not supported",
        ),
        (
            "COMPARE_WITH_CURRENT",
            "COMPARE_WITH_PREVIOUS",
            "COMPARE_WITH_PREVIOUS",
            "comparisonStrategy COMPARE_WITH_PREVIOUS is not supported",
        ),
        ('timeDuration: "10"', 'timeDuration: "0"', "timeDuration", "must be above 0"),
        ('timeDuration: "10"', 'timeDuration: "90"', "timeDuration", "at most 60 minutes"),
        ('timeDuration: "10"', "timeDuration: soon", "timeDuration", "not a duration"),
        (
            "comparisonStrategy: COMPARE_WITH_CURRENT\n                        time",
            "time",
            "analysisType: Prometheus",
            "a canary analysis needs comparisonStrategy",
        ),
        (
            'timeDuration: "10"',
            'timeDuration: "10"\n                        analysisServer: x',
            "analysisServer",
            "'analysisServer' is not supported",
        ),
        (
            'timeDuration: "10"',
            'timeDuration: "10"\n                        metrics:\n'
            "                          - {name: cpu, query: 'sum(cpu)', maxRatio: 2}",
            "name: cpu",
            "the query must select the side's hosts with $instances",
        ),
        (
            'timeDuration: "10"',
            'timeDuration: "10"\n                        metrics:\n'
            "                          - {name: cpu, query: 'sum(cpu{instance=~\"$instances\"})'}",
            "name: cpu",
            "needs maxIncrease and/or maxRatio",
        ),
        (
            'timeDuration: "10"',
            'timeDuration: "10"\n                        metrics:\n'
            "                          - {name: cpu, query: 'sum(cpu{instance=~\"$instances\"})', "
            "maxRatio: 2, threshold: 3}",
            "name: cpu",
            "unknown field 'threshold'",
        ),
    ],
)
def test_an_analysis_vmfarm_does_not_run_is_refused_at_load_where_it_is_written(
    tmp_path: Path, old: str, new: str, needle: str, says: str
) -> None:
    # Given the reference's canary block with one thing vmfarm does not carry out
    pipeline = reference_with_canary(tmp_path, old, new)
    # When it is loaded, Then it is refused at the line that says it, naming it
    errors = refused(pipeline.parent)
    (err,) = [e for e in errors if says in e.message]
    lines = pipeline.read_text().split("\n")
    assert err.file.endswith("pipeline.yaml")
    assert needle in lines[err.line - 1], (err.line, lines[err.line - 1])


def test_a_canary_analysis_needs_phases_to_compare(tmp_path: Path) -> None:
    from app.definitions.models import StrategySpec

    analysis = {
        "analysisType": "Prometheus",
        "comparisonStrategy": "COMPARE_WITH_CURRENT",
        "timeDuration": 5,
    }
    with pytest.raises(ValueError, match="canaryAnalysis is not supported with a Basic"):
        StrategySpec.model_validate({"type": "Basic", "verification": {"canaryAnalysis": analysis}})
    ok = StrategySpec.model_validate(
        {"type": "Canary", "phases": [1], "verification": {"canaryAnalysis": analysis}}
    )
    assert ok.verification is not None and ok.verification.canary_analysis is not None


def test_a_verification_step_in_a_rollout_phase_gates_that_phase(tmp_path: Path) -> None:
    # Given the reference's block written as a rolloutDeployment (it was ignored before)
    pipeline = reference_with_canary(tmp_path, "canaryDeployment:", "rolloutDeployment:")
    strategy = strategy_of(pipeline.parent)
    from app.definitions.plan import StrategyPlan

    phases = plan_phases(StrategyPlan.model_validate(strategy), [f"h{i}" for i in range(10)])
    assert [(len(p.hosts), p.verify) for p in phases] == [(1, True), (9, False)]
    assert strategy["verification"]["canaryAnalysis"]["timeDuration"] == "10"


# --- the comparison ----------------------------------------------------------------------------

ERRORS, P95 = DEFAULT_METRICS


@pytest.mark.parametrize(
    ("canary", "baseline", "passed"),
    [
        (0.0, 0.0, True),
        (0.005, 0.0, True),  # worse, but by less than a percentage point
        (0.02, 0.0, False),  # 2 pp above a clean baseline
        (0.12, 0.10, True),  # +2 pp, but only 1.2x a noisy baseline
        (0.25, 0.10, False),  # +15 pp and 2.5x
        (0.0, 0.05, True),  # better is never a failure
    ],
)
def test_error_rate_fails_when_worse_by_more_than_both_margins(
    canary: float, baseline: float, passed: bool
) -> None:
    ok, why = compare(ERRORS, canary, baseline)
    assert ok is passed, why
    assert f"canary {canary * 100:.2f}%" in why and f"baseline {baseline * 100:.2f}%" in why


@pytest.mark.parametrize(
    ("canary", "baseline", "passed"),
    [
        (0.010, 0.005, True),  # 2x, but only 5 ms slower
        (0.120, 0.100, True),  # 1.2x exactly
        (0.150, 0.100, False),  # 1.5x and +50 ms
        (0.300, 0.004, False),
    ],
)
def test_p95_latency_fails_when_worse_by_more_than_both_margins(
    canary: float, baseline: float, passed: bool
) -> None:
    ok, why = compare(P95, canary, baseline)
    assert ok is passed, why
    assert f"canary {canary * 1000:.1f} ms" in why


@pytest.mark.parametrize(
    ("canary", "baseline", "says"),
    [
        (None, 0.1, "no data for the canary hosts"),
        (math.nan, 0.1, "no data for the canary hosts"),
        (0.1, None, "no data for the hosts on the current version"),
    ],
)
def test_no_data_on_either_side_is_not_a_pass(
    canary: float | None, baseline: float | None, says: str
) -> None:
    ok, why = compare(ERRORS, canary, baseline)
    assert not ok and says in why


def test_one_margin_alone_decides_when_only_one_is_given() -> None:
    ratio_only = CanaryMetric(name="cpu", query='cpu{instance=~"$instances"}', max_ratio=1.5)
    assert compare(ratio_only, 1.6, 1.0)[0] is False
    assert compare(ratio_only, 1.4, 1.0)[0] is True


def test_the_query_selects_exactly_the_sides_instances() -> None:
    q = render_query(ERRORS.query, ["127.0.1.5:8080", "127.0.1.15:8080"], 600)
    assert 'instance=~"127\\\\.0\\\\.1\\\\.5:8080|127\\\\.0\\\\.1\\\\.15:8080"' in q
    assert "[600s]" in q and "$" not in q


def test_the_verdict_keeps_both_sides_numbers_and_says_why() -> None:
    # Given a Prometheus whose canary side is slower and errs more
    answers = {
        "canary": {"error rate": 0.2, "p95 latency": 0.3},
        "baseline": {"error rate": 0.0, "p95 latency": 0.01},
    }
    asked: list[tuple[str, float | None]] = []

    def query(url: str, promql: str, *, at: float | None = None) -> float:
        asked.append((promql, at))
        side = "canary" if "10\\\\.0\\\\.0\\\\.1" in promql else "baseline"
        metric = "error rate" if "http_requests_total" in promql else "p95 latency"
        return answers[side][metric]

    spec = CanaryAnalysisSpec.model_validate(
        {
            "analysisType": "Prometheus",
            "comparisonStrategy": "COMPARE_WITH_CURRENT",
            "timeDuration": "10",
        }
    )
    verdict = analyse(
        spec,
        url="http://prom:9090",
        canary=["10.0.0.1:8080"],
        baseline=["10.0.0.2:8080", "10.0.0.3:8080"],
        query=query,
        now=lambda: 5000.0,
    )
    # Then it failed, with both sides' numbers per metric
    assert verdict["passed"] is False
    assert verdict["window"] == {"seconds": 600, "start": 4400.0, "end": 5000.0}
    assert [(m["name"], m["canary"], m["baseline"], m["passed"]) for m in verdict["metrics"]] == [
        ("error rate", 0.2, 0.0, False),
        ("p95 latency", 0.3, 0.01, False),
    ]
    assert verdict["reasons"][0].startswith("canary analysis: error rate: canary 20.00%")
    # and every query was evaluated at the window's end, over the window
    assert len(asked) == 4 and {at for _, at in asked} == {5000.0}
    assert all("[600s]" in q for q, _ in asked)


def test_a_failing_metric_source_fails_the_analysis_with_the_reason() -> None:
    def query(url: str, promql: str, *, at: float | None = None) -> float:
        raise RuntimeError("connection refused")

    spec = CanaryAnalysisSpec.model_validate(
        {
            "analysisType": "Prometheus",
            "comparisonStrategy": "COMPARE_WITH_CURRENT",
            "timeDuration": "30s",
        }
    )
    verdict = analyse(spec, url="http://prom:9090", canary=["a"], baseline=["b"], query=query)
    assert verdict["passed"] is False
    assert "canary query failed: connection refused" in verdict["reasons"][0]


def test_verification_steps_that_differ_within_a_stage_are_refused(tmp_path: Path) -> None:
    # Given a second canary phase whose VERIFICATION step says something else
    second = (
        "    - phase:\n"
        "        name: Canary Two\n"
        '        instanceCount: "50%"\n'
        "        instanceUnitType: PERCENTAGE\n"
        "        steps:\n"
        "          - type: VERIFICATION\n"
        "            properties:\n"
        "              analysisType: Prometheus\n"
        "              comparisonStrategy: COMPARE_WITH_CURRENT\n"
        '              timeDuration: "5"\n'
    )
    old = '              timeDuration: "10"\n'
    new = old + "".join(f"          {line}\n" for line in second.splitlines())
    pipeline = reference_with_canary(tmp_path, old, new)
    # Then only the first would run: refused, not ignored
    errors = refused(pipeline.parent)
    (err,) = [e for e in errors if "differ from the first one's" in e.message]
    assert (
        err.line > pipeline.read_text().split("\n").index("                  name: Canary Two") + 1
    )


def test_the_checks_of_an_analysis_wait_its_window_in_the_broker() -> None:
    import time

    from app.canvas import verify_canvas

    # Given a verification gate after a canary whose analysis window is 10 minutes
    before = time.time()
    canvas = verify_canvas(
        execution_id="e1",
        stage_index=0,
        phase=0,
        hosts=[("h1", "r1"), ("h2", "r2")],
        expires=60,
        countdown=600,
    )
    # Then every check is sent with that countdown (no worker sleeps), and its dispatch
    # deadline counts from the window's end
    assert [t.options.get("countdown") for t in canvas.tasks] == [600, 600]
    assert all(t.kwargs["key"]["x"] > before + 659 for t in canvas.tasks)
    assert canvas.body.name == "vmfarm.verification_gate"
    # and a gate without an analysis is sent at once, as before
    plain = verify_canvas(
        execution_id="e1", stage_index=0, phase=0, hosts=[("h1", "r1")], expires=60
    )
    assert "countdown" not in plain.tasks[0].options
