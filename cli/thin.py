"""The commands in server mode: each one HTTP call (or a few) to the vmfarm server, with the
same options, output and exit codes as in local mode.

::

    run, retry, rollback          submit, then follow over server-sent events
    status, executions, logs      reads
    approve, reject, abort        decisions (as the signed-in subject)
    apply, get, history           the registry
    tokens create|list|revoke     API tokens
    login, logout                 both modes: how server mode starts and ends

``cli.main``'s group picks these in server mode (``COMMANDS``); a local command without a
server equivalent is refused there by name (``local_only``) rather than run against a local
ledger. Nothing here imports SQLAlchemy, SQLModel or Celery.
"""

from __future__ import annotations

import functools
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, NoReturn, TypeVar

import click
from rich.text import Text

from cli.console import err, error, out
from cli.context import Cli, pass_cli
from cli.options import input_options, output_option, pipeline_option, watch_option
from cli.remote import (
    LoginError,
    Remote,
    RemoteError,
    ServerBadInput,
    ServerRefused,
    ServerUnavailable,
    connect,
)

F = TypeVar("F", bound=Callable[..., Any])
EX = "/api/v1/executions"
REG = "/api/v1/registry"
YAML_SUFFIXES = (".yaml", ".yml")
# How often following an execution reconnects after its event stream broke, before giving up.
RECONNECTS = 5
NO_FREEZE_FILES = "the server's operators decide the freeze windows"
NO_ROUTE = "the server has no route for it yet"


def stop(exc: RemoteError, *, nothing: str | None = None) -> NoReturn:
    """Print a RemoteError as local mode prints its kind of error, exit with its code."""
    if isinstance(exc, ServerRefused | LoginError):
        err.print(Text(f"refused: {exc}", style="red"))
    else:
        for line in str(exc).splitlines() or [str(exc)]:
            error(line)
        if isinstance(exc, ServerBadInput) and nothing:
            err.print(nothing)
    sys.exit(exc.code)


def remote_errors(nothing: str | None = None) -> Callable[[F], F]:
    """Turn a RemoteError escaping the command into its message and exit code."""

    def decorate(f: F) -> F:
        @functools.wraps(f)
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            try:
                return f(*args, **kwargs)
            except RemoteError as exc:
                stop(exc, nothing=nothing)

        return wrapper  # type: ignore[return-value]

    return decorate


def refuse_option(name: str, why: str) -> NoReturn:
    error(f"{name} is not carried out in server mode: {why}; nothing was run.")
    sys.exit(2)


# --- files ------------------------------------------------------------------------------------


def read_files(paths: tuple[str, ...]) -> dict[str, str]:
    """Files as given, folders as their YAML files (recursively), by plain name (what the
    server takes); exit 2 on a missing file or two files of the same name."""
    found: list[Path] = []
    for raw in paths:
        p = Path(raw)
        if p.is_dir():
            inside = sorted(q for q in p.rglob("*") if q.suffix in YAML_SUFFIXES and q.is_file())
            if not inside:
                _bad(f"{p}: folder has no .yaml or .yml files")
            found.extend(inside)
        elif p.is_file():
            found.append(p)
        else:
            _bad(f"{p}: no such file or folder")
    files: dict[str, str] = {}
    origin: dict[str, Path] = {}
    for p in found:
        name = p.name if p.suffix in YAML_SUFFIXES else p.name + ".yaml"
        if name in files:
            _bad(f"{p} and {origin[name]}: two files named {name} (the server takes plain names)")
        try:
            files[name] = p.read_text()
        except (OSError, UnicodeDecodeError) as exc:
            _bad(f"{p}: cannot read file: {exc}")
        origin[name] = p
    return files


def _bad(message: str) -> NoReturn:
    error(message)
    err.print("nothing was run.")
    sys.exit(2)


# --- following an execution -------------------------------------------------------------------


