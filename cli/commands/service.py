"""Services around the fleet: ``vmfarm flower`` (Celery's monitor), ``vmfarm schedules`` (the
cron triggers and their last runs) and ``vmfarm autoscale`` (workers per region from the queue
depth).

Exit codes as elsewhere: 0 success, 2 bad input or settings (nothing was started).
"""

from __future__ import annotations

import ipaddress
import json
import logging
import os
import signal
import sys
from pathlib import Path
from typing import Any

import click
from rich.text import Text

from cli.console import fail
from cli.context import Cli, pass_cli
from cli.options import output_option


def register(main: click.Group) -> None:
    """Add ``flower``, ``schedules`` and ``autoscale`` to ``main``."""
    for command in (flower, schedules, autoscale):
        main.add_command(command)


def _need_broker(what: str) -> None:
    from app.settings import get_settings

    if get_settings().embedded:
        fail(f"{what} needs a broker: set VMFARM_BROKER_URL (e.g. redis://127.0.0.1:6379/0)")


# --- flower ---------------------------------------------------------------------------------------


def check_basic_auth(value: str) -> list[str]:
    """``user:password[,user2:password2]`` -> the pairs; ValueError naming what is wrong
    (never the password)."""
    pairs = [v.strip() for v in value.split(",") if v.strip()]
    if not pairs:
        raise ValueError("FLOWER_BASIC_AUTH is empty")
    for i, pair in enumerate(pairs, 1):
        user, sep, password = pair.partition(":")
        if not sep or not user or not password:
            raise ValueError(f"FLOWER_BASIC_AUTH entry {i} is not user:password")
    return pairs


@click.command(context_settings={"ignore_unknown_options": True})
@click.option(
    "--address",
    default="127.0.0.1",
    show_default=True,
    help="Address to listen on (0.0.0.0 in a container).",
)
@click.option("--port", type=click.IntRange(1, 65535), default=5555, show_default=True)
@click.option("--url-prefix", default=None, help="Serve under this path (behind a proxy).")
@click.option(
    "--no-auth",
    is_flag=True,
    help="Run without FLOWER_BASIC_AUTH (only sensible on a loopback address).",
)
@click.argument("flower_args", nargs=-1, type=click.UNPROCESSED)
@pass_cli
def flower(
    cli: Cli,
    address: str,
    port: int,
    url_prefix: str | None,
    no_auth: bool,
    flower_args: tuple[str, ...],
) -> None:
    """Run Flower (Celery's monitor: workers, tasks, queues, /metrics) on vmfarm's app.

    Basic auth comes from FLOWER_BASIC_AUTH=user:password[,user2:password2], which Flower
    reads from the environment (never from the command line, where `ps` shows it). Extra
    arguments go to Flower as they are (e.g. --max_tasks=5000). Flower's /metrics and
    /healthcheck answer without credentials."""
    _need_broker("Flower")
    auth = os.environ.get("FLOWER_BASIC_AUTH", "")
    if auth.strip():
        try:
            check_basic_auth(auth)
        except ValueError as exc:
            fail(str(exc))
        os.environ["FLOWER_BASIC_AUTH"] = auth.strip()
    elif not no_auth:
        fail("set FLOWER_BASIC_AUTH=user:password (or give --no-auth on a loopback address)")
    else:
        os.environ.pop("FLOWER_BASIC_AUTH", None)
        if not _loopback(address):
            cli.err.print(
                Text(
                    f"warning: Flower on {address} without authentication: anyone who "
                    "reaches it can revoke tasks and read task arguments",
                    style="yellow",
                )
            )
    if any(a.split("=", 1)[0] in ("--basic-auth", "--basic_auth") for a in flower_args):
        fail("give the credentials in FLOWER_BASIC_AUTH, not on the command line")
    argv = ["flower", f"--address={address}", f"--port={port}"]
    if url_prefix:
        argv.append(f"--url_prefix={url_prefix}")
    from app.celery import app
    from app.flower import FlowerWatch

    # Flower turns task events on in the workers; the last Flower to exit turns them off.
    with FlowerWatch(app):
        code = app.start([*argv, *flower_args])
    sys.exit(code or 0)


def _loopback(address: str) -> bool:
    if address == "localhost":
        return True
    try:
        return ipaddress.ip_address(address).is_loopback
    except ValueError:
        return False


# --- schedules ------------------------------------------------------------------------------------


