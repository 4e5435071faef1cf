"""Pipeline files and new executions: ``vmfarm validate``, ``plan``, ``run`` and ``retry``.

``validate`` and ``plan`` only read the files (nothing is recorded, no host is touched);
``run`` and ``retry`` go through ``app.operations`` (RBAC and the audit trail), then send the
execution its first work and watch it (``cli.watch``).
"""

from __future__ import annotations

import sys
from typing import Any

import click
from rich.text import Text

from app.errors import ConfigError, SpecError, SpecErrors
from app.policy import PolicyViolation
from app.rbac import PermissionRefused
from cli.console import err, fail, fail_input, refused
from cli.context import Cli, pass_cli
from cli.options import (
    files_argument,
    gather_inputs,
    input_options,
    output_option,
    pipeline_option,
    watch_option,
)
from cli.render import print_plan
from cli.watch import dispatch_and_watch, refuse_detach_when_embedded


def register(main: click.Group) -> None:
    """Add ``validate``, ``plan``, ``convert``, ``run`` and ``retry`` to ``main``."""
    for command in (validate, plan_cmd, convert, run, retry):
        main.add_command(command)


@click.command()
@files_argument
@input_options()
@output_option
@pass_cli
def validate(
    cli: Cli,
    files: tuple[str, ...],
    sets: tuple[str, ...],
    input_files: tuple[str, ...],
    output: str,
) -> None:
    """Check pipeline files: schema, references and expressions. Exit 2 when invalid."""
    from app.definitions import load

    try:
        bundle = load(files, inputs=gather_inputs(input_files, sets), require_inputs=False)
    except (SpecError, SpecErrors) as exc:
        if output == "json":
            errors = exc.errors if isinstance(exc, SpecErrors) else [exc]
            cli.json(
                {
                    "valid": False,
                    "errors": [
                        {
                            "file": e.file,
                            "line": e.line,
                            "col": e.col,
                            "field": e.field,
                            "message": e.message,
                        }
                        for e in errors
                    ],
                }
            )
            sys.exit(2)
        fail_input(exc)
    from app.definitions.chaining import chain_filled
    from app.definitions.templates import templates_of

    all_docs = [*bundle.documents, *bundle.templates]
    chained = chain_filled(bundle.documents)
    summary: dict[str, Any] = {
        "valid": True,
        "templates": sorted(
            f"{ident} ({kind}{', ' + version if version else ''})"
            for ident, version, kind in templates_of(bundle.templates)
        ),
        "services": sorted(bundle.services),
        "environments": sorted(bundle.environments),
        "infrastructures": sorted(bundle.infrastructures),
        "pipelines": sorted(bundle.pipelines),
        "connectors": sorted(
            f"{ident} ({c.model.spec.type})" for ident, c in bundle.connectors.items()
        ),
        "inputs": [
            {
                "name": s.name,
                **({"default": s.options["default"]} if "default" in s.options else {}),
                **({"given_by": "a Pipeline stage that chains it"} if s.name in chained else {}),
            }
            for s in bundle.inputs
            if "<+input>" in str(_value_at(s))
        ],
    }
    if output == "json":
        cli.json(summary)
        return
    cli.out.print(
        Text.assemble(
            ("valid", "green"),
            f": {len(all_docs)} document(s) in {len({d.file for d in all_docs})} file(s)",
        )
    )
    for kind in (
        "templates",
        "services",
        "environments",
        "infrastructures",
        "pipelines",
        "connectors",
    ):
        if summary[kind]:
            cli.out.print(f"  {kind}: {', '.join(summary[kind])}")
    for i in summary["inputs"]:
        cli.out.print(
            f"  runtime input: {i['name']}"
            + (
                f" (default {i['default']})"
                if "default" in i
                else f" (given by {i['given_by']}; --set when run alone)"
                if "given_by" in i
                else " (give it with --set)"
            )
        )


