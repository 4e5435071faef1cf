"""Operating vmfarm: ``vmfarm metrics serve|show`` (Prometheus metrics from the ledger, the
registry and the broker), ``vmfarm notify test`` (what an event's notification says and who
gets it) and ``vmfarm reconcile`` (what the periodic reconciler does, now).

Exit codes as elsewhere: 0 success, 1 a notification could not be delivered, 2 bad input.
"""

from __future__ import annotations

import sys
from typing import Any

import click
from rich.table import Table
from rich.text import Text

from cli.console import error, fail
from cli.context import Cli, pass_cli
from cli.options import F, output_option


def register(main: click.Group) -> None:
    """Add the ``metrics`` and ``notify`` groups and ``reconcile`` to ``main``."""
    for command in (metrics, notify, reconcile):
        main.add_command(command)


def _window_options(f: F) -> F:
    f = click.option(
        "--max-executions",
        type=click.IntRange(min=1),
        default=None,
        help="Newest executions a scrape looks at (default VMFARM_METRICS_MAX_EXECUTIONS or 500).",
    )(f)
    return click.option(
        "--window",
        default=None,
        metavar="DURATION",
        help="How far back recent executions name the queues to report, e.g. "
        "24h, 30m (default VMFARM_METRICS_WINDOW seconds or 24h); "
        "counters always count every execution.",
    )(f)


def _seconds(window: str | None) -> float | None:
    from app.definitions.base import parse_duration

    if window is None:
        return None
    try:
        seconds = parse_duration(window)
    except ValueError as exc:
        raise click.BadParameter(str(exc), param_hint="--window") from None
    if seconds <= 0:
        raise click.BadParameter("must be positive", param_hint="--window")
    return seconds


# --- metrics --------------------------------------------------------------------------------------


@click.group()
def metrics() -> None:
    """Prometheus metrics read from the ledger, the worker registry and the broker."""


@metrics.command("serve")
@click.option("--port", type=click.IntRange(0, 65535), default=9464, show_default=True)
@click.option(
    "--addr",
    default="127.0.0.1",
    show_default=True,
    help="Address to listen on (0.0.0.0: every interface).",
)
@_window_options
@pass_cli
def metrics_serve(
    cli: Cli, port: int, addr: str, window: str | None, max_executions: int | None
) -> None:
    """Serve the metrics over HTTP (GET /metrics) in the foreground until interrupted."""
    from app.metrics import serve

    seconds = _seconds(window)
    try:
        server = serve(port, addr, window=seconds, max_executions=max_executions)
    except OSError as exc:
        fail(f"cannot listen on {addr}:{port}: {exc}")
    cli.out.print(f"serving metrics on {server.url} (Ctrl-C stops)")
    server.wait()


@metrics.command("show")
@_window_options
@output_option
@pass_cli
def metrics_show(cli: Cli, window: str | None, max_executions: int | None, output: str) -> None:
    """Print one scrape: the Prometheus exposition text, or its samples as JSON."""
    from app.metrics import render

    text = render(window=_seconds(window), max_executions=max_executions).decode()
    if output == "json":
        from prometheus_client.parser import text_string_to_metric_families

        families = [
            {
                "name": f.name,
                "type": f.type,
                "help": f.documentation,
                "samples": [
                    {"name": s.name, "labels": s.labels, "value": s.value} for s in f.samples
                ],
            }
            for f in text_string_to_metric_families(text)
        ]
        cli.json({"metrics": families})
        return
    sys.stdout.write(text)
    sys.stdout.flush()


# --- notify ---------------------------------------------------------------------------------------


@click.group()
def notify() -> None:
    """Notifications of pipeline events (spec.notificationRules)."""


