"""Run one step's command units on one host and record the outcome in the ledger.

Order matters: the idempotency key is claimed in SQL before anything touches the host, so a
duplicate delivery returns the recorded result instead of running the commands again. Expected
failures (non-zero exit, unreachable host, timeout) are recorded and returned, never raised: the
chord's gate must run and decide from SQL.

The ledger may restart under a running step (design note: a short outage is survived): the
claim, the outcome and the reads are tried again on a lost connection (``app.db.retrying``),
log chunks wait in memory for the next flush, heartbeats resume at the next beat, and a unit
on the host is never interrupted because the ledger was away.
"""

from __future__ import annotations

import base64
import dataclasses
import logging
import re
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

from sqlalchemy import delete, update
from sqlmodel import col, select

from app.canvas import HostStepKey
from app.connectors.base import Connector, HostTarget
from app.db import RECONNECT_SECONDS, claim_once, is_disconnect, retrying, session_scope
from app.definitions.base import parse_duration
from app.definitions.expressions import Binder, Context, render
from app.errors import HostError
from app.models import Execution, HostStepRun, LogChunk, StageRun, Status, utcnow
from app.providers.base import Host
from app.secrets import SecretError
from app.settings import get_settings

log = logging.getLogger("vmfarm.tasks")

TAIL_CHARS = 4000
FLUSH_BYTES = 64 * 1024
FLUSH_SECONDS = 1.0
OUTPUT_MARK = "::vmfarm-output::"


# --- per-process caches of immutable execution data --------------------------------------------

_plan_cache: dict[tuple[str, int], tuple[dict[str, Any], dict[str, dict[str, Any]]]] = {}
_plan_lock = threading.Lock()
_plan_loads: dict[tuple[str, int], threading.Lock] = {}


def _stage_data(execution_id: str, stage_index: int) -> tuple[dict[str, Any],
                                                               dict[str, dict[str, Any]]]:
    """The resolved stage and its hosts by name; immutable once the stage runs, so cached.

    One thread reads it; the pool's other threads wait for its copy (32 threads decoding a
    10,000-host stage at once tripled a worker's memory)."""
    key = (execution_id, stage_index)
    with _plan_lock:
        hit = _plan_cache.get(key)
        loading = _plan_loads.setdefault(key, threading.Lock())
    if hit:
        return hit
    with loading:
        with _plan_lock:
            hit = _plan_cache.get(key)
        return hit or _read_stage_data(execution_id, stage_index)


def _read_stage_data(execution_id: str, stage_index: int) -> tuple[dict[str, Any],
                                                                    dict[str, dict[str, Any]]]:
    def read() -> tuple[dict[str, Any], dict[str, dict[str, Any]]]:
        with session_scope() as s:
            ex = s.get(Execution, execution_id)
            run = s.exec(select(StageRun).where(StageRun.execution_id == execution_id,
                                                StageRun.stage_index == stage_index)).one()
            if ex is None:
                raise LookupError(f"execution {execution_id} not found")
            return ex.plan["stages"][stage_index], {h["name"]: h for h in run.hosts}

    data = retrying(read, what=f"reading the plan of {execution_id}")
    with _plan_lock:
        if len(_plan_cache) > 256:
            _plan_cache.clear()
            _plan_loads.clear()
        _plan_cache[(execution_id, stage_index)] = data
    return data


# --- heartbeat ------------------------------------------------------------------------------------


class _Heartbeats:
    """One thread per worker process renews the heartbeat of every running step in a single
    UPDATE, so a silent 20-minute script still looks alive and a dead worker's steps do not."""

    def __init__(self) -> None:
        self._ids: set[int] = set()
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None

    def add(self, run_id: int) -> None:
        with self._lock:
            self._ids.add(run_id)
            if self._thread is None or not self._thread.is_alive():
                self._thread = threading.Thread(target=self._loop, name="vmfarm-heartbeat",
                                                daemon=True)
                self._thread.start()

    def discard(self, run_id: int) -> None:
        with self._lock:
            self._ids.discard(run_id)

    def _loop(self) -> None:
        failing = False
        while True:
            time.sleep(get_settings().heartbeat_interval)
            with self._lock:
                ids = list(self._ids)
            if not ids:
                continue
            try:  # waits for a restarting database (session_scope), then renews at once
                with session_scope() as s:
                    s.execute(update(HostStepRun).where(col(HostStepRun.id).in_(ids))
                              .values(heartbeat_at=utcnow()))
            except Exception as exc:  # the database may be away: try again next beat
                if not failing:
                    log.warning("could not renew the heartbeats of %d running steps (trying "
                                "again every beat): %s", len(ids), exc,
                                exc_info=not is_disconnect(exc))
                failing = True
                continue
            if failing:
                log.warning("heartbeats of %d running steps renewed again", len(ids))
            failing = False


heartbeats = _Heartbeats()


# --- claim ----------------------------------------------------------------------------------------


