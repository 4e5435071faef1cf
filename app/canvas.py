"""Every canvas vmfarm sends, built here and nowhere else (DESIGN.md section 3).

    chord(
        group(run_host(h, steps 0..n-1) for h in batch),   # regions: one task per host
        verify_gate(execution, stage, phase),              # control
    ).on_error(nudge(execution))

A canvas is one phase, never a whole pipeline (a static chain of chords grows quadratically).
A host's steps run in order in one task (one message, one result, no chain hop per step; each
step still has its own ledger row, idempotency key and failure strategy). Steps that need other
worker tags than the step before them (delegate selectors) start a new task on that tag queue,
chained after it. Signatures carry a small key of ids; the worker reads everything else from SQL.

Signatures name their tasks (``vmfarm.run_host``...): building a canvas imports no task module,
so the coordinator never imports worker code.
"""

from __future__ import annotations

import dataclasses
import time
import uuid
from dataclasses import dataclass
from typing import Any

from celery import chain, chord, group
from celery.canvas import Signature

from app.celery import app as celery_app


def task(name: str, **kwargs: Any) -> Signature:
    """A signature of the task called ``name`` (immutable: it ignores a parent's result)."""
    return celery_app.signature(name, kwargs=kwargs, immutable=True)


def link(name: str, **kwargs: Any) -> Signature:
    """A chain link: it receives the previous link's result (``prev``)."""
    return celery_app.signature(name, kwargs=kwargs)


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
    # "deploy", or "rollback": then ``step`` indexes the stage's rollbackSteps, or, with ``src``
    # (execution, stage index), the steps of the plan that deployed the version to return to.
    kind: str = "deploy"
    src: tuple[str, int] | None = None
    # Worker tags the step needs (delegate selectors): it goes to vmfarm.<region>[tags].
    tags: tuple[str, ...] = ()

    @property
    def idem(self) -> str:
        base = f"{self.execution}:{self.stage}:{self.phase}:{self.host}:{self.step}:{self.attempt}"
        return base if self.kind == "deploy" else f"{base}:{self.kind}"

    def to_dict(self) -> dict[str, Any]:
        d: dict[str, Any] = {
            "e": self.execution,
            "s": self.stage,
            "p": self.phase,
            "h": self.host,
            "i": self.step,
            "a": self.attempt,
            "region": self.region,
        }
        if self.deadline is not None:
            d["x"] = self.deadline
        if self.kind != "deploy":
            d["k"] = self.kind
        if self.src is not None:
            d["src"] = list(self.src)
        if self.tags:
            d["tags"] = list(self.tags)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> HostStepKey:
        src = d.get("src")
        return cls(
            execution=str(d["e"]),
            stage=int(d["s"]),
            phase=int(d["p"]),
            host=str(d["h"]),
            step=int(d["i"]),
            attempt=int(d.get("a", 1)),
            region=str(d["region"]),
            deadline=float(d["x"]) if d.get("x") is not None else None,
            kind=str(d.get("k", "deploy")),
            src=(str(src[0]), int(src[1])) if src else None,
            tags=tuple(str(t) for t in d.get("tags") or ()),
        )


# Task ids of host tasks are derived from their first step's idempotency key (design note §5.3):
# the reconciler finds a host's message in its queue by that id (app.coordinator.resend).
_TASK_IDS = uuid.UUID("6f1c3d2a-9b7e-5c41-8d0f-2a4e6b8c1d35")


def traced() -> bool:
    """Do host tasks carry the task id of their key (``task_id_of``)? Only with a result
    backend that counts chord parts natively (Redis): a polling backend (embedded SQLite)
    joins a chord by its members' stored results, and a retry's lane reuses the ids of the
    old lane's hosts, whose pass-through results would complete the retry's chord early."""
    return bool(celery_app.backend.supports_native_join)


def task_id_of(key: HostStepKey) -> str:
    """The Celery task id of the host task whose first step is ``key``: the same for every
    dispatch of the same attempt, so a message sent again is the same message."""
    return str(uuid.uuid5(_TASK_IDS, key.idem))


def _quiet(sig: Signature) -> Signature:
    """A header task whose result nobody reads: a phase's gate reads the ledger. Storing and
    publishing the result (and subscribing to it in the publisher) costs Redis round trips for
    nobody. Only with a backend that counts chord parts natively (Redis), which Celery does for
    ignored results too; a polling backend (embedded SQLite) needs the stored results."""
    return sig.set(ignore_result=True) if celery_app.backend.supports_native_join else sig


