"""A looped stage whose iterations run side by side (``maxConcurrency`` above 1).

```yaml
- stage:
    name: Deploy
    identifier: deploy
    type: Deployment
    strategy:
      repeat:
        items: [us-east-1, eu-west-1, ap-south-1]
        maxConcurrency: 3          # the three regions deploy at once; 2: two at a time,
    spec: {...}                    # the third starting when one of them ends
```

The iterations (``deploy_0``, ``deploy_1``...) are stages of the plan as they are when they run
one after another, each with its own rows; the plan marks them with their group
(``concurrency: {first, last, cap}``) and the coordinator starts up to ``cap`` of them at once
(app.coordinator.machine). One that fails does so alone: under StageRollback it rolls back its
own hosts, the others in flight finish and keep what they did, and the execution ends FAILED.

What cannot be carried out for iterations side by side is refused at load, naming file:line
and the field:

- a PipelineRollback or ManualIntervention failure strategy that applies to the stage (its
  steps', step groups', its own or the pipeline's): a pipeline rollback would undo iterations
  still running, and one person's answer would stand for every iteration;
- a HarnessApproval step in it (the execution waits for one approval at a time);
- a ``rollbackStrategy`` (the watch after deployment watches one stage at a time);
- a Custom stage (its steps run on a delegate, in the coordinator's order).
"""

from __future__ import annotations

from typing import Any

from app.definitions import models as m
from app.definitions.bundle import Bundle, Collector, Loaded, get_at

_SIDE_BY_SIDE = "a stage whose iterations run side by side (strategy maxConcurrency {cap})"
_ONE_AT_A_TIME = "; write maxConcurrency: 1 to run the iterations one after another"
_REFUSED_ACTIONS = {
    "PipelineRollback": "would roll back iterations that are still running",
    "ManualIntervention": "would make one person's answer stand for every iteration in flight",
}


def side_by_side(stage: Any) -> int:
    """How many of the stage's iterations run at once (1: one after another)."""
    loop = getattr(stage, "strategy", None)
    if not isinstance(loop, m.StageLoopStrategy):
        return 1
    return loop.side_by_side()


def check_stage_concurrency(bundle: Bundle, errs: Collector) -> None:
    """Refuse what a stage whose iterations run side by side cannot carry out."""
    for pipe in bundle.pipelines.values():
        stages = pipe.model.spec.stages
        for i, el in enumerate(stages):
            cap = side_by_side(el.stage)
            if cap > 1:
                _check_stage(pipe, i, cap, errs)


def _check_stage(pipe: Loaded, index: int, cap: int, errs: Collector) -> None:
    at: tuple[str | int, ...] = ("spec", "stages", index, "stage")
    raw = get_at(pipe.doc.data, (*pipe.base, *at))
    if not isinstance(raw, dict):
        return
    what = _SIDE_BY_SIDE.format(cap=cap)
    if raw.get("type") == "Custom":
        errs.add(
            pipe.error(
                f"{what} cannot be a Custom stage: its steps run on a delegate one stage at a "
                f"time{_ONE_AT_A_TIME}",
                (*at, "type"),
            )
        )
        return
    if raw.get("rollbackStrategy") is not None:
        errs.add(
            pipe.error(
                f"{what} cannot have a rollbackStrategy (the watch after deployment watches "
                f"one stage at a time){_ONE_AT_A_TIME}",
                (*at, "rollbackStrategy"),
            )
        )
    for path, kind in _steps(raw, at):
        if kind == "HarnessApproval":
            errs.add(
                pipe.error(
                    f"{what} cannot hold a HarnessApproval step (the execution waits for one "
                    f"approval at a time){_ONE_AT_A_TIME}, or put the approval in an Approval "
                    "stage before it",
                    (*path, "type"),
                )
            )
    found = [("a failure strategy", *a) for a in _actions(raw, at)] + [
        ("the pipeline's failure strategy", *a)
        for a in _actions(
            get_at(pipe.doc.data, (*pipe.base, "spec")), ("spec",), only="failureStrategies"
        )
    ]
    for whose, path, action in found:
        errs.add(
            pipe.error(
                f"{whose} {action} cannot apply to {what}: it "
                f"{_REFUSED_ACTIONS[action]}; use StageRollback (the failed iteration rolls "
                f"back alone), MarkAsFailure, Abort, Ignore or Retry{_ONE_AT_A_TIME}",
                path,
            )
        )


def _steps(
    raw: dict[str, Any], at: tuple[str | int, ...]
) -> list[tuple[tuple[str | int, ...], str]]:
    """Every step of the stage (in step groups too) with its type."""
    out: list[tuple[tuple[str | int, ...], str]] = []

    def walk(elements: Any, path: tuple[str | int, ...]) -> None:
        if not isinstance(elements, list):
            return
        for i, el in enumerate(elements):
            if not isinstance(el, dict):
                continue
            step = el.get("step")
            if isinstance(step, dict):
                out.append(((*path, i, "step"), str(step.get("type"))))
            group = el.get("stepGroup")
            if isinstance(group, dict):
                walk(group.get("steps"), (*path, i, "stepGroup", "steps"))

    execution = (
        (raw.get("spec") or {}).get("execution") if isinstance(raw.get("spec"), dict) else None
    )
    if isinstance(execution, dict):
        for key in ("steps", "rollbackSteps"):
            walk(execution.get(key), (*at, "spec", "execution", key))
    return out


def _actions(
    data: Any, at: tuple[str | int, ...], *, only: str | None = None
) -> list[tuple[tuple[str | int, ...], str]]:
    """Every failure strategy action refused side by side under ``data`` (a retry's
    onRetryFailure and an intervention's onTimeout too): (path of its type, the action)."""
    out: list[tuple[tuple[str | int, ...], str]] = []

    def walk(node: Any, path: tuple[str | int, ...], inside: bool) -> None:
        if isinstance(node, dict):
            if inside and node.get("type") in _REFUSED_ACTIONS and "type" in node:
                out.append(((*path, "type"), str(node["type"])))
            for k, v in node.items():
                if only is not None and not inside and k != only:
                    continue
                walk(v, (*path, k), inside or k == "failureStrategies")
        elif isinstance(node, list):
            for i, v in enumerate(node):
                walk(v, (*path, i), inside)

    walk(data, at, False)
    return out


def mark_groups(stages: list[dict[str, Any]], first: int, cap: int) -> None:
    """The iterations ``stages[first:]`` (one loop's, in plan order) run side by side, ``cap``
    at a time: each says so in the plan."""
    last = len(stages) - 1
    if cap <= 1 or last <= first:
        return
    for st in stages[first:]:
        st["concurrency"] = {"first": first, "last": last, "cap": min(cap, last - first + 1)}