def claim(key: HostStepKey, *, task_id: str | None, worker: str | None,
          queue: str | None) -> tuple[int, HostStepRun | None]:
    """Insert the HostStepRun for ``key``; (id, None) if we own it, (id, row) if it existed
    (tried again across a ledger restart: ``claim_once``)."""
    now = utcnow()
    values = dict(
        idem_key=key.idem, execution_id=key.execution, stage_index=key.stage, phase=key.phase,
        step_index=key.step, step_id="", kind=key.kind, host=key.host, region=key.region,
        attempt=key.attempt,
        status=Status.RUNNING, outputs={}, worker=worker, queue=queue, task_id=task_id,
        started_at=now, heartbeat_at=now,
    )
    return claim_once(HostStepRun, values, what=f"claiming {key.idem}",
                      owner=("status", "task_id", "worker", "started_at"))


def _summary(row: HostStepRun, *, duplicate: bool = False) -> dict[str, Any]:
    out: dict[str, Any] = {"status": row.status, "host": row.host, "step": row.step_index,
                           "exit_code": row.exit_code}
    if duplicate:
        out["duplicate"] = True
    return out


# --- logs -----------------------------------------------------------------------------------------


@dataclass
class LogSink:
    """Buffers output and writes it as a few LogChunk rows (never one row per line)."""

    run_id: int
    unit: str = ""
    seq: int = 0
    buf: list[tuple[str, str, str]] = field(default_factory=list)
    size: int = 0
    last_flush: float = field(default_factory=time.monotonic)
    tails: dict[str, str] = field(default_factory=lambda: {"stdout": "", "stderr": ""})
    outputs: dict[str, str] = field(default_factory=dict)
    _partial: str = ""
    _failing: bool = False
    lock: threading.Lock = field(default_factory=threading.Lock)
    # Secret values this worker resolved never reach a row: each stream is masked as it
    # arrives, a value split across two chunks included.
    _maskers: dict[str, Any] = field(default_factory=dict)

    def write(self, stream: str, text: str) -> None:
        if stream == "stdout" and (OUTPUT_MARK in text or self._partial):
            text = self._strip_outputs(text)
            if not text:
                return
        text = self._masker(stream).feed(text)
        if not text:
            return
        with self.lock:
            self.buf.append((self.unit, stream, text))
            self.size += len(text)
            self.tails[stream] = (self.tails[stream] + text)[-TAIL_CHARS:]
            due = self.size >= FLUSH_BYTES or time.monotonic() - self.last_flush >= FLUSH_SECONDS
        if due:
            self.flush()

    def _strip_outputs(self, text: str) -> str:
        # Output-variable lines may arrive split across chunks: hold an incomplete last line.
        text = self._partial + text
        self._partial = ""
        kept: list[str] = []
        for line in text.splitlines(keepends=True):
            if OUTPUT_MARK in line:
                if not line.endswith("\n"):
                    self._partial = line
                    continue
                before, _, rest = line.partition(OUTPUT_MARK)
                m = re.match(r"(\w+)=([A-Za-z0-9+/=]*)", rest)
                if m:
                    self.outputs[m.group(1)] = base64.b64decode(m.group(2)).decode(
                        "utf-8", "replace")
                if before:  # the script's last line had no newline: keep it
                    kept.append(before + "\n")
                continue
            kept.append(line)
        return "".join(kept)

    def _masker(self, stream: str) -> Any:
        m = self._maskers.get(stream)
        if m is None:
            from app.secrets import StreamMasker

            m = self._maskers[stream] = StreamMasker()
        return m

    def close(self) -> None:
        """Write what the stream maskers still hold, then flush (waiting for a restarting
        ledger)."""
        for stream, m in list(self._maskers.items()):
            rest = m.flush()
            if rest:
                with self.lock:
                    self.buf.append((self.unit, stream, rest))
                    self.tails[stream] = (self.tails[stream] + rest)[-TAIL_CHARS:]
        if self.buf:
            self.flush(wait=RECONNECT_SECONDS)

    def flush(self, *, wait: float = 0.0) -> None:
        """Write the buffered output as LogChunk rows. While the ledger is unreachable the
        output stays buffered for the next flush (never an error in the unit: the command on
        the host goes on); with ``wait`` (the last flush) a lost connection is tried again
        for that many seconds."""
        with self.lock:
            items, self.buf, self.size = self.buf, [], 0
            self.last_flush = time.monotonic()
            start = self.seq
            self.seq += len(items)
        if not items and not wait:
            return
        tries = 0

        def write() -> None:
            nonlocal tries
            tries += 1
            self._write(start, items, wait, again=tries > 1)

        try:
            if wait:
                retrying(write, what=f"writing the logs of step run {self.run_id}", within=wait)
            else:
                write()
        except Exception as exc:
            if wait or not is_disconnect(exc):
                raise
            with self.lock:  # keep them, ahead of what came meanwhile
                self.buf[:0] = items
                self.size += sum(len(text) for _, _, text in items)
            if not self._failing:
                log.warning("step run %d: the ledger is unreachable (%s); its output stays "
                            "buffered until the next flush", self.run_id, exc)
            self._failing = True
            return
        if self._failing:
            log.warning("step run %d: its buffered output is written again", self.run_id)
        self._failing = False

    def _write(self, start: int, items: list[tuple[str, str, str]], wait: float, *,
               again: bool) -> None:
        """One transaction; ``again`` (a retry: the server may have committed the first try
        before the connection was cut) replaces the rows of these sequence numbers."""
        with session_scope(wait=wait) as s:
            if again:
                s.execute(delete(LogChunk).where(
                    col(LogChunk.host_step_run_id) == self.run_id, col(LogChunk.seq) >= start,
                    col(LogChunk.seq) < start + len(items)))
            for n, (unit, stream, text) in enumerate(_merge(items)):
                s.add(LogChunk(host_step_run_id=self.run_id, seq=start + n, unit=unit,
                               stream=stream, text=text))
            s.execute(update(HostStepRun).where(HostStepRun.id == self.run_id)  # type: ignore[arg-type]
                      .values(heartbeat_at=utcnow()))


