"""Worker autoscaling per region, from queue depth (Harness's delegate ``auto_scaling``).

Per region a policy says how many workers may serve it (``min``..``max``) and when to change
that: scale up by ``step`` when the region's queue stays above ``scaleUpQueueDepth`` for
``scaleUpAfter``, down by ``step`` when it stays below ``scaleDownQueueDepth`` for
``scaleDownAfter``. Depths from ``scaleDownQueueDepth`` to ``scaleUpQueueDepth`` hold (the
hysteresis band), and each step restarts the period: the next step needs the queue to stay
deep (or shallow) for a whole period again. Outside ``min``..``max`` the count is brought
back at once.

What is observed (``observe``): the queues a worker of the policy consumes (``vmfarm.<region>``
and, with ``tags``, its tag queues; ``app.delegates.queue_depths``) and the live workers of the
registry that serve the region (``app.delegates.live_workers``), every worker counted, whoever
started it; workers this autoscaler is starting count too, those it is stopping do not.

``decide(state, observation, now)`` is the pure decision; an executor applies it. The built-in
``LocalProcessExecutor`` runs ``vmfarm worker --region R -n autoscale-R-<k>@<host>`` processes
on this machine and stops them with SIGTERM (a warm shutdown: in-flight tasks finish first),
choosing the least busy. It only ever stops workers named ``autoscale-<region>-<k>@<this
host>``: its own, including those a previous autoscaler on this host left running (they are
found in the registry by name and pid, checked against /proc before any signal).

Configuration file (``configs/autoscale.yaml``)::

    interval: 15s               # between observations
    regions:
      us-east-1:
        min: 1
        max: 5
        scaleUpQueueDepth: 50   # N
        scaleUpAfter: 5m        # T
        scaleDownQueueDepth: 10 # M (at most N)
        scaleDownAfter: 15m     # T'
        step: 1                 # workers added or removed at a time
        concurrency: 32         # vmfarm worker -c (default: vmfarm worker's)
        tags: [gpu]             # vmfarm worker --tags (their queues count in the depth)
"""

from __future__ import annotations

import dataclasses
import logging
import os
import re
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Protocol

from app.errors import ConfigError

log = logging.getLogger("vmfarm.autoscale")

DEFAULT_INTERVAL = 15.0
NAME_PREFIX = "autoscale"
Action = Literal["up", "down", "hold"]


# --- policy, state, decision ---------------------------------------------------------------------


@dataclass(frozen=True)
class Policy:
    """How one region scales (defaults: Harness's example, 1..5 workers, up above 50 waiting
    tasks for 5 minutes, down below 10 for 15 minutes)."""

    region: str
    min: int = 1
    max: int = 5
    scale_up_depth: int = 50
    scale_up_after: float = 300.0
    scale_down_depth: int = 10
    scale_down_after: float = 900.0
    step: int = 1
    concurrency: int | None = None
    tags: tuple[str, ...] = ()

    def check(self, where: str = "") -> Policy:
        """ConfigError naming the region (or ``where``) and the setting when the policy cannot
        work; the policy with its tags normalised."""
        from app.celery import region_queue
        from app.delegates import MAX_TAGS, normalise_tags

        where = where or f"autoscale region {self.region!r}"
        try:
            region_queue(self.region)
            tags = normalise_tags(self.tags)
        except ValueError as exc:
            raise ConfigError(f"{where}: {exc}") from None
        if len(tags) > MAX_TAGS:
            raise ConfigError(f"{where}: at most {MAX_TAGS} tags")
        if self.min < 0:
            raise ConfigError(f"{where}: min must be 0 or more (got {self.min})")
        if self.max < max(self.min, 1):
            raise ConfigError(
                f"{where}: max ({self.max}) must be at least min ({self.min}) and at least 1"
            )
        if self.step < 1:
            raise ConfigError(f"{where}: step must be 1 or more")
        if self.scale_down_depth < 0 or self.scale_up_depth < 0:
            raise ConfigError(f"{where}: queue depths must not be negative")
        if self.scale_down_depth > self.scale_up_depth:
            raise ConfigError(
                f"{where}: scaleDownQueueDepth ({self.scale_down_depth}) must not "
                f"exceed scaleUpQueueDepth ({self.scale_up_depth})"
            )
        if self.scale_up_after < 0 or self.scale_down_after < 0:
            raise ConfigError(f"{where}: scaleUpAfter and scaleDownAfter must not be negative")
        if self.concurrency is not None and self.concurrency < 1:
            raise ConfigError(f"{where}: concurrency must be 1 or more")
        return dataclasses.replace(self, tags=tags)

    def queues(self) -> list[str]:
        """The queues a worker of this policy consumes: their depth drives the scaling."""
        from app.delegates import worker_queues

        return worker_queues([self.region], self.tags)