def _brief(key: HostStepKey, until: int | None = None) -> str:
    """What task events and Flower show of a host task's kwargs: its idempotency key (the
    rest is in the ledger), instead of Celery's repr of the whole key, built per message."""
    return (
        f"{{'key': {key.idem!r}}}"
        if until is None
        else f"{{'key': {key.idem!r}, 'until': {until}}}"
    )


def phase_canvas(
    *,
    execution_id: str,
    stage_index: int,
    phase: int,
    hosts: list[tuple[str, str]],
    step_count: int,
    attempt: int = 1,
    expires: int = 3600,
    lanes: int | None = None,
    kind: str = "deploy",
    steps_of: dict[str, tuple[int, tuple[str, int] | None]] | None = None,
    tags_of: dict[tuple[str, int], tuple[str, ...]] | None = None,
) -> Signature:
    """The chord for one phase. ``hosts`` is [(host name, region)] in inventory order.

    With ``lanes`` (maxConcurrency) smaller than the batch, hosts are dealt round-robin into
    that many chains that run one host after another, so at most ``lanes`` hosts are in
    flight; a failed host does not stop the next host of its lane.

    A rollback phase (``kind="rollback"``) gives each host its own step count and source plan
    in ``steps_of``: {host: (number of steps, (execution, stage) or None)}. ``tags_of`` gives
    the worker tags of (host, step) when delegate selectors apply.
    """
    # Not Celery's `expires`: an expired message is discarded silently and the chord, whose
    # header holds chains, would wait forever. The task itself refuses to start past the
    # deadline and records why, so the chain and the chord complete and the gate decides.
    deadline = round(time.time() + expires, 3)

    n = len(hosts) if not lanes or lanes >= len(hosts) else lanes
    lines: list[list[Signature]] = [[] for _ in range(n)]
    for i, (h, r) in enumerate(hosts):
        count, src = (steps_of or {}).get(h, (step_count, None))
        lines[i % n].extend(
            _host_links(
                HostStepKey(
                    execution_id, stage_index, phase, h, 0, attempt, r, deadline, kind, src
                ),
                count,
                tags_of,
            )
        )
    return _gated(lines, execution_id=execution_id, stage_index=stage_index, phase=phase, kind=kind)


def _host_links(
    first: HostStepKey, count: int, tags_of: dict[tuple[str, int], tuple[str, ...]] | None
) -> list[Signature]:
    """The tasks running steps ``first.step`` .. ``count - 1`` of one host: a run of steps
    with the same worker tags is one task."""
    out: list[Signature] = []
    start = first.step
    while start < count:
        tags = (tags_of or {}).get((first.host, start), ())
        end = start + 1
        while end < count and (tags_of or {}).get((first.host, end), ()) == tags:
            end += 1
        key = dataclasses.replace(first, step=start, tags=tags)
        sig = _quiet(link("vmfarm.run_host", key=key.to_dict(), until=end)).set(
            kwargsrepr=_brief(key, end)
        )
        out.append(sig.set(task_id=task_id_of(key)) if traced() else sig)
        start = end
    return out


def _gated(
    lines: list[list[Signature]], *, execution_id: str, stage_index: int, phase: int, kind: str
) -> Signature:
    """chord(group(chain per lane), the phase's gate), with the error nudge."""
    header = group(chain(*line) if len(line) > 1 else line[0] for line in lines if line)
    body = task(
        "vmfarm.verify_gate",
        execution_id=execution_id,
        stage_index=stage_index,
        phase=phase,
        kind=kind,
    )
    canvas = chord(header, body)
    canvas.on_error(link("vmfarm.nudge", execution_id=execution_id))
    return canvas


def retry_canvas(
    *,
    execution_id: str,
    stage_index: int,
    phase: int,
    lane: list[tuple[str, str, int, int]],
    step_count: int,
    deadline: float,
    countdown: float,
    tags_of: dict[tuple[str, int], tuple[str, ...]] | None = None,
) -> Signature:
    """A retry (app.coordinator.retry): one lane of [(host, region, first step, attempt)], the
    retried host first, then the hosts that waited behind it; its first task waits
    ``countdown`` seconds in the broker (no worker sleeps). The body is the phase's own gate:
    the phase is judged once the last attempt has run."""
    links: list[Signature] = []
    for host, region, step, attempt in lane:
        links.extend(
            _host_links(
                HostStepKey(
                    execution_id, stage_index, phase, host, step, attempt, region, deadline
                ),
                step_count,
                tags_of,
            )
        )
    if countdown:  # none: a resent lane (app.coordinator.resend) goes at once
        links[0] = links[0].set(countdown=countdown)
    return _gated(
        [links], execution_id=execution_id, stage_index=stage_index, phase=phase, kind="deploy"
    )