def _merge(items: list[tuple[str, str, str]]) -> Iterator[tuple[str, str, str]]:
    """Adjacent chunks of the same unit and stream become one row."""
    cur: tuple[str, str, list[str]] | None = None
    for unit, stream, text in items:
        if cur and cur[0] == unit and cur[1] == stream:
            cur[2].append(text)
        else:
            if cur:
                yield cur[0], cur[1], "".join(cur[2])
            cur = (unit, stream, [text])
    if cur:
        yield cur[0], cur[1], "".join(cur[2])


# --- running --------------------------------------------------------------------------------------


def host_target(host: Host, *, on_delegate: bool) -> HostTarget:
    if on_delegate:
        return HostTarget(hostname=host.address, extra={"connection": "local"})
    return HostTarget(
        hostname=host.address, port=host.port, user=host.user,
        private_key_file=host.private_key_file, known_hosts_file=host.known_hosts_file,
        host_key_policy=host.host_key_policy, connect_timeout=host.connect_timeout,
        sandbox_root=host.sandbox_root if host.connection == "Sandbox" else None,
        extra={"connection": "local"} if host.connection == "Local" else
        {"connection": "noop"} if host.connection == "Noop" else
        {f"{kind}_secret": ident for kind, ident in host.credentials.items()},
    )


def host_context(host: Host, stage: dict[str, Any]) -> Context:
    ctx = Context()
    for k, v in stage.get("externalValues", {}).items():
        ctx.set(k, v, external=True)
    for k, v in {
        "instance.name": host.name, "instance.hostName": host.address,
        "instance.host.hostName": host.address,
        "instance.host.privateIp": host.private_ip or host.address,
        "instance.host.publicIp": host.public_ip or host.address,
        "instance.host.port": host.port, "instance.host.region": host.region,
        "infra.region": host.region,
    }.items():
        ctx.set(k, v, external=True)
    return ctx


def _earlier_outputs(key: HostStepKey, ctx: Context, stage: dict[str, Any]) -> None:
    """``<+steps.ID.output.outputVariables.X>`` from this host's earlier steps in this phase."""
    def read() -> list[HostStepRun]:
        with session_scope() as s:
            return list(s.exec(select(HostStepRun).where(
                HostStepRun.execution_id == key.execution, HostStepRun.stage_index == key.stage,
                HostStepRun.phase == key.phase, HostStepRun.host == key.host,
                HostStepRun.kind == key.kind, HostStepRun.step_index < key.step)).all())

    rows = retrying(read, what=f"reading earlier outputs for {key.idem}")
    for r in rows:
        sid = step_of(dataclasses.replace(key, step=r.step_index), stage)[1]["identifier"]
        for name, value in (r.outputs or {}).items():
            ctx.set(f"steps.{sid}.output.outputVariables.{name}", value, external=True)


@contextmanager
def _connector(target: HostTarget) -> Iterator[Connector]:
    from app.connectors.pool import get_pool

    with get_pool().lease(target) as conn:
        yield conn


def execute(key: HostStepKey, *, prev: dict[str, Any] | None, task_id: str | None = None,
            worker: str | None = None, queue: str | None = None) -> dict[str, Any]:
    """Run one step on one host, then apply the failure strategy that matches its error.

    A retry is a new attempt with its own idempotency key and row; Ignore lets the host go
    on; MarkAsSuccess records success (keeping the error); Abort aborts the execution.
    """
    summary = _execute_once(key, prev=prev, task_id=task_id, worker=worker, queue=queue)
    if summary["status"] != Status.FAILED or summary.get("duplicate") or key.kind != "deploy":
        return summary  # a rollback step's failure is recorded; the rollback verdict decides
    stage, _ = _stage_data(key.execution, key.stage)
    step = stage["steps"][key.step]
    action = failure_action(step, stage, summary.get("error_class") or "Unknown")
    while action is not None and action["type"] == "Retry":
        spec = action["spec"]
        done = key.attempt - 1
        if done >= int(spec["retryCount"]):
            action = (spec.get("onRetryFailure") or {}).get("action")
            break
        intervals = spec["retryIntervals"]
        time.sleep(parse_duration(intervals[min(done, len(intervals) - 1)]))
        key = dataclasses.replace(key, attempt=key.attempt + 1)
        summary = _execute_once(key, prev=prev, task_id=task_id, worker=worker, queue=queue)
        if summary["status"] != Status.FAILED or summary.get("duplicate"):
            return summary
    if action is None or action["type"] not in ("Ignore", "MarkAsSuccess", "Abort"):
        return summary  # failed; rollback and manual intervention are the coordinator's
    note = {"Ignore": "ignored", "MarkAsSuccess": "marked as success",
            "Abort": "aborted the execution"}[action["type"]]
    status = {"Ignore": Status.IGNORED, "MarkAsSuccess": Status.SUCCEEDED}.get(
        action["type"], Status.FAILED)
    def record() -> None:
        with session_scope() as s:
            row = s.exec(select(HostStepRun).where(HostStepRun.idem_key == key.idem)).one()
            suffix = f" ({note} by the failure strategy)"
            row.status = status
            row.error = row.error if (row.error or "").endswith(suffix) else f"{row.error}{suffix}"
            s.add(row)

    retrying(record, what=f"recording the failure strategy of {key.idem}")
    if action["type"] == "Abort":
        from app.coordinator import abort

        abort(key.execution, user="failure strategy")
    return {**summary, "status": status}


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


