"""The ``vmfarm`` command: the root group and its entry point.

The root group builds the context object (``cli.context.Cli``: consoles, the acting user) once;
the commands live in ``cli/commands/``, one module per group of them. Exit codes are in
``cli.console``: 0 success, 1 the deployment failed, 2 bad input (nothing ran), 3 refused.

Two modes. Local mode (no server configured) runs everything in this process against the
local ledger and broker, as ``VMFARM_USER`` (or ``$USER``), with no authentication. Server
mode (``VMFARM_SERVER``, or a sign-in stored by ``vmfarm login URL``) takes the commands of
``cli.thin`` instead: thin HTTP clients of the server, which decides who you are and what you
may do; the local command modules are then not even imported (no SQL, no Celery).
"""

from __future__ import annotations

import click

from cli.context import Cli


class ModalGroup(click.Group):
    """The root group: local commands (``cli.commands``, registered when first needed) or,
    in server mode, their server-mode versions (``cli.thin``)."""

    _loaded = False

    def _local(self) -> None:
        if not self._loaded:
            from cli.commands import register_all

            self._loaded = True
            register_all(self)

    def list_commands(self, ctx: click.Context) -> list[str]:
        from cli import thin

        self._local()
        return sorted(set(self.commands) | set(thin.COMMANDS))

    def get_command(self, ctx: click.Context, cmd_name: str) -> click.Command | None:
        from cli import thin
        from cli.remote import server_mode

        if cmd_name in thin.EITHER_MODE:
            return thin.COMMANDS[cmd_name]
        if server_mode():
            if cmd_name in thin.COMMANDS:
                return thin.COMMANDS[cmd_name]
            self._local()
            local = self.commands.get(cmd_name)
            if local is None or cmd_name in thin.LOCAL_IN_SERVER_MODE:
                return local
            return thin.local_only(cmd_name, local)
        self._local()
        local = self.commands.get(cmd_name)
        if local is None and cmd_name in thin.SERVER_ONLY:
            return thin.server_only(cmd_name)
        return local


@click.group(cls=ModalGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="vmfarm")
@click.pass_context
def main(ctx: click.Context) -> None:
    """Deploy applications to fleets of virtual machines over SSH, on Celery workers per
    region.

    \b
    Local mode (no server configured): one person on one machine. There is NO
    authentication: you act as VMFARM_USER (or $USER) and RBAC comes from local files.
    Server mode (VMFARM_SERVER=URL, or `vmfarm login URL`): every command goes to the
    vmfarm server, which knows who you are (your sign-in, or VMFARM_TOKEN) and decides.
    """
    ctx.ensure_object(Cli)


def _thin_client_imports(command: str) -> None:
    """In a process that runs only a server-mode command, skip two imports that a
    synchronous HTTP client never uses (``import X`` raises ImportError when
    ``sys.modules[X]`` is None, and both libraries expect that): trio, which httpcore imports
    at the first connection for an event loop nobody runs here (~140 ms), and httpx's own
    command-line tool, which httpx imports with its rich and pygments output (~30 ms). Only
    in the ``vmfarm`` process, never when ``main`` is called as a library."""
    import sys

    from cli import thin
    from cli.remote import server_mode

    if command in thin.COMMANDS and server_mode():
        for name in ("trio", "httpx._main"):
            if name not in sys.modules:
                sys.modules[name] = None  # type: ignore[assignment]


def entry() -> None:
    """The `vmfarm` command: the click group, then a quick exit (freezing the heap skips the
    collector's walk over every object at interpreter shutdown, ~0.4 s)."""
    import gc
    import sys

    if len(sys.argv) > 1:
        _thin_client_imports(sys.argv[1])
    try:
        main()
    finally:
        gc.freeze()


if __name__ == "__main__":
    entry()