def resume_canvas(
    *,
    execution_id: str,
    stage_index: int,
    phase: int,
    hosts: list[tuple[str, str]],
    first_step: int,
    step_count: int,
    deadline: float,
    lanes: int | None = None,
    tags_of: dict[tuple[str, int], tuple[str, ...]] | None = None,
) -> Signature:
    """The hosts of a phase going on after a Wait or approval step (app.coordinator.barriers):
    steps ``first_step`` .. ``step_count - 1`` of each host, dealt into ``lanes`` as
    ``phase_canvas`` does; the body is the phase's own gate."""
    n = len(hosts) if not lanes or lanes >= len(hosts) else lanes
    lines: list[list[Signature]] = [[] for _ in range(n)]
    for i, (h, r) in enumerate(hosts):
        lines[i % n].extend(
            _host_links(
                HostStepKey(execution_id, stage_index, phase, h, first_step, 1, r, deadline),
                step_count,
                tags_of,
            )
        )
    return _gated(
        lines, execution_id=execution_id, stage_index=stage_index, phase=phase, kind="deploy"
    )


def verify_canvas(
    *,
    execution_id: str,
    stage_index: int,
    phase: int,
    hosts: list[tuple[str, str]],
    expires: int = 3600,
    tags_of: dict[tuple[str, int], tuple[str, ...]] | None = None,
    countdown: float = 0.0,
) -> Signature:
    """The verification gate: checks on every host of the phase (on its region's worker), then
    the verdict on control. With ``countdown`` (a canary analysis's window) the checks wait
    that long in the broker first, so the verdict comes when the window has passed."""
    deadline = round(time.time() + countdown + expires, 3)
    keys = [
        HostStepKey(
            execution_id,
            stage_index,
            phase,
            h,
            -1,
            1,
            r,
            deadline,
            tags=(tags_of or {}).get((h, -1), ()),
        )
        for h, r in hosts
    ]
    header = group(
        _quiet(
            task("vmfarm.check_host", key=key.to_dict()).set(
                kwargsrepr=_brief(key), **({"countdown": countdown} if countdown else {})
            )
        )
        for key in keys
    )
    body = task(
        "vmfarm.verification_gate", execution_id=execution_id, stage_index=stage_index, phase=phase
    )
    canvas = chord(header, body)
    canvas.on_error(link("vmfarm.nudge", execution_id=execution_id))
    return canvas


def switch_canvas(
    *, execution_id: str, stage_index: int, phase: int, kind: str = "switch"
) -> Signature:
    """Move traffic to the hosts of the phase record of ``kind`` (switch, or rollback-switch:
    back to the set that was live before) in one control task."""
    if kind == "switch":  # the message stays as it was for workers of an earlier version
        return task(
            "vmfarm.switch_traffic", execution_id=execution_id, stage_index=stage_index, phase=phase
        )
    return task(
        "vmfarm.switch_traffic",
        execution_id=execution_id,
        stage_index=stage_index,
        phase=phase,
        kind=kind,
    )


def discovery_canvas(
    *, execution_id: str, stage_index: int, work: list[tuple[dict[str, Any], str, tuple[str, ...]]]
) -> Signature:
    """List a stage's hosts on each infrastructure's region workers (they hold the cloud
    credentials), then record them on control: [(resolved infrastructure, region, tags)]."""
    header = discovery_tasks(work)
    body = link("vmfarm.discovery_done", execution_id=execution_id, stage_index=stage_index)
    canvas = chord(header, body)
    canvas.on_error(link("vmfarm.nudge", execution_id=execution_id))
    return canvas


def discovery_tasks(work: list[tuple[dict[str, Any], str, tuple[str, ...]]]) -> list[Signature]:
    """One ``vmfarm.discover`` per (resolved infrastructure, region, tags), on that region's
    (tag) queue."""
    return [
        celery_app.signature(
            "vmfarm.discover", kwargs={"infra": infra, "region": region, "tags": list(tags)}
        )
        for infra, region, tags in work
    ]


def advance_later(*, execution_id: str) -> Signature:
    """Wake the coordinator for an execution (a timer: give it a countdown)."""
    return task("vmfarm.advance", execution_id=execution_id)


def watch_check(*, execution_id: str, stage_index: int, seq: int) -> Signature:
    """One check of a stage's watch after deployment, on control (give it a countdown)."""
    return task("vmfarm.watch_check", execution_id=execution_id, stage_index=stage_index, seq=seq)


def notify(*, execution_id: str, before: dict[str, Any] | None, after: dict[str, Any]) -> Signature:
    """Send an execution's notifications for one transition, from control."""
    return task("vmfarm.notify", execution_id=execution_id, before=before, after=after)
