"""How executions and plans look on a terminal: the live view of a run, the summary of an
ended execution (a matrix of counts for stages of more than ``MATRIX_FROM`` hosts), phase
verdicts, ``vmfarm plan`` and the preview of ``vmfarm rollback --plan``. Everything is printed
to ``cli.console.out``; ``-o json`` prints the report itself instead.
"""

from __future__ import annotations

from typing import Any

from rich.console import Group
from rich.progress_bar import ProgressBar
from rich.table import Table
from rich.text import Text

from cli.console import out, styled

# Above this many hosts a stage is shown as a matrix of counts and failure groups.
MATRIX_FROM = 40


def _named(st: dict[str, Any]) -> str:
    """A stage as status names it: its identifier, and which iteration of a loop it is."""
    loop = st.get("loop")
    return f"{st['identifier']} [{loop}]" if loop else str(st["identifier"])


def live_view(report: dict[str, Any]) -> Group:
    """The live view of ``vmfarm run --watch``: a progress bar and a host table per stage."""
    parts: list[Any] = [
        Text.assemble("execution ", (report["id"], "bold"), "  ", styled(report["status"]))
    ]
    for st in report["stages"]:
        if st.get("type") == "Pipeline":  # its hosts are the child's: follow it there
            child = st.get("child_execution")
            parts.append(
                Text.assemble(
                    f"stage {_named(st)} ",
                    styled(st["status"]),
                    f"  child execution {child['id']} ({child['pipeline']}) " if child else "",
                    styled(child["status"]) if child else "",
                )
            )
            continue
        hosts = st["hosts"]
        done = sum(h["status"] in ("SUCCEEDED", "FAILED", "SKIPPED") for h in hosts)
        bar = Table.grid(padding=(0, 1))
        bar.add_row(
            Text.assemble(f"stage {_named(st)} ", styled(st["status"])),
            ProgressBar(total=max(len(hosts), 1), completed=done, width=30),
            Text(f"{done}/{len(hosts)} hosts"),
        )
        parts.append(bar)
        if len(hosts) > MATRIX_FROM:
            counts: dict[str, int] = {}
            for h in hosts:
                counts[h["status"]] = counts.get(h["status"], 0) + 1
            parts.append(Text("  " + "  ".join(f"{k}: {v}" for k, v in sorted(counts.items()))))
            hosts = [h for h in hosts if h["status"] in ("FAILED", "RUNNING")][:MATRIX_FROM]
        table = Table(box=None, pad_edge=False)
        table.add_column("host")
        table.add_column("region")
        for sid in st["steps"]:
            table.add_column(sid)
        for h in hosts:
            table.add_row(h["host"], h["region"], *[styled(s["status"]) for s in h["steps"]])
        parts.append(table)
        parts.extend(Text(line, style=style) for line, style in watch_lines(st.get("watch")))
    return Group(*parts)


def watch_lines(w: dict[str, Any] | None) -> list[tuple[str, str]]:
    """The watch after deployment (a stage's rollbackStrategy.triggers), as (line, style):
    its state, window end, and each trigger's last and worst numbers."""
    if not w:
        return []
    if w.get("state") == "not started":
        return [("  watch after deployment: starts when the last phase has passed", "")]
    status = w.get("status")
    span = f"window {w.get('window'):g}s, {w.get('checks', 0)} check(s)"
    if status == "RUNNING":
        head = (
            f"  watch after deployment: WATCHING until {w.get('ends_at')} ({span}; the "
            "execution ends with it)"
        )
        style = "yellow"
    elif status == "SUCCEEDED":
        head, style = f"  watch after deployment: passed ({span})", "green"
    elif status == "FAILED":
        head, style = f"  watch after deployment: BREACHED, stage rolled back ({span})", "red"
    else:
        head, style = f"  watch after deployment: {status} ({span})", ""
    lines = [(head, style)]
    for trig in w.get("triggers") or []:
        if trig.get("summary"):
            bad = trig.get("state") == "breached"
            lines.append((f"    {trig['summary']}", "red" if bad else ""))
    lines.extend((f"    {r}", "red") for r in w.get("reasons") or [])
    health = ((w.get("last") or {}).get("health") or {}).get("failed") or {}
    lines.extend((f"    {h}: health check failed: {e}", "red") for h, e in health.items())
    return lines


