"""The ``vmfarm`` command.

Exit codes: 0 success, 1 the deployment failed, 2 bad input (files, inputs, options): nothing ran.
"""

from __future__ import annotations

import json
import os
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import click
from rich.console import Console, Group
from rich.live import Live
from rich.progress_bar import ProgressBar
from rich.table import Table
from rich.text import Text

from app.errors import ConfigError, LabError, SpecError, SpecErrors
from app.policy import PolicyViolation
from app.rbac import PermissionRefused

F = TypeVar("F", bound=Callable[..., Any])

STATUS_STYLE = {"SUCCEEDED": "green", "FAILED": "bold red", "RUNNING": "yellow",
                "SKIPPED": "dim", "PENDING": "dim", "QUEUED": "dim", "ABORTED": "red",
                "ROLLING_BACK": "yellow", "ROLLED_BACK": "magenta", "ROLLBACK_FAILED": "bold red",
                "WAITING": "cyan", "IGNORED": "dim"}

# No console markup: host names, scripts and errors are printed as they are ("[x]" included).
out = Console(highlight=False, soft_wrap=True, markup=False)
err = Console(stderr=True, highlight=False, soft_wrap=True, markup=False)


def output_option(f: F) -> F:
    return click.option("--output", "-o", type=click.Choice(["text", "json"]), default="text",
                        show_default=True, help="json: machine-readable output on stdout.")(f)


INPUTS_HELP = ("An input set file (Harness inputSet, or NAME: VALUE lines), or a folder of them; "
               "repeatable, later files win, --set wins over all.")


def gather_inputs(input_files: tuple[str, ...], sets: tuple[str, ...]) -> Any:
    """Runtime inputs from --inputs files with --set on top (SpecError names a bad file)."""
    from app.definitions.inputsets import merge_inputs, read_input_sets

    if not input_files:
        return parse_sets(sets)
    return merge_inputs(read_input_sets(input_files), parse_sets(sets))


def parse_sets(values: tuple[str, ...]) -> dict[str, str]:
    inputs: dict[str, str] = {}
    for v in values:
        if "=" not in v or not v.split("=", 1)[0].strip():
            raise click.BadParameter(f"'{v}' is not KEY=VALUE", param_hint="--set")
        k, val = v.split("=", 1)
        inputs[k.strip()] = val
    return inputs


def _user() -> str:
    from app.settings import get_settings

    return get_settings().user or os.environ.get("USER", "")


def _refused(exc: Exception) -> None:
    """A permission the caller lacks: nothing was done; exit 3."""
    err.print(Text(f"refused: {exc}", style="red"))
    sys.exit(3)


def _guard(action: str, execution_id: str) -> str:
    """Check the caller may do ``action`` on the execution (RBAC); exit 3 if not, 2 when the
    RBAC or users file is wrong. Returns the caller's name."""
    from app.rbac import guard

    user = _user()
    try:
        guard(action, user=user, execution_id=execution_id)
    except PermissionRefused as exc:
        _refused(exc)
    except ConfigError as exc:
        err.print(Text(f"error: {exc}", style="red"))
        sys.exit(2)
    return user


def _audit(action: str, user: str, execution_id: str, outcome: str, **detail: Any) -> None:
    from app.audit import record

    record(action, user=user, execution_id=execution_id, detail=detail, outcome=outcome)


def fail_input(exc: Exception) -> None:
    """Print a bad-input error (file:line:col: message) and exit 2."""
    errors = exc.errors if isinstance(exc, SpecErrors) else [exc]
    for e in errors:
        err.print(Text(f"error: {e}", style="red"))
    if len(errors) > 1:
        err.print(f"{len(errors)} errors; nothing was run.")
    else:
        err.print("nothing was run.")
    sys.exit(2)


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="vmfarm")
def main() -> None:
    """Deploy applications to fleets of virtual machines over SSH, on Celery workers per
    region."""


# --- validate -------------------------------------------------------------------------------------


@main.command()
@click.argument("files", nargs=-1, required=True, type=click.Path())
@click.option("--set", "sets", multiple=True, metavar="KEY=VALUE", help="Fill a runtime input.")
@click.option("--inputs", "input_files", multiple=True, type=click.Path(), help=INPUTS_HELP)
@output_option
def validate(files: tuple[str, ...], sets: tuple[str, ...], input_files: tuple[str, ...],
             output: str) -> None:
    """Check pipeline files: schema, references and expressions. Exit 2 when invalid."""
    from app.definitions import load

    try:
        bundle = load(files, inputs=gather_inputs(input_files, sets), require_inputs=False)
    except (SpecError, SpecErrors) as exc:
        if output == "json":
            errors = exc.errors if isinstance(exc, SpecErrors) else [exc]
            out.print_json(json.dumps({"valid": False, "errors": [
                {"file": e.file, "line": e.line, "col": e.col, "field": e.field,
                 "message": e.message} for e in errors]}))
            sys.exit(2)
        fail_input(exc)
        return
    summary: dict[str, Any] = {
        "valid": True,
        "services": sorted(bundle.services),
        "environments": sorted(bundle.environments),
        "infrastructures": sorted(bundle.infrastructures),
        "pipelines": sorted(bundle.pipelines),
        "inputs": [{"name": s.name, **({"default": s.options["default"]}
                                       if "default" in s.options else {})}
                   for s in bundle.inputs if "<+input>" in str(_value_at(s))],
    }
    if output == "json":
        out.print_json(json.dumps(summary))
        return
    out.print(Text.assemble(("valid", "green"), f": {len(bundle.documents)} document(s) in "
                            f"{len({d.file for d in bundle.documents})} file(s)"))
    for kind in ("services", "environments", "infrastructures", "pipelines"):
        if summary[kind]:
            out.print(f"  {kind}: {', '.join(summary[kind])}")
    for i in summary["inputs"]:
        out.print(f"  runtime input: {i['name']}" + (f" (default {i['default']})"
                                                      if "default" in i else
                                                      " (give it with --set)"))