@dataclass(frozen=True)
class State:
    """A region's policy and how long its queue has been deep (or shallow), as monotonic
    times: ``above_since`` since the depth went above N, ``below_since`` below M."""

    policy: Policy
    above_since: float | None = None
    below_since: float | None = None


@dataclass(frozen=True)
class Observation:
    """Waiting tasks (None: unknown) and the workers serving the region."""

    depth: int | None
    workers: int


@dataclass(frozen=True)
class Decision:
    """What the policy wants for a region (``target``) and, when it scales down, which
    workers are stopped (``stops``) and which over the target are not, because this
    autoscaler did not start them (``keeps``: started by hand, by another machine's
    autoscaler...). A dry run says the same as the real run would."""

    region: str
    current: int
    target: int
    action: Action
    reason: str
    depth: int | None
    state: State
    stops: tuple[str, ...] = ()
    keeps: tuple[str, ...] = ()

    @property
    def reached(self) -> int:
        """The workers the region will have once this decision is applied."""
        if self.target < self.current:
            return self.current - len(self.stops)
        return self.target

    def as_dict(self) -> dict[str, Any]:
        return {
            "region": self.region,
            "current": self.current,
            "target": self.target,
            "action": self.action,
            "reason": self.reason,
            "depth": self.depth,
            "stops": list(self.stops),
            "keeps": list(self.keeps),
            "reached": self.reached,
        }

    def __str__(self) -> str:
        arrow = (
            f"{self.current} -> {self.target}" if self.target != self.current else f"{self.current}"
        )
        text = f"region {self.region}: {arrow} worker(s) ({self.action}): {self.reason}"
        if self.target < self.current:
            text += f"; stops {', '.join(self.stops) or 'none'}"
            if self.keeps:
                text += (
                    f"; not stopped (not started by this autoscaler): "
                    f"{', '.join(self.keeps)}; the region stays at {self.reached}"
                )
        return text


def decide(state: State, observation: Observation, now: float) -> Decision:
    """What to do for one region at monotonic time ``now``; the decision carries the next
    state. Pure: no clock, no I/O."""
    p, cur, depth = state.policy, observation.workers, observation.depth

    def out(
        target: int, action: Action, reason: str, above: float | None, below: float | None
    ) -> Decision:
        return Decision(
            p.region,
            cur,
            target,
            action,
            reason,
            depth,
            dataclasses.replace(state, above_since=above, below_since=below),
        )

    if cur < p.min:
        return out(p.min, "up", f"{cur} below min {p.min}", None, None)
    if cur > p.max:
        return out(p.max, "down", f"{cur} above max {p.max}", None, None)
    if depth is None:
        return out(cur, "hold", "queue depth unknown", None, None)
    if depth > p.scale_up_depth:
        since = state.above_since if state.above_since is not None else now
        held = now - since
        what = f"depth {depth} > {p.scale_up_depth} for {held:.1f}s"
        if cur >= p.max:
            return out(cur, "hold", f"{what}; at max {p.max}", since, None)
        if held >= p.scale_up_after:
            return out(
                min(p.max, cur + p.step), "up", f"{what} (>= {p.scale_up_after:g}s)", now, None
            )
        return out(cur, "hold", f"{what} (of {p.scale_up_after:g}s)", since, None)
    if depth < p.scale_down_depth:
        since = state.below_since if state.below_since is not None else now
        held = now - since
        what = f"depth {depth} < {p.scale_down_depth} for {held:.1f}s"
        if cur <= p.min:
            return out(cur, "hold", f"{what}; at min {p.min}", None, since)
        if held >= p.scale_down_after:
            return out(
                max(p.min, cur - p.step), "down", f"{what} (>= {p.scale_down_after:g}s)", None, now
            )
        return out(cur, "hold", f"{what} (of {p.scale_down_after:g}s)", None, since)
    return out(
        cur, "hold", f"depth {depth} within {p.scale_down_depth}..{p.scale_up_depth}", None, None
    )