def print_summary(report: dict[str, Any], *, every_host: bool = False) -> None:
    """An ended (or waiting) execution: per stage its hosts, failures and gates."""
    out.print(Text.assemble("execution ", (report["id"], "bold"), " ", styled(report["status"])))
    parent = report.get("parent")
    if parent:
        out.print(f"  run by execution {parent['id']}, stage {parent['stage']} (a Pipeline stage)")
    for st in report["stages"]:
        if st["status"] == "SKIPPED" and st.get("error"):
            out.print(
                Text.assemble(f"stage {_named(st)}: ", styled(st["status"]), f" ({st['error']})")
            )  # its when, or a failed stage
            continue
        if st.get("type") == "Approval":
            out.print(Text.assemble(f"stage {st['identifier']} (approval): ", styled(st["status"])))
            print_gates(st, only_failed=False)
            continue
        if st.get("type") == "Custom":
            _print_custom(st)
            continue
        if st.get("type") == "Pipeline":
            child = st.get("child_execution")
            out.print(
                Text.assemble(
                    f"stage {_named(st)} (pipeline): ",
                    styled(st["status"]),
                    *(
                        (" child execution ", (child["id"], "bold"), f" ({child['pipeline']}) ")
                        if child
                        else (" no child execution yet",)
                    ),
                    *((styled(child["status"]),) if child else ()),
                )
            )
            if st.get("error"):
                out.print(Text(f"  {st['error']}", style="red"))
            continue
        if len(st["hosts"]) > MATRIX_FROM and not every_host:
            _print_matrix(st)
            print_discovery(st)
            print_gates(st, only_failed=True)
            for line, style in watch_lines(st.get("watch")):
                out.print(Text(line, style=style))
            continue
        table = Table(
            title=f"stage {_named(st)} ({st['service']} -> {st['environment']}): {st['status']}",
            title_justify="left",
        )
        rolled = any(h.get("rollback") for h in st["hosts"])
        for c in (
            "host",
            "region",
            "status",
            "version",
            "previous",
            *(("rollback",) if rolled else ()),
        ):
            table.add_column(c, no_wrap=True)
        for h in st["hosts"]:
            rb = h.get("rollback") or {}
            extra = (
                [
                    Text.assemble(styled(rb["status"]), f" -> {rb.get('to') or 'nothing'}")
                    if rb
                    else Text("")
                ]
                if rolled
                else []
            )
            table.add_row(
                h["host"],
                h["region"],
                styled(h["status"]),
                h["version"] or "",
                h["previous_version"] or "",
                *extra,
            )
        out.print(table)
        print_discovery(st)
        for h in st["hosts"]:
            rb = h.get("rollback") or {}
            if rb.get("status") == "ROLLBACK_FAILED":
                out.print(
                    Text(
                        f"  rollback of {h['host']}: step {rb.get('step')} failed: "
                        f"{rb.get('error')}",
                        style="red",
                    )
                )
            elif rb.get("status") == "SKIPPED":
                out.print(f"  rollback of {h['host']}: nothing done: {rb.get('reason')}")
        for h in st["hosts"]:  # retried steps: every attempt, the last one first
            for s in h["steps"]:
                if len(s.get("attempts") or []) > 1:
                    out.print(f"  {h['host']} ({h['region']}): step {s['step']} {attempts_line(s)}")
        # Failures as plain lines: readable in a CI log at any width.
        for h in st["hosts"]:
            bad = next((s for s in h["steps"] if s["status"] == "FAILED"), None)
            if bad:
                out.print(
                    Text(f"  {h['host']} ({h['region']}): {_failure_detail(bad)}", style="red")
                )
        print_gates(st, only_failed=True)
        for line, style in watch_lines(st.get("watch")):
            out.print(Text(line, style=style))
    if report.get("intervention"):
        v = report["intervention"]
        out.print(
            Text(
                f"waiting for a manual intervention: {v.get('error')}; choose one of "
                f"{', '.join(v.get('choices', []))} with vmfarm intervene "
                f"{report['id']} ACTION (after {v.get('timeout')}: {v.get('on_timeout')})",
                style="yellow",
            )
        )
    if report.get("error"):
        out.print(Text(report["error"], style="red"))