def _value_at(slot: Any) -> Any:
    data = slot.doc.data
    for p in slot.path:
        data = data[p]
    return data


# --- run ------------------------------------------------------------------------------------------


@main.command()
@click.argument("files", nargs=-1, required=True, type=click.Path())
@click.option("--pipeline", "-p", help="Pipeline identifier (when the files define several).")
@click.option("--set", "sets", multiple=True, metavar="KEY=VALUE",
              help="Fill a runtime input <+input>; KEY may be the input's last name parts.")
@click.option("--inputs", "input_files", multiple=True, type=click.Path(), help=INPUTS_HELP)
@click.option("--watch/--detach", default=None,
              help="Show live progress (default on a terminal) or return after submitting.")
@output_option
def run(files: tuple[str, ...], pipeline: str | None, sets: tuple[str, ...],
        input_files: tuple[str, ...], watch: bool | None, output: str) -> None:
    """Run a pipeline. Exit 0 when it succeeds, 1 when it fails, 2 on bad input."""
    from app.coordinator import submit
    from app.settings import get_settings

    settings = get_settings()
    _refuse_detach_when_embedded(watch)
    try:
        inputs = gather_inputs(input_files, sets)
        execution_id = submit(files, pipeline=pipeline, inputs=inputs,
                              user=settings.user or os.environ.get("USER", ""), publish=False)
    except PermissionRefused as exc:
        _refused(exc)
    except (SpecError, SpecErrors, ConfigError, PolicyViolation) as exc:
        fail_input(exc)
        return
    _dispatch_and_watch(execution_id, watch=watch, output=output)


def _refuse_detach_when_embedded(watch: bool | None) -> None:
    from app.settings import get_settings

    if get_settings().embedded and watch is False:
        err.print("error: --detach needs a broker (VMFARM_BROKER_URL): in embedded mode the "
                  "worker lives in this process; nothing was run.")
        sys.exit(2)


def _dispatch_and_watch(execution_id: str, *, watch: bool | None, output: str) -> None:
    """Send a recorded execution's first work, then watch it (or return when detached)."""
    from app.coordinator import advance
    from app.settings import get_settings

    settings = get_settings()
    if output != "json":
        err.print(Text.assemble("execution ", (execution_id, "bold")))
    if settings.embedded:
        from app.worker import EmbeddedWorker

        with EmbeddedWorker(_regions_of(execution_id)):
            advance(execution_id)
            report = _wait(execution_id, live=_live(watch, output))
    else:
        advance(execution_id)
        if watch is False:
            if output == "json":
                out.print_json(json.dumps({"id": execution_id, "status": "RUNNING"}))
            else:
                out.print(execution_id)
            return
        report = _wait(execution_id, live=_live(watch, output))
    if output == "json":
        out.print_json(json.dumps(report))
    else:
        _print_summary(report)
    sys.exit(0 if report["status"] == "SUCCEEDED" else 1)


@main.command()
@click.argument("execution_id")
@click.option("--only-failed", is_flag=True, required=True,
              help="Re-run only the hosts that failed or never ran (required: say so).")
@click.option("--watch/--detach", default=None, help="As for run.")
@output_option
def retry(execution_id: str, only_failed: bool, watch: bool | None, output: str) -> None:
    """Re-run an ended execution on the hosts that did not succeed, as a new execution."""
    from app.coordinator import retry_failed
    from app.settings import get_settings

    _refuse_detach_when_embedded(watch)
    user = _guard("retry", execution_id)
    try:
        new_id = retry_failed(execution_id, publish=False,
                              user=get_settings().user or os.environ.get("USER", ""))
    except LookupError as exc:
        err.print(Text(f"error: {exc}", style="red"))
        sys.exit(2)
    _audit("retry", user, new_id, "submitted", retry_of=execution_id)
    if output != "json":
        err.print(f"retrying the failed hosts of {execution_id}")
    _dispatch_and_watch(new_id, watch=watch, output=output)


def _live(watch: bool | None, output: str) -> bool:
    if output == "json":
        return False
    return sys.stdout.isatty() if watch is None else watch


def _regions_of(execution_id: str) -> list[str]:
    from sqlmodel import select

    from app.db import session_scope
    from app.models import StageRun

    with session_scope() as s:
        runs = s.exec(select(StageRun).where(StageRun.execution_id == execution_id)).all()
        return sorted({h["region"] for r in runs for h in r.hosts}) or ["default"]