# --- configuration -------------------------------------------------------------------------------


@dataclass(frozen=True)
class Config:
    policies: tuple[Policy, ...]
    interval: float = DEFAULT_INTERVAL


_YAML_KEYS = {
    "min": "min",
    "max": "max",
    "scaleUpQueueDepth": "scale_up_depth",
    "scaleUpAfter": "scale_up_after",
    "scaleDownQueueDepth": "scale_down_depth",
    "scaleDownAfter": "scale_down_after",
    "step": "step",
    "concurrency": "concurrency",
    "tags": "tags",
}
_DURATIONS = {"scale_up_after", "scale_down_after"}


def _seconds(value: Any, what: str) -> float:
    from app.definitions.base import parse_duration

    try:
        return parse_duration(str(value))
    except ValueError as exc:
        raise ConfigError(f"{what}: {exc}") from None


def policy_from(
    region: str, values: Mapping[str, Any], *, where: str = "", base: Policy | None = None
) -> Policy:
    """A policy from a YAML mapping (camelCase keys, as in the file) over ``base``."""
    where = where or f"autoscale region {region!r}"
    unknown = sorted(set(map(str, values)) - set(_YAML_KEYS))
    if unknown:
        raise ConfigError(
            f"{where}: unknown setting(s) {', '.join(unknown)} (known: {', '.join(_YAML_KEYS)})"
        )
    kw: dict[str, Any] = {}
    for key, value in values.items():
        attr = _YAML_KEYS[str(key)]
        if value is None:
            continue
        if attr in _DURATIONS:
            kw[attr] = _seconds(value, f"{where}: {key}")
        elif attr == "tags":
            kw[attr] = (
                tuple(value.split(",")) if isinstance(value, str) else tuple(str(v) for v in value)
            )
        else:
            if isinstance(value, bool) or not isinstance(value, int):
                raise ConfigError(f"{where}: {key} must be a whole number (got {value!r})")
            kw[attr] = value
    start = base or Policy(region=region)
    return dataclasses.replace(start, region=region, **kw).check(where)


def load_config(path: Path | str) -> Config:
    """Read an autoscale file; ConfigError naming the file and the setting."""
    import yaml

    p = Path(path)
    try:
        data = yaml.safe_load(p.read_text()) or {}
    except FileNotFoundError:
        raise ConfigError(f"{p}: no such autoscale file") from None
    except (OSError, yaml.YAMLError) as exc:
        raise ConfigError(f"{p}: cannot read the autoscale file: {exc}") from None
    if not isinstance(data, dict) or not isinstance(data.get("regions") or {}, dict):
        raise ConfigError(f"{p}: expected a mapping with 'regions: {{name: settings}}'")
    unknown = sorted(set(map(str, data)) - {"interval", "regions"})
    if unknown:
        raise ConfigError(f"{p}: unknown setting(s) {', '.join(unknown)}")
    policies = []
    for region, values in (data.get("regions") or {}).items():
        if not isinstance(values, dict):
            raise ConfigError(f"{p}: regions.{region}: expected a mapping of settings")
        policies.append(policy_from(str(region), values, where=f"{p}: regions.{region}"))
    interval = (
        _seconds(data["interval"], f"{p}: interval")
        if data.get("interval") is not None
        else DEFAULT_INTERVAL
    )
    if interval <= 0:
        raise ConfigError(f"{p}: interval must be positive")
    return Config(policies=tuple(policies), interval=interval)


# --- observing -----------------------------------------------------------------------------------


@dataclass
class Fleet:
    """What the registry and the broker say now: live workers serving each region (by name,
    with their registry entries) and each queue's depth."""

    workers: dict[str, dict[str, dict[str, Any]]]
    depths: dict[str, int | None]

    def depth(self, queues: Iterable[str]) -> int | None:
        values = [self.depths.get(q) for q in queues]
        if any(v is None for v in values):
            return None
        return sum(v for v in values if v is not None)


