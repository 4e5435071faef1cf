"""The watch after deployment: one check's numbers, and the verdict over the checks so far
(a stage's ``rollbackStrategy.triggers``, app.definitions.models.watch).

A check (:func:`measure`) asks Prometheus each trigger's metric for the stage's hosts over the
last ``lookback`` (never further back than the watch's start: the previous version's requests
must not dilute the new one's errors) and makes one HTTP health check per host when a trigger
reads ``health_check_success_rate``. The verdict (:func:`judge`) reads every check so far:

- a trigger is judged on the checks made within its ``evaluation_window`` from the watch's
  start; a number that meets its condition is a breach, and the stage rolls back;
- ``health_check_success_rate`` is the share of the health checks within the last lookback
  that passed;
- a trigger that got no number during its whole window (no traffic, Prometheus unreachable)
  is a breach too: a watch that saw nothing vouches for nothing;
- when the longest window has passed without a breach, the watch has passed.

Nothing here imports Celery or touches SQL: the coordinator calls these outside its lock and
keeps what they return in the watch's record.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from app.definitions.models.watch import HEALTH, KNOWN_METRICS, RollbackStrategySpec, WatchTrigger
from app.verify.canary import render_query, show

Query = Callable[..., "float | None"]
Check = Callable[..., Any]  # app.verify.probes.http_check

#: The checks a watch record keeps (the verdict needs those of the last lookback only).
HISTORY = 120


def _number(value: float | None) -> float | None:
    return None if value is None or not math.isfinite(value) else float(value)


def _query_of(trigger: WatchTrigger) -> str | None:
    if trigger.query is not None:
        return trigger.query
    return KNOWN_METRICS[trigger.parsed().metric][1]


def measure(
    spec: RollbackStrategySpec,
    *,
    url: str | None,
    instances: Sequence[str],
    health_urls: Mapping[str, str],
    started: float,
    now: float,
    query: Query,
    check: Check,
) -> dict[str, Any]:
    """One check: each trigger's number now (None: no data; with ``errors`` saying why), and
    the health checks' outcome per host. JSON-able."""
    lookback = max(1.0, min(spec.lookback_seconds(), now - started))
    values: dict[str, float | None] = {}
    errors: dict[str, str] = {}
    for t in spec.triggers:
        template = _query_of(t)
        if template is None:  # the health checks below
            continue
        if not url:
            values[t.name] = None
            errors[t.name] = "no Prometheus URL (rollbackStrategy.prometheusUrl or "
            errors[t.name] += "VMFARM_PROMETHEUS_URL)"
            continue
        try:
            values[t.name] = _number(query(url, render_query(template, instances, lookback)))
        except Exception as exc:  # a broken metric source is recorded, with why
            values[t.name], errors[t.name] = None, str(exc)
    health: dict[str, Any] | None = None
    if spec.health_check is not None and spec.needs_health_checks():
        hc = spec.health_check
        from app.definitions.base import parse_duration

        failed: dict[str, str] = {}
        for host, target in health_urls.items():
            result = check(
                target,
                expect_status=hc.expect_status,
                expect_body=hc.expect_body,
                retries=1,
                interval=0.0,
                timeout=parse_duration(hc.timeout),
            )
            if not result.ok:
                failed[host] = str(getattr(result, "error", "") or "unhealthy")
        health = {"passed": len(health_urls) - len(failed), "total": len(health_urls)}
        if failed:
            health["failed"] = failed
    return {
        "at": round(now, 3),
        "lookback": round(lookback, 3),
        "values": values,
        **({"errors": errors} if errors else {}),
        **({"health": health} if health is not None else {}),
    }


def _health_share(samples: Sequence[Mapping[str, Any]], *, now: float, lookback: float) -> float:
    recent = [x["health"] for x in samples if x.get("health") and now - x["at"] < lookback]
    total = sum(h["total"] for h in recent)
    return sum(h["passed"] for h in recent) / total if total else math.nan


def judge(
    spec: RollbackStrategySpec,
    samples: Sequence[Mapping[str, Any]],
    *,
    started: float,
    now: float,
) -> dict[str, Any]:
    """The watch's verdict over its checks so far: ``state`` is ``watching``, ``passed`` or
    ``breached``; per trigger its last and worst numbers; ``reasons`` say why it breached.
    ``slack`` seconds after a window's end still count for it (the closing check)."""
    slack = spec.interval_seconds()
    triggers: list[dict[str, Any]] = []
    reasons: list[str] = []
    ends = started + spec.window_seconds()
    for t in spec.triggers:
        cond = t.parsed()
        window_end = started + t.window_seconds()
        mine = [x for x in samples if x["at"] <= window_end + slack]
        numbers: list[tuple[float, float]] = []  # (at, value)
        for i, x in enumerate(mine):
            raw: float | None = (
                _health_share(mine[: i + 1], now=x["at"], lookback=spec.lookback_seconds())
                if cond.metric == HEALTH and t.query is None
                else (x.get("values") or {}).get(t.name)
            )
            value = _number(raw)
            if value is not None:
                numbers.append((x["at"], value))
        breach = next(((at, v) for at, v in numbers if cond.breached(v)), None)
        last = numbers[-1][1] if numbers else None
        worst = None
        if numbers:
            pick = min if cond.op.startswith("<") else max
            worst = pick(v for _, v in numbers)
        closed = now >= window_end
        entry: dict[str, Any] = {
            "name": t.name,
            "condition": cond.written,
            "window": t.window_seconds(),
            "ends": round(window_end, 3),
            "unit": cond.unit,
            "checks": len(mine),
            "measured": len(numbers),
            "last": last,
            "worst": worst,
        }
        if breach is not None:
            at, value = breach
            entry["state"] = "breached"
            entry["reason"] = (
                f"trigger '{t.name}' ({cond.written}): {show(value, cond.unit)} at "
                f"{at - started:.0f}s after the stage's last phase (window "
                f"{t.evaluation_window})"
            )
            reasons.append(entry["reason"])
        elif closed and not numbers:
            errors = [str((x.get("errors") or {}).get(t.name)) for x in mine if x.get("errors")]
            why = f": {errors[-1]}" if errors and errors[-1] != "None" else ""
            entry["state"] = "breached"
            entry["reason"] = (
                f"trigger '{t.name}' ({cond.written}): no number in {len(mine)} check(s) "
                f"over its {t.evaluation_window} window{why} (a watch that saw nothing "
                "vouches for nothing)"
            )
            reasons.append(entry["reason"])
        else:
            entry["state"] = "passed" if closed else "watching"
        entry["summary"] = (
            f"{t.name} ({cond.written}): last {show(last, cond.unit)}, worst "
            f"{show(worst, cond.unit)} in {len(numbers)} check(s)"
        )
        triggers.append(entry)
    if reasons:
        state = "breached"
    elif now >= ends and all(e["state"] == "passed" for e in triggers):
        state = "passed"
    else:
        state = "watching"
    return {"state": state, "triggers": triggers, "reasons": reasons}


def next_check(spec: RollbackStrategySpec, *, started: float, now: float) -> float:
    """Seconds until the next check: an interval, or less to close the window exactly."""
    ends = started + spec.window_seconds()
    return max(0.0, min(spec.interval_seconds(), ends - now))