def _wait(execution_id: str, *, live: bool) -> dict[str, Any]:
    from app.models import Status

    if not live:
        # Poll the status column (one short query) and build the report once at the end:
        # a report of a large run costs tens of milliseconds.
        from app.settings import get_settings

        # Embedded, every read takes SQLite's write lock (BEGIN IMMEDIATE): ask less often.
        pause = 0.25 if get_settings().embedded else 0.1
        told = False
        status = _status_of(execution_id)
        while status not in Status.TERMINAL:
            time.sleep(pause)
            status = _status_of(execution_id) or status
            if status == Status.WAITING and not told:
                if _report(execution_id).get("intervention"):
                    err.print(f"execution {execution_id} waits for a manual intervention: "
                              f"vmfarm intervene {execution_id} ACTION")
                else:
                    err.print(f"execution {execution_id} is waiting for approval: "
                              f"vmfarm approve {execution_id} (or reject)")
                told = True
        return _report(execution_id)
    report = _report(execution_id)
    with Live(_render(report), console=out, refresh_per_second=8, transient=True) as view:
        while report["status"] not in Status.TERMINAL:
            time.sleep(0.25)
            report = _report(execution_id)
            view.update(_render(report))
    return report


def _status_of(execution_id: str) -> str:
    from sqlmodel import select

    from app.db import retrying, session_scope
    from app.models import Execution

    def read() -> str:
        with session_scope() as s:
            return s.exec(select(Execution.status).where(Execution.id == execution_id)).one()

    # A watcher outlives a ledger restart: it waits for the server instead of failing.
    return retrying(read, what="watching the execution")


def _report(execution_id: str) -> dict[str, Any]:
    from app.db import retrying
    from app.report import execution_report

    report = retrying(lambda: execution_report(execution_id), what="watching the execution")
    assert report is not None
    return report


def _styled(status: str) -> Text:
    return Text(status, style=STATUS_STYLE.get(status, ""))


def _render(report: dict[str, Any]) -> Group:
    parts: list[Any] = [Text.assemble("execution ", (report["id"], "bold"), "  ",
                                      _styled(report["status"]))]
    for st in report["stages"]:
        hosts = st["hosts"]
        done = sum(h["status"] in ("SUCCEEDED", "FAILED", "SKIPPED") for h in hosts)
        bar = Table.grid(padding=(0, 1))
        bar.add_row(Text.assemble(f"stage {st['identifier']} ", _styled(st["status"])),
                    ProgressBar(total=max(len(hosts), 1), completed=done, width=30),
                    Text(f"{done}/{len(hosts)} hosts"))
        parts.append(bar)
        if len(hosts) > 40:
            counts: dict[str, int] = {}
            for h in hosts:
                counts[h["status"]] = counts.get(h["status"], 0) + 1
            parts.append(Text("  " + "  ".join(f"{k}: {v}" for k, v in sorted(counts.items()))))
            hosts = [h for h in hosts if h["status"] in ("FAILED", "RUNNING")][:40]
        table = Table(box=None, pad_edge=False)
        table.add_column("host")
        table.add_column("region")
        for sid in st["steps"]:
            table.add_column(sid)
        for h in hosts:
            table.add_row(h["host"], h["region"], *[_styled(s["status"]) for s in h["steps"]])
        parts.append(table)
    return Group(*parts)


# Above this many hosts a stage is shown as a matrix of counts and failure groups.
MATRIX_FROM = 40


def _print_summary(report: dict[str, Any], *, every_host: bool = False) -> None:
    out.print(Text.assemble("execution ", (report["id"], "bold"), " ", _styled(report["status"])))
    for st in report["stages"]:
        if st.get("type") == "Approval":
            out.print(Text.assemble(f"stage {st['identifier']} (approval): ",
                                    _styled(st["status"])))
            _print_gates(st, only_failed=False)
            continue
        if len(st["hosts"]) > MATRIX_FROM and not every_host:
            _print_matrix(st)
            _print_gates(st, only_failed=True)
            continue
        table = Table(title=f"stage {st['identifier']} ({st['service']} -> "
                            f"{st['environment']}): {st['status']}", title_justify="left")
        rolled = any(h.get("rollback") for h in st["hosts"])
        for c in ("host", "region", "status", "version", "previous",
                  *(("rollback",) if rolled else ())):
            table.add_column(c, no_wrap=True)
        for h in st["hosts"]:
            rb = h.get("rollback") or {}
            extra = ([Text.assemble(_styled(rb["status"]), f" -> {rb.get('to') or 'nothing'}")
                      if rb else Text("")] if rolled else [])
            table.add_row(h["host"], h["region"], _styled(h["status"]), h["version"] or "",
                          h["previous_version"] or "", *extra)
        out.print(table)
        for h in st["hosts"]:
            rb = h.get("rollback") or {}
            if rb.get("status") == "ROLLBACK_FAILED":
                out.print(Text(f"  rollback of {h['host']}: step {rb.get('step')} failed: "
                               f"{rb.get('error')}", style="red"))
            elif rb.get("status") == "SKIPPED":
                out.print(f"  rollback of {h['host']}: nothing done: {rb.get('reason')}")
        # Failures as plain lines: readable in a CI log at any width.
        for h in st["hosts"]:
            bad = next((s for s in h["steps"] if s["status"] == "FAILED"), None)
            if bad:
                out.print(Text(f"  {h['host']} ({h['region']}): {_failure_detail(bad)}",
                               style="red"))
        _print_gates(st, only_failed=True)
    if report.get("intervention"):
        v = report["intervention"]
        out.print(Text(f"waiting for a manual intervention: {v.get('error')}; choose one of "
                       f"{', '.join(v.get('choices', []))} with vmfarm intervene "
                       f"{report['id']} ACTION (after {v.get('timeout')}: {v.get('on_timeout')})",
                       style="yellow"))
    if report.get("error"):
        out.print(Text(report["error"], style="red"))