def _execute_once(key: HostStepKey, *, prev: dict[str, Any] | None, task_id: str | None,
                  worker: str | None, queue: str | None) -> dict[str, Any]:
    """One attempt: claim its key, run the units, record the outcome."""
    run_id, existing = claim(key, task_id=task_id, worker=worker, queue=queue)
    if existing is not None:
        log.info("duplicate delivery of %s: returning the recorded result", key.idem)
        return _summary(existing, duplicate=True)
    fields: dict[str, Any] = {}
    step: dict[str, Any] | None = None
    sink = LogSink(run_id)
    heartbeats.add(run_id)
    try:
        stage, hosts = _stage_data(key.execution, key.stage)
        stage, step = step_of(key, stage)
        fields["step_id"] = step["identifier"]
        # In a lane (maxConcurrency) the previous link may be another host's last step.
        if prev is not None and prev.get("status") not in Status.PASSED \
                and prev.get("host") == key.host:
            fields.update(status=Status.SKIPPED,
                          error="skipped: an earlier step failed on this host")
            return _finish(run_id, key, fields)
        if key.deadline is not None and time.time() > key.deadline:
            waited = get_settings().dispatch_expires
            fields.update(status=Status.FAILED, error_class="Timeout",
                          error=f"expired: waited in queue {queue or key.region} past its "
                                f"dispatch deadline ({waited} s, VMFARM_DISPATCH_EXPIRES); no "
                                f"worker of region {key.region} took it in time; nothing ran")
            return _finish(run_id, key, fields)
        if _aborted(key.execution, key.kind):
            fields.update(status=Status.SKIPPED, error="skipped: the execution was aborted")
            return _finish(run_id, key, fields)
        host = Host.from_dict(hosts[key.host])
        fields.update(_run_units(key, stage, step, host, sink))
    except HostError as exc:
        exc.host = exc.host or key.host
        fields.update(status=Status.FAILED, error_class=exc.error_class, error=str(exc),
                      failed_unit=exc.unit or fields.get("failed_unit"))
    except SecretError as exc:  # names the id and the backend, never a value
        fields.update(status=Status.FAILED, error_class=exc.error_class or "Unknown",
                      error=str(exc))
    except Exception as exc:  # a bug must not lose the result: record it, the gate decides
        log.exception("internal error in %s", key.idem)
        fields.update(status=Status.FAILED, error_class="Unknown",
                      error=f"internal error: {type(exc).__name__}: {exc}")
    try:
        sink.close()
    except Exception:  # logs are best effort; the outcome row below is not
        log.exception("could not write logs for %s", key.idem)
    from app.secrets import mask

    fields["stdout_tail"] = mask(sink.tails["stdout"]) or None
    fields["stderr_tail"] = mask(sink.tails["stderr"]) or None
    # A Secret-typed output variable is a secret from now on: masked everywhere, and never
    # stored (later steps cannot read it from the ledger; pass secrets through the store).
    secret_outputs = {str(o["name"]) for o in ((step or {}).get("spec") or {}).get(
        "outputVariables", []) if o.get("type") == "Secret"}
    if secret_outputs:
        from app.secrets import register

        register([v for k, v in sink.outputs.items() if k in secret_outputs and v])
    fields["outputs"] = {k: "***" if k in secret_outputs else mask(v)
                         for k, v in sink.outputs.items()}
    if fields.get("error"):
        fields["error"] = mask(str(fields["error"]))
    return _finish(run_id, key, fields)


def render_step(stage: dict[str, Any], step: dict[str, Any],
                host: Host | None) -> dict[str, Any]:
    """A step as it would run on ``host``: scripts rendered, unsafe values shown as the
    environment variables they travel in (for ``vmfarm plan``)."""
    out: dict[str, Any] = {"identifier": step["identifier"], "type": step["type"]}
    ctx = host_context(host, stage) if host else Context()
    spec = step["spec"]
    if step["type"] == "HealthCheck":
        out["check"] = {k: render(str(v), ctx) if isinstance(v, str) else v
                        for k, v in spec.items()}
        return out
    out["onDelegate"] = bool(spec.get("onDelegate"))
    out["environment"] = {v["name"]: render(str(v.get("value", "")), ctx)
                          for v in spec.get("environmentVariables", [])}
    units = []
    for unit in spec["commandUnits"]:
        if unit["type"] == "Script":
            binder = Binder()
            script = render(unit["spec"]["source"]["spec"]["script"], ctx, quote=True,
                            bind=binder)
            units.append({"identifier": unit["identifier"], "type": "Script",
                          "script": script, "values": binder.env})
        else:
            art = stage.get("artifact") or {}
            units.append({"identifier": unit["identifier"], "type": "Copy",
                          "source": (art.get("spec") or {}).get("path"),
                          "destination": render(unit["spec"]["destinationPath"], ctx).rstrip("/")
                          + "/" + str(art.get("fileName"))})
    out["units"] = units
    return out