def _rules_from_files(paths: tuple[str, ...]) -> list[dict[str, Any]]:
    """``spec.notificationRules`` of every Pipeline document in the files."""
    import yaml

    rules: list[dict[str, Any]] = []
    for path in paths:
        try:
            with open(path, encoding="utf-8") as fh:
                docs = list(yaml.safe_load_all(fh))
        except (OSError, yaml.YAMLError) as exc:
            raise click.BadParameter(f"{path}: {exc}", param_hint="--file") from None
        for doc in docs:
            if isinstance(doc, dict) and doc.get("kind") == "Pipeline":
                found = (doc.get("spec") or {}).get("notificationRules") or []
                if not isinstance(found, list):
                    raise click.BadParameter(
                        f"{path}: spec.notificationRules is not a list", param_hint="--file"
                    )
                rules += [r for r in found if isinstance(r, dict)]
    return rules


@notify.command("test")
@click.argument("execution_id")
@click.option(
    "--event",
    "-e",
    type=click.Choice(
        [
            "PipelineStart",
            "PipelineSuccess",
            "PipelineFailed",
            "StageFailed",
            "ApprovalNeeded",
            "InterventionNeeded",
            "RollbackDone",
        ]
    ),
    default="PipelineFailed",
    show_default=True,
)
@click.option("--stage", help="Stage identifier or index (stage events).")
@click.option(
    "--file",
    "-f",
    "files",
    multiple=True,
    type=click.Path(exists=True),
    help="Take the rules from these pipeline files (default: the execution's plan).",
)
@click.option("--send", is_flag=True, help="Deliver it (not only show it); not recorded as sent.")
@output_option
@pass_cli
def notify_test(
    cli: Cli,
    execution_id: str,
    event: str,
    stage: str | None,
    files: tuple[str, ...],
    send: bool,
    output: str,
) -> None:
    """Show the message an event of an execution gives and who gets it; --send delivers it."""
    from app.notify import build_message, parse_rules, plan_rules
    from app.notify import notify as send_notification
    from app.report import execution_report

    report = execution_report(execution_id)
    if report is None:
        fail(f"no execution {execution_id}")
    where: int | str | None = int(stage) if stage is not None and stage.isdigit() else stage
    rules = _rules_from_files(files) if files else plan_rules(execution_id)
    parsed, invalid = parse_rules(rules)
    if invalid:
        for why in invalid:
            error(why)
        sys.exit(2)
    msg = build_message(event, report, stage=where)
    ident = msg.stage if event in ("StageFailed", "ApprovalNeeded", "InterventionNeeded") else None
    chosen = [r for r in parsed if r.wants(event, ident)]
    deliveries = send_notification(event, report, chosen, stage=where) if send else []
    if output == "json":
        cli.json(
            {
                "event": event,
                "subject": msg.title,
                "text": msg.text,
                "commands": msg.commands,
                "rules": [{"name": r.name, "channel": r.channel.type} for r in chosen],
                "deliveries": [d.to_dict() for d in deliveries],
            }
        )
    else:
        cli.out.print(msg.title)
        cli.out.print(msg.text)
        cli.out.print("")
        if not chosen:
            cli.out.print(
                Text(
                    f"no notification rule wants {event}" + (f" of stage {ident}" if ident else ""),
                    style="yellow",
                )
            )
        table = Table(title="deliveries" if send else "would notify", title_justify="left")
        for c in ("rule", "channel", *(("target", "result") if send else ())):
            table.add_column(c)
        if send:
            for d in deliveries:
                table.add_row(
                    d.rule,
                    d.channel,
                    d.target,
                    Text("sent", style="green")
                    if d.ok
                    else Text(f"failed after {d.attempts} attempt(s): {d.error}", style="red"),
                )
        else:
            for r in chosen:
                table.add_row(r.name, r.channel.type)
        if chosen:
            cli.out.print(table)
    if any(not d.ok for d in deliveries):
        sys.exit(1)


# --- reconcile ------------------------------------------------------------------------------------


@click.command()
@output_option
@pass_cli
def reconcile(cli: Cli, output: str) -> None:
    """Turn lost workers and unclaimed work into failures and move executions on (what the
    periodic reconciler does; safe to run at any time)."""
    from app.coordinator import reconcile as do_reconcile

    actions = do_reconcile()
    if output == "json":
        cli.json({"actions": actions})
        return
    for a in actions:
        cli.out.print(a)
    if not actions:
        cli.out.print("nothing to reconcile")