def _print_gates(stage: dict[str, Any], *, only_failed: bool) -> None:
    """One line per phase verdict; for a failed gate, one line per failed host with its
    numbers."""
    names = {p["index"]: p["name"] for p in stage.get("plan", [])}
    for p in stage["phases"]:
        v = p.get("verdict") or {}
        if not v or (only_failed and v.get("passed")):
            continue
        if p["kind"] == "approval":
            _print_approval(p, only_failed=only_failed)
            continue
        name = names.get(p["phase"], f"phase {p['phase'] + 1}")
        what = {"deploy": "deploy", "verify": "verification", "switch": "traffic switch"}.get(
            p["kind"], p["kind"])
        if p["kind"] == "switch":
            detail = (f"live: {', '.join(v.get('backends', []))}" if v.get("passed")
                      else v.get("error", ""))
            out.print(Text(f"  {what} of {name}: {'passed' if v.get('passed') else 'FAILED'}"
                           f" ({detail})", style="" if v.get("passed") else "red"))
            continue
        out.print(Text(f"  {what} of {name}: {'passed' if v.get('passed') else 'FAILED'} "
                       f"({v.get('succeeded')}/{v.get('hosts')} hosts passed; {v.get('rule')})",
                       style="" if v.get("passed") else "red"))
        for reason in v.get("reasons") or []:
            out.print(Text(f"    {reason}", style="red"))
        for host, c in (v.get("checks") or {}).items():
            numbers = _check_numbers(c.get("results") or {})
            if not c.get("passed"):
                out.print(Text(f"    {host}: {'; '.join(c.get('reasons') or [])}"
                               + (f" [{numbers}]" if numbers else ""), style="red"))
            elif not only_failed and numbers:
                out.print(f"    {host}: {numbers}")


def _print_approval(p: dict[str, Any], *, only_failed: bool) -> None:
    v = p.get("verdict") or {}
    names = ", ".join(a["user"] for a in v.get("approvals", [])) or "nobody yet"
    if p["status"] == "RUNNING":
        out.print(Text(f"  waiting for approval: {v.get('message', '')} — "
                       f"{len(v.get('approvals', []))} of {v.get('required')} approvals "
                       f"({names}); approvers: {', '.join(v.get('groups', []))}",
                       style="yellow"))
    elif p["status"] == "FAILED":
        out.print(Text(f"  approval FAILED: {v.get('reason', '')}", style="red"))
    elif not only_failed:
        out.print(f"  approved by {names}")


def _check_numbers(results: dict[str, Any]) -> str:
    parts = []
    health = results.get("health") or {}
    if health:
        parts.append(f"health {health.get('status_code') or health.get('error') or '-'} in "
                     f"{health.get('attempts')} attempt(s)")
    pr = results.get("probe") or {}
    if pr:
        rate = pr.get("error_rate")
        parts.append(f"{pr.get('requests')} requests")
        if isinstance(rate, int | float):
            parts.append(f"error rate {rate * 100:.1f}%")
        for q in ("p50", "p95", "p99"):
            key = next((k for k in pr if k.startswith(q)), None)
            if key and pr.get(key) is not None:
                parts.append(f"{q} {float(pr[key]):.0f} ms")
    return ", ".join(p for p in parts if p)


def _signature(text: str, host: dict[str, Any]) -> str:
    """An error with the host's own name and address taken out, so that one error on many
    hosts is one group."""
    import re

    for name in {host["host"], *(str(s.get("host", "")) for s in host["steps"])} - {""}:
        text = text.replace(name, "<host>")
    return re.sub(r"\b\d{1,3}(\.\d{1,3}){3}\b", "<ip>", text)