def _health_check_step(stage: dict[str, Any], step: dict[str, Any], host: Host,
                       sink: LogSink) -> dict[str, Any]:
    """HealthCheck step: HTTP/TCP from this worker to the host, or a command on the host."""
    spec = step["spec"]
    sink.unit = step["identifier"]
    if spec["type"] in ("HTTP", "TCP"):
        from tasks.checks import health_step

        ok, what = health_step(step, host, stage)
        detail = what
        sink.write("stdout" if ok else "stderr", what + "\n")
    else:
        ok = False
        detail = "unhealthy"
        retries = int(spec.get("retries", 3))
        interval = parse_duration(spec.get("interval", "1s"))
        timeout = parse_duration(spec.get("timeout", "5s"))
        ctx = host_context(host, stage)
        with _connector(host_target(host, on_delegate=False)) as conn:
            for attempt in range(1, retries + 1):  # retries = attempts in all, as for HTTP
                binder = Binder()
                command = render(spec["command"], ctx, quote=True, bind=binder)
                try:
                    res = conn.run(command, env=binder.env, timeout=timeout,
                                   on_output=sink.write)
                    ok = res.exit_code == 0
                    what = f"attempt {attempt}: exit {res.exit_code}"
                    said = res.stderr.strip().splitlines()
                    detail = f"exit {res.exit_code}" + (f": {said[-1]}" if said else "")
                except HostError as exc:
                    if exc.error_class != "Timeout":
                        raise
                    what = detail = f"attempt {attempt}: timed out after {timeout:g} s"
                sink.write("stdout" if ok else "stderr", f"health check {what}\n")
                if ok or attempt >= retries:
                    break
                time.sleep(interval)
    if ok:
        return {"status": Status.SUCCEEDED, "exit_code": 0}
    return {"status": Status.FAILED, "error_class": "Verification",
            "failed_unit": step["identifier"],
            "error": f"health check '{step['identifier']}' failed: {detail}"[:500]}


def _run_units(key: HostStepKey, stage: dict[str, Any], step: dict[str, Any], host: Host,
               sink: LogSink) -> dict[str, Any]:
    if step.get("type") == "HealthCheck":
        return _health_check_step(stage, step, host, sink)
    spec = step["spec"]
    ctx = host_context(host, stage)
    if "<+rollbackArtifact." in str(spec):
        ctx.set("rollbackArtifact.tag", rollback_version(key), external=True)
    if "<+artifact.checksum>" in str(spec):
        ctx.set("artifact.checksum", _fetch(key, stage.get("artifact") or {}).sha256,
                external=True)
    if any("<+steps." in str(u) for u in spec["commandUnits"]) or any(
            "<+steps." in str(v.get("value", "")) for v in spec.get("environmentVariables", [])):
        _earlier_outputs(key, ctx, stage)
    env = {v["name"]: _with_secrets(render(str(v.get("value", "")), ctx))
           for v in spec.get("environmentVariables", []) if v.get("value") is not None}
    outputs = spec.get("outputVariables", [])
    timeout = parse_duration(step["timeout"]) if step.get("timeout") else \
        get_settings().step_timeout
    deadline = time.monotonic() + timeout
    target = host_target(host, on_delegate=bool(spec.get("onDelegate")))
    artifact = stage.get("artifact") or {}
    releases: list[str] | None = None
    with _connector(target) as conn:
        for i, unit in enumerate(spec["commandUnits"]):
            sink.unit = unit["identifier"]
            if i and _aborted(key.execution, key.kind):  # abort stops a host between units
                return {"status": Status.ABORTED, "failed_unit": unit["identifier"],
                        "error": f"aborted before unit '{unit['identifier']}'"}
            remaining = max(1.0, deadline - time.monotonic())
            if unit["type"] == "Script":
                binder = Binder()
                script = render(unit["spec"]["source"]["spec"]["script"], ctx, quote=True,
                                bind=binder)
                # Secrets last, in one pass: each value travels in the environment only.
                script = _with_secrets(script, bind=binder)
                if outputs:
                    script = _with_output_trap(script, outputs)
                res = _in_unit(unit, conn.run, script, env={**env, **binder.env},
                               timeout=remaining, on_output=sink.write,
                               workdir=unit["spec"].get("workingDirectory"))
                if res.exit_code != 0:
                    return {"status": Status.FAILED, "error_class": "Unknown",
                            "exit_code": res.exit_code, "failed_unit": unit["identifier"],
                            "error": f"unit '{unit['identifier']}' exited with code "
                                     f"{res.exit_code}"}
                fields_exit = res.exit_code
            elif unit["type"] == "Copy":
                dest = render(unit["spec"]["destinationPath"], ctx)
                remote = dest.rstrip("/") + "/" + str(artifact["fileName"])
                problem = _in_unit(unit, _push_artifact, key, artifact, conn, host, remote,
                                   sink, remaining)
                if problem:
                    return {**problem, "failed_unit": unit["identifier"]}
                fields_exit = 0
            elif unit["type"] == "DownloadArtifact":
                dest = render(unit["spec"]["destinationPath"], ctx)
                remote = dest.rstrip("/") + "/" + str(artifact["fileName"])
                problem = _in_unit(unit, _download_on_host, artifact, conn, host, remote,
                                   sink, remaining)
                if problem:
                    return {**problem, "failed_unit": unit["identifier"]}
                fields_exit = 0
            elif unit["type"] == "Setup":
                res = conn.run(_setup_script(unit, ctx), timeout=remaining,
                               on_output=sink.write)
                if res.exit_code != 0:
                    return {"status": Status.FAILED, "error_class": "Unknown",
                            "exit_code": res.exit_code, "failed_unit": unit["identifier"],
                            "error": f"unit '{unit['identifier']}' could not prepare the "
                                     f"runtime paths (exit {res.exit_code})"}
                fields_exit = 0
            elif unit["type"] == "Release":
                done = _in_unit(unit, _release, key, artifact, unit, ctx, conn, host, sink,
                                remaining)
                if done.get("status") == Status.FAILED:
                    return {**done, "failed_unit": unit["identifier"]}
                releases = done["releases"]
                fields_exit = 0
    if releases is not None:
        sink.outputs[RELEASES_OUTPUT] = " ".join(releases)
    return {"status": Status.SUCCEEDED, "exit_code": fields_exit if spec["commandUnits"] else 0}