def follow(
    cli: Cli, remote: Remote, execution_id: str, *, watch: bool | None, output: str
) -> NoReturn:
    """As local mode's ``dispatch_and_watch`` after the work is sent: the execution's id,
    then its progress (from the server's event stream), then the report; exit 0 when it
    succeeded, 1 otherwise (``--detach``: the id, exit 0)."""
    if output != "json":
        err.print(Text.assemble("execution ", (execution_id, "bold")))
    if watch is False:
        if output == "json":
            cli.json({"id": execution_id, "status": "RUNNING"})
        else:
            cli.out.print(execution_id)
        sys.exit(0)
    live = output != "json" and (sys.stdout.isatty() if watch is None else watch)
    report = _follow_live(remote, execution_id) if live else _follow_quiet(remote, execution_id)
    if output == "json":
        cli.json(report)
    else:
        from cli.render import print_summary

        print_summary(report)
    sys.exit(0 if report["status"] == "SUCCEEDED" else 1)


def _events(remote: Remote, execution_id: str) -> Any:
    """The execution's status events until its ``end`` event, reconnecting when the stream
    breaks (a server restart) a few times."""
    broken = 0
    while True:
        try:
            for name, data in remote.events(f"{EX}/{execution_id}/events"):
                if name == "end":
                    return
                if name == "status":
                    broken = 0
                    yield data
            return
        except ServerUnavailable:
            broken += 1
            if broken > RECONNECTS:
                raise
            time.sleep(min(2.0**broken / 4, 5.0))


def _follow_quiet(remote: Remote, execution_id: str) -> dict[str, Any]:
    told = False
    watched: set[str] = set()
    for progress in _events(remote, execution_id):
        w = progress.get("watching")  # the watch after deployment that holds the run open
        if w and w.get("stage") not in watched:
            watched.add(w.get("stage"))
            err.print(
                f"execution {execution_id}: stage {w.get('stage')} passed its last phase; "
                f"watching it until {w.get('ends_at')} (rollbackStrategy.triggers): the run "
                "ends when the watch does"
            )
        if progress.get("status") == "WAITING" and not told:
            if remote.get(f"{EX}/{execution_id}").get("intervention"):
                err.print(
                    f"execution {execution_id} waits for a manual intervention: "
                    f"vmfarm intervene {execution_id} ACTION"
                )
            else:
                err.print(
                    f"execution {execution_id} is waiting for approval: "
                    f"vmfarm approve {execution_id} (or reject)"
                )
            told = True
    report: dict[str, Any] = remote.get(f"{EX}/{execution_id}")
    return report


def _follow_live(remote: Remote, execution_id: str) -> dict[str, Any]:
    from rich.live import Live

    from cli.render import live_view

    report: dict[str, Any] = remote.get(f"{EX}/{execution_id}")
    with Live(live_view(report), console=out, refresh_per_second=8, transient=True) as view:
        for _ in _events(remote, execution_id):
            report = remote.get(f"{EX}/{execution_id}")
            view.update(live_view(report))
    final: dict[str, Any] = remote.get(f"{EX}/{execution_id}")
    return final


# --- new executions ---------------------------------------------------------------------------


@click.command("run")
@click.argument("files", nargs=-1, type=click.Path())
@pipeline_option
@input_options(set_help="Fill a runtime input <+input>; KEY may be the input's last name parts.")
@watch_option("Show live progress (default on a terminal) or return after submitting.")
@click.option(
    "--freeze",
    "freeze_files",
    multiple=True,
    type=click.Path(dir_okay=False),
    help=f"Refused in server mode: {NO_FREEZE_FILES}.",
)
@click.option("--override-freeze", is_flag=True, help=f"Refused in server mode: {NO_ROUTE}.")
@output_option
@pass_cli
@remote_errors(nothing="nothing was run.")
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
    """Run a pipeline on the server: submit FILES (or name a stored pipeline with --pipeline
    ID and no files), then follow it. Exit 0 when it succeeds, 1 when it fails, 2 on bad
    input, 3 when refused."""
    if freeze_files:
        refuse_option("--freeze", NO_FREEZE_FILES)
    if override_freeze:
        refuse_option("--override-freeze", NO_ROUTE)
    if not files and not pipeline:
        raise click.UsageError("give pipeline FILES, or --pipeline ID of a stored pipeline")
    from cli.options import gather_inputs, parse_sets

    # --inputs files are read here (the server takes values); without them the loader, and
    # its half second of imports, is not needed.
    values = gather_inputs(input_files, sets) if input_files else parse_sets(sets)
    inputs = {str(k): str(v) for k, v in dict(values).items()}
    # No files: --pipeline names a pipeline stored on the server (the registry's).
    body: dict[str, Any] = {"files": read_files(files)} if files else {}
    body["set"] = inputs
    if pipeline:
        body["pipeline"] = pipeline
    remote = connect()
    submitted = remote.post(EX, body)
    follow(cli, remote, str(submitted["id"]), watch=watch, output=output)