def _print_custom(st: dict[str, Any]) -> None:
    """A Custom stage: its steps on the delegate, one row each (status, worker, outputs)."""
    table = Table(
        title=f"stage {_named(st)} (custom, on the delegate): {st['status']}",
        title_justify="left",
    )
    for c in ("step", "status", "worker", "outputs"):
        table.add_column(c, no_wrap=c != "outputs")
    for h in st["hosts"]:
        for s in h["steps"]:
            shown = ", ".join(f"{k}={v}" for k, v in (s.get("outputs") or {}).items())
            table.add_row(s["step"], styled(s["status"]), s.get("worker") or "", shown)
    out.print(table)
    for h in st["hosts"]:
        bad = next((s for s in h["steps"] if s["status"] == "FAILED"), None)
        if bad:
            out.print(Text(f"  {bad['step']}: {_failure_detail(bad)}", style="red"))
    print_gates(st, only_failed=True)


def _workers(found: list[dict[str, Any]]) -> str:
    return ", ".join(
        f"{w.get('worker') or 'a worker'} ({w.get('queue') or 'no queue'})" for w in found
    )


def print_discovery(stage: dict[str, Any]) -> None:
    """How the stage's hosts were listed by the region workers (nothing for static hosts)."""
    d = stage.get("discovery")
    if not d:
        return
    if d["status"] == "FAILED":
        where = f" on {_workers(d['workers'])}" if d["workers"] else ""
        out.print(
            Text(
                f"  discovery FAILED{where}: {d.get('error') or 'no reason recorded'}", style="red"
            )
        )
    elif d["status"] == "SUCCEEDED":
        out.print(f"  discovery: {d['hosts']} host(s) listed by {_workers(d['workers'])}")
    else:
        queues = sorted(
            {
                f"vmfarm.{i['region']}" + (f"[{','.join(i['tags'])}]" if i.get("tags") else "")
                for i in d["infrastructures"]
            }
        )
        out.print(Text(f"  discovery: waiting for a worker on {', '.join(queues)}", style="yellow"))


def gate_phases(stage: dict[str, Any]) -> list[dict[str, Any]]:
    """The stage's phase records that are verdicts (not discovery, not an intervention)."""
    return [
        p
        for p in stage["phases"]
        if p["kind"] not in ("discover", "watch") and not p["kind"].startswith("mi-")
    ]


def print_gates(stage: dict[str, Any], *, only_failed: bool) -> None:
    """One line per phase verdict; for a failed gate, one line per failed host with its
    numbers. Discovery is not a gate (``print_discovery``); a manual intervention shows who
    chose what."""
    names = {p["index"]: p["name"] for p in stage.get("plan", [])}
    for p in stage["phases"]:
        v = p.get("verdict") or {}
        if p["kind"] in ("discover", "watch"):  # watch: watch_lines
            continue
        if p["kind"].startswith("mi-"):
            if not only_failed and v.get("chosen"):
                why = f" ({v['comment']})" if v.get("comment") else ""
                who = (
                    f"after the {v.get('timeout')} timeout"
                    if v.get("by") == "timeout"
                    else f"by {v.get('by')}"
                )
                out.print(f"  manual intervention: {v['chosen']} chosen {who}{why}")
            continue
        # A canary analysis is shown passed or not: its numbers are what the user reads.
        if not v or (only_failed and v.get("passed") and not v.get("analysis")):
            continue
        if p["kind"] == "approval":
            _print_approval(p, only_failed=only_failed)
            continue
        if p["kind"] == "deploy" and "passed" not in v:
            continue  # not judged yet (a Wait step's timer note)
        name = names.get(p["phase"], f"phase {p['phase'] + 1}")
        what = {"deploy": "deploy", "verify": "verification", "switch": "traffic switch"}.get(
            p["kind"], p["kind"]
        )
        if p["kind"] == "switch":
            detail = (
                f"live: {', '.join(v.get('backends', []))}"
                if v.get("passed")
                else v.get("error", "")
            )
            out.print(
                Text(
                    f"  {what} of {name}: {'passed' if v.get('passed') else 'FAILED'} ({detail})",
                    style="" if v.get("passed") else "red",
                )
            )
            continue
        checks = " their checks" if v.get("analysis") else ""  # the analysis says the rest
        out.print(
            Text(
                f"  {what} of {name}: {'passed' if v.get('passed') else 'FAILED'} "
                f"({v.get('succeeded')}/{v.get('hosts')} hosts passed{checks}; "
                f"{v.get('rule')})",
                style="" if v.get("passed") else "red",
            )
        )
        analysis = v.get("analysis") or {}
        for reason in v.get("reasons") or []:
            if not (analysis and reason.startswith("canary analysis: ")):
                out.print(Text(f"    {reason}", style="red"))
        if analysis:
            _print_analysis(analysis)
        for host, c in (v.get("checks") or {}).items():
            numbers = _check_numbers(c.get("results") or {})
            if not c.get("passed"):
                out.print(
                    Text(
                        f"    {host}: {'; '.join(c.get('reasons') or [])}"
                        + (f" [{numbers}]" if numbers else ""),
                        style="red",
                    )
                )
            elif not only_failed and numbers:
                out.print(f"    {host}: {numbers}")