def _with_secrets(text: str, *, bind: Binder | None = None) -> str:
    """Resolve ``<+secrets.getValue("id")>`` here, on the worker that runs the step; with
    ``bind`` (a script) each value becomes an environment variable of the command."""
    from app.secrets import has_refs, substitute

    if not has_refs(text):
        return text
    out, _ = substitute(text, bind=bind)
    return out


def _in_unit(unit: dict[str, Any], fn: Any, *args: Any, **kwargs: Any) -> Any:
    """Call ``fn``; a host error it raises names the unit it happened in."""
    try:
        return fn(*args, **kwargs)
    except HostError as exc:
        exc.unit = exc.unit or unit["identifier"]
        raise


def _setup_script(unit: dict[str, Any], ctx: Context) -> str:
    """mkdir -p each runtime path; chown and chmod when asked."""
    import shlex

    spec = unit["spec"]
    paths = " ".join(shlex.quote(render(str(p), ctx)) for p in spec["paths"])
    lines = ["set -e", f"mkdir -p {paths}"]
    if spec.get("owner"):
        lines.append(f"chown {shlex.quote(str(spec['owner']))} {paths}")
    if spec.get("mode"):
        lines.append(f"chmod {shlex.quote(str(spec['mode']))} {paths}")
    lines.append(f"ls -ld {paths}")
    return "\n".join(lines) + "\n"


# The output a Release unit leaves: the releases the host holds, newest first.
RELEASES_OUTPUT = "vmfarm_releases"


def _fetch(key: HostStepKey, artifact: dict[str, Any]) -> Any:
    """The artifact in this worker's cache: fetched once per execution, checksum verified."""
    from app.artifacts import fetch

    return fetch(artifact, execution_id=key.execution)


def _push_artifact(key: HostStepKey, artifact: dict[str, Any], conn: Connector, host: Host,
                   remote: str, sink: LogSink, timeout: float) -> dict[str, Any] | None:
    """Copy the artifact to ``remote`` over SFTP and verify its checksum there; None when it
    landed intact, else the failure's fields."""
    from app.artifacts import verify_remote_command

    got = _fetch(key, artifact)
    sink.write("stdout", f"copying {artifact['fileName']} ({got.source}, sha256 {got.sha256}"
                         f"{'' if got.verified else ', not verified at the source'}) to "
                         f"{host.name}:{remote}\n")
    conn.put(str(got.path), remote)
    res = conn.run(verify_remote_command(remote, got.sha256), timeout=timeout,
                   on_output=sink.write)
    if res.exit_code != 0:
        return {"status": Status.FAILED, "error_class": "Unknown", "exit_code": res.exit_code,
                "error": f"checksum mismatch on {host.name}: {artifact['fileName']} from "
                         f"{got.source} is not sha256 {got.sha256} there"}
    return None


