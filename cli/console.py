"""Where the ``vmfarm`` command writes, and how it stops when something is wrong.

Exit codes, for every command::

    0   done
    1   the deployment failed (or a delivery, a discovery, the lab)
    2   bad input: files, inputs, options, settings; nothing ran
    3   refused: the user may not (RBAC, the approval's rules); nothing was done

No console markup: host names, scripts and errors are printed as they are ("[x]" included).
"""

from __future__ import annotations

import sys
from typing import NoReturn

from rich.console import Console
from rich.text import Text

from app.errors import SpecErrors

out = Console(highlight=False, soft_wrap=True, markup=False)
err = Console(stderr=True, highlight=False, soft_wrap=True, markup=False)

STATUS_STYLE = {
    "SUCCEEDED": "green",
    "FAILED": "bold red",
    "RUNNING": "yellow",
    "SKIPPED": "dim",
    "PENDING": "dim",
    "QUEUED": "dim",
    "ABORTED": "red",
    "ROLLING_BACK": "yellow",
    "ROLLED_BACK": "magenta",
    "ROLLBACK_FAILED": "bold red",
    "WAITING": "cyan",
    "IGNORED": "dim",
}


def styled(status: str) -> Text:
    """An execution, stage, host or step status in its colour."""
    return Text(status, style=STATUS_STYLE.get(status, ""))


def error(message: str) -> None:
    """Print ``error: message`` on stderr (the caller decides whether to go on)."""
    err.print(Text(f"error: {message}", style="red"))


def fail(message: str, *, code: int = 2, then: str | None = None) -> NoReturn:
    """Print ``error: message`` (and ``then`` on a line of its own), exit ``code``."""
    error(message)
    if then:
        err.print(then)
    sys.exit(code)


def refused(exc: Exception) -> NoReturn:
    """A permission the user lacks (or an approval rule): nothing was done; exit 3."""
    err.print(Text(f"refused: {exc}", style="red"))
    sys.exit(3)


def fail_input(exc: Exception) -> NoReturn:
    """Print a bad-input error (``file:line:col: message``, each of several), exit 2."""
    errors = exc.errors if isinstance(exc, SpecErrors) else [exc]
    for e in errors:
        error(str(e))
    if len(errors) > 1:
        err.print(f"{len(errors)} errors; nothing was run.")
    else:
        err.print("nothing was run.")
    sys.exit(2)
