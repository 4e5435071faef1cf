"""Which failure strategy applies to a failure: Harness's precedence (the step's own entries,
then its step group's, then the stage's, then the pipeline's; the first match wins), and across
the failed hosts of one phase the strongest action. Pure functions of the plan.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from app.definitions.base import parse_duration

# When hosts of one phase fail in different ways, the strongest action wins.
_SEVERITY = ("PipelineRollback", "StageRollback", "Abort", "ManualIntervention", "MarkAsFailure",
             "Ignore", "MarkAsSuccess")


def failure_action(step: dict[str, Any] | None, stage: dict[str, Any],
                   error_class: str) -> dict[str, Any] | None:
    """The action of the first failure strategy matching ``error_class``: the step's own
    entries, then its step group's, then the stage's, then the pipeline's (Harness's
    precedence; the plan lists a stage's entries before the pipeline's)."""
    own = [*(step or {}).get("failureStrategies", []),
           *(step or {}).get("groupFailureStrategies", [])]
    for entry in [*own, *stage.get("failureStrategies", [])]:
        on = entry["onFailure"]
        if "AllErrors" in on["errors"] or error_class in on["errors"]:
            return dict(on["action"])
    return None


@dataclass(frozen=True)
class AfterFailure:
    """What follows a failed attempt: another attempt after ``wait`` seconds, or (``wait`` is
    None) ``action``: the matched strategy's action, a spent Retry's onRetryFailure action, or
    None when no strategy matches."""

    wait: float | None
    action: dict[str, Any] | None


def after_failure(step: dict[str, Any] | None, stage: dict[str, Any], error_class: str,
                  attempt: int) -> AfterFailure:
    """The one place that decides whether attempt number ``attempt`` of ``step``, failed with
    ``error_class``, is retried and when (``retryCount`` retries after the first attempt, the
    n-th waiting ``retryIntervals[n-1]``, the last interval repeating)."""
    action = failure_action(step, stage, error_class)
    if action is None or action["type"] != "Retry":
        return AfterFailure(None, action)
    spec = action.get("spec") or {}
    if attempt - 1 >= int(spec.get("retryCount", 0)):
        return AfterFailure(None, (spec.get("onRetryFailure") or {}).get("action"))
    intervals = spec.get("retryIntervals") or ["0s"]
    return AfterFailure(parse_duration(intervals[min(attempt - 1, len(intervals) - 1)]), None)


def stage_action(stage: dict[str, Any],
                 failures: list[tuple[dict[str, Any] | None, str]]) -> dict[str, Any]:
    """The failure strategy action for a failed phase (Harness precedence per failure, then the
    strongest across failures). A Retry that ran out gives its onRetryFailure action. With no
    matching strategy a deployment stage rolls back; an approval stage just fails."""
    default = {"type": "MarkAsFailure"} if stage.get("type") == "Approval" else \
        {"type": "StageRollback"}
    chosen: dict[str, Any] | None = None
    for step, error_class in failures:
        action = failure_action(step, stage, error_class)
        while action is not None and action["type"] == "Retry":
            action = ((action.get("spec") or {}).get("onRetryFailure") or {}).get("action")
        action = action or default
        if chosen is None or _SEVERITY.index(action["type"]) < _SEVERITY.index(chosen["type"]):
            chosen = action
    return chosen or default