@click.command("retry")
@click.argument("execution_id")
@click.option(
    "--only-failed", is_flag=True, required=True, help="Re-run only the hosts that did not succeed."
)
@watch_option()
@click.option("--override-freeze", is_flag=True, help=f"Refused in server mode: {NO_ROUTE}.")
@output_option
@pass_cli
@remote_errors()
def retry(
    cli: Cli,
    execution_id: str,
    only_failed: bool,
    watch: bool | None,
    override_freeze: bool,
    output: str,
) -> None:
    """Re-run an ended execution on the hosts that did not succeed, as a new execution."""
    if override_freeze:
        refuse_option("--override-freeze", NO_ROUTE)
    remote = connect()
    new = remote.post(f"{EX}/{execution_id}/retry")
    if output != "json":
        err.print(f"retrying the failed hosts of {execution_id}")
    follow(cli, remote, str(new["id"]), watch=watch, output=output)


@click.command("rollback")
@click.argument("execution_id")
@click.option(
    "--plan", "show_plan", is_flag=True, help="Refused in server mode: no preview route yet."
)
@watch_option()
@output_option
@pass_cli
@remote_errors()
def rollback(cli: Cli, execution_id: str, show_plan: bool, watch: bool | None, output: str) -> None:
    """Roll a successful execution back on every host it changed, as a new execution."""
    if show_plan:
        refuse_option("--plan", "the server has no rollback preview route yet")
    remote = connect()
    new = remote.post(f"{EX}/{execution_id}/rollback")
    if output != "json":
        err.print(f"rolling back {execution_id}")
    follow(cli, remote, str(new["id"]), watch=watch, output=output)


# --- reads ------------------------------------------------------------------------------------


@click.command("status")
@click.argument("execution_id")
@click.option("--all-hosts", is_flag=True, help="One line per host even for large stages.")
@output_option
@pass_cli
@remote_errors()
def status(cli: Cli, execution_id: str, all_hosts: bool, output: str) -> None:
    """Show an execution: stages, phases and every host's outcome."""
    from cli.render import gate_phases, print_gates, print_summary

    report = connect().get(f"{EX}/{execution_id}")
    if output == "json":
        cli.json(report)
        return
    print_summary(report, every_host=all_hosts)
    for st in report["stages"]:
        if st.get("type") == "Approval" or not gate_phases(st):
            continue
        cli.out.print(f"stage {st['identifier']} gates:")
        print_gates(st, only_failed=False)


@click.command("executions")
@click.option("--limit", default=20, show_default=True)
@click.option(
    "--status", "statuses", multiple=True, help="Only executions in this status (repeatable)."
)
@output_option
@pass_cli
@remote_errors()
def executions(cli: Cli, limit: int, statuses: tuple[str, ...], output: str) -> None:
    """List recent executions (newest first)."""
    from rich.table import Table

    from cli.console import styled

    data = connect().get(EX, limit=limit, status=[s.upper() for s in statuses] or None)
    if output == "json":
        cli.json(data)
        return
    table = Table()
    for c in ("id", "pipeline", "status", "created", "by"):
        table.add_column(c)
    for d in data:
        table.add_row(d["id"], d["pipeline"], styled(d["status"]), d["created_at"], d["created_by"])
    cli.out.print(table)


