"""The watch after deployment as a stage's plan holds it (its rollbackStrategy, with the
stage's HTTP HealthCheck step's check filled in where a trigger needs one). Used by
app.definitions.resolve.
"""

from __future__ import annotations

from typing import Any

from app.definitions import models as m
from app.definitions.bundle import Collector, Loaded


def stage_watch(
    stage: m.StageSpec, pipe: Loaded, base: tuple[str | int, ...], errs: Collector
) -> dict[str, Any] | None:
    """The stage's watch after deployment (its rollbackStrategy), as plain data. A trigger on
    health_check_success_rate without a query takes the stage's HTTP HealthCheck step's check
    when the watch gives none; with neither, the file is refused there."""
    from app.definitions.models.watch import HEALTH

    watch = stage.rollback_strategy
    if watch is None:
        return None
    if watch.health_check is None and watch.needs_health_checks():
        found = next(
            (
                st.spec
                for _, st, _ in m.flat_steps(stage.spec.execution.steps)
                if isinstance(st, m.HealthCheckStep) and st.spec.type == "HTTP" and st.spec.url
            ),
            None,
        )
        if found is None:
            errs.add(
                pipe.error(
                    "health_check_success_rate needs a health check to make: give "
                    "rollbackStrategy.healthCheck.url, or an HTTP HealthCheck step in the stage",
                    (
                        *base,
                        "rollbackStrategy",
                        "triggers",
                        next(
                            i
                            for i, t in enumerate(watch.triggers)
                            if t.query is None and t.parsed().metric == HEALTH
                        ),
                        "condition",
                    ),
                )
            )
            errs.raise_if_any()
        else:
            watch = watch.model_copy(
                update={
                    "health_check": m.WatchHealthCheck(
                        url=str(found.url),
                        expect_status=list(getattr(found, "expect_status", None) or [200]),
                        expect_body=getattr(found, "expect_body", None),
                    )
                }
            )
    return watch.to_json()