def observe(policies: Sequence[Policy]) -> Fleet:
    """Read the registry (live workers) and the broker (queue depths)."""
    from app.delegates import live_workers, queue_depths

    live = live_workers()
    workers = {
        p.region: {w["name"]: w for w in live if p.region in w.get("regions", [])} for p in policies
    }
    depths = queue_depths([q for p in policies for q in p.queues()])
    return Fleet(workers=workers, depths=depths)


# --- executors -----------------------------------------------------------------------------------


class Executor(Protocol):
    def refresh(self, fleet: Fleet) -> None:
        """Take in the latest observation (reap exited processes, find adopted ones)."""

    def running(self, region: str) -> list[str]:
        """The region's workers of this executor that are not stopping (registered or not)."""

    def stopping(self, region: str) -> list[str]:
        """Workers of ``region`` told to stop that have not gone yet."""

    def start(self, policy: Policy, count: int, taken: Iterable[str] = ()) -> list[str]:
        """Start ``count`` workers for the policy's region, named unlike ``taken`` (the
        registered workers); their names."""

    def stop(self, region: str, count: int, fleet: Fleet) -> list[str]:
        """Stop up to ``count`` of the region's workers that this executor may stop."""

    def shutdown(self, timeout: float) -> None:
        """Stop every worker this executor may stop and wait for them."""


_NAME_RE = re.compile(r"^autoscale-(?P<region>[a-z0-9][a-z0-9-]*)-(?P<k>\d+)@(?P<host>.+)$")


@dataclass
class _Proc:
    name: str
    region: str
    pid: int
    popen: subprocess.Popen[bytes] | None = None
    stopping_since: float | None = None