@click.command("logs")
@click.argument("execution_id")
@click.option("--host", help="Only this host.")
@click.option("--step", help="Only this step identifier.")
@output_option
@pass_cli
@remote_errors()
def logs(cli: Cli, execution_id: str, host: str | None, step: str | None, output: str) -> None:
    """Print the output of an execution's steps, host by host."""
    chunks = connect().get(f"{EX}/{execution_id}/logs", host=host, step=step)
    if output == "json":
        cli.json(chunks)
        return
    if not chunks:
        cli.err.print("no log output recorded for that selection")
    for c in chunks:
        where = f"{c['step']}/{c['unit']}" + (" (rollback)" if c.get("kind") == "rollback" else "")
        prefix = f"[{c['host']} {where}]"
        for line in c["text"].splitlines():
            style = "red" if c["stream"] == "stderr" else ""
            cli.out.print(Text(f"{prefix} {line}", style=style))


# --- decisions --------------------------------------------------------------------------------


def _decide(cli: Cli, execution_id: str, verb: str, comment: str) -> None:
    answer = connect().post(f"{EX}/{execution_id}/{verb}", {"comment": comment})
    cli.out.print(f"execution {execution_id}: {answer['outcome']}")


@click.command("approve")
@click.argument("execution_id")
@click.option("--comment", "-m", default="", help="Why (kept with the decision).")
@pass_cli
@remote_errors()
def approve(cli: Cli, execution_id: str, comment: str) -> None:
    """Approve an execution waiting in an Approval stage, as the signed-in user."""
    _decide(cli, execution_id, "approve", comment)


@click.command("reject")
@click.argument("execution_id")
@click.option("--comment", "-m", default="", help="Why (kept with the decision).")
@pass_cli
@remote_errors()
def reject(cli: Cli, execution_id: str, comment: str) -> None:
    """Reject an execution waiting in an Approval stage: it fails (ApprovalRejection)."""
    _decide(cli, execution_id, "reject", comment)


@click.command("abort")
@click.argument("execution_id")
@click.option(
    "--rollback", is_flag=True, help="Then roll back the hosts the current stage changed."
)
@pass_cli
@remote_errors()
def abort(cli: Cli, execution_id: str, rollback: bool) -> None:
    """Stop an execution: no new work is sent; running hosts stop at their next unit."""
    result = connect().post(f"{EX}/{execution_id}/abort", {"rollback": rollback})["outcome"]
    if result not in ("aborted", "rolling back"):
        cli.out.print(f"execution {execution_id} already ended: {result}")
        return
    then = (
        "; then the hosts the stage changed roll back (vmfarm status shows it)"
        if result == "rolling back"
        else ""
    )
    cli.out.print(
        f"execution {execution_id} aborted: no new work is sent; running hosts stop "
        f"at their next command unit{then}"
    )


# --- the registry -----------------------------------------------------------------------------


@click.command("apply")
@click.option(
    "--file",
    "-f",
    "paths",
    multiple=True,
    required=True,
    type=click.Path(),
    help="A file or a folder of YAML files (repeatable).",
)
@output_option
@pass_cli
@remote_errors(nothing="nothing was applied.")
def apply(cli: Cli, paths: tuple[str, ...], output: str) -> None:
    """Store Environments, Infrastructures, Services, Connectors, Templates and Pipelines on
    the server: a new version of each that changed (who, when, diff)."""
    answer = connect().post(REG, {"files": read_files(paths)})
    applied = answer.get("applied", []) if isinstance(answer, dict) else answer
    if output == "json":
        cli.json(answer)
        return
    for a in applied:
        what = "changed" if a.get("changed") else "unchanged"
        cli.out.print(f"{a['kind']}/{a['id']}: version {a['version']} ({what})")