def _print_matrix(st: dict[str, Any]) -> None:
    """A large stage on one screen: per step, how many hosts ended how; then the hosts that
    did not succeed, grouped by error, a few named per group."""
    title = (f"stage {st['identifier']} ({st['service']} -> {st['environment']}): "
             f"{st['status']}, {len(st['hosts'])} hosts")
    states = ["SUCCEEDED", "FAILED", "IGNORED", "SKIPPED", "ABORTED", "RUNNING", "PENDING"]
    table = Table(title=title, title_justify="left")
    table.add_column("step")
    for state in states:
        table.add_column(state.lower(), justify="right")
    for i, step_id in enumerate(st["steps"]):
        counts = {x: 0 for x in states}
        for h in st["hosts"]:
            state = h["steps"][i]["status"] if i < len(h["steps"]) else "PENDING"
            counts[state] = counts.get(state, 0) + 1
        table.add_row(step_id, *[str(counts[x]) if counts[x] else "" for x in states])
    out.print(table)
    by_status: dict[str, int] = {}
    versions: dict[str, int] = {}
    for h in st["hosts"]:
        by_status[h["status"]] = by_status.get(h["status"], 0) + 1
        versions[str(h["version"])] = versions.get(str(h["version"]), 0) + 1
    out.print("  hosts: " + ", ".join(f"{n} {k.lower()}" for k, n in sorted(by_status.items()))
              + "; versions: " + ", ".join(f"{v} on {n}" for v, n in sorted(versions.items())))
    groups: dict[str, list[str]] = {}
    for h in st["hosts"]:
        bad = next((x for x in h["steps"] if x["status"] in ("FAILED", "ABORTED")), None)
        if bad is not None:
            groups.setdefault(_signature(_failure_detail(bad), h), []).append(h["host"])
        rb = h.get("rollback") or {}
        if rb.get("status") == "ROLLBACK_FAILED":
            key = _signature(f"rollback step {rb.get('step')} failed: {rb.get('error')}", h)
            groups.setdefault(key, []).append(h["host"])
    for detail, names in sorted(groups.items(), key=lambda kv: -len(kv[1]))[:10]:
        shown = ", ".join(names[:6]) + (f" (+{len(names) - 6} more)" if len(names) > 6 else "")
        out.print(Text(f"  {len(names)} host(s): {detail}: {shown}", style="red"))
    if len(groups) > 10:
        out.print(f"  ... {len(groups) - 10} more kinds of failure (vmfarm status -o json)")


def _failure_detail(step: dict[str, Any]) -> str:
    """``step check, unit check, exit 3: <last stderr line>`` or the error message."""
    parts = [f"step {step['step']}"]
    if step.get("failed_unit"):
        parts.append(f"unit {step['failed_unit']}")
    if step.get("exit_code") is not None:
        parts.append(f"exit {step['exit_code']}")
    detail = ", ".join(parts)
    tail = (step.get("stderr_tail") or "").strip().splitlines()
    if tail:
        return f"{detail}: {tail[-1][:200]}"
    if step.get("error"):
        return f"{detail}: {step['error']}"
    return detail


# --- plan -----------------------------------------------------------------------------------------


@main.command("plan")
@click.argument("files", nargs=-1, required=True, type=click.Path())
@click.option("--pipeline", "-p", help="Pipeline identifier (when the files define several).")
@click.option("--set", "sets", multiple=True, metavar="KEY=VALUE", help="Fill a runtime input.")
@click.option("--inputs", "input_files", multiple=True, type=click.Path(), help=INPUTS_HELP)
@output_option
def plan_cmd(files: tuple[str, ...], pipeline: str | None, sets: tuple[str, ...],
             input_files: tuple[str, ...], output: str) -> None:
    """Dry run: hosts per region, phases, rendered command units, failure policy. Touches no
    host and records nothing."""
    from app.coordinator import dry_run

    try:
        result = dry_run(files, pipeline=pipeline, inputs=gather_inputs(input_files, sets))
    except (SpecError, SpecErrors, ConfigError) as exc:
        fail_input(exc)
        return
    if output == "json":
        out.print_json(json.dumps(result))
        return
    out.print(Text.assemble("pipeline ", (result["pipeline"], "bold"), f" ({result['name']})"))
    for st in result["stages"]:
        if st.get("type") == "Approval":
            out.print(Text.assemble("\nstage ", (st["identifier"], "bold"),
                                    f": approval, {st['summary']}"))
            continue
        strategy = st["strategy"]
        out.print(Text.assemble("\nstage ", (st["identifier"], "bold"),
                                f": {st['service']} {st['version'] or ''} -> "
                                f"{st['environment']}, strategy {strategy.get('type')}"))
        hosts = st["hosts_by_region"]
        if isinstance(hosts, dict):
            for region, names in hosts.items():
                out.print(f"  region {region} (queue vmfarm.{region}): {len(names)} host(s): "
                          + ", ".join(names))
        else:
            out.print(f"  hosts: {hosts}")
        for p in st["phases"]:
            gate = " -> verification gate" if p["verify"] else ""
            verb = "switch traffic to" if p["kind"] == "switch" else "deploy to"
            out.print(f"  {p['name']}: {verb} {len(p['hosts'])} host(s): "
                      f"{', '.join(p['hosts'])}{gate}")
        for note in st["notes"]:
            out.print(f"  note: {note}")
        if st["rendered_for"]:
            out.print(f"  steps, rendered for {st['rendered_for']}:")
        for step in st["steps"]:
            out.print(Text(f"  - {step['identifier']} ({step['type']}"
                           + (", on the delegate" if step.get("onDelegate") else "") + ")",
                           style="bold"))
            for k, v in (step.get("environment") or {}).items():
                out.print(f"      env {k}={v}")
            if step.get("check"):
                out.print(f"      check: {step['check']}")
            for u in step.get("units", []):
                if u["type"] == "Copy":
                    out.print(f"      [{u['identifier']}] copy {u['source']} -> "
                              f"{u['destination']}")
                    continue
                out.print(f"      [{u['identifier']}] script:")
                for line in u["script"].rstrip("\n").splitlines():
                    out.print(Text(f"        {line}"))
                for k, v in u["values"].items():
                    out.print(f"        (with {k}={v!r})")
        out.print(f"  on failure: {st['on_failure']}")


# --- status / logs --------------------------------------------------------------------------------


@main.command()
@click.argument("execution_id")
@click.option("--all-hosts", is_flag=True,
              help=f"One line per host even for stages of more than {MATRIX_FROM} hosts.")
