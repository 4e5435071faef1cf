"""``vmfarm secrets``: edit the encrypted secrets file (the ``file`` backend).

::

    vmfarm secrets set NAME [--value-stdin]   store a value (without --value-stdin: asked for
                                              twice with hidden input, on a terminal only)
    vmfarm secrets list [-o json]             names and update times, never values
    vmfarm secrets rm NAME                    delete one
    vmfarm secrets keygen                     print a new Fernet key for VMFARM_SECRETS_KEY

The file is ``VMFARM_SECRETS_FILE`` (default ``$VMFARM_HOME/secrets.enc``); its key
``VMFARM_SECRETS_KEY`` (or ``VMFARM_SECRETS_KEY_FILE``). With ``--value-stdin`` the whole of
standard input is the value, less one trailing newline (``printf`` and ``echo`` both work;
inner newlines stay). Exit codes: 0 done; 2 bad input (bad name, empty value, key missing or
wrong, no such secret to remove): nothing was changed.
"""

from __future__ import annotations

import os
import sys
from typing import NoReturn

import click
from rich.table import Table

from app.secrets.backends import FileBackend, check_name, env_var_name
from app.secrets.errors import SecretError
from app.secrets.store import SecretsSettings, file_backend, load_settings
from cli import console
from cli.context import Cli, pass_cli
from cli.options import output_option


def register(main: click.Group) -> None:
    """Add the ``secrets`` group to ``main``."""
    main.add_command(secrets)


def _fail(message: str) -> NoReturn:
    """Bad input: exit 2, saying nothing was changed. Never a value in the message."""
    console.fail(message, then="nothing was changed.")


def _settings() -> tuple[SecretsSettings, FileBackend]:
    try:
        settings = load_settings()
        return settings, file_backend(settings)
    except SecretError as exc:
        _fail(str(exc))


@click.group("secrets")
def secrets() -> None:
    """Secrets in the local encrypted file (VMFARM_HOME/secrets.enc, key VMFARM_SECRETS_KEY).

    Pipelines read them as <+secrets.getValue("NAME")>. Values are never printed.
    """


@secrets.command("set")
@click.argument("name")
@click.option(
    "--value-stdin",
    is_flag=True,
    help="Read the value from standard input (less one trailing newline).",
)
@output_option
@pass_cli
def set_cmd(cli: Cli, name: str, value_stdin: bool, output: str) -> None:
    """Store the secret NAME (replacing its value if it exists). Prompts for the value."""
    problem = check_name(name)
    if problem:
        _fail(problem)
    settings, backend = _settings()
    if value_stdin:
        value = sys.stdin.read()
        if value.endswith("\r\n"):
            value = value[:-2]
        elif value.endswith("\n"):
            value = value[:-1]
    elif _interactive():
        value = click.prompt(
            f"value of {name}", hide_input=True, confirmation_prompt=True, err=True
        )
    else:
        _fail("no terminal to ask for the value on: give it with --value-stdin")
    if not value:
        _fail(f"secret {name!r}: the value is empty")
    try:
        created = backend.set(name, value)
    except SecretError as exc:
        _fail(str(exc))
    if output == "json":
        cli.json({"name": name, "created": created, "file": str(backend.path)})
    else:
        cli.out.print(f"secret {name} {'created' if created else 'updated'} in {backend.path}")
    _warn_shadowing(cli, settings, name)


def _interactive() -> bool:
    """Whether the value can be asked for with hidden input."""
    return sys.stdin.isatty()


def _warn_shadowing(cli: Cli, settings: SecretsSettings, name: str) -> None:
    """Say so when pipelines will not read what was just stored."""
    try:
        order = settings.order
    except SecretError as exc:
        cli.err.print(f"warning: {exc}")
        return
    if "file" not in order:
        cli.err.print(
            f"warning: the file backend is not enabled (VMFARM_SECRETS="
            f"{','.join(order) or '(none)'}): pipelines will not read this secret"
        )
        return
    var = env_var_name(name)
    if "env" in order[: order.index("file")] and os.environ.get(var):
        cli.err.print(
            f"warning: {var} is set here and the env backend is asked first: "
            "pipelines run with this environment read that variable instead"
        )


@secrets.command("list")
@output_option
@pass_cli
def list_cmd(cli: Cli, output: str) -> None:
    """The names of the stored secrets and when each was last set (never their values)."""
    _, backend = _settings()
    try:
        entries = backend.entries()
    except SecretError as exc:
        _fail(str(exc))
    if output == "json":
        cli.json(
            {
                "file": str(backend.path),
                "secrets": [{"name": e.name, "updated": e.updated} for e in entries],
            }
        )
        return
    if not entries:
        cli.err.print(f"no secrets in {backend.path}")
        return
    table = Table(box=None, show_edge=False, pad_edge=False)
    table.add_column("NAME")
    table.add_column("UPDATED")
    for e in entries:
        table.add_row(e.name, e.updated)
    cli.out.print(table)


@secrets.command("rm")
@click.argument("name")
@output_option
@pass_cli
def rm_cmd(cli: Cli, name: str, output: str) -> None:
    """Delete the secret NAME from the file."""
    _, backend = _settings()
    try:
        removed = backend.remove(name)
    except SecretError as exc:
        _fail(str(exc))
    if not removed:
        _fail(f"no secret {name!r} in {backend.path}")
    if output == "json":
        cli.json({"name": name, "removed": True, "file": str(backend.path)})
    else:
        cli.out.print(f"secret {name} removed from {backend.path}")


@secrets.command("keygen")
@pass_cli
def keygen_cmd(cli: Cli) -> None:
    """Print a new random Fernet key (for VMFARM_SECRETS_KEY or VMFARM_SECRETS_KEY_FILE)."""
    from cryptography.fernet import Fernet

    cli.out.print(Fernet.generate_key().decode("ascii"))