@dataclass
class LocalProcessExecutor:
    """``vmfarm worker`` processes on this machine (see the module docstring).

    ``command`` is how to run vmfarm (default: this Python with ``-m cli.main``); worker output
    goes to ``<log_dir>/<name>.log``. ``env`` is the workers' environment (default: ours).
    """

    log_dir: Path
    command: Sequence[str] = (sys.executable, "-m", "cli.main")
    env: Mapping[str, str] | None = None
    loglevel: str = "INFO"
    hostname: str = field(default_factory=socket.gethostname)
    kill_after: float = 600.0
    procs: dict[str, _Proc] = field(default_factory=dict)
    # A dry run's view: it finds its workers as a real run would, and says nothing of it.
    quiet: bool = False

    def name(self, region: str, k: int) -> str:
        return f"{NAME_PREFIX}-{region}-{k}@{self.hostname}"

    def owns(self, worker_name: str, region: str) -> bool:
        m = _NAME_RE.match(worker_name)
        return bool(m and m["region"] == region and m["host"] == self.hostname)

    # -- bookkeeping --

    def refresh(self, fleet: Fleet) -> None:
        for name, proc in list(self.procs.items()):
            if not self._alive(proc):
                code = proc.popen.returncode if proc.popen is not None else None
                if proc.stopping_since is None:
                    log.warning(
                        "worker %s exited on its own (exit code %s; log %s)",
                        name,
                        code,
                        self.log_dir / f"{name.split('@')[0]}.log",
                    )
                else:
                    log.info("worker %s stopped (exit code %s)", name, code)
                del self.procs[name]
            elif (
                proc.stopping_since is not None
                and proc.popen is not None
                and time.monotonic() - proc.stopping_since > self.kill_after
            ):
                log.warning(
                    "worker %s still running %ss after SIGTERM: SIGKILL", name, self.kill_after
                )
                self._signal(proc, signal.SIGKILL)
        # Adopt live workers of ours that another autoscaler run on this host started.
        for region, workers in fleet.workers.items():
            for name, w in workers.items():
                if (
                    name not in self.procs
                    and self.owns(name, region)
                    and _is_our_worker(int(w.get("pid") or 0), name)
                ):
                    self.procs[name] = _Proc(name=name, region=region, pid=int(w["pid"]))
                    log.log(
                        logging.DEBUG if self.quiet else logging.INFO,
                        "adopted worker %s (pid %s)",
                        name,
                        w["pid"],
                    )

    def _alive(self, proc: _Proc) -> bool:
        if proc.popen is not None:
            return proc.popen.poll() is None
        return _is_our_worker(proc.pid, proc.name)

    def _signal(self, proc: _Proc, sig: int) -> None:
        if proc.popen is not None:
            if proc.popen.poll() is None:
                proc.popen.send_signal(sig)
        elif _is_our_worker(proc.pid, proc.name):
            os.kill(proc.pid, sig)

    def running(self, region: str) -> list[str]:
        return [
            p.name for p in self.procs.values() if p.region == region and p.stopping_since is None
        ]

    def stopping(self, region: str) -> list[str]:
        return [
            p.name
            for p in self.procs.values()
            if p.region == region and p.stopping_since is not None
        ]

    # -- actions --

    def start(self, policy: Policy, count: int, taken: Iterable[str] = ()) -> list[str]:
        used = set(self.procs) | set(taken)
        started: list[str] = []
        k = 1
        self.log_dir.mkdir(parents=True, exist_ok=True)
        while len(started) < count:
            name = self.name(policy.region, k)
            k += 1
            if name in used:
                continue
            argv = [
                *self.command,
                "worker",
                "--region",
                policy.region,
                "-n",
                name,
                "-l",
                self.loglevel,
            ]
            if policy.concurrency:
                argv += ["-c", str(policy.concurrency)]
            if policy.tags:
                argv += ["--tags", ",".join(policy.tags)]
            logfile = self.log_dir / f"{name.split('@')[0]}.log"
            with logfile.open("ab") as fh:
                popen = subprocess.Popen(
                    argv,
                    stdout=fh,
                    stderr=subprocess.STDOUT,
                    stdin=subprocess.DEVNULL,
                    start_new_session=True,
                    env=dict(self.env) if self.env is not None else None,
                )
            self.procs[name] = _Proc(name=name, region=policy.region, pid=popen.pid, popen=popen)
            log.info("started worker %s (pid %s; log %s)", name, popen.pid, logfile)
            started.append(name)
        return started

    def _choose(self, region: str, count: int, fleet: Fleet) -> list[_Proc]:
        registered = fleet.workers.get(region, {})
        mine = [p for p in self.procs.values() if p.region == region and p.stopping_since is None]

        def busy(p: _Proc) -> tuple[int, int, str]:
            # Not registered yet: nothing running, stop it first; then the least busy, the
            # most recently numbered.
            w = registered.get(p.name)
            m = _NAME_RE.match(p.name)
            return (
                -1 if w is None else int(w.get("in_flight") or 0),
                -int(m["k"]) if m else 0,
                p.name,
            )

        return sorted(mine, key=busy)[:count]

    def would_stop(self, region: str, count: int, fleet: Fleet) -> list[str]:
        """The workers ``stop`` would stop now (nothing is signalled): the dry run's view."""
        return [p.name for p in self._choose(region, count, fleet)]

    def stop(self, region: str, count: int, fleet: Fleet) -> list[str]:
        chosen = self._choose(region, count, fleet)
        for p in chosen:
            p.stopping_since = time.monotonic()
            self._signal(p, signal.SIGTERM)
            log.info("stopping worker %s (SIGTERM: warm shutdown)", p.name)
        return [p.name for p in chosen]

    def shutdown(self, timeout: float) -> None:
        now = time.monotonic()
        for p in self.procs.values():
            if p.stopping_since is None:
                p.stopping_since = now
            self._signal(p, signal.SIGTERM)
        deadline = now + timeout
        while time.monotonic() < deadline and any(self._alive(p) for p in self.procs.values()):
            time.sleep(0.2)
        for p in self.procs.values():
            if self._alive(p):
                log.warning("worker %s did not stop within %ss: SIGKILL", p.name, timeout)
                self._signal(p, signal.SIGKILL)
                if p.popen is not None:
                    p.popen.wait(timeout=30)
        self.procs.clear()


def _is_our_worker(pid: int, name: str) -> bool:
    """Whether process ``pid`` runs ``vmfarm worker`` named ``name`` (read from /proc)."""
    if pid <= 0:
        return False
    try:
        argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    except OSError:
        return False
    return b"worker" in argv and name.encode() in argv


