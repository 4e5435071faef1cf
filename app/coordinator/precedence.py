"""Which failure strategy applies to a failure: Harness's precedence (the step's own entries,
then its step group's, then the stage's, then the pipeline's; the first match wins), and across
the failed hosts of one phase the strongest action. Pure functions of the plan.
"""

from __future__ import annotations

from dataclasses import dataclass

from app.definitions.base import parse_duration
from app.definitions.models import FailureAction
from app.definitions.plan import AnyStagePlan, DeploymentStagePlan, PipelineStagePlan, StepPlan

Stage = AnyStagePlan

# When hosts of one phase fail in different ways, the strongest action wins.
_SEVERITY = (
    "PipelineRollback",
    "StageRollback",
    "Abort",
    "ManualIntervention",
    "MarkAsFailure",
    "Ignore",
    "MarkAsSuccess",
)


def failure_action(step: StepPlan | None, stage: Stage, error_class: str) -> FailureAction | None:
    """The action of the first failure strategy matching ``error_class``: the step's own
    entries, then its step group's, then the stage's, then the pipeline's (Harness's
    precedence; the plan lists a stage's entries before the pipeline's)."""
    own = [*step.failure_strategies, *step.group_failure_strategies] if step else []
    stage_level = (
        stage.failure_strategies
        if isinstance(stage, DeploymentStagePlan | PipelineStagePlan)
        else []
    )
    for entry in [*own, *stage_level]:
        on = entry.on_failure
        if "AllErrors" in on.errors or error_class in on.errors:
            return on.action
    return None


@dataclass(frozen=True)
class AfterFailure:
    """What follows a failed attempt: another attempt after ``wait`` seconds, or (``wait`` is
    None) ``action``: the matched strategy's action, a spent Retry's onRetryFailure action, or
    None when no strategy matches."""

    wait: float | None
    action: FailureAction | None


def after_failure(
    step: StepPlan | None, stage: Stage, error_class: str, attempt: int
) -> AfterFailure:
    """The one place that decides whether attempt number ``attempt`` of ``step``, failed with
    ``error_class``, is retried and when (``retryCount`` retries after the first attempt, the
    n-th waiting ``retryIntervals[n-1]``, the last interval repeating)."""
    action = failure_action(step, stage, error_class)
    retry = action.retry if action is not None else None
    if retry is None:
        return AfterFailure(None, action)
    if attempt - 1 >= retry.retry_count:
        return AfterFailure(None, retry.on_retry_failure.action if retry.on_retry_failure else None)
    intervals = retry.retry_intervals
    return AfterFailure(parse_duration(intervals[min(attempt - 1, len(intervals) - 1)]), None)


def stage_action(stage: Stage, failures: list[tuple[StepPlan | None, str]]) -> FailureAction:
    """The failure strategy action for a failed phase (Harness precedence per failure, then the
    strongest across failures). A Retry that ran out gives its onRetryFailure action. With no
    matching strategy a deployment stage rolls back; an approval or Custom stage (nothing
    deployed to roll back) just fails; so does a Pipeline stage (its child deployed)."""
    default = FailureAction(
        type="MarkAsFailure"
        if stage.type in ("Approval", "Custom", "Pipeline")
        else "StageRollback"
    )
    chosen: FailureAction | None = None
    for step, error_class in failures:
        action = failure_action(step, stage, error_class)
        while action is not None and action.retry is not None:
            action = action.retry.on_retry_failure.action if action.retry.on_retry_failure else None
        action = action or default
        if chosen is None or _SEVERITY.index(action.type) < _SEVERITY.index(chosen.type):
            chosen = action
    return chosen or default
