"""Run one step on one host: claim, run its command units (or its health check), record the
outcome, then apply the failure strategy that matches its error.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from sqlmodel import select

from app.canvas import HostStepKey
from app.connectors.base import Connector, HostTarget
from app.coordinator.precedence import after_failure
from app.coordinator.retry import schedule_retry
from app.db import retrying, session_scope
from app.definitions.base import parse_duration
from app.definitions.expressions import Binder, ExpressionError, render_script
from app.definitions.plan import (
    ApprovalStepPlan,
    CommandStepPlan,
    DeploymentStagePlan,
    HealthCheckStepPlan,
    HttpStepPlan,
    StepPlan,
    TerraformStepPlan,
    WaitStepPlan,
    step_when,
)
from app.errors import HostError
from app.execution.ledger import (
    aborted,
    claim,
    earlier_outputs,
    finish_step,
    rollback_version,
    stage_data,
    stage_outputs,
    step_of,
    summary,
    typed_stage,
)
from app.execution.logs import LogSink, heartbeats
from app.models import HostStepRun, Status
from app.providers.base import Host
from app.secrets import SecretError
from app.settings import get_settings
from app.units import HostSession, host_context, run_unit, step_environment, step_scope

log = logging.getLogger("vmfarm.tasks")


def execute(
    key: HostStepKey,
    *,
    prev: dict[str, Any] | None,
    task_id: str | None = None,
    worker: str | None = None,
    queue: str | None = None,
) -> dict[str, Any]:
    """Run one step on one host, then apply the failure strategy that matches its error.

    A retry is a new attempt with its own idempotency key and row, recorded now and sent with
    a countdown by the coordinator's retry engine (app.coordinator.retry): this worker does not
    wait for it, and its result says ``handover`` (the retry runs this host's later steps and
    the hosts behind it in its lane). Ignore lets the host go on; MarkAsSuccess records success
    (keeping the error); Abort aborts the execution.
    """
    before = earlier_failed(key, prev)
    result = _execute(key, before=before, task_id=task_id, worker=worker, queue=queue)
    # Whether a step of this host has failed so far (``when: {stageStatus: Failure}`` reads
    # it): a step that ran after a failure does not make the host pass again.
    result["host_failed"] = before or not Status.passed(result.get("status"), result.get("skipped"))
    return result


def earlier_failed(key: HostStepKey, prev: dict[str, Any] | None) -> bool:
    """Did an earlier step of the stage fail on this host? The previous link says so when it
    was this host's step; a host's first link after a retry asks the ledger."""
    if prev is not None and prev.get("host") == key.host:
        return bool(prev.get("host_failed")) or not Status.passed(
            prev.get("status"), prev.get("skipped")
        )
    if key.step == 0:
        return False
    from app.execution.ledger import failed_before

    return failed_before(key)


def _execute(
    key: HostStepKey, *, before: bool, task_id: str | None, worker: str | None, queue: str | None
) -> dict[str, Any]:
    summary = _execute_once(key, before=before, task_id=task_id, worker=worker, queue=queue)
    if summary["status"] != Status.FAILED or summary.get("duplicate") or key.kind != "deploy":
        return summary  # a rollback step's failure is recorded; the rollback verdict decides
    stage = typed_stage(key.execution, key.stage)
    step = stage.steps[key.step]
    after = after_failure(step, stage, summary.get("error_class") or "Unknown", key.attempt)
    if after.wait is not None:
        scheduled = schedule_retry(key, wait=after.wait)
        log.info("%s failed; retry: %s", key.idem, scheduled or "already scheduled")
        return {**summary, "handover": True}
    action = after.action
    if action is None or action.type not in ("Ignore", "MarkAsSuccess", "Abort"):
        return summary  # failed; rollback and manual intervention are the coordinator's
    note = {
        "Ignore": "ignored",
        "MarkAsSuccess": "marked as success",
        "Abort": "aborted the execution",
    }[action.type]
    status = {"Ignore": Status.IGNORED, "MarkAsSuccess": Status.SUCCEEDED}.get(
        action.type, Status.FAILED
    )

    def record() -> None:
        with session_scope() as s:
            row = s.exec(select(HostStepRun).where(HostStepRun.idem_key == key.idem)).one()
            suffix = f" ({note} by the failure strategy)"
            row.status = status
            row.error = row.error if (row.error or "").endswith(suffix) else f"{row.error}{suffix}"
            s.add(row)

    retrying(record, what=f"recording the failure strategy of {key.idem}")
    if action.type == "Abort":
        # The control worker aborts: a region worker writes only its step rows (its database
        # role may not touch executions). Hosts stop at their next unit once it has run.
        from app.coordinator.publish import request_abort

        request_abort(key.execution, by="failure strategy", idem=key.idem)
    return {**summary, "status": status}


def _execute_once(
    key: HostStepKey, *, before: bool, task_id: str | None, worker: str | None, queue: str | None
) -> dict[str, Any]:
    """One attempt: claim its key, run the units, record the outcome."""
    run_id, existing = claim(key, task_id=task_id, worker=worker, queue=queue)
    if existing is not None:
        log.info("duplicate delivery of %s: returning the recorded result", key.idem)
        return summary(existing, duplicate=True)
    return _attempt(run_id, key, before=before, queue=queue)


def _attempt(run_id: int, key: HostStepKey, *, before: bool, queue: str | None) -> dict[str, Any]:
    """The claimed attempt: its ``when``, then its units; the outcome recorded."""
    fields: dict[str, Any] = {}
    step: StepPlan | None = None
    sink = LogSink(run_id)
    heartbeats.add(run_id)
    try:
        stage, hosts = stage_data(key.execution, key.stage)
        stage, step = step_of(key, stage)
        fields["step_id"] = step.identifier
        skip = when_skips(key, stage, step, before=before, hosts=hosts)
        if skip:
            fields.update(status=Status.SKIPPED, error=skip)
            # the reason travels with the chain link: the host's next step reads it
            return {**finish_step(run_id, key, fields), "skipped": skip}
        if key.deadline is not None and time.time() > key.deadline:
            waited = get_settings().dispatch_expires
            fields.update(
                status=Status.FAILED,
                error_class="Timeout",
                error=f"expired: waited in queue {queue or key.region} past its "
                f"dispatch deadline ({waited} s, VMFARM_DISPATCH_EXPIRES); no "
                f"worker of region {key.region} took it in time; nothing ran",
            )
            return finish_step(run_id, key, fields)
        if aborted(key.execution, key.kind):
            fields.update(status=Status.SKIPPED, error="skipped: the execution was aborted")
            return finish_step(run_id, key, fields)
        host = Host.from_dict(hosts[key.host])
        if isinstance(step, WaitStepPlan | ApprovalStepPlan):
            fields.update(_stop_at_barrier(step, sink))
        else:
            fields.update(_run_units(key, stage, step, host, sink))
    except HostError as exc:
        exc.host = exc.host or key.host
        fields.update(
            status=Status.FAILED,
            error_class=exc.error_class,
            error=str(exc),
            failed_unit=exc.unit or fields.get("failed_unit"),
        )
    except ExpressionError as exc:  # a when condition that cannot be judged on this host
        fields.update(
            status=Status.FAILED,
            error_class="Unknown",
            error=f"could not judge the step's when: {exc}",
        )
    except SecretError as exc:  # names the id and the backend, never a value
        fields.update(
            status=Status.FAILED, error_class=exc.error_class or "Unknown", error=str(exc)
        )
    except Exception as exc:  # a bug must not lose the result: record it, the gate decides
        log.exception("internal error in %s", key.idem)
        fields.update(
            status=Status.FAILED,
            error_class="Unknown",
            error=f"internal error: {type(exc).__name__}: {exc}",
        )
    try:
        sink.close()
    except Exception:  # logs are best effort; the outcome row below is not
        log.exception("could not write logs for %s", key.idem)
    from app.secrets import mask

    fields["stdout_tail"] = mask(sink.tails["stdout"]) or None
    fields["stderr_tail"] = mask(sink.tails["stderr"]) or None
    # A Secret-typed output variable is a secret from now on: masked everywhere, and never
    # stored (later steps cannot read it from the ledger; pass secrets through the store).
    secret_outputs = {
        o.name
        for o in (step.spec.output_variables if isinstance(step, CommandStepPlan) else [])
        if o.type == "Secret"
    }
    if secret_outputs:
        from app.secrets import register

        register([v for k, v in sink.outputs.items() if k in secret_outputs and v])
    fields["outputs"] = {
        k: "***" if k in secret_outputs else mask(v) for k, v in sink.outputs.items()
    }
    if fields.get("error"):
        fields["error"] = mask(str(fields["error"]))
    return finish_step(run_id, key, fields)


def when_skips(
    key: HostStepKey,
    stage: DeploymentStagePlan,
    step: StepPlan,
    *,
    before: bool,
    hosts: dict[str, dict[str, Any]],
) -> str:
    """Why this step does not run on this host ('' when it runs): its own ``when`` and its
    group's (both must allow it; without one, a step runs only while the host has not failed)."""
    whens = [w for w in (step_when(step), step.group_when) if w is not None]
    statuses = [w.stage_status for w in whens] or ["Success"]
    if before and "Success" in statuses:
        return "skipped: an earlier step failed on this host"
    if not before and "Failure" in statuses:
        return f"{Status.WHEN}stageStatus Failure, and no earlier step failed on this host"
    conditions = [w.condition for w in whens if w.condition]
    if not conditions:
        return ""
    from app.definitions.conditions import ConditionError, evaluate, parse

    ctx = host_context(Host.from_dict(hosts[key.host]), stage)
    if any("<+steps." in c for c in conditions):
        earlier_outputs(key, ctx, stage)
    if any("<+pipeline.stages." in c for c in conditions):
        from app.coordinator.outputs import add_stage_outputs

        add_stage_outputs(ctx, key.execution, key.stage)  # a Pipeline stage's output.NAME
        stage_outputs(key, ctx, " ".join(conditions))

    def lookup(name: str) -> str:
        val = ctx.lookup(name)
        if val is None:
            raise ConditionError(f"<+{name}> has no value on host {key.host}")
        return val.text

    for text in conditions:
        if not evaluate(parse(text), lookup):
            return f"{Status.WHEN}condition {text} is false"
    return ""


