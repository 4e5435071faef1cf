"""Reading the ledger: ``vmfarm status``, ``logs``, ``executions`` and ``artifacts``. Nothing
here changes anything.
"""

from __future__ import annotations

from typing import Any

import click
from rich.table import Table
from rich.text import Text

from app.status import Status
from cli.console import fail, styled
from cli.context import Cli, pass_cli
from cli.options import output_option
from cli.render import MATRIX_FROM, gate_phases, print_gates, print_summary


def register(main: click.Group) -> None:
    """Add ``status``, ``logs``, ``executions`` and ``artifacts`` to ``main``."""
    for command in (status, logs, executions, artifacts):
        main.add_command(command)


@click.command()
@click.argument("execution_id")
@click.option(
    "--all-hosts",
    is_flag=True,
    help=f"One line per host even for stages of more than {MATRIX_FROM} hosts.",
)
@output_option
@pass_cli
def status(cli: Cli, execution_id: str, all_hosts: bool, output: str) -> None:
    """Show an execution: stages, phases and every host's outcome (large stages as a matrix
    of counts, failed hosts grouped by error)."""
    from app.report import execution_report

    report = execution_report(execution_id)
    if report is None:
        fail(f"no execution '{execution_id}'")
    if output == "json":
        cli.json(report)
        return
    print_summary(report, every_host=all_hosts)
    for st in report["stages"]:
        if st.get("type") == "Approval" or not gate_phases(st):
            continue  # the summary above already shows it
        cli.out.print(f"stage {st['identifier']} gates:")
        print_gates(st, only_failed=False)


@click.command()
@click.argument("execution_id")
@click.option("--host", help="Only this host.")
@click.option("--step", help="Only this step identifier.")
@output_option
@pass_cli
def logs(cli: Cli, execution_id: str, host: str | None, step: str | None, output: str) -> None:
    """Print the output of an execution's steps, host by host."""
    from app.report import execution_logs

    try:
        chunks = execution_logs(execution_id, host=host, step=step)
    except LookupError as exc:
        fail(str(exc))
    if output == "json":
        cli.json(chunks)
        return
    if not chunks:
        cli.err.print("no log output recorded for that selection")
    for c in chunks:
        where = f"{c['step']}/{c['unit']}" + (" (rollback)" if c.get("kind") == "rollback" else "")
        prefix = f"[{c['host']} {where}]"
        for line in c["text"].splitlines():
            if c["stream"] == "stderr":
                cli.out.print(Text(f"{prefix} {line}", style="red"))
            else:
                cli.out.print(Text(f"{prefix} {line}"))


@click.command()
@click.option("--limit", default=20, show_default=True)
@click.option(
    "--status",
    "statuses",
    multiple=True,
    type=click.Choice(Status.EXECUTION, case_sensitive=False),
    help="Only executions in this status (repeatable).",
)
@output_option
@pass_cli
def executions(cli: Cli, limit: int, statuses: tuple[str, ...], output: str) -> None:
    """List recent executions (newest first)."""
    from app.report import recent_executions

    rows = recent_executions(limit, statuses=[x.upper() for x in statuses])
    data = [
        {
            "id": e.id,
            "pipeline": e.pipeline,
            "status": e.status,
            "created_at": e.created_at.isoformat() + "Z",
            "created_by": e.created_by,
        }
        for e in rows
    ]
    if output == "json":
        cli.json(data)
        return
    table = Table()
    for c in ("id", "pipeline", "status", "created", "by"):
        table.add_column(c)
    for d in data:
        table.add_row(d["id"], d["pipeline"], styled(d["status"]), d["created_at"], d["created_by"])
    cli.out.print(table)


@click.command()
@click.argument("service")
@click.option("--env", "environment", help="Only this environment (identifier).")
@output_option
@pass_cli
def artifacts(cli: Cli, service: str, environment: str | None, output: str) -> None:
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
        data: list[dict[str, Any]] = [
            {
                "environment": i.environment,
                "infrastructure": i.infrastructure,
                "host": i.host,
                "region": i.region,
                "version": i.version,
                "previous_version": i.previous_version,
                "releases": i.releases or [],
                "execution": i.execution_id,
                "updated_at": i.updated_at.isoformat(timespec="seconds") + "Z",
            }
            for i in rows
        ]
    if output == "json":
        cli.json({"service": service, "instances": data})
        return
    if not data:
        cli.err.print(
            f"no host runs service '{service}'" + (f" in {environment}" if environment else "")
        )
        return
    versions: dict[str, int] = {}
    for d in data:
        versions[str(d["version"])] = versions.get(str(d["version"]), 0) + 1
    cli.out.print(
        f"service {service}: "
        + ", ".join(f"{v} on {n} host(s)" for v, n in sorted(versions.items()))
    )
    table = Table(box=None)
    for c in ("environment", "host", "region", "version", "previous", "releases on host"):
        table.add_column(c)
    for d in data:
        table.add_row(
            d["environment"],
            d["host"],
            d["region"],
            str(d["version"]),
            str(d["previous_version"] or ""),
            " ".join(d["releases"]),
        )
    cli.out.print(table)
