"""The ``vmfarm`` command: the root group and its entry point.

The root group builds the context object (``cli.context.Cli``: consoles, the acting user) once;
the commands live in ``cli/commands/``, one module per group of them. Exit codes are in
``cli.console``: 0 success, 1 the deployment failed, 2 bad input (nothing ran), 3 refused.
"""

from __future__ import annotations

import click

from cli.commands import register_all
from cli.context import Cli


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="vmfarm")
@click.pass_context
def main(ctx: click.Context) -> None:
    """Deploy applications to fleets of virtual machines over SSH, on Celery workers per
    region."""
    ctx.ensure_object(Cli)


register_all(main)


def entry() -> None:
    """The `vmfarm` command: the click group, then a quick exit (freezing the heap skips the
    collector's walk over every object at interpreter shutdown, ~0.4 s)."""
    import gc

    try:
        main()
    finally:
        gc.freeze()


if __name__ == "__main__":
    entry()