@click.command()
@click.option(
    "--file",
    "-f",
    "path",
    type=click.Path(path_type=Path),
    default=None,
    help="Schedules file (default VMFARM_SCHEDULES_FILE, else configs/schedules.yaml if present).",
)
@output_option
@pass_cli
def schedules(cli: Cli, path: Path | None, output: str) -> None:
    """List the pipeline schedules (cron triggers) with their next and last run.

    The beat of `vmfarm worker --control --beat` submits each due slot once (as user
    `scheduler`). Exit 2 when the schedules file is invalid."""
    from app.errors import ConfigError
    from app.schedules import default_store, describe, load_schedules, schedules_file

    source = path if path is not None else schedules_file()
    try:
        loaded = load_schedules(source) if source is not None else []
    except ConfigError as exc:
        fail(str(exc))
    store: Any = None
    if loaded:
        try:
            store = default_store()
        except Exception as exc:  # the last run is a nicety: list the schedules anyway
            cli.err.print(f"warning: last runs unknown: {exc}")
    rows = describe(loaded, store=store)
    if output == "json":
        cli.json({"file": str(source) if source else None, "schedules": rows})
        return
    if source is None:
        cli.out.print(
            "no schedules file (set VMFARM_SCHEDULES_FILE or create configs/schedules.yaml)"
        )
        return
    if not rows:
        cli.out.print(f"{source}: no schedules")
        return
    cli.out.print(f"schedules in {source}:")
    for r in rows:
        nxt = (
            "disabled"
            if not r["enabled"]
            else f"next {r['next_run_local']} (in {_human(r['in_seconds'])})"
            if r["next_run"]
            else "never runs"
        )
        last = r["last"] or {}
        last_text = (
            "never run"
            if not last
            else f"last {last['slot']}: "
            + (
                f"execution {last['execution']} {last.get('status') or 'not in the ledger'}"
                if "execution" in last
                else f"not submitted: {last['error']}"
                if "error" in last
                else "claimed"
            )
        )
        cli.out.print(
            Text.assemble(
                (r["name"], "bold"),
                f"  {r['cron']} ({r['timezone']})  ",
                (nxt, "dim" if not r["enabled"] else "green"),
            )
        )
        what = f"pipeline {r['pipeline']} of " if r["pipeline"] else ""
        cli.out.print(
            f"  runs {what}{' '.join(_short(f) for f in r['files'])}"
            + (
                f" with {', '.join(f'{k}={v}' for k, v in r['inputs'].items())}"
                if r["inputs"]
                else ""
            )
        )
        cli.out.print(Text(f"  {last_text}", style="red" if "error" in last else ""))
    for r in rows:
        for f in r["missing_files"]:
            cli.err.print(Text(f"warning: schedule {r['name']}: no such file {f}", style="yellow"))


def _short(path: str) -> str:
    try:
        return str(Path(path).relative_to(Path.cwd()))
    except ValueError:
        return path


def _human(seconds: int | None) -> str:
    if seconds is None:
        return "-"
    m, s = divmod(max(0, seconds), 60)
    h, m = divmod(m, 60)
    d, h = divmod(h, 24)
    return f"{d}d{h}h" if d else f"{h}h{m:02d}m" if h else f"{m}m{s:02d}s"


# --- autoscale ------------------------------------------------------------------------------------


def _duration(value: str | None, hint: str) -> float | None:
    from app.definitions.base import parse_duration

    if value is None:
        return None
    try:
        return parse_duration(value)
    except ValueError as exc:
        raise click.BadParameter(str(exc), param_hint=hint) from None


