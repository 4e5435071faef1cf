"""What a person decides about an execution: ``vmfarm approve``, ``reject``, ``abort``,
``intervene`` and ``rollback``.

Each is one call to ``app.operations`` (RBAC and the audit trail are there). A refusal exits 3
(``refused: ...``), a missing execution or one in the wrong state exits 2 (``error: ...``).
"""

from __future__ import annotations

import click

from app.errors import ConfigError
from app.rbac import PermissionRefused
from cli.console import fail, refused
from cli.context import Cli, pass_cli
from cli.options import output_option, watch_option
from cli.render import print_rollback_plan
from cli.watch import dispatch_and_watch, refuse_detach_when_embedded

INTERVENTIONS = [
    "Abort",
    "StageRollback",
    "PipelineRollback",
    "MarkAsSuccess",
    "Ignore",
    "MarkAsFailure",
]


def register(main: click.Group) -> None:
    """Add ``approve``, ``reject``, ``abort``, ``intervene`` and ``rollback`` to ``main``."""
    for command in (approve, reject, abort, intervene, rollback):
        main.add_command(command)


@click.command()
@click.argument("execution_id")
@click.option("--comment", "-m", default="", help="Why (kept with the approval).")
@pass_cli
def approve(cli: Cli, execution_id: str, comment: str) -> None:
    """Approve an execution waiting in an Approval stage (identity: VMFARM_USER). Exit 3 when
    you may not."""
    _decide(cli, execution_id, comment, approve=True)


@click.command()
@click.argument("execution_id")
@click.option("--comment", "-m", default="", help="Why (kept with the rejection).")
@pass_cli
def reject(cli: Cli, execution_id: str, comment: str) -> None:
    """Reject an execution waiting in an Approval stage: it fails (ApprovalRejection)."""
    _decide(cli, execution_id, comment, approve=False)


def _decide(cli: Cli, execution_id: str, comment: str, *, approve: bool) -> None:
    from app import operations

    decide = operations.approve if approve else operations.reject
    try:
        outcome = decide(cli.actor, execution_id, comment=comment)
    except (PermissionRefused, operations.ApprovalRefused) as exc:
        refused(exc)
    except (LookupError, ConfigError) as exc:
        fail(str(exc))
    cli.out.print(f"execution {execution_id}: {outcome}")


@click.command()
@click.argument("execution_id")
@click.option(
    "--rollback",
    is_flag=True,
    help="Then roll back the hosts the current stage changed (rollback phases in "
    "reverse order, as its failure strategy would).",
)
@pass_cli
def abort(cli: Cli, execution_id: str, rollback: bool) -> None:
    """Stop an execution: no new work is sent; running hosts stop at their next unit."""
    from app import operations

    try:
        result = operations.abort(cli.actor, execution_id, rollback=rollback)
    except PermissionRefused as exc:
        refused(exc)
    except (LookupError, ConfigError) as exc:
        fail(str(exc))
    if result not in ("aborted", "rolling back"):
        cli.out.print(f"execution {execution_id} already ended: {result}")
        return
    then = (
        "; then the hosts the stage changed roll back (vmfarm status shows it)"
        if result == "rolling back"
        else ""
    )
    cli.out.print(
        f"execution {execution_id} aborted: no new work is sent; running hosts stop "
        f"at their next command unit{then}"
    )


@click.command()
@click.argument("execution_id")
@click.argument("action", type=click.Choice(INTERVENTIONS))
@click.option("--comment", "-m", default="", help="Why (kept with the decision).")
@pass_cli
def intervene(cli: Cli, execution_id: str, action: str, comment: str) -> None:
    """Answer a ManualIntervention failure strategy: what the paused stage does now."""
    from app import operations

    try:
        outcome = operations.intervene(cli.actor, execution_id, action, comment=comment)
    except PermissionRefused as exc:
        refused(exc)
    except (LookupError, operations.ApprovalRefused, ConfigError) as exc:
        fail(str(exc))
    cli.out.print(f"execution {execution_id}: {outcome}")


@click.command()
@click.argument("execution_id")
@click.option(
    "--plan",
    "show_plan",
    is_flag=True,
    help="Print what would be rolled back (hosts, versions, order) and stop.",
)
@watch_option()
@output_option
@pass_cli
def rollback(cli: Cli, execution_id: str, show_plan: bool, watch: bool | None, output: str) -> None:
    """Roll a successful execution back: every host it changed returns to its previous
    version (its stages' rollbackSteps, or the previous version's own steps), as a new
    execution. Exit 0 when every host rolled back."""
    from app import operations

    if show_plan:
        _preview_rollback(cli, execution_id, output)
        return
    refuse_detach_when_embedded(watch)
    try:
        new_id = operations.rollback(cli.actor, execution_id, publish=False)
    except PermissionRefused as exc:
        refused(exc)
    except (LookupError, ConfigError) as exc:
        fail(str(exc))
    if output != "json":
        cli.err.print(f"rolling back {execution_id}")
    dispatch_and_watch(cli, new_id, watch=watch, output=output)


def _preview_rollback(cli: Cli, execution_id: str, output: str) -> None:
    from app import operations

    try:
        preview = operations.rollback_plan(cli.actor, execution_id)
    except PermissionRefused as exc:
        refused(exc)
    except (LookupError, ConfigError) as exc:
        fail(str(exc))
    if output == "json":
        cli.json(preview)
    else:
        print_rollback_plan(preview)
