"""The watch after deployment: a Deployment stage's ``rollbackStrategy.triggers`` (the reference's
"Comprehensive Rollback Configuration"; CodeDeploy's alarm-based automatic rollback).

After the stage's last phase has passed, vmfarm watches the stage's hosts for the longest
``evaluation_window`` of its triggers: every ``interval`` the control worker measures each
trigger's metric over the last ``lookback`` (never further back than the watch's start) and
compares it with the trigger's condition. A breached condition rolls the stage back (the
ledger's rollback, as a StageRollback does) and says which trigger, with the numbers; when the
window has passed without a breach the stage succeeds, its verdict holding the numbers.

```yaml
- stage:
    name: Deploy
    identifier: deploy
    type: Deployment
    spec: {...}
    rollbackStrategy:
      prometheusUrl: http://prometheus:9090   # default: VMFARM_PROMETHEUS_URL
      interval: 30s                           # how often the watch measures (default 30s)
      triggers:
        - name: High Error Rate
          condition: "error_rate > 5%"
          evaluation_window: 5m
          action: automatic_rollback
        - name: Response Time Degradation
          condition: "avg_response_time > 2000ms"
          evaluation_window: 10m
        - name: Health Check Failure
          condition: "health_check_success_rate < 80%"
          evaluation_window: 3m
```

Metrics: ``error_rate`` and ``avg_response_time`` read the conventional HTTP metrics of a
Prometheus client (``http_requests_total{code}``, ``http_request_duration_seconds``) for the
stage's hosts (``instance`` labels, ``<+instance.hostName>:8080`` by default);
``health_check_success_rate`` is the share of HTTP health checks the control worker made to
the stage's hosts that passed (``healthCheck``, or the stage's HTTP HealthCheck step). Any
other name needs a ``query`` (PromQL with ``$instances`` and ``$window``).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Annotated, Any

from pydantic import AfterValidator, Field, model_validator

from app.definitions.base import Duration, Model, parse_duration

#: The longest watch (a watch holds its execution open: runs wait for it).
MAX_WATCH_SECONDS = 24 * 3600
#: The longest gap between two checks (a check waits that long in the broker, under Redis's
#: visibility timeout of an hour).
MAX_INTERVAL_SECONDS = 600
DEFAULT_WINDOW = "5m"
DEFAULT_INTERVAL = "30s"
DEFAULT_LOOKBACK = "1m"

ERROR_RATE_QUERY = (
    '(sum(rate(http_requests_total{instance=~"$instances",code=~"5.."}[$window])) '
    'or vector(0)) / sum(rate(http_requests_total{instance=~"$instances"}[$window]))'
)
RESPONSE_TIME_QUERY = (
    'sum(rate(http_request_duration_seconds_sum{instance=~"$instances"}[$window])) '
    '/ sum(rate(http_request_duration_seconds_count{instance=~"$instances"}[$window]))'
)
HEALTH = "health_check_success_rate"
#: The metrics vmfarm knows: (unit, default query; None = the watch's HTTP health checks).
KNOWN_METRICS: dict[str, tuple[str, str | None]] = {
    "error_rate": ("fraction", ERROR_RATE_QUERY),
    "avg_response_time": ("seconds", RESPONSE_TIME_QUERY),
    HEALTH: ("fraction", None),
}

_CONDITION_RE = re.compile(
    r"^\s*([A-Za-z_][A-Za-z0-9_]*)\s*(>=|<=|>|<)\s*(-?\d+(?:\.\d+)?)\s*(%|ms|s)?\s*$"
)


@dataclass(frozen=True)
class Condition:
    """A trigger's condition, read: ``metric op threshold`` in the metric's unit (a fraction
    for rates, seconds for times); ``written`` is the text as the file has it."""

    metric: str
    op: str
    threshold: float
    unit: str
    written: str

    def breached(self, value: float) -> bool:
        """Does ``value`` meet the condition (and so call for a rollback)?"""
        return {
            ">": value > self.threshold,
            ">=": value >= self.threshold,
            "<": value < self.threshold,
            "<=": value <= self.threshold,
        }[self.op]


def parse_condition(text: str, *, custom: bool = False) -> Condition:
    """``error_rate > 5%`` -> Condition; raises ValueError naming what is wrong and the fix.
    ``custom``: the trigger has its own query, so any metric name goes (a plain number)."""
    if text.strip() == "user_initiated":
        raise ValueError(
            "condition user_initiated is not a watch: a person rolls a deployment back with "
            "`vmfarm rollback EXECUTION` at any time; remove this trigger"
        )
    m = _CONDITION_RE.match(text)
    if not m:
        raise ValueError(
            f"condition {text!r} is not `metric > number` (e.g. 'error_rate > 5%', "
            "'avg_response_time > 2000ms', 'health_check_success_rate < 80%')"
        )
    metric, op, number, suffix = m.group(1), m.group(2), float(m.group(3)), m.group(4)
    if metric not in KNOWN_METRICS and not custom:
        raise ValueError(
            f"condition {text!r}: unknown metric {metric} (known: {', '.join(KNOWN_METRICS)}; "
            "any other needs the trigger's query: PromQL with $instances and $window)"
        )
    unit = KNOWN_METRICS[metric][0] if metric in KNOWN_METRICS and not custom else "number"
    if suffix == "%":
        if unit == "seconds":
            raise ValueError(f"condition {text!r}: {metric} is a time (write ms or s)")
        threshold, unit = number / 100, "fraction"
    elif suffix in ("ms", "s"):
        if unit == "fraction":
            raise ValueError(f"condition {text!r}: {metric} is a rate (write a percentage)")
        threshold, unit = (number / 1000 if suffix == "ms" else number), "seconds"
    elif unit == "seconds":
        raise ValueError(f"condition {text!r}: give the time's unit (2000ms or 2s)")
    elif unit == "fraction" and not 0 <= number <= 1:
        raise ValueError(f"condition {text!r}: write the rate as a percentage ({number:g}%)")
    else:
        threshold = number
    return Condition(metric, op, threshold, unit, text.strip())


def _window(v: str) -> str:
    seconds = parse_duration(v)
    if not 0 < seconds <= MAX_WATCH_SECONDS:
        raise ValueError(f"evaluation_window {v!r} must be above 0 and at most 24h")
    return v


def _interval(v: str) -> str:
    seconds = parse_duration(v)
    if not 0.2 <= seconds <= MAX_INTERVAL_SECONDS:
        raise ValueError(f"interval {v!r} must be at least 0.2s and at most 10m")
    return v


def _action(v: str) -> str:
    if v != "automatic_rollback":
        raise ValueError(
            f"action {v} is not supported: a watch's breach rolls the stage back "
            "(action: automatic_rollback); a person rolls back with `vmfarm rollback`"
        )
    return v


class WatchTrigger(Model):
    """One trigger: its condition is judged on every check during its evaluation window."""

    name: str = Field(min_length=1)
    condition: str
    # Both spellings are read: the reference's evaluation_window, and evaluationWindow.
    evaluation_window: Annotated[Duration, AfterValidator(_window)] = DEFAULT_WINDOW
    action: Annotated[str, AfterValidator(_action)] = "automatic_rollback"
    query: str | None = None  # PromQL with $instances and $window; needed for other metrics

    @model_validator(mode="after")
    def _readable(self) -> WatchTrigger:
        parse_condition(self.condition, custom=self.query is not None)
        if self.query is not None and "$instances" not in self.query:
            raise ValueError(
                f"trigger '{self.name}': the query must select the stage's hosts with "
                '$instances, e.g. {instance=~"$instances"}'
            )
        return self

    def parsed(self) -> Condition:
        """The condition, read."""
        return parse_condition(self.condition, custom=self.query is not None)

    def window_seconds(self) -> float:
        return parse_duration(self.evaluation_window)


class WatchHealthCheck(Model):
    """The HTTP health check the watch makes to every host at each check (one attempt)."""

    url: str
    expect_status: list[int] = Field(default_factory=lambda: [200])
    expect_body: str | None = None
    timeout: Duration = "2s"


class RollbackStrategySpec(Model):
    """A stage's ``rollbackStrategy``: the watch after deployment (see the module docstring).
    The reference's ``rollbackTypes`` are refused by name: a stage rolls back with its
    rollbackSteps or the previous version's steps from the Instance ledger."""

    triggers: list[WatchTrigger] = Field(min_length=1)
    prometheus_url: str | None = None  # default: VMFARM_PROMETHEUS_URL
    instance: str = "<+instance.hostName>:8080"  # a host's `instance` label in Prometheus
    interval: Annotated[Duration, AfterValidator(_interval)] = DEFAULT_INTERVAL
    lookback: Duration = DEFAULT_LOOKBACK
    health_check: WatchHealthCheck | None = None
    rollback_types: Any = None

    @model_validator(mode="after")
    def _supported(self) -> RollbackStrategySpec:
        if self.rollback_types is not None:
            raise ValueError(
                "rollbackTypes is not supported: a stage rolls back with its rollbackSteps, or "
                "else the steps that deployed the previous version (the Instance ledger); "
                "blue-green switches traffic back first"
            )
        names = [t.name for t in self.triggers]
        twice = sorted({n for n in names if names.count(n) > 1})
        if twice:
            raise ValueError(f"trigger names must be unique: {', '.join(twice)}")
        if parse_duration(self.lookback) <= 0:
            raise ValueError(f"lookback {self.lookback!r} must be above 0")
        return self

    def window_seconds(self) -> float:
        """How long the watch lasts: its longest trigger window."""
        return max(t.window_seconds() for t in self.triggers)

    def interval_seconds(self) -> float:
        return parse_duration(self.interval)

    def lookback_seconds(self) -> float:
        return parse_duration(self.lookback)

    def needs_health_checks(self) -> bool:
        return any(t.query is None and t.parsed().metric == HEALTH for t in self.triggers)