@click.command("get")
@click.argument("kind")
@click.argument("ident", required=False)
@click.option("--version", "version", type=int, help="This version (default: the current).")
@output_option
@pass_cli
@remote_errors()
def get(cli: Cli, kind: str, ident: str | None, version: int | None, output: str) -> None:
    """List the registry's entries of KIND, or show one (its YAML)."""
    from urllib.parse import quote

    remote = connect()
    if ident is None:
        rows = remote.get(f"{REG}/{quote(kind, safe='')}")
        if output == "json":
            cli.json(rows)
            return
        _table(cli, rows)
        return
    doc = remote.get(f"{REG}/{quote(kind, safe='')}/{quote(ident, safe='')}", version=version)
    if output == "json":
        cli.json(doc)
        return
    err.print(
        f"{doc.get('kind', kind)}/{doc.get('id', ident)} version {doc.get('version')} "
        f"by {doc.get('author')} at {doc.get('created_at')}"
    )
    cli.out.print(str(doc.get("text", "")).rstrip("\n"))


@click.command("history")
@click.argument("kind")
@click.argument("ident")
@output_option
@pass_cli
@remote_errors()
def history(cli: Cli, kind: str, ident: str, output: str) -> None:
    """Every version of a registry entry: who, when, and what changed."""
    from urllib.parse import quote

    rows = connect().get(f"{REG}/{quote(kind, safe='')}/{quote(ident, safe='')}/history")
    if output == "json":
        cli.json(rows)
        return
    for r in rows:
        cli.out.print(f"version {r['version']} by {r['author']} at {r['created_at']}")
        for line in str(r.get("diff") or "").splitlines():
            style = "green" if line.startswith("+") else "red" if line.startswith("-") else ""
            cli.out.print(Text(f"  {line}", style=style))


def _table(cli: Cli, rows: Any) -> None:
    from rich.table import Table

    if not rows:
        cli.err.print("nothing stored of that kind")
        return
    if not isinstance(rows[0], dict):
        for r in rows:
            cli.out.print(str(r))
        return
    columns = [c for c in rows[0] if c not in ("text", "diff")]
    table = Table(box=None)
    for c in columns:
        table.add_column(c)
    for r in rows:
        table.add_row(*(str(r.get(c, "")) for c in columns))
    cli.out.print(table)


@click.command("triggers")
@output_option
@pass_cli
@remote_errors()
def triggers(cli: Cli, output: str) -> None:
    """The server's triggers (kind: Trigger): webhook triggers with their last deliveries,
    artifact triggers with their last poll (and its error) and the last builds they found."""
    rows = connect().get("/api/v1/triggers")
    if output == "json":
        cli.json(rows)
        return
    if not rows:
        cli.err.print("no trigger stored (vmfarm apply -f TRIGGER.yaml stores one)")
        return
    for t in rows:
        state = "" if t.get("enabled", True) else " (disabled)"
        if t.get("kind") == "artifact":
            _artifact_trigger(cli, t, state)
            continue
        cli.out.print(
            f"{t['id']}{state}: pipeline {t['pipeline']}, version {t.get('version')}; "
            f"POST /api/v1/webhooks/{t['id']}"
        )
        for d in t.get("deliveries") or []:
            what = d["outcome"] + (f" {d['execution']}" if d.get("execution") else "")
            detail = f" ({d['detail']})" if d.get("detail") else ""
            cli.out.print(f"  {_when(d['received_at'])}  {d['delivery'][:40]}  {what}{detail}")


def _artifact_trigger(cli: Cli, t: dict[str, Any], state: str) -> None:
    from rich.text import Text

    cli.out.print(
        Text(
            f"{t['id']}{state}: pipeline {t['pipeline']}, version {t.get('version')}; "
            f"polls {t.get('source')}"
        )
    )
    poll = t.get("poll")
    if poll is None:
        cli.out.print("  not polled yet")
    elif poll.get("error"):
        ok = f"; last good poll {_when(poll['ok_at'])}" if poll.get("ok_at") else ""
        cli.out.print(
            Text(f"  last poll {_when(poll['polled_at'])} FAILED: {poll['error']}{ok}", style="red")
        )
    else:
        cli.out.print(f"  last poll {_when(poll['polled_at'])}: ok")
    for b in t.get("builds") or []:
        what = b["outcome"] + (f" {b['execution']}" if b.get("execution") else "")
        detail = f" ({b['detail']})" if b.get("detail") else ""
        cli.out.print(Text(f"  {_when(b['seen_at'])}  {b['build'][:80]}  {what}{detail}"))