@output_option
def status(execution_id: str, all_hosts: bool, output: str) -> None:
    """Show an execution: stages, phases and every host's outcome (large stages as a matrix
    of counts, failed hosts grouped by error)."""
    from app.report import execution_report

    report = execution_report(execution_id)
    if report is None:
        err.print(f"error: no execution '{execution_id}'")
        sys.exit(2)
    if output == "json":
        out.print_json(json.dumps(report))
    else:
        _print_summary(report, every_host=all_hosts)
        for st in report["stages"]:
            if st.get("type") == "Approval" or not st["phases"]:
                continue  # the summary above already shows it
            out.print(f"stage {st['identifier']} gates:")
            _print_gates(st, only_failed=False)


@main.command()
@click.argument("execution_id")
@click.option("--host", help="Only this host.")
@click.option("--step", help="Only this step identifier.")
@output_option
def logs(execution_id: str, host: str | None, step: str | None, output: str) -> None:
    """Print the output of an execution's steps, host by host."""
    from app.report import execution_logs

    chunks = execution_logs(execution_id, host=host, step=step)
    if output == "json":
        out.print_json(json.dumps(chunks))
        return
    if not chunks:
        err.print("no log output recorded for that selection")
    for c in chunks:
        where = f"{c['step']}/{c['unit']}" + (" (rollback)" if c.get("kind") == "rollback" else "")
        prefix = f"[{c['host']} {where}]"
        for line in c["text"].splitlines():
            if c["stream"] == "stderr":
                out.print(Text(f"{prefix} {line}", style="red"))
            else:
                out.print(Text(f"{prefix} {line}"))


@main.command()
@click.option("--limit", default=20, show_default=True)
@click.option("--status", "statuses", multiple=True, metavar="S",
              help="Only executions in this status (repeatable): RUNNING, FAILED, WAITING...")
@output_option
def executions(limit: int, statuses: tuple[str, ...], output: str) -> None:
    """List recent executions (newest first)."""
    from app.report import recent_executions

    rows = recent_executions(limit, statuses=[x.upper() for x in statuses])
    data = [{"id": e.id, "pipeline": e.pipeline, "status": e.status,
             "created_at": e.created_at.isoformat() + "Z", "created_by": e.created_by}
            for e in rows]
    if output == "json":
        out.print_json(json.dumps(data))
        return
    table = Table()
    for c in ("id", "pipeline", "status", "created", "by"):
        table.add_column(c)
    for d in data:
        table.add_row(d["id"], d["pipeline"], _styled(d["status"]), d["created_at"],
                      d["created_by"])
    out.print(table)


def _decide(execution_id: str, comment: str, *, approve: bool) -> None:
    from app.coordinator import ApprovalRefused, decide_approval
    from app.settings import get_settings

    action = "approve" if approve else "reject"
    user = _guard(action, execution_id) or get_settings().user or ""
    try:
        outcome = decide_approval(execution_id, user=user, approve=approve, comment=comment)
    except ApprovalRefused as exc:
        _audit(action, user, execution_id, "refused", reason=str(exc))
        err.print(Text(f"refused: {exc}", style="red"))
        sys.exit(3)
    except (LookupError, ConfigError) as exc:
        err.print(Text(f"error: {exc}", style="red"))
        sys.exit(2)
    _audit(action, user, execution_id, "approved" if approve else "rejected", comment=comment)
    out.print(f"execution {execution_id}: {outcome}")


@main.command()
@click.argument("execution_id")
@click.option("--comment", "-m", default="", help="Why (kept with the approval).")
def approve(execution_id: str, comment: str) -> None:
    """Approve an execution waiting in an Approval stage (identity: VMFARM_USER). Exit 3 when
    you may not."""
    _decide(execution_id, comment, approve=True)


@main.command()
@click.argument("execution_id")
@click.option("--comment", "-m", default="", help="Why (kept with the rejection).")
def reject(execution_id: str, comment: str) -> None:
    """Reject an execution waiting in an Approval stage: it fails (ApprovalRejection)."""
    _decide(execution_id, comment, approve=False)


@main.command()
@click.argument("execution_id")
@click.option("--rollback", is_flag=True,
              help="Then roll back the hosts the current stage changed (rollback phases in "
                   "reverse order, as its failure strategy would).")
def abort(execution_id: str, rollback: bool) -> None:
    """Stop an execution: no new work is sent; running hosts stop at their next unit."""
    from app.coordinator import abort as do_abort

    user = _guard("abort", execution_id)
    if rollback:
        _guard("rollback", execution_id)
    result = do_abort(execution_id, user=user, rollback=rollback)
    if result == "missing":
        err.print(f"error: no execution '{execution_id}'")
        sys.exit(2)
    _audit("abort", user, execution_id, result, rollback=rollback)
    if result not in ("aborted", "rolling back"):
        out.print(f"execution {execution_id} already ended: {result}")
        return
    then = ("; then the hosts the stage changed roll back (vmfarm status shows it)"
            if result == "rolling back" else "")
    out.print(f"execution {execution_id} aborted: no new work is sent; running hosts stop at "
              f"their next command unit{then}")


@main.command()
@click.argument("execution_id")
@click.argument("action", type=click.Choice(["Abort", "StageRollback", "PipelineRollback",
                                             "MarkAsSuccess", "Ignore", "MarkAsFailure"]))
