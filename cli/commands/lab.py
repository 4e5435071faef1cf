"""``vmfarm lab up|status|down``: a local lab of real OpenSSH hosts on 127.0.1.x (or sandbox
hosts where sshd or root is missing), with the Infrastructure file that targets them.

A lab that cannot start (not root, sshd missing) exits 1 with its reason.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import click
from rich.table import Table
from rich.text import Text

from app.errors import LabError
from cli.console import fail
from cli.context import Cli, pass_cli
from cli.options import output_option


def register(main: click.Group) -> None:
    """Add the ``lab`` group to ``main``."""
    main.add_command(lab)


@click.group()
def lab() -> None:
    """A local lab of real OpenSSH hosts on 127.0.1.x (needs root and openssh-server)."""


def _lab_root() -> Path:
    from app.settings import get_settings

    return get_settings().home_dir / "lab"


def _lab_json(state: Any) -> dict[str, Any]:
    return {
        "mode": state.mode,
        "reason": state.reason,
        "infrastructure_file": str(state.infrastructure_file),
        "hosts": [
            {
                "num": h.num,
                "address": h.address,
                "port": h.port,
                "region": h.region,
                "pid": h.pid,
                "alive": h.alive,
            }
            for h in state.hosts
        ],
    }


def _print_lab(cli: Cli, state: Any) -> None:
    table = Table(title=f"lab ({state.mode})", title_justify="left")
    for c in ("host", "region", "pid", "alive"):
        table.add_column(c)
    for h in state.hosts:
        table.add_row(
            f"{h.address}:{h.port}",
            h.region,
            str(h.pid or ""),
            Text("yes", style="green") if h.alive else Text("no", style="red"),
        )
    cli.out.print(table)
    if state.reason:
        cli.out.print(Text(state.reason, style="yellow"))
    cli.out.print(f"infrastructure file: {state.infrastructure_file}")


def _show_lab(cli: Cli, action: Callable[[], Any], output: str) -> None:
    """Run a lab action and print the lab it leaves; a LabError exits 1 with its message."""
    try:
        state = action()
    except LabError as exc:
        fail(str(exc), code=1)
    if output == "json":
        cli.json(_lab_json(state))
    else:
        _print_lab(cli, state)


@lab.command("up")
@click.option("--hosts", "n", type=click.IntRange(1, 250), default=5, show_default=True)
@click.option(
    "--regions",
    default="local",
    show_default=True,
    help="Comma-separated regions, assigned to hosts in turn.",
)
@click.option(
    "--sandbox/--ssh",
    "sandbox",
    default=None,
    help="Force local sandbox hosts (no sshd) or real sshd hosts; default: sshd when possible.",
)
@click.option(
    "--first",
    type=click.IntRange(1, 254),
    default=1,
    show_default=True,
    help="Address of the first host: 127.0.1.FIRST (run several labs side by side).",
)
@output_option
@pass_cli
def lab_up_cmd(
    cli: Cli, n: int, regions: str, sandbox: bool | None, first: int, output: str
) -> None:
    """Start N lab hosts and write their Infrastructure file."""
    from app.lab import lab_up

    _show_lab(
        cli,
        lambda: lab_up(
            n,
            root=_lab_root(),
            sandbox=sandbox,
            first=first,
            regions=[r.strip() for r in regions.split(",") if r.strip()],
        ),
        output,
    )


@lab.command("status")
@output_option
@pass_cli
def lab_status_cmd(cli: Cli, output: str) -> None:
    """Show the lab hosts and whether they are alive."""
    from app.lab import lab_status

    _show_lab(cli, lambda: lab_status(root=_lab_root()), output)


@lab.command("down")
@pass_cli
def lab_down_cmd(cli: Cli) -> None:
    """Stop exactly the lab processes that `lab up` started."""
    from app.lab import lab_down

    try:
        n = lab_down(root=_lab_root())
    except LabError as exc:
        fail(str(exc), code=1)
    cli.out.print(f"stopped {n} lab process(es)")