# --- API tokens -------------------------------------------------------------------------------


@click.group("tokens")
def tokens() -> None:
    """API tokens for machines (CI systems, schedules): VMFARM_TOKEN=vmf_... (server mode)."""


@tokens.command("create")
@click.option("--name", required=True, help="What it is for, e.g. ci.")
@click.option("--role", "roles", multiple=True, required=True, help="A role (repeatable).")
@click.option("--expires", default="90d", show_default=True, help="Lifetime: 90d, 12h, ...")
@output_option
@pass_cli
@remote_errors()
def tokens_create(cli: Cli, name: str, roles: tuple[str, ...], expires: str, output: str) -> None:
    """Make an API token with ROLEs. It is printed once: the server keeps only its hash."""
    made = connect().post(
        "/api/v1/tokens", {"name": name, "roles": list(roles), "expires": expires}
    )
    if output == "json":
        cli.json(made)
        return
    cli.out.print(made["token"])
    err.print(
        f"token {made['name']} (id {made['id']}, role(s) {', '.join(made['roles'])}) expires "
        f"{made['expires_at']}: it is shown once, store it now"
    )


@tokens.command("list")
@output_option
@pass_cli
@remote_errors()
def tokens_list(cli: Cli, output: str) -> None:
    """Every API token: roles, maker, expiry, last use, revocation (never a token)."""
    from rich.table import Table

    rows = connect().get("/api/v1/tokens")
    if output == "json":
        cli.json(rows)
        return
    table = Table(box=None)
    for c in ("id", "name", "prefix", "roles", "by", "expires", "last used", "revoked"):
        table.add_column(c)
    for r in rows:
        table.add_row(
            r["id"],
            r["name"],
            r["prefix"],
            ",".join(r["roles"]),
            r["created_by"],
            _when(r["expires_at"]),
            _when(r["last_used_at"]) or "never",
            _when(r["revoked_at"]),
        )
    cli.out.print(table)


def _when(value: str | None) -> str:
    return (value or "")[:19].replace("T", " ")


@tokens.command("revoke")
@click.argument("token_id")
@pass_cli
@remote_errors()
def tokens_revoke(cli: Cli, token_id: str) -> None:
    """Revoke an API token: the server refuses it from now on."""
    connect().delete(f"/api/v1/tokens/{token_id}")
    cli.out.print(f"token {token_id} revoked")


# --- signing in -------------------------------------------------------------------------------


@click.command("login")
@click.argument("url", required=False)
@click.option(
    "--device",
    is_flag=True,
    help="Sign in on another device with a code (the device flow, when the identity "
    "provider offers it; chosen by itself on a machine without a browser).",
)
@click.option("--no-browser", is_flag=True, help="Print the sign-in address; open nothing.")
@remote_errors()
def login(url: str | None, device: bool, no_browser: bool) -> None:
    """Sign in to a vmfarm server (URL, default VMFARM_SERVER or the last one); the commands
    then act on it as you. The token is kept in ~/.config/vmfarm/login.json (mode 0600) and
    renewed with its refresh token."""
    import httpx

    from cli import login as flows
    from cli.remote import bearer_of, jwt_claims, server_url, write_login

    server = (url or server_url() or "").rstrip("/")
    if not server:
        raise click.UsageError("which server? vmfarm login URL (or set VMFARM_SERVER)")
    if not server.startswith(("http://", "https://")):
        raise click.BadParameter(f"'{server}' is not an http(s) URL", param_hint="URL")

    def show(line: str) -> None:
        err.print(line, soft_wrap=True)

    with httpx.Client(timeout=30.0) as http:
        conf = flows.auth_config(http, server)
        disc = flows.discovery(http, str(conf["issuer"]))
        flow = flows.choose_flow(
            disc, device=device, no_browser=no_browser, browser=flows.browser_here
        )
        if flow == "device" and not device:
            show("no browser on this machine: sign in on another device with a code")
        if flow == "device":
            answer = flows.device_code(http, conf, disc, show=show)
        else:
            answer = flows.authorization_code(
                http, conf, disc, show=show, open_browser=not no_browser
            )
    token = bearer_of(answer)
    if token is None:
        raise LoginError("the identity provider gave no ID token; nothing was stored")
    subject = jwt_claims(token).get("sub", "?")
    path = write_login(
        {
            "server": server,
            "issuer": conf["issuer"],
            "client_id": conf["client_id"],
            **({"client_secret": conf["client_secret"]} if conf.get("client_secret") else {}),
            "token_endpoint": disc["token_endpoint"],
            "token": token,
            "refresh_token": answer.get("refresh_token"),
            "subject": subject,
        }
    )
    err.print(f"signed in to {server} as {subject} (kept in {path})")