def _stop_at_barrier(step: WaitStepPlan | ApprovalStepPlan, sink: LogSink) -> dict[str, Any]:
    """A Wait or HarnessApproval step: the host stops here (WAITING) and this worker goes on;
    the coordinator continues the host when the wait is over or the approvers said yes
    (app.coordinator.barriers). No worker sleeps."""
    sink.unit = step.identifier
    if isinstance(step, WaitStepPlan):
        sink.write("stdout", f"waiting {step.spec.duration} before the next step\n")
    else:
        sink.write("stdout", f"waiting for approval: {step.spec.approval_message}\n")
    return {"status": Status.WAITING}


def _http_step(
    key: HostStepKey, stage: DeploymentStagePlan, step: HttpStepPlan, host: Host, sink: LogSink
) -> dict[str, Any]:
    """Http step: one request from this worker (the delegate), judged by its assertion."""
    from app.execution.httpstep import request

    ctx = host_context(host, stage)
    if "<+steps." in str(step.spec.to_json()):
        earlier_outputs(key, ctx, stage)
    if "<+pipeline.stages." in str(step.spec.to_json()):
        from app.coordinator.outputs import add_stage_outputs

        add_stage_outputs(ctx, key.execution, key.stage)  # a Terraform step's output.X
        stage_outputs(key, ctx, str(step.spec.to_json()))  # outputVariables: per host
    sink.unit = step.identifier
    timeout = parse_duration(step.timeout) if step.timeout else get_settings().step_timeout
    return request(step, ctx, sink, timeout=timeout)