def _print_analysis(a: dict[str, Any]) -> None:
    """A canary analysis: one line per metric with both sides' numbers (app.verify.canary)."""
    window = a.get("window") or {}
    seconds = float(window.get("seconds") or 0)
    span = f"{seconds / 60:g} min" if seconds >= 60 else f"{seconds:g} s"
    ok = a.get("passed")
    canary, baseline = a.get("canary") or {}, a.get("baseline") or {}
    out.print(
        Text(
            f"    canary analysis ({a.get('analysisType', 'Prometheus')}, "
            f"{a.get('comparisonStrategy', 'COMPARE_WITH_CURRENT')}, {span}): "
            f"{'passed' if ok else 'FAILED'}; canary {len(canary.get('hosts') or [])} "
            f"host(s) vs current version {len(baseline.get('hosts') or [])} host(s)",
            style="" if ok else "red",
        )
    )
    for m in a.get("metrics") or []:
        out.print(Text(f"      {m.get('reason')}", style="" if m.get("passed") else "red"))
    for reason in (a.get("reasons") or []) if not a.get("metrics") else []:
        out.print(Text(f"      {reason}", style="red"))


def _print_approval(p: dict[str, Any], *, only_failed: bool) -> None:
    v = p.get("verdict") or {}
    names = ", ".join(a["user"] for a in v.get("approvals", [])) or "nobody yet"
    if p["status"] == "RUNNING":
        out.print(
            Text(
                f"  waiting for approval: {v.get('message', '')} — "
                f"{len(v.get('approvals', []))} of {v.get('required')} approvals "
                f"({names}); approvers: {', '.join(v.get('groups', []))}",
                style="yellow",
            )
        )
    elif p["status"] == "FAILED":
        out.print(Text(f"  approval FAILED: {v.get('reason', '')}", style="red"))
    elif not only_failed:
        out.print(f"  approved by {names}")


def _check_numbers(results: dict[str, Any]) -> str:
    parts = []
    health = results.get("health") or {}
    if health:
        parts.append(
            f"health {health.get('status_code') or health.get('error') or '-'} in "
            f"{health.get('attempts')} attempt(s)"
        )
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
    title = (
        f"stage {_named(st)} ({st['service']} -> {st['environment']}): "
        f"{st['status']}, {len(st['hosts'])} hosts"
    )
    states = [
        "SUCCEEDED",
        "FAILED",
        "IGNORED",
        "SKIPPED",
        "ABORTED",
        "RUNNING",
        "WAITING",
        "PENDING",
    ]
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
    out.print(
        "  hosts: "
        + ", ".join(f"{n} {k.lower()}" for k, n in sorted(by_status.items()))
        + "; versions: "
        + ", ".join(f"{v} on {n}" for v, n in sorted(versions.items()))
    )
    retried = [
        h["host"] for h in st["hosts"] if any(len(s.get("attempts") or []) > 1 for s in h["steps"])
    ]
    if retried:
        out.print(
            f"  {len(retried)} host(s) needed more than one attempt: "
            + ", ".join(retried[:6])
            + (f" (+{len(retried) - 6} more)" if len(retried) > 6 else "")
            + " (vmfarm status --all-hosts)"
        )
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


