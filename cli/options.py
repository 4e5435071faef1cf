"""Options shared by several commands, as decorators (one definition each)::

    @files_argument                      FILES...: pipeline files or folders
    @pipeline_option                     --pipeline/-p ID
    @input_options()                     --set KEY=VALUE and --inputs FILE (runtime inputs)
    @watch_option()                      --watch/--detach
    @output_option                       --output/-o text|json

``gather_inputs(input_files, sets)`` turns the two input options into the mapping the loader
takes.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, TypeVar

import click

F = TypeVar("F", bound=Callable[..., Any])

INPUTS_HELP = (
    "An input set file (Harness inputSet, or NAME: VALUE lines), or a folder of them; "
    "repeatable, later files win, --set wins over all."
)
SET_HELP = "Fill a runtime input."


def output_option(f: F) -> F:
    """``--output/-o text|json``: the command gets ``output``."""
    return click.option(
        "--output",
        "-o",
        type=click.Choice(["text", "json"]),
        default="text",
        show_default=True,
        help="json: machine-readable output on stdout.",
    )(f)


def files_argument(f: F) -> F:
    """``FILES...`` (at least one): the command gets ``files``."""
    return click.argument("files", nargs=-1, required=True, type=click.Path())(f)


def pipeline_option(f: F) -> F:
    """``--pipeline/-p ID``: the command gets ``pipeline``."""
    return click.option(
        "--pipeline", "-p", help="Pipeline identifier (when the files define several)."
    )(f)


def input_options(*, set_help: str = SET_HELP, inputs_help: str = INPUTS_HELP) -> Callable[[F], F]:
    """``--set KEY=VALUE`` and ``--inputs FILE`` (both repeatable): the command gets ``sets``
    and ``input_files``; ``gather_inputs`` merges them."""

    def decorate(f: F) -> F:
        f = click.option(
            "--inputs", "input_files", multiple=True, type=click.Path(), help=inputs_help
        )(f)
        return click.option("--set", "sets", multiple=True, metavar="KEY=VALUE", help=set_help)(f)

    return decorate


def watch_option(help_text: str = "As for run.") -> Callable[[F], F]:
    """``--watch/--detach`` (default: watch on a terminal): the command gets ``watch``."""

    def decorate(f: F) -> F:
        return click.option("--watch/--detach", default=None, help=help_text)(f)

    return decorate


def gather_inputs(input_files: tuple[str, ...], sets: tuple[str, ...]) -> Any:
    """Runtime inputs from --inputs files with --set on top (SpecError names a bad file)."""
    from app.definitions.inputsets import merge_inputs, read_input_sets

    if not input_files:
        return parse_sets(sets)
    return merge_inputs(read_input_sets(input_files), parse_sets(sets))


def parse_sets(values: tuple[str, ...]) -> dict[str, str]:
    """``--set KEY=VALUE`` values as a mapping (a usage error, exit 2, when one has no ``=``)."""
    inputs: dict[str, str] = {}
    for v in values:
        key, sep, val = v.partition("=")
        if not sep or not key.strip():
            raise click.BadParameter(f"'{v}' is not KEY=VALUE", param_hint="--set")
        inputs[key.strip()] = val
    return inputs