def _terraform_step(
    key: HostStepKey, stage: DeploymentStagePlan, step: TerraformStepPlan, host: Host, sink: LogSink
) -> dict[str, Any]:
    """A Terraform step: terraform on this worker (the delegate), app.execution.terraform."""
    from app.execution.terraform import run_step

    ctx = host_context(host, stage)
    written = str(step.to_json())
    if "<+steps." in written:
        earlier_outputs(key, ctx, stage)
    if "<+pipeline.stages." in written:
        from app.coordinator.outputs import add_stage_outputs

        add_stage_outputs(ctx, key.execution, key.stage)
        stage_outputs(key, ctx, written)
    timeout = parse_duration(step.timeout) if step.timeout else get_settings().step_timeout
    return run_step(
        step,
        ctx,
        sink,
        execution_id=key.execution,
        attempt=key.attempt,
        timeout=timeout,
        stop=lambda: aborted(key.execution, key.kind),
    )


def _health_check_step(
    stage: DeploymentStagePlan, step: HealthCheckStepPlan, host: Host, sink: LogSink
) -> dict[str, Any]:
    """HealthCheck step: HTTP/TCP from this worker to the host, or a command on the host."""
    spec = step.spec
    sink.unit = step.identifier
    if spec.type in ("HTTP", "TCP"):
        from app.execution.checks import health_step

        ok, what = health_step(step, host, stage)
        detail = what
        sink.write("stdout" if ok else "stderr", what + "\n")
    else:
        ok = False
        detail = "unhealthy"
        retries = spec.retries
        interval = parse_duration(spec.interval)
        timeout = parse_duration(spec.timeout)
        ctx = host_context(host, stage)
        with _connector(host_target(host, on_delegate=False)) as conn:
            for attempt in range(1, retries + 1):  # retries = attempts in all, as for HTTP
                binder = Binder()  # values from outside stand intact, as in Script units
                command = render_script(spec.command or "", ctx, bind=binder)
                try:
                    res = conn.run(command, env=binder.env, timeout=timeout, on_output=sink.write)
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
    return {
        "status": Status.FAILED,
        "error_class": "Verification",
        "failed_unit": step.identifier,
        "error": f"health check '{step.identifier}' failed: {detail}"[:500],
    }