def _download_on_host(artifact: dict[str, Any], conn: Connector, host: Host, remote: str,
                      sink: LogSink, timeout: float) -> dict[str, Any] | None:
    """The host fetches the artifact itself; credentials travel only in this command's
    environment; the checksum (when the source gives one) is verified on the host."""
    import shlex

    from app.artifacts.sources import resolve

    r = resolve(artifact)
    env: dict[str, str] = {}
    if r.kind == "s3":
        import boto3

        from app.artifacts.s3 import endpoint_url

        client = boto3.client("s3", region_name=r.region, endpoint_url=endpoint_url())
        env["VMFARM_URL"] = client.generate_presigned_url(
            "get_object", Params={"Bucket": r.bucket, "Key": r.key}, ExpiresIn=900)
        auth = ""
    elif r.kind == "http":
        env["VMFARM_URL"] = str(r.url)
        auth = ""
        if r.auth.token:
            env["VMFARM_AUTH"] = f"Authorization: Bearer {r.auth.token}"
            auth = ' -H "$VMFARM_AUTH"'
        elif r.auth.username:
            env["VMFARM_AUTH"] = f"{r.auth.username}:{r.auth.password or ''}"
            auth = ' -u "$VMFARM_AUTH"'
    else:
        return {"status": Status.FAILED, "error_class": "Unknown",
                "error": f"DownloadArtifact cannot fetch a {r.type} artifact on the host; use "
                         "Copy or Release (the worker fetches it)"}
    q = shlex.quote(remote)
    script = (f"set -e\nmkdir -p \"$(dirname {q})\"\n"
              f"curl -fsSL --retry 3{auth} -o {q}.part \"$VMFARM_URL\"\nmv {q}.part {q}\n")
    if r.expected:
        from app.artifacts import verify_remote_command

        script += verify_remote_command(remote, r.expected) + "\n"
    sink.write("stdout", f"downloading {artifact['fileName']} ({r.source}) on {host.name}\n")
    res = conn.run(script, env=env, timeout=timeout, on_output=sink.write)
    if res.exit_code != 0:
        return {"status": Status.FAILED, "error_class": "Unknown", "exit_code": res.exit_code,
                "error": f"{host.name} could not download {artifact['fileName']} from "
                         f"{r.source} (exit {res.exit_code})"}
    return None


def _release(key: HostStepKey, artifact: dict[str, Any], unit: dict[str, Any], ctx: Context,
             conn: Connector, host: Host, sink: LogSink, timeout: float) -> dict[str, Any]:
    """Install the artifact as releases/<version>, switch ``current`` atomically, keep the
    last N. Nothing is fetched when the host already holds that release."""
    import shlex

    base = render(unit["spec"]["deploymentPath"], ctx).rstrip("/")
    version = str(artifact.get("tag") or "")
    if not re.fullmatch(r"[A-Za-z0-9._+-]+", version):
        return {"status": Status.FAILED, "error_class": "Unknown",
                "error": f"version {version!r} cannot name a release directory"}
    keep = int(unit["spec"].get("keep", 3))
    b, v = shlex.quote(base), shlex.quote(version)
    has = conn.run(f"test -d {b}/releases/{v} && test -e {b}/releases/{v}/.vmfarm-release",
                   timeout=timeout)
    if has.exit_code != 0:
        incoming = f"{base}/incoming/{artifact['fileName']}"
        problem = _push_artifact(key, artifact, conn, host, incoming, sink, timeout)
        if problem:
            return problem
        i = shlex.quote(incoming)
        unpack = (f"tar -xzf {i} -C \"$tmp\"" if str(artifact["fileName"]).endswith(
            (".tar.gz", ".tgz")) else f"cp {i} \"$tmp\"/")
        install = (f"set -e\nmkdir -p {b}/releases\ntmp=$(mktemp -d {b}/releases/.{v}.XXXX)\n"
                   f"{unpack}\necho {v} > \"$tmp\"/.vmfarm-release\n"
                   f"rm -rf {b}/releases/{v}\nmv \"$tmp\" {b}/releases/{v}\nrm -f {i}\n")
        res = conn.run(install, timeout=timeout, on_output=sink.write)
        if res.exit_code != 0:
            return {"status": Status.FAILED, "error_class": "Unknown", "exit_code": res.exit_code,
                    "error": f"could not unpack release {version} into {base}/releases"}
    else:
        sink.write("stdout", f"release {version} is already on {host.name}: nothing to fetch\n")
    # ln + rename: `current` always points at a whole release, never at nothing.
    switch = (f"set -e\ncd {b}\nln -sfn releases/{v} .current.$$\nmv -T .current.$$ current\n"
              f"ls -1t releases | grep -v '^[.]' | tail -n +{keep + 1} | while read -r old; do "
              f"[ \"$old\" = {v} ] || rm -rf \"releases/$old\"; done\n"
              f"echo \"RELEASES $(ls -1t releases | grep -v '^[.]' | tr '\\n' ' ')\"\n")
    res = conn.run(switch, timeout=timeout)
    if res.exit_code != 0:
        return {"status": Status.FAILED, "error_class": "Unknown", "exit_code": res.exit_code,
                "error": f"could not switch {base}/current to release {version}: "
                         f"{res.stderr.strip()[-300:]}"}
    listed = next((line for line in res.stdout.splitlines() if line.startswith("RELEASES ")),
                  "RELEASES ")
    sink.write("stdout", f"{base}/current -> releases/{version}\n")
    return {"status": Status.SUCCEEDED, "releases": listed.split()[1:]}


def _aborted(execution_id: str, kind: str = "deploy") -> bool:
    """Must this host stop? Deploy steps stop when the execution is aborted or rolls back;
    rollback steps only when it is aborted again."""
    stop = {Status.ABORTED, Status.ROLLING_BACK} if kind == "deploy" else {Status.ABORTED}
    status = _execution_status(execution_id)
    return status is None or status in stop