@click.option("--comment", "-m", default="", help="Why (kept with the decision).")
def intervene(execution_id: str, action: str, comment: str) -> None:
    """Answer a ManualIntervention failure strategy: what the paused stage does now."""
    from app.coordinator import ApprovalRefused
    from app.coordinator import intervene as do_intervene
    from app.settings import get_settings

    user = _guard("intervene", execution_id) or get_settings().user or ""
    try:
        outcome = do_intervene(execution_id, action=action, user=user, comment=comment)
    except (LookupError, ApprovalRefused) as exc:
        err.print(Text(f"error: {exc}", style="red"))
        sys.exit(2)
    _audit("intervene", user, execution_id, action, chosen=action, comment=comment)
    out.print(f"execution {execution_id}: {outcome}")


@main.command()
@click.argument("execution_id")
@click.option("--plan", "show_plan", is_flag=True,
              help="Print what would be rolled back (hosts, versions, order) and stop.")
@click.option("--watch/--detach", default=None, help="As for run.")
@output_option
def rollback(execution_id: str, show_plan: bool, watch: bool | None, output: str) -> None:
    """Roll a successful execution back: every host it changed returns to its previous
    version (its stages' rollbackSteps, or the previous version's own steps), as a new
    execution. Exit 0 when every host rolled back."""
    from app.coordinator import rollback_execution, rollback_plan
    from app.settings import get_settings

    user = _guard("view" if show_plan else "rollback", execution_id)
    try:
        if show_plan:
            preview = rollback_plan(execution_id)
            _print_rollback_plan(preview, output)
            return
        _refuse_detach_when_embedded(watch)
        new_id = rollback_execution(execution_id, publish=False,
                                    user=user or get_settings().user or "")
    except LookupError as exc:
        err.print(Text(f"error: {exc}", style="red"))
        sys.exit(2)
    _audit("rollback", user, new_id, "submitted", rollback_of=execution_id)
    if output != "json":
        err.print(f"rolling back {execution_id}")
    _dispatch_and_watch(new_id, watch=watch, output=output)


def _print_rollback_plan(preview: dict[str, Any], output: str) -> None:
    if output == "json":
        out.print_json(json.dumps(preview))
        return
    out.print(f"rollback of execution {preview['execution']} ({preview['pipeline']}), "
              "latest stage first; nothing has run")
    for st in preview["stages"]:
        out.print(f"stage {st['stage']} ({st['service']} in {st['environment']}):")
        for ph in st["phases_in_order"]:
            out.print(f"  {ph['phase']}: {', '.join(ph['hosts']) or 'no changed host'}")
        table = Table(box=None)
        for c in ("host", "region", "from", "to", "how"):
            table.add_column(c)
        for h in st["hosts"]:
            table.add_row(h["host"], h["region"], str(h["from"]), str(h["to"]),
                          h["how"] or f"left as is: {h['skipped']}")
        out.print(table)


@main.command()
@click.argument("service")
@click.option("--env", "environment", help="Only this environment (identifier).")
@output_option
def artifacts(service: str, environment: str | None, output: str) -> None:
    """Which version of SERVICE runs where: per host its current and previous version and the
    releases it still holds (a rollback to one of them fetches nothing)."""
    from sqlmodel import col, select

    from app.db import session_scope
    from app.models import Instance

    with session_scope() as s:
        q = select(Instance).where(Instance.service == service)
        if environment:
            q = q.where(Instance.environment == environment)
        rows = s.exec(q.order_by(col(Instance.environment), col(Instance.host))).all()
        data: list[dict[str, Any]] = [{"environment": i.environment,
                                       "infrastructure": i.infrastructure,
                 "host": i.host, "region": i.region, "version": i.version,
                 "previous_version": i.previous_version, "releases": i.releases or [],
                 "execution": i.execution_id,
                 "updated_at": i.updated_at.isoformat(timespec="seconds") + "Z"}
                for i in rows]
    if output == "json":
        out.print_json(json.dumps({"service": service, "instances": data}))
        return
    if not data:
        err.print(f"no host runs service '{service}'" + (f" in {environment}" if environment
                                                          else ""))
        return
    versions: dict[str, int] = {}
    for d in data:
        versions[str(d["version"])] = versions.get(str(d["version"]), 0) + 1
    out.print(f"service {service}: " + ", ".join(f"{v} on {n} host(s)"
                                                 for v, n in sorted(versions.items())))
    table = Table(box=None)
    for c in ("environment", "host", "region", "version", "previous", "releases on host"):
        table.add_column(c)
    for d in data:
        table.add_row(d["environment"], d["host"], d["region"], str(d["version"]),
                      str(d["previous_version"] or ""), " ".join(d["releases"]))
    out.print(table)


@main.command()
@output_option
def reconcile(output: str) -> None:
    """Turn lost workers and unclaimed work into failures and move executions on (what the
    periodic reconciler does; safe to run at any time)."""
    from app.coordinator import reconcile as do_reconcile

    actions = do_reconcile()
    if output == "json":
        out.print_json(json.dumps({"actions": actions}))
        return
    for a in actions:
        out.print(a)
    if not actions:
        out.print("nothing to reconcile")


# --- worker ---------------------------------------------------------------------------------------