def _run_units(
    key: HostStepKey, stage: DeploymentStagePlan, step: StepPlan, host: Host, sink: LogSink
) -> dict[str, Any]:
    """Each command unit of the step in turn, rendered and run by its type (app.units);
    an abort stops the host between units."""
    if isinstance(step, HealthCheckStepPlan):
        return _health_check_step(stage, step, host, sink)
    if isinstance(step, HttpStepPlan):
        return _http_step(key, stage, step, host, sink)
    if isinstance(step, WaitStepPlan | ApprovalStepPlan):  # (handled before: never here)
        return _stop_at_barrier(step, sink)
    if isinstance(step, TerraformStepPlan):
        return _terraform_step(key, stage, step, host, sink)
    spec = step.spec
    written = str(spec.to_json())  # what the units' expressions name
    # What the units' expressions need from the ledger and the artifact cache, read once.
    ctx = host_context(host, stage)
    if "<+rollbackArtifact." in written:
        ctx.set("rollbackArtifact.tag", rollback_version(key), external=True)
    if "<+artifact.checksum>" in written and stage.artifact is not None:
        from app.artifacts import fetch

        ctx.set(
            "artifact.checksum",
            fetch(stage.artifact.to_json(), execution_id=key.execution).sha256,
            external=True,
        )
    if "<+steps." in written:
        earlier_outputs(key, ctx, stage)
    if "<+pipeline.stages." in written:
        from app.coordinator.outputs import add_stage_outputs

        add_stage_outputs(ctx, key.execution, key.stage)  # a Terraform step's output.X
        stage_outputs(key, ctx, written)  # outputVariables: per host, the delegate's, .list
    env = step_environment(step, ctx, secrets=True)
    scope = step_scope(stage, step, ctx, secrets=True)
    timeout = parse_duration(step.timeout) if step.timeout else get_settings().step_timeout
    deadline = time.monotonic() + timeout
    target = host_target(host, on_delegate=spec.on_delegate)
    outputs: dict[str, str] = {}
    with _connector(target) as conn:
        for i, unit in enumerate(spec.command_units):
            sink.unit = unit.identifier
            if i and aborted(key.execution, key.kind):  # abort stops a host between units
                return {
                    "status": Status.ABORTED,
                    "failed_unit": unit.identifier,
                    "error": f"aborted before unit '{unit.identifier}'",
                }
            session = HostSession(
                conn=conn,
                host=host,
                out=sink,
                env=env,
                timeout=max(1.0, deadline - time.monotonic()),
                execution_id=key.execution,
            )
            done = run_unit(unit, scope, session)
            if not done.ok:
                return {
                    "status": Status.FAILED,
                    "error_class": done.error_class,
                    "exit_code": done.exit_code,
                    "failed_unit": unit.identifier,
                    "error": done.error,
                }
            outputs.update(done.outputs)
    sink.outputs.update(outputs)  # only a step that succeeded reports them
    return {"status": Status.SUCCEEDED, "exit_code": 0}


def host_target(host: Host, *, on_delegate: bool) -> HostTarget:
    if on_delegate:
        return HostTarget(hostname=host.address, extra={"connection": "local"})
    return HostTarget(
        hostname=host.address,
        port=host.port,
        user=host.user,
        private_key_file=host.private_key_file,
        known_hosts_file=host.known_hosts_file,
        host_key_policy=host.host_key_policy,
        connect_timeout=host.connect_timeout,
        sandbox_root=host.sandbox_root if host.connection == "Sandbox" else None,
        extra={"connection": "local"}
        if host.connection == "Local"
        else {f"{kind}_secret": ident for kind, ident in host.credentials.items()},
    )


@contextmanager
def _connector(target: HostTarget) -> Iterator[Connector]:
    from app.connectors.pool import get_pool

    with get_pool().lease(target) as conn:
        yield conn
