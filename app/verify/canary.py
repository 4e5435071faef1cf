"""Canary analysis: the canary hosts' metrics against those of the hosts still on the current
version, over one window (Harness CV's ``COMPARE_WITH_CURRENT``; Kayenta's canary judge).

Each metric is a PromQL template run twice at the window's end, once per side: ``$instances``
becomes a regular expression matching that side's ``instance`` labels exactly, ``$window`` the
window as a PromQL duration (``600s``). Higher is worse. The canary fails a metric when it is
worse than the baseline by more than every margin the metric gives: ``maxIncrease`` (absolute,
in the metric's unit) and ``maxRatio`` (times the baseline). Both margins together keep noise
from failing a good build: with a baseline of 0 errors, one error in a thousand is "infinitely
worse" but not by a percentage point. No data on either side fails the metric: no data is not
a pass.

The defaults (``DEFAULT_METRICS``) read the conventional HTTP metrics of a Prometheus client:

    error rate    (sum(rate(http_requests_total{instance=~"$instances",code=~"5.."}[$window]))
                   or vector(0)) / sum(rate(http_requests_total{instance=~"$instances"}[$window]))
                  fails above baseline + 0.01 (one percentage point) and above 2x baseline
    p95 latency   histogram_quantile(0.95, sum by (le)
                   (rate(http_request_duration_seconds_bucket{instance=~"$instances"}[$window])))
                  fails above baseline + 0.025 s and above 1.2x baseline

Nothing here imports Celery or touches SQL: the coordinator calls :func:`analyse` with the two
sides' instance labels and stores what it returns in the phase's verdict.
"""

from __future__ import annotations

import math
import re
import time
from collections.abc import Callable, Sequence
from typing import Any

from app.definitions.models import CanaryAnalysisSpec, CanaryMetric

DEFAULT_METRICS: tuple[CanaryMetric, ...] = (
    CanaryMetric(
        name="error rate",
        query='(sum(rate(http_requests_total{instance=~"$instances",code=~"5.."}[$window])) '
        'or vector(0)) / sum(rate(http_requests_total{instance=~"$instances"}[$window]))',
        max_increase=0.01,
        max_ratio=2.0,
        unit="fraction",
    ),
    CanaryMetric(
        name="p95 latency",
        query="histogram_quantile(0.95, sum by (le) (rate("
        'http_request_duration_seconds_bucket{instance=~"$instances"}[$window])))',
        max_increase=0.025,
        max_ratio=1.2,
        unit="seconds",
    ),
)

Query = Callable[..., "float | None"]


def instances_regex(instances: Sequence[str]) -> str:
    """The labels as one PromQL regular expression, inside a double-quoted PromQL string:
    ``127.0.1.5:8080`` matches itself only (RE2 anchors label matchers)."""
    pattern = "|".join(re.escape(i) for i in instances)
    return pattern.replace("\\", "\\\\").replace('"', '\\"')


def render_query(template: str, instances: Sequence[str], window_s: float) -> str:
    """The metric's PromQL for one side."""
    return template.replace("$instances", instances_regex(instances)).replace(
        "$window", f"{max(1, round(window_s))}s"
    )


def show(value: float | None, unit: str) -> str:
    """A number as a person reads it: 1.5%, 120 ms, 3.2."""
    if value is None:
        return "no data"
    if unit == "fraction":
        return f"{value * 100:.2f}%"
    if unit == "seconds":
        return f"{value * 1000:.1f} ms"
    return f"{value:.4g}"


def _margins(metric: CanaryMetric) -> str:
    parts = []
    if metric.max_increase is not None:
        inc = (
            f"{metric.max_increase * 100:g} pp"
            if metric.unit == "fraction"
            else show(metric.max_increase, metric.unit)
        )
        parts.append(f"+{inc}")
    if metric.max_ratio is not None:
        parts.append(f"{metric.max_ratio:g}x")
    return " and ".join(parts)


def compare(metric: CanaryMetric, canary: float | None, baseline: float | None) -> tuple[bool, str]:
    """(passed, why): is the canary within the metric's margins of the baseline?"""
    canary = None if canary is None or math.isnan(canary) else canary
    baseline = None if baseline is None or math.isnan(baseline) else baseline
    numbers = (
        f"{metric.name}: canary {show(canary, metric.unit)}, baseline {show(baseline, metric.unit)}"
    )
    if canary is None:
        return False, f"{numbers}: no data for the canary hosts"
    if baseline is None:
        return False, f"{numbers}: no data for the hosts on the current version"
    exceeded = []
    if metric.max_increase is not None:
        exceeded.append(canary - baseline > metric.max_increase)
    if metric.max_ratio is not None:
        exceeded.append(canary > baseline * metric.max_ratio)
    if all(exceeded):
        return False, f"{numbers}: worse by more than {_margins(metric)}"
    return True, f"{numbers}: within {_margins(metric)}"


def _stored(value: float | None) -> float | None:
    # JSON columns take finite numbers only; the reason keeps what the number was.
    return value if value is not None and math.isfinite(value) else None


def analyse(
    spec: CanaryAnalysisSpec,
    *,
    url: str,
    canary: Sequence[str],
    baseline: Sequence[str],
    query: Query,
    now: Callable[[], float] = time.time,
) -> dict[str, Any]:
    """Run every metric for both sides at the window's end (now); the verdict, with both
    sides' numbers, as JSON-able data. ``query`` is app.verify.probes.prometheus_query."""
    window = spec.window_seconds()
    end = now()
    metrics: list[dict[str, Any]] = []
    reasons: list[str] = []
    for metric in spec.metrics or DEFAULT_METRICS:
        sides: dict[str, float | None] = {}
        errors: list[str] = []
        for side, instances in (("canary", canary), ("baseline", baseline)):
            try:
                sides[side] = query(url, render_query(metric.query, instances, window), at=end)
            except Exception as exc:  # a broken metric source fails the analysis, with why
                sides[side] = None
                errors.append(f"{side} query failed: {exc}")
        ok, why = compare(metric, sides["canary"], sides["baseline"])
        if errors:
            ok, why = False, f"{metric.name}: {'; '.join(errors)}"
        metrics.append(
            {
                "name": metric.name,
                "unit": metric.unit,
                "canary": _stored(sides["canary"]),
                "baseline": _stored(sides["baseline"]),
                "maxIncrease": metric.max_increase,
                "maxRatio": metric.max_ratio,
                "passed": ok,
                "reason": why,
            }
        )
        if not ok:
            reasons.append(f"canary analysis: {why}")
    return {
        "passed": not reasons,
        "analysisType": spec.analysis_type,
        "comparisonStrategy": spec.comparison_strategy,
        "prometheus": url,
        "window": {"seconds": window, "start": round(end - window, 3), "end": round(end, 3)},
        "canary": {"instances": list(canary)},
        "baseline": {"instances": list(baseline)},
        "metrics": metrics,
        "reasons": reasons,
    }
