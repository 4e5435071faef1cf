"""evaluate(): the pipeline's success criteria judged against measured numbers (error rate,
latency percentiles, Prometheus values), and the criteria it refuses. The checks and probes
that measure them run against real servers in tests/service/test_verify_probes.py.
"""

from __future__ import annotations

from typing import Any

import pytest

from app.errors import ConfigError
from app.verify import evaluate

# --------------------------------------------------------------------------------------------
# The injected clock


# --------------------------------------------------------------------------------------------
# Local servers


# --------------------------------------------------------------------------------------------
# http_check


# --------------------------------------------------------------------------------------------
# probe


# --------------------------------------------------------------------------------------------
# prometheus_query


# --------------------------------------------------------------------------------------------
# evaluate

MEASURED = {
    "error_rate": 0.002,
    "p50_ms": 40.2,
    "p95_ms": 812.0,
    "p99_ms": 1200.0,
    "max_ms": 1500.0,
    "mean_ms": 90.0,
}


@pytest.mark.parametrize(
    ("criteria", "measured", "passed", "reasons"),
    [
        ({"errorRateBelow": "1%"}, {"error_rate": 0.125}, False, ["error rate 12.5% >= 1%"]),
        ({"errorRateBelow": 0.01}, MEASURED, True, ["error rate 0.2% < 1%"]),
        ({"error_rate_below": "0.5%"}, {"error_rate": 0.005}, False, ["error rate 0.5% >= 0.5%"]),
        (
            {"errorRateBelow": "1%"},
            {"error_rate": None},
            False,
            ["error rate not measured (no requests), threshold 1%"],
        ),
        ({"responseTimeBelow": 500}, MEASURED, False, ["p95 812 ms >= 500 ms"]),
        ({"response_time_below": "900ms"}, MEASURED, True, ["p95 812 ms < 900 ms"]),
        ({"responseTimeBelow": "1.5s"}, MEASURED, True, ["p95 812 ms < 1500 ms"]),
        ({"responseTimeBelow": {"p99": 500}}, MEASURED, False, ["p99 1200 ms >= 500 ms"]),
        (
            {"responseTimeBelow": {"p50": 50, "max": 1000}},
            MEASURED,
            False,
            ["max 1500 ms >= 1000 ms"],
        ),
        (
            {"responseTimeBelow": 500},
            {"p95_ms": None},
            False,
            ["p95 not measured (no successful request), threshold 500 ms"],
        ),
        (
            {"prometheus": {"query": "err", "below": 0.05}},
            {"prometheus": 0.07},
            False,
            ["err = 0.07 >= 0.05"],
        ),
        (
            {"prometheus": {"query": "up", "above": 0.9, "below": 1.5}},
            {"prometheus": 1.0},
            True,
            ["up = 1 > 0.9 and < 1.5"],
        ),
        (
            {"prometheus": [{"query": "a", "below": 1}, {"query": "b", "above": 5}]},
            {"prometheus": {"a": 0.5, "b": 2}},
            False,
            ["b = 2 <= 5"],
        ),
        (
            {"prometheus": {"query": "err", "below": 0.05}},
            {"prometheus": None},
            False,
            ["err: no data"],
        ),
        (
            {"prometheus": {"query": "err", "below": 0.05}},
            {"prometheus": float("nan")},
            False,
            ["err: no data"],
        ),
        (
            {"errorRateBelow": "1%", "responseTimeBelow": 500},
            MEASURED,
            False,
            ["p95 812 ms >= 500 ms"],
        ),
        (
            {"errorRateBelow": "1%", "responseTimeBelow": 900},
            MEASURED,
            True,
            ["error rate 0.2% < 1%", "p95 812 ms < 900 ms"],
        ),
        ({}, MEASURED, True, []),
    ],
)
def test_evaluate(
    criteria: dict[str, Any], measured: dict[str, Any], passed: bool, reasons: list[str]
) -> None:
    assert evaluate(criteria, measured) == (passed, reasons)


@pytest.mark.parametrize(
    ("criteria", "message"),
    [
        ({"errorRateBelo": "1%"}, "unknown success criterion 'errorRateBelo'"),
        ({"errorRateBelow": 5}, "not in 0..1; write a percentage as a string"),
        ({"errorRateBelow": "lots"}, "not a fraction"),
        ({"responseTimeBelow": {"p90": 100}}, "unknown statistic 'p90'"),
        ({"responseTimeBelow": "fast"}, "not a time"),
        ({"prometheus": {"query": "up"}}, "needs below and/or above"),
    ],
)
def test_evaluate_rejects_criteria_it_cannot_check(criteria: dict[str, Any], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        evaluate(criteria, MEASURED)
