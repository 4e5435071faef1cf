"""Turn one phase of a plan into its Celery canvas (DESIGN.md section 3).

    chord(
        group(chain(run_step(h, step 0), run_step(h, step 1), ...) for h in batch),  # regions
        verify_gate(execution, stage, phase),                                       # control
    ).on_error(nudge(execution))

A canvas is one phase, never a whole pipeline (a static chain of chords grows quadratically).
Signatures carry a small key of ids; the worker reads everything else from SQL.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

from celery import chain, chord, group
from celery.canvas import Signature


@dataclass(frozen=True)
class HostStepKey:
    """Identifies one step on one host in one dispatch; ``idem`` is its idempotency key."""

    execution: str
    stage: int
    phase: int
    host: str
    step: int
    attempt: int
    region: str
    # Unix time after which the step must not start (it waited too long in its region's queue).
    deadline: float | None = None

    @property
    def idem(self) -> str:
        return f"{self.execution}:{self.stage}:{self.phase}:{self.host}:{self.step}:{self.attempt}"

    def to_dict(self) -> dict[str, Any]:
        d: dict[str, Any] = {"e": self.execution, "s": self.stage, "p": self.phase,
                             "h": self.host, "i": self.step, "a": self.attempt,
                             "region": self.region}
        if self.deadline is not None:
            d["x"] = self.deadline
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> HostStepKey:
        return cls(execution=str(d["e"]), stage=int(d["s"]), phase=int(d["p"]), host=str(d["h"]),
                   step=int(d["i"]), attempt=int(d.get("a", 1)), region=str(d["region"]),
                   deadline=float(d["x"]) if d.get("x") is not None else None)


def phase_canvas(
    *,
    execution_id: str,
    stage_index: int,
    phase: int,
    hosts: list[tuple[str, str]],
    step_count: int,
    attempt: int = 1,
    expires: int = 3600,
) -> Signature:
    """The chord for one phase. ``hosts`` is [(host name, region)] in inventory order."""
    from tasks.control import nudge, verify_gate
    from tasks.deploy import run_step

    # Not Celery's `expires`: an expired message is discarded silently and the chord, whose
    # header holds chains, would wait forever. The task itself refuses to start past the
    # deadline and records why, so the chain and the chord complete and the gate decides.
    deadline = round(time.time() + expires, 3)

    def link(host: str, region: str, step: int) -> Signature:
        key = HostStepKey(execution_id, stage_index, phase, host, step, attempt, region,
                          deadline)
        # Routing comes from the router (region in the key), identical in every process.
        return run_step.s(key=key.to_dict())

    header = group(
        chain(*(link(h, r, i) for i in range(step_count))) if step_count > 1 else link(h, r, 0)
        for h, r in hosts
    )
    body = verify_gate.si(execution_id=execution_id, stage_index=stage_index, phase=phase)
    canvas = chord(header, body)
    canvas.on_error(nudge.s(execution_id=execution_id))
    return canvas