@click.command("logout")
def logout() -> None:
    """Forget the stored sign-in (back to local mode unless VMFARM_SERVER is set)."""
    import os

    from cli.remote import forget_login

    gone = forget_login()
    err.print("signed out" if gone else "not signed in")
    if os.environ.get("VMFARM_SERVER", "").strip():
        err.print("VMFARM_SERVER is still set: commands still go to that server")


# --- which command where ----------------------------------------------------------------------

COMMANDS: dict[str, click.Command] = {
    c.name: c
    for c in (
        run,
        retry,
        rollback,
        status,
        executions,
        logs,
        approve,
        reject,
        abort,
        apply,
        triggers,
        get,
        history,
        tokens,
        login,
        logout,
    )
    if c.name
}
# Both modes: how server mode starts and ends.
EITHER_MODE = ("login", "logout")
# Local commands that work in server mode as they are: file tools that read only the given
# files, and the control plane's own processes and setup (run where the ledger and broker
# are, never by a client).
LOCAL_IN_SERVER_MODE = ("validate", "convert", "server", "worker", "lab", "flower", "reconcile")
# Only the server has these.
SERVER_ONLY = ("apply", "get", "history", "tokens", "triggers")


def local_only(name: str, local: click.Command | None) -> click.Command:
    """What ``name`` is in server mode when it has no server equivalent: a command that says
    so (exit 2) instead of acting on a local ledger."""
    help_text = (local.get_short_help_str(70) if local else "") + " (local mode only)"

    @click.command(
        name,
        help=help_text,
        context_settings={"ignore_unknown_options": True, "allow_extra_args": True},
        add_help_option=False,
    )
    @click.argument("args", nargs=-1, type=click.UNPROCESSED)
    def refuse(args: tuple[str, ...]) -> None:
        from cli.remote import server_url

        error(
            f"'vmfarm {name}' has no server equivalent yet: in server mode ({server_url()}) "
            "it would act on this machine's local ledger, not the server's. Unset "
            "VMFARM_SERVER and vmfarm logout to use it locally; nothing was done."
        )
        sys.exit(2)

    return refuse


def server_only(name: str) -> click.Command:
    """What ``name`` is in local mode: a command that says it needs a server (exit 2)."""

    @click.command(
        name,
        help=f"{COMMANDS[name].get_short_help_str(70)} (server mode: vmfarm login URL)",
        context_settings={"ignore_unknown_options": True, "allow_extra_args": True},
        add_help_option=False,
    )
    @click.argument("args", nargs=-1, type=click.UNPROCESSED)
    def refuse(args: tuple[str, ...]) -> None:
        error(
            f"'vmfarm {name}' needs a vmfarm server: vmfarm login URL, or set VMFARM_SERVER "
            "(and VMFARM_TOKEN for an API token)"
        )
        sys.exit(2)

    return refuse


__all__ = ["COMMANDS", "follow", "local_only", "read_files", "server_only"]