@click.command("convert")
@files_argument
@click.option(
    "--to",
    "to",
    type=click.Choice(["harness", "vmfarm"]),
    required=True,
    help="harness: pipeline:/service:/environment:/infrastructureDefinition:/"
    "connector: at the top; vmfarm: apiVersion, kind, metadata, spec.",
)
@click.option("--write", is_flag=True, help="Rewrite the files in place instead of printing.")
@pass_cli
def convert(cli: Cli, files: tuple[str, ...], to: str, write: bool) -> None:
    """Print pipeline files in Harness's shape or vmfarm's (either loads), comments kept.

    Templates, input sets and documents already in the asked shape are left as they are.
    """
    from pathlib import Path

    from app.definitions.loader import expand_paths
    from app.definitions.native import convert_text

    try:
        paths = expand_paths(files)
    except SpecError as exc:
        fail_input(exc)
    out: dict[Path, str] = {}
    for path in paths:
        try:
            out[path] = convert_text(path.read_text(), to)
        except (ValueError, OSError) as exc:
            fail(f"{path}: cannot convert: {exc}", code=2)
    for path, text in out.items():
        if write:
            path.write_text(text)
            err.print(f"{path}: written in {to}'s shape", markup=False, highlight=False)
        else:
            if len(out) > 1:
                cli.out.print(f"# ==> {path} <==", markup=False, highlight=False)
            cli.out.print(text.rstrip("\n"), markup=False, highlight=False, soft_wrap=True)


def _value_at(slot: Any) -> Any:
    data = slot.doc.data
    for p in slot.path:
        data = data[p]
    return data


@click.command("plan")
@files_argument
@pipeline_option
@input_options()
@output_option
@pass_cli
def plan_cmd(
    cli: Cli,
    files: tuple[str, ...],
    pipeline: str | None,
    sets: tuple[str, ...],
    input_files: tuple[str, ...],
    output: str,
) -> None:
    """Dry run: hosts per region, phases, rendered command units, failure policy. Touches no
    host and records nothing."""
    from app.coordinator import dry_run

    try:
        result = dry_run(files, pipeline=pipeline, inputs=gather_inputs(input_files, sets))
    except (SpecError, SpecErrors, ConfigError) as exc:
        fail_input(exc)
    if output == "json":
        cli.json(result)
        return
    print_plan(result)


@click.command()
@files_argument
@pipeline_option
@input_options(set_help="Fill a runtime input <+input>; KEY may be the input's last name parts.")
@watch_option("Show live progress (default on a terminal) or return after submitting.")
@click.option(
    "--freeze",
    "freeze_files",
    multiple=True,
    type=click.Path(dir_okay=False),
    help="A deployment freeze file (Harness's freeze YAML); repeatable. It adds to "
    "the operator's (VMFARM_FREEZE_DIR), never lifts them.",
)
@click.option(
    "--override-freeze",
    is_flag=True,
    help="Run inside an active freeze window (needs the permission freeze:override; audited).",
)
@output_option
@pass_cli
def run(
    cli: Cli,
    files: tuple[str, ...],
    pipeline: str | None,
    sets: tuple[str, ...],
    input_files: tuple[str, ...],
    watch: bool | None,
    freeze_files: tuple[str, ...],
    override_freeze: bool,
    output: str,
) -> None:
    """Run a pipeline. Exit 0 when it succeeds, 1 when it fails, 2 on bad input or inside a
    freeze window, 3 when a permission is missing."""
    from app import operations
    from app.definitions.freeze import FreezeActiveError

    refuse_detach_when_embedded(watch)
    try:
        execution_id = operations.run(
            cli.actor,
            files,
            pipeline=pipeline,
            inputs=gather_inputs(input_files, sets),
            publish=False,
            freeze_files=freeze_files,
            override_freeze=override_freeze,
        )
    except PermissionRefused as exc:
        refused(exc)
    except (SpecError, SpecErrors, ConfigError, PolicyViolation, FreezeActiveError) as exc:
        fail_input(exc)
    dispatch_and_watch(cli, execution_id, watch=watch, output=output)


@click.command()
@click.argument("execution_id")
@click.option(
    "--only-failed",
    is_flag=True,
    required=True,
    help="Re-run only the hosts that failed or never ran (required: say so).",
)
@watch_option()
@click.option(
    "--override-freeze",
    is_flag=True,
    help="Retry inside an active freeze window (needs freeze:override; audited).",
)
@output_option
@pass_cli
def retry(
    cli: Cli,
    execution_id: str,
    only_failed: bool,
    watch: bool | None,
    override_freeze: bool,
    output: str,
) -> None:
    """Re-run an ended execution on the hosts that did not succeed, as a new execution."""
    from app import operations
    from app.definitions.freeze import FreezeActiveError

    refuse_detach_when_embedded(watch)
    try:
        new_id = operations.retry(
            cli.actor, execution_id, publish=False, override_freeze=override_freeze
        )
    except PermissionRefused as exc:
        refused(exc)
    except (SpecError, SpecErrors, FreezeActiveError) as exc:
        fail_input(exc)
    except (LookupError, ConfigError) as exc:
        fail(str(exc))
    if output != "json":
        err.print(f"retrying the failed hosts of {execution_id}")
    dispatch_and_watch(cli, execution_id=new_id, watch=watch, output=output)