@main.command()
@click.option("--region", "regions", multiple=True, help="Consume vmfarm.<region> (repeatable).")
@click.option("--control", is_flag=True, help="Also (or only) consume vmfarm.control.")
@click.option("--concurrency", "-c", type=int, help="Parallel tasks (threads for regions).")
@click.option("--loglevel", "-l", default="INFO", show_default=True)
@click.option("--name", "-n", help="Worker node name (default vmfarm-<region>@<host>).")
@click.option("--beat", is_flag=True,
              help="Also run the periodic reconciler (Celery beat); run exactly one.")
def worker(regions: tuple[str, ...], control: bool, concurrency: int | None, loglevel: str,
           name: str | None, beat: bool) -> None:
    """Run a Celery worker for one or more regions (a delegate) and/or the control queue."""
    from app.settings import get_settings
    from app.worker import run_worker

    if not regions and not control:
        raise click.UsageError("give --region R (repeatable) and/or --control")
    if get_settings().embedded:
        err.print("error: a standalone worker needs a broker: set VMFARM_BROKER_URL "
                  "(e.g. redis://127.0.0.1:6379/0)")
        sys.exit(2)
    try:
        run_worker(regions=list(regions), control=control, concurrency=concurrency,
                   loglevel=loglevel, name=name, beat=beat)
    except ValueError as exc:
        raise click.BadParameter(str(exc), param_hint="--region") from None


# --- lab ------------------------------------------------------------------------------------------


@main.group()
def lab() -> None:
    """A local lab of real OpenSSH hosts on 127.0.1.x (needs root and openssh-server)."""


def _lab_root() -> Path:
    from app.settings import get_settings

    return get_settings().home_dir / "lab"


def _lab_json(state: Any) -> dict[str, Any]:
    return {"mode": state.mode, "reason": state.reason,
            "infrastructure_file": str(state.infrastructure_file),
            "hosts": [{"num": h.num, "address": h.address, "port": h.port, "region": h.region,
                       "pid": h.pid, "alive": h.alive} for h in state.hosts]}


def _print_lab(state: Any) -> None:
    table = Table(title=f"lab ({state.mode})", title_justify="left")
    for c in ("host", "region", "pid", "alive"):
        table.add_column(c)
    for h in state.hosts:
        table.add_row(f"{h.address}:{h.port}", h.region, str(h.pid or ""),
                      Text("yes", style="green") if h.alive else Text("no", style="red"))
    out.print(table)
    if state.reason:
        out.print(Text(state.reason, style="yellow"))
    out.print(f"infrastructure file: {state.infrastructure_file}")


def _show_lab(action: Callable[[], Any], output: str) -> None:
    """Run a lab action and print the lab it leaves; a LabError exits 1 with its message."""
    try:
        state = action()
    except LabError as exc:
        err.print(Text(f"error: {exc}", style="red"))
        sys.exit(1)
    if output == "json":
        out.print_json(json.dumps(_lab_json(state)))
    else:
        _print_lab(state)


@lab.command("up")
@click.option("--hosts", "n", type=click.IntRange(1, 250), default=5, show_default=True)
@click.option("--regions", default="local", show_default=True,
              help="Comma-separated regions, assigned to hosts in turn.")
@click.option("--sandbox/--ssh", "sandbox", default=None,
              help="Force local sandbox hosts (no sshd) or real sshd hosts; default: sshd "
                   "when possible.")
@click.option("--first", type=click.IntRange(1, 254), default=1, show_default=True,
              help="Address of the first host: 127.0.1.FIRST (run several labs side by side).")
@output_option
def lab_up_cmd(n: int, regions: str, sandbox: bool | None, first: int, output: str) -> None:
    """Start N lab hosts and write their Infrastructure file."""
    from app.lab import lab_up

    _show_lab(lambda: lab_up(n, root=_lab_root(), sandbox=sandbox, first=first,
                             regions=[r.strip() for r in regions.split(",") if r.strip()]),
              output)


@lab.command("status")
@output_option
def lab_status_cmd(output: str) -> None:
    """Show the lab hosts and whether they are alive."""
    from app.lab import lab_status

    _show_lab(lambda: lab_status(root=_lab_root()), output)


@lab.command("down")
def lab_down_cmd() -> None:
    """Stop exactly the lab processes that `lab up` started."""
    from app.lab import lab_down

    try:
        n = lab_down(root=_lab_root())
    except LabError as exc:
        err.print(Text(f"error: {exc}", style="red"))
        sys.exit(1)
    out.print(f"stopped {n} lab process(es)")


from cli import fleet as _fleet  # noqa: E402
from cli import governance_cmd as _gov  # noqa: E402
from cli import ops_cmd as _ops  # noqa: E402
from cli import secrets_cmd as _secrets  # noqa: E402
from cli import server_cmd as _server  # noqa: E402
from cli import service_cmd as _service  # noqa: E402

_fleet.register(main)
_gov.register(main)
_ops.register(main)
_secrets.register(main)
_service.register(main)
_server.register(main)

def entry() -> None:
    """The `vmfarm` command: the click group, then a quick exit (freezing the heap skips the
    collector's walk over every object at interpreter shutdown, ~0.4 s)."""
    import gc

    try:
        main()
    finally:
        gc.freeze()


if __name__ == "__main__":
    entry()