@click.command()
@click.option(
    "--config",
    "config_path",
    type=click.Path(path_type=Path),
    help="Autoscale file (regions and their settings; see configs/autoscale.yaml).",
)
@click.option(
    "--region",
    "regions",
    multiple=True,
    help="Scale this region (repeatable); the options below apply to it, over the "
    "file's settings. Default: every region of the file.",
)
@click.option("--min", "min_", type=int, help="Fewest workers serving the region.")
@click.option("--max", "max_", type=int, help="Most workers serving the region.")
@click.option(
    "--scale-up-depth", type=int, metavar="N", help="Scale up when more than N tasks wait ..."
)
@click.option("--scale-up-after", metavar="DURATION", help="... for this long (e.g. 5m).")
@click.option(
    "--scale-down-depth", type=int, metavar="M", help="Scale down when fewer than M tasks wait ..."
)
@click.option("--scale-down-after", metavar="DURATION", help="... for this long (e.g. 15m).")
@click.option("--step", type=int, help="Workers added or removed at a time.")
@click.option("--concurrency", "-c", type=int, help="Concurrency of each worker started.")
@click.option(
    "--tags",
    "tag_values",
    multiple=True,
    metavar="A,B",
    help="Tags of the workers started (their tag queues count in the depth).",
)
@click.option(
    "--interval", metavar="DURATION", help="Between observations (default: the file's, else 15s)."
)
@click.option("--dry-run", is_flag=True, help="Print the decisions; start or stop nothing.")
@click.option(
    "--once",
    is_flag=True,
    help="One observation and its decision, then exit (workers started keep "
    "running; a later run adopts them).",
)
@click.option(
    "--log-dir",
    type=click.Path(path_type=Path),
    help="Worker logs (default $VMFARM_HOME/autoscale).",
)
@click.option(
    "--stop-timeout",
    default="10m",
    show_default=True,
    metavar="DURATION",
    help="On exit, how long workers may take to finish their tasks before SIGKILL.",
)
@output_option
@pass_cli
def autoscale(
    cli: Cli,
    config_path: Path | None,
    regions: tuple[str, ...],
    min_: int | None,
    max_: int | None,
    scale_up_depth: int | None,
    scale_up_after: str | None,
    scale_down_depth: int | None,
    scale_down_after: str | None,
    step: int | None,
    concurrency: int | None,
    tag_values: tuple[str, ...],
    interval: str | None,
    dry_run: bool,
    once: bool,
    log_dir: Path | None,
    stop_timeout: str,
    output: str,
) -> None:
    """Scale the workers of each region with its queue depth (Harness delegate
    auto_scaling): up when the queue stays above N for a while, down when it stays below M.

    Workers are `vmfarm worker --region R -n autoscale-R-<k>@<host>` processes on this
    machine; they are counted with every other live worker of the region. On SIGTERM or
    Ctrl-C the autoscaler stops its workers (warm shutdown) and exits."""
    from app.autoscale import (
        DEFAULT_INTERVAL,
        Autoscaler,
        LocalProcessExecutor,
        Policy,
        load_config,
        policy_from,
    )
    from app.errors import ConfigError
    from app.settings import get_settings

    _need_broker("autoscale")
    logging.basicConfig(
        level=logging.WARNING,
        stream=sys.stderr,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    logging.getLogger("vmfarm.autoscale").setLevel(logging.INFO)
    flags: dict[str, Any] = {
        "min": min_,
        "max": max_,
        "scaleUpQueueDepth": scale_up_depth,
        "scaleDownQueueDepth": scale_down_depth,
        "step": step,
        "concurrency": concurrency,
        "scaleUpAfter": _duration(scale_up_after, "--scale-up-after"),
        "scaleDownAfter": _duration(scale_down_after, "--scale-down-after"),
        "tags": ",".join(tag_values) if tag_values else None,
    }
    flags = {k: v for k, v in flags.items() if v is not None}
    every = _duration(interval, "--interval")
    if every is not None and every <= 0:
        raise click.BadParameter("must be positive", param_hint="--interval")
    grace = _duration(stop_timeout, "--stop-timeout") or 0.0
    try:
        file_policies: dict[str, Policy] = {}
        file_interval = DEFAULT_INTERVAL
        if config_path is not None:
            cfg = load_config(config_path)
            file_policies = {p.region: p for p in cfg.policies}
            file_interval = cfg.interval
        # The options apply to the regions named with --region, else to the file's regions.
        names = list(dict.fromkeys(regions)) or list(file_policies)
        if not names:
            fail("nothing to scale: give --region R and/or --config FILE")
        policies = [policy_from(r, flags, base=file_policies.get(r)) for r in names]
    except ConfigError as exc:
        fail(str(exc))
    every = every or file_interval
    if not get_settings().celery_broker.startswith(("redis://", "rediss://")):
        cli.err.print(
            Text(
                "warning: queue depths are known only with a Redis broker: only min and max apply",
                style="yellow",
            )
        )

    executor = (
        None
        if dry_run
        else LocalProcessExecutor(log_dir=log_dir or get_settings().home_dir / "autoscale")
    )
    scaler = Autoscaler(policies=policies, executor=executor)

    def show(d: Any) -> None:
        if output == "json":
            cli.out.print(json.dumps({**d.as_dict(), "dry_run": dry_run}))
        else:
            style = {"up": "green", "down": "yellow"}.get(d.action, "")
            cli.out.print(Text(("[dry run] " if dry_run else "") + str(d), style=style))
        sys.stdout.flush()

    if once:
        try:
            decisions = scaler.step()
        except Exception as exc:  # the registry or the broker cannot be read
            fail(f"cannot observe the fleet: {exc}", code=1)
        for d in decisions:
            show(d)
        return

    stopping: list[int] = []

    def on_signal(signum: int, _frame: Any) -> None:
        stopping.append(signum)

    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, on_signal)
    cli.err.print(
        f"autoscaling {', '.join(p.region for p in policies)} every {every:g}s"
        + (" (dry run)" if dry_run else "")
        + "; Ctrl-C to stop"
    )
    try:
        scaler.run(every, should_stop=lambda: bool(stopping), report=show)
    finally:
        if executor is not None:
            cli.err.print("stopping the autoscaled workers (warm shutdown) ...")
            executor.shutdown(grace)
    cli.err.print("autoscaler stopped")
