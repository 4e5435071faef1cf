"""Governance commands: ``vmfarm audit`` and ``vmfarm policy check``.

::

    vmfarm audit [--execution ID] [--user U] [--action A] [--limit N] [-o json]
        the audit trail, newest first: runs, approvals, aborts, rollbacks, RBAC refusals and
        policy denials
    vmfarm policy check FILE... [-p PIPELINE] [--set K=V] [--policies FILE] [-o json]
        load and resolve the pipeline as ``vmfarm plan`` does, then print what the policy
        rules say about it; touches no host and records nothing

Exit codes: 0 fine (warnings included); 2 bad input (files, inputs, policy file) or a finding
of severity ``error`` (the run would be refused).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import click
from rich.text import Text

from app.errors import ConfigError, SpecError, SpecErrors
from cli.console import error, fail
from cli.context import Cli, pass_cli
from cli.options import (
    files_argument,
    gather_inputs,
    input_options,
    output_option,
    pipeline_option,
)

SEVERITY_STYLE = {"error": "bold red", "warn": "yellow"}
OUTCOME_STYLE = {"refused": "bold red", "denied": "bold red", "failed": "red"}


def register(main: click.Group) -> None:
    """Add ``audit`` and the ``policy`` group to ``main``."""
    main.add_command(audit)
    main.add_command(policy)


# --- audit ----------------------------------------------------------------------------------------


@click.command("audit")
@click.option("--execution", "execution_id", metavar="ID", help="Only this execution.")
@click.option("--user", help="Only what this user did.")
@click.option(
    "--action", help="Only this action (run, approve, reject, abort, rollback, retry, intervene)."
)
@click.option("--limit", type=click.IntRange(min=1), default=50, show_default=True)
@output_option
@pass_cli
def audit(
    cli: Cli,
    execution_id: str | None,
    user: str | None,
    action: str | None,
    limit: int,
    output: str,
) -> None:
    """The audit trail, newest first: who did what, to which execution, and what came of it."""
    from app.audit import events

    rows = events(limit, execution_id=execution_id, user=user, action=action)
    if output == "json":
        cli.json(rows)
        return
    if not rows:
        cli.err.print("no audit events for that selection")
        return
    for r in rows:
        at = r["at"][:19].replace("T", " ")
        target = (r["execution_id"] or "-") + (f" ({r['pipeline']})" if r["pipeline"] else "")
        detail = _brief(r["detail"])
        cli.out.print(
            Text.assemble(
                f"{at}  {r['user'] or '-'}  {r['action']}  ",
                (r["outcome"], OUTCOME_STYLE.get(r["outcome"], "bold")),
                f"  {target}" + (f": {detail}" if detail else ""),
            )
        )


def _brief(detail: dict[str, Any]) -> str:
    if "reason" in detail:
        return str(detail["reason"])
    if "findings" in detail:
        return "; ".join(f"{f.get('rule')}: {f.get('message')}" for f in detail["findings"])
    return ", ".join(
        f"{k}={json.dumps(v)}" for k, v in detail.items() if v not in (None, "", [], {})
    )


# --- policy ---------------------------------------------------------------------------------------


@click.group("policy")
def policy() -> None:
    """Policies as code (VMFARM_POLICY_FILE, default configs/policies.yaml)."""


@policy.command("check")
@files_argument
@pipeline_option
@input_options(inputs_help="An input set file or folder (repeatable); --set wins.")
@click.option(
    "--policies",
    "policies_file",
    type=click.Path(dir_okay=False),
    help="The policy file (default VMFARM_POLICY_FILE, else configs/policies.yaml).",
)
@output_option
@pass_cli
def policy_check(
    cli: Cli,
    files: tuple[str, ...],
    pipeline: str | None,
    sets: tuple[str, ...],
    input_files: tuple[str, ...],
    policies_file: str | None,
    output: str,
) -> None:
    """Check a pipeline against the policy rules without running it. Exit 2 when a rule of
    severity error is broken (a run would be refused)."""
    from app.coordinator import prepare
    from app.policy import evaluate, load_policies, policy_file

    source = Path(policies_file) if policies_file else policy_file()
    try:
        rules = load_policies(source) if source is not None else []
        plan, stage_hosts = prepare(
            files,
            pipeline=pipeline,
            inputs=gather_inputs(input_files, sets),
            execution_id="<policy-check>",
        )
        findings = evaluate(plan, stage_hosts, rules=rules)
    except (SpecError, SpecErrors) as exc:
        for e in exc.errors if isinstance(exc, SpecErrors) else [exc]:
            error(str(e))
        sys.exit(2)
    except ConfigError as exc:
        fail(str(exc))
    errors = sum(1 for f in findings if f.severity == "error")
    if output == "json":
        cli.json(
            {
                "pipeline": plan.identifier,
                "policy_file": str(source) if source else None,
                "rules": [r.name for r in rules],
                "passed": errors == 0,
                "findings": [f.to_dict() for f in findings],
            }
        )
    elif source is None:
        cli.out.print(
            "no policy file (VMFARM_POLICY_FILE is unset and configs/policies.yaml does "
            "not exist): nothing to check"
        )
    else:
        for f in findings:
            where = f"stage '{f.stage}': " if f.stage else ""
            cli.out.print(
                Text.assemble(
                    (f"{f.severity:5}", SEVERITY_STYLE.get(f.severity, "")),
                    f" [{f.rule}] {where}{f.message}",
                )
            )
        warnings = len(findings) - errors
        verdict = "a run would be refused" if errors else "a run would be allowed"
        cli.out.print(
            f"pipeline {plan.identifier}: {len(rules)} rule(s) from {source}, "
            f"{errors} error(s), {warnings} warning(s): {verdict}"
        )
    if errors:
        sys.exit(2)
