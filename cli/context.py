"""The context object: built once per ``vmfarm`` invocation by the root group, handed to every
command that asks for it with ``@pass_cli`` (click's ``ctx.obj``, as in click's repo example).

It holds the consoles, who the user is (decided here, for every command below: nothing under
the CLI reads the environment to find out) and the output helpers.
"""

from __future__ import annotations

import json
import os
from functools import cached_property
from typing import TYPE_CHECKING, Any

import click
from rich.console import Console

from cli import console

if TYPE_CHECKING:
    from app.operations import Actor


def current_user() -> str:
    """Who runs this command: ``VMFARM_USER``, else ``$USER``, else the OS account of this
    process (never blank: an execution always has a creator)."""
    from app.settings import get_settings

    for name in (get_settings().user, os.environ.get("USER")):
        if name and name.strip():
            return name
    return os_account()


def os_account() -> str:
    """The name of this process's OS account (``uid-N`` when the uid has no passwd entry, as
    in a container run with an arbitrary uid)."""
    import pwd

    try:
        return pwd.getpwuid(os.getuid()).pw_name
    except KeyError:
        return f"uid-{os.getuid()}"


class Cli:
    """What every command shares: ``out``/``err`` consoles, the acting user, JSON output."""

    def __init__(self) -> None:
        self.out: Console = console.out
        self.err: Console = console.err

    @cached_property
    def actor(self) -> Actor:
        """The user this invocation acts as (read once, when a command first needs it)."""
        from app.operations import Actor

        return Actor(current_user())

    def json(self, doc: Any) -> None:
        """Print ``doc`` as JSON on stdout (``--output json``)."""
        self.out.print_json(json.dumps(doc))


# ensure=True: a command registered on a bare group (as tests do) still gets its context.
pass_cli = click.make_pass_decorator(Cli, ensure=True)