def attempts_line(step: dict[str, Any]) -> str:
    """``SUCCEEDED on attempt 2; attempt 1 FAILED (exit 1)``: how a retried step ended, then
    each earlier attempt (``attempt 1 DelegateRestart (worker lost: ...)`` for a lost worker)."""
    tries = step.get("attempts") or []
    if not tries:
        return str(step["status"])
    last, earlier = tries[-1], tries[:-1]
    parts = [f"{last['status']} on attempt {last['attempt']}"]
    for a in earlier:
        error = (a.get("error") or "").strip().splitlines()
        error_text = error[0][:160] if error else ""
        if a.get("error_class") == "DelegateRestart":
            parts.append(
                f"attempt {a['attempt']} DelegateRestart"
                + (f" ({error_text})" if error_text else "")
            )
        elif a.get("exit_code") is not None and a["status"] != "SUCCEEDED":
            parts.append(f"attempt {a['attempt']} {a['status']} (exit {a['exit_code']})")
        elif error_text:
            why = f"{a['error_class']}: {error_text}" if a.get("error_class") else error_text
            parts.append(f"attempt {a['attempt']} {a['status']} ({why})")
        else:
            parts.append(f"attempt {a['attempt']} {a['status']}")
    return "; ".join(parts)


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


def print_plan(result: dict[str, Any]) -> None:
    """``vmfarm plan``: per stage its hosts by region, phases, rendered steps, failure policy."""
    from app.units import describe_unit

    out.print(Text.assemble("pipeline ", (result["pipeline"], "bold"), f" ({result['name']})"))
    for st in result["stages"]:
        if st.get("skipped_by_when"):
            out.print(
                Text.assemble(
                    "\nstage ",
                    (st["identifier"], "bold"),
                    f": SKIPPED by its when: {st['skipped_by_when']}",
                )
            )
        if st.get("type") == "Approval":
            out.print(
                Text.assemble(
                    "\nstage ", (st["identifier"], "bold"), f": approval, {st['summary']}"
                )
            )
            continue
        if st.get("type") == "Pipeline":
            out.print(Text.assemble("\nstage ", (st["identifier"], "bold"), f": {st['summary']}"))
            for name, value in (st.get("inputs") or {}).items():
                out.print(f"  variable {name} = {value}")
            for name, value in (st.get("outputs") or {}).items():
                out.print(
                    f"  output {name} = {value} (later stages: "
                    f"<+pipeline.stages.{st['identifier']}.output.{name}>)"
                )
            out.print(f"  --- the plan of pipeline {st['pipeline']} ---")
            print_plan({"pipeline": st["pipeline"], "name": st["name"], "stages": st["stages"]})
            out.print(f"  --- end of pipeline {st['pipeline']} ---")
            continue
        strategy = st["strategy"]
        if st.get("type") == "Custom":
            out.print(
                Text.assemble(
                    "\nstage ",
                    (st["identifier"], "bold"),
                    ": custom, its steps run on a delegate (a worker)",
                )
            )
        else:
            out.print(
                Text.assemble(
                    "\nstage ",
                    (st["identifier"], "bold"),
                    f": {st['service']} {st['version'] or ''} -> "
                    f"{st['environment']}, strategy {strategy.get('type')}",
                )
            )
        if st.get("loop"):  # one iteration of the stage's looping strategy
            out.print(Text(f"  {st['loop']} (stage {st.get('name')})"))
        if st.get("concurrency"):  # its loop's iterations run side by side
            out.print(Text(f"  {st['concurrency']['says']}"))
        if strategy.get("maxConcurrency"):
            out.print(f"  at most {strategy['maxConcurrency']} host(s) in flight in a phase")
        hosts = st["hosts_by_region"]
        if isinstance(hosts, dict):
            for region, names in hosts.items():
                out.print(
                    f"  region {region} (queue vmfarm.{region}): {len(names)} host(s): "
                    + ", ".join(names)
                )
        else:
            out.print(f"  hosts: {hosts}")
        analysis = (strategy.get("verification") or {}).get("canaryAnalysis")
        window = str((analysis or {}).get("timeDuration", ""))
        window += " min" if window.replace(".", "", 1).isdigit() else ""  # Harness's unit
        gate_text = " -> verification gate" + (
            f" (canary analysis: {analysis['analysisType']}, {analysis['comparisonStrategy']}, "
            f"over {window})"
            if analysis
            else ""
        )
        for p in st["phases"]:
            gate = gate_text if p["verify"] else ""
            verb = "switch traffic to" if p["kind"] == "switch" else "deploy to"
            out.print(
                f"  {p['name']}: {verb} {len(p['hosts'])} host(s): {', '.join(p['hosts'])}{gate}"
            )
        for note in st["notes"]:
            out.print(f"  note: {note}")
        if st["rendered_for"]:
            out.print(f"  steps, rendered for {st['rendered_for']}:")
        for step in st["steps"]:
            out.print(
                Text(
                    f"  - {step['identifier']} ({step['type']}"
                    + (", on the delegate" if step.get("onDelegate") else "")
                    + ")",
                    style="bold",
                )
            )
            if step.get("loop"):
                out.print(Text(f"      loop: {step['loop']}"))
            if step.get("when"):
                out.print(Text(f"      when: {step['when']}"))
            for k, v in (step.get("environment") or {}).items():
                out.print(f"      env {k}={v}")
            if step.get("check"):
                out.print(f"      check: {step['check']}")
            for line in _barrier_or_http(step, custom=st.get("type") == "Custom"):
                out.print(Text(f"      {line}"))
            for u in step.get("units", []):  # each unit type says how it reads (app.units)
                for line in describe_unit(u):
                    out.print(Text(f"      {line}"))
        out.print(f"  on failure: {st['on_failure']}")
        w = st.get("watch")
        if w:
            out.print(
                f"  then a watch after deployment for {w['window']:g}s (a check every "
                f"{w['interval']:g}s over the last {w['lookback']:g}s; Prometheus "
                f"{w.get('prometheus') or 'not set: give prometheusUrl or VMFARM_PROMETHEUS_URL'}"
                f"); a breach rolls the stage back:"
            )
            for trig in w["triggers"]:
                out.print(f"    {trig['name']}: {trig['condition']} within {trig['window']:g}s")
            if w.get("health_check"):
                out.print(f"    health checks from the control worker: {w['health_check']}")