# --- the loop ------------------------------------------------------------------------------------


@dataclass
class Autoscaler:
    """Observe, decide and apply, for every policy, once per ``step()``."""

    policies: Sequence[Policy]
    executor: Executor | None
    observe: Callable[[Sequence[Policy]], Fleet] = observe
    clock: Callable[[], float] = time.monotonic
    states: dict[str, State] = field(default_factory=dict)
    # Dry run (no executor): the executor whose choices the decisions describe, which only
    # looks (by default the LocalProcessExecutor a real run on this machine would use).
    preview: LocalProcessExecutor | None = None
    # Rewritten after every round of ``run`` (``python -m app.health autoscaler`` reads it);
    # default $VMFARM_HOME/autoscale/alive.json.
    alive: Path | None = None

    def __post_init__(self) -> None:
        for p in self.policies:
            self.states.setdefault(p.region, State(policy=p))
        if self.executor is None and self.preview is None:
            self.preview = LocalProcessExecutor(log_dir=Path(os.devnull), quiet=True)

    def step(self) -> list[Decision]:
        """One round; with no executor (dry run) nothing is applied, and the decisions say
        what would be."""
        fleet = self.observe(self.policies)
        now = self.clock()
        ex = self.executor
        view: Executor | None = ex if ex is not None else self.preview
        if view is not None:
            view.refresh(fleet)
        decisions = []
        for p in self.policies:
            registered = set(fleet.workers.get(p.region, {}))
            if ex is not None:
                registered -= set(ex.stopping(p.region))
                registered |= set(ex.running(p.region))
            decision = decide(
                self.states[p.region],
                Observation(depth=fleet.depth(p.queues()), workers=len(registered)),
                now,
            )
            self.states[p.region] = decision.state
            if decision.target < decision.current:
                decision = self._down(p, decision, registered, fleet)
            elif ex is not None and decision.target > decision.current:
                ex.start(
                    p,
                    decision.target - decision.current,
                    [n for ws in fleet.workers.values() for n in ws],
                )
            decisions.append(decision)
        return decisions

    def _down(self, policy: Policy, d: Decision, counted: set[str], fleet: Fleet) -> Decision:
        """Stop (or, in a dry run, choose) the workers over the target that this autoscaler
        may stop; name the others, which keep running."""
        count = d.current - d.target
        if self.executor is not None:
            mine = set(self.executor.running(policy.region))
            stops = self.executor.stop(policy.region, count, fleet)
        elif self.preview is not None:
            mine = set(self.preview.running(policy.region))
            stops = self.preview.would_stop(policy.region, count, fleet)
        else:
            mine, stops = set(), []
        keeps = sorted(counted - mine) if len(stops) < count else []
        if keeps and self.executor is not None:
            log.warning(
                "region %s: %d worker(s) over target but not started by this "
                "autoscaler keep running: %s",
                policy.region,
                count - len(stops),
                ", ".join(keeps),
            )
        return dataclasses.replace(d, stops=tuple(stops), keeps=tuple(keeps))

    def run(
        self,
        interval: float,
        *,
        should_stop: Callable[[], bool],
        report: Callable[[Decision], None] | None = None,
    ) -> None:
        """Step every ``interval`` seconds until ``should_stop()``; ``report`` gets each
        decision that changes something, and each region's first one."""
        from app.health import alive_file, mark_alive

        last: dict[str, tuple[Action, int]] = {}
        alive = self.alive or alive_file()
        while not should_stop():
            started = self.clock()
            try:
                decisions = self.step()
            except Exception as exc:  # the registry or the broker is down: try again
                log.warning("autoscale: cannot observe the fleet: %s", exc)
                decisions = []
            else:
                try:
                    mark_alive(alive, interval=interval)
                except OSError as exc:
                    log.warning("autoscale: cannot record this round in %s: %s", alive, exc)
            for d in decisions:
                key = (d.action, d.current)
                if report is not None and (d.action != "hold" or last.get(d.region) != key):
                    report(d)
                last[d.region] = key
            while not should_stop() and self.clock() - started < interval:
                time.sleep(min(0.1, interval))
