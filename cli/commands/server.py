"""``vmfarm server``: run the control plane's HTTP API; ``server keys`` and ``server db-roles``
prepare what it needs (message-signing keys, the ledger's PostgreSQL roles)."""

from __future__ import annotations

from pathlib import Path

import click

from cli.console import fail


def register(main: click.Group) -> None:
    main.add_command(server)


@click.group(invoke_without_command=True)
@click.option(
    "--host", default=None, help="Address to listen on [VMFARM_SERVER_HOST, default 127.0.0.1]."
)
@click.option(
    "--port",
    type=click.IntRange(1, 65535),
    default=None,
    help="Port [VMFARM_SERVER_PORT, default 8000].",
)
@click.option(
    "--log-level",
    default="info",
    show_default=True,
    type=click.Choice(["critical", "error", "warning", "info", "debug"]),
)
@click.pass_context
def server(ctx: click.Context, host: str | None, port: int | None, log_level: str) -> None:
    """Run the vmfarm server (the HTTP API; OpenAPI at /api/docs).

    Configured from the environment: VMFARM_SERVER_RBAC_FILE (roles and bindings, required),
    VMFARM_SERVER_ISSUER and VMFARM_SERVER_AUDIENCE (OpenID Connect sign-in),
    VMFARM_SERVER_GROUPS_CLAIM (default groups), VMFARM_SERVER_USERS_FILE; the ledger and
    broker as every vmfarm process (VMFARM_DATABASE_URL, VMFARM_BROKER_URL, and the
    VMFARM_SECURITY_* paths that sign messages). It polls the artifact triggers' repositories
    every VMFARM_ARTIFACT_POLL_INTERVAL seconds (default 60; 0: never).
    """
    if ctx.invoked_subcommand is not None:
        return
    import uvicorn

    from app.errors import ConfigError
    from app.server import create_app
    from app.server.settings import ServerSettings

    settings = ServerSettings()
    if host:
        settings.host = host
    if port:
        settings.port = port
    try:
        api = create_app(settings)
    except ConfigError as exc:
        fail(str(exc))
    from app.server import poller

    poller.start(api.state.rbac.get)  # artifact triggers (VMFARM_ARTIFACT_POLL_INTERVAL)
    uvicorn.run(
        api, host=settings.host, port=settings.port, log_level=log_level, proxy_headers=False
    )


@server.command("keys")
@click.argument("directory", type=click.Path(file_okay=False, path_type=Path))
@click.option("--name", required=True, help="Whose key: server, control, region-r1, ...")
@click.option(
    "--days",
    type=click.IntRange(1, 3650),
    default=825,
    show_default=True,
    help="How long the certificate is valid.",
)
def keys(directory: Path, name: str, days: int) -> None:
    """Make a message-signing key for one kind of process: DIRECTORY/NAME.key (mode 0600),
    DIRECTORY/NAME.pem, and the certificate in the store DIRECTORY/certs/.

    Every process that publishes or consumes tasks in service mode then sets
    VMFARM_SECURITY_KEY, VMFARM_SECURITY_CERTIFICATE and VMFARM_SECURITY_CERT_STORE
    (see app/signing.py); a region gets only its own key and the certs/ directory.
    """
    from app.errors import ConfigError
    from app.signing import init_keys

    try:
        made = init_keys(directory, name, days=days)
    except ConfigError as exc:
        fail(str(exc))
    click.echo(f"VMFARM_SECURITY_KEY={made.key}")
    click.echo(f"VMFARM_SECURITY_CERTIFICATE={made.certificate}")
    click.echo(f"VMFARM_SECURITY_CERT_STORE={made.store}")


@server.command("db-roles")
def db_roles() -> None:
    """Create the ledger's PostgreSQL roles (vmfarm_server, vmfarm_worker, vmfarm_readonly)
    and grant their privileges again (after an upgrade added tables). Run it as a role that
    may create roles; then make login roles members of them (see app/dbroles.py)."""
    from app.db import get_engine
    from app.dbroles import apply

    engine = get_engine()
    if engine.dialect.name != "postgresql":
        fail("the ledger is not PostgreSQL: it has no roles to grant")
    with engine.begin() as conn:
        if not apply(conn):
            fail("the roles do not exist and this database user may not create them")
    click.echo("roles vmfarm_server, vmfarm_worker, vmfarm_readonly granted")