def _barrier_or_http(step: dict[str, Any], *, custom: bool) -> list[str]:
    """The plan's lines for an Http, Wait or HarnessApproval step."""
    spec = step.get("spec") or {}
    if step["type"].startswith("Terraform"):
        from app.definitions.terraform import describe

        return describe(step)
    if step["type"] == "Http":
        return [
            f"{spec.get('method', 'GET')} {spec.get('url')}",
            f"passes when: {spec.get('assertion') or 'the status is below 400'}",
        ]
    if step["type"] == "Wait":
        return [f"waits {spec.get('duration')} (a timer in the coordinator; no worker sleeps)"]
    if step["type"] == "HarnessApproval":
        who = spec.get("approvers") or {}
        where = "the stage stops" if custom else "every host of the phase stops"
        return [
            f"{where} here until {who.get('minimumCount', 1)} "
            f"approval(s) from {', '.join(who.get('userGroups') or [])}"
            + (" (not the executor)" if who.get("disallowPipelineExecutor") else "")
            + f": {spec.get('approvalMessage')}"
        ]
    return []


def print_rollback_plan(preview: dict[str, Any]) -> None:
    """``vmfarm rollback --plan``: per stage, the phases in order and each host's versions."""
    out.print(
        f"rollback of execution {preview['execution']} ({preview['pipeline']}), "
        "latest stage first; nothing has run"
    )
    for st in preview["stages"]:
        out.print(f"stage {st['stage']} ({st['service']} in {st['environment']}):")
        for ph in st["phases_in_order"]:
            out.print(f"  {ph['phase']}: {', '.join(ph['hosts']) or 'no changed host'}")
        table = Table(box=None)
        for c in ("host", "region", "from", "to", "how"):
            table.add_column(c)
        for h in st["hosts"]:
            table.add_row(
                h["host"],
                h["region"],
                str(h["from"]),
                str(h["to"]),
                h["how"] or f"left as is: {h['skipped']}",
            )
        out.print(table)