# Asked before every step and unit of every host: one read per execution and process per
# STATUS_TTL seconds serves them all (an abort still stops each host at its next unit).
STATUS_TTL = 0.5
_status_cache: dict[str, tuple[float, str | None]] = {}
_status_lock = threading.Lock()


def _execution_status(execution_id: str) -> str | None:
    now = time.monotonic()
    with _status_lock:
        hit = _status_cache.get(execution_id)
    if hit is not None and now - hit[0] < STATUS_TTL:
        return hit[1]

    def read() -> str | None:
        with session_scope() as s:  # the status column only
            return s.exec(select(Execution.status).where(Execution.id == execution_id)).first()

    status = retrying(read, what=f"reading the status of {execution_id}")
    with _status_lock:
        if len(_status_cache) > 1024:
            _status_cache.clear()
        _status_cache[execution_id] = (time.monotonic(), status)
    return status


def step_of(key: HostStepKey, stage: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """(the stage to render with, the step) for a key: a deploy step, a rollbackStep, or a step
    of the plan that deployed the version a built-in rollback returns to."""
    if key.kind == "deploy":
        return stage, stage["steps"][key.step]
    if key.src is not None:
        source, _ = _stage_data(*key.src)
        return source, source["steps"][key.step]
    return stage, stage["rollbackSteps"][key.step]


def rollback_version(key: HostStepKey) -> str:
    """``<+rollbackArtifact.tag>``: the version this host returns to on rollback ('' if none).

    In a rollback step it is the version of the stage's rollback plan; in a deploy step, the
    version the host ran before this execution."""
    return retrying(lambda: _rollback_version(key), what=f"reading versions for {key.idem}")


def _rollback_version(key: HostStepKey) -> str:
    from app.models import Instance

    with session_scope() as s:
        run = s.exec(select(StageRun).where(StageRun.execution_id == key.execution,
                                            StageRun.stage_index == key.stage)).one()
        if key.kind != "deploy":
            target = ((run.rollback or {}).get("hosts") or {}).get(key.host) or {}
            return str(target.get("version") or "")
        ex = s.get(Execution, key.execution)
        stage = ex.plan["stages"][key.stage] if ex else {}
        for inst in s.exec(select(Instance).where(
                Instance.host == key.host,
                Instance.service == stage.get("service", {}).get("identifier"),
                Instance.environment == stage.get("environment", {}).get("identifier"))).all():
            if inst.execution_id == key.execution:
                return inst.previous_version or ""
            return inst.version or ""
    return ""


def _with_output_trap(script: str, outputs: list[dict[str, Any]]) -> str:
    """Print the output variables the script set when it ends, however it ends.

    Only variables the unit actually set are printed, so a later unit of the step does not
    overwrite an earlier unit's value with nothing.
    """
    parts = []
    for o in outputs:
        var = str(o.get("value") or o["name"])
        if not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", var):
            continue
        parts.append(f'[ -n "${{{var}+x}}" ] && printf "%s{o["name"]}=%s\\n" '
                     f'"{OUTPUT_MARK}" "$(printf %s "${{{var}}}" | base64 -w0)"')
    trap = "__vmfarm_out() { " + "; ".join([*parts, "true"]) + "; }\ntrap __vmfarm_out EXIT\n"
    return trap + script


# How long a step's outcome waits for an unreachable ledger: the units ran, and an outcome
# that is not recorded ends as "worker lost" (which a Retry strategy would run again).
FINISH_RETRY_SECONDS = 120.0


def _finish(run_id: int, key: HostStepKey, fields: dict[str, Any]) -> dict[str, Any]:
    """Record the attempt's outcome (its heartbeat goes on until it is written).

    Only a RUNNING row is written: if the reconciler has meanwhile called this attempt lost
    (its heartbeat went stale while the ledger was away) its verdict stands, and is returned,
    since the failure strategy may already have sent a new attempt.
    """
    fields.setdefault("status", Status.FAILED)
    fields["finished_at"] = utcnow()
    fields["heartbeat_at"] = fields["finished_at"]

    def write() -> tuple[str, str | None] | None:
        with session_scope() as s:
            done = s.execute(update(HostStepRun).where(
                col(HostStepRun.id) == run_id, col(HostStepRun.status) == Status.RUNNING)
                .values(**fields))
            if getattr(done, "rowcount", 1):
                return None
            status, error_class, finished_at = s.exec(select(
                HostStepRun.status, HostStepRun.error_class, HostStepRun.finished_at).where(
                HostStepRun.id == run_id)).one()
            if finished_at == fields["finished_at"]:
                return None  # this call's own write: its commit's answer was lost
            return status, error_class

    try:
        decided = retrying(write, what=f"recording the outcome of {key.idem}",
                           within=FINISH_RETRY_SECONDS)
    finally:
        heartbeats.discard(run_id)
    status, error_class = fields["status"], fields.get("error_class")
    if decided is not None:
        log.warning("%s ended %s on the host, but the ledger had already recorded it as %s "
                    "(%s): that stands", key.idem, status, decided[0], decided[1])
        status, error_class = decided
    return {"status": status, "host": key.host, "step": key.step,
            "exit_code": fields.get("exit_code"), "error_class": error_class,
            "attempt": key.attempt}
