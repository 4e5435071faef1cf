"""The fleet: ``vmfarm worker`` (a Celery worker for regions and/or the control queue, with
``--tags``), ``vmfarm workers`` (the registry and the queues) and ``vmfarm hosts`` (the hosts a
pipeline would deploy to: listed by the region's workers in service mode, here when embedded).
"""

from __future__ import annotations

import sys
from typing import Any

import click
from rich.table import Table
from rich.text import Text

from app.errors import ConfigError, SpecError, SpecErrors
from cli.console import error, fail, fail_input
from cli.context import Cli, pass_cli
from cli.options import (
    files_argument,
    gather_inputs,
    input_options,
    output_option,
    pipeline_option,
)


def register(main: click.Group) -> None:
    """Add ``worker``, ``workers`` and ``hosts`` to ``main``."""
    for command in (worker, workers, hosts):
        main.add_command(command)


# --- worker ---------------------------------------------------------------------------------------


@click.command()
@click.option("--region", "regions", multiple=True, help="Consume vmfarm.<region> (repeatable).")
@click.option("--control", is_flag=True, help="Also (or only) consume vmfarm.control.")
@click.option("--concurrency", "-c", type=int, help="Parallel tasks (threads for regions).")
@click.option("--loglevel", "-l", default="INFO", show_default=True)
@click.option("--name", "-n", help="Worker node name (default vmfarm-<region>@<host>).")
@click.option(
    "--beat", is_flag=True, help="Also run the periodic reconciler (Celery beat); run exactly one."
)
@click.option(
    "--tags",
    "tag_values",
    multiple=True,
    metavar="A,B",
    help="This worker's tags (comma-separated or repeated; at most 6): it also "
    "takes its regions' tasks that require some of them, on the queues "
    "vmfarm.<region>[tags].",
)
def worker(
    regions: tuple[str, ...],
    control: bool,
    concurrency: int | None,
    loglevel: str,
    name: str | None,
    beat: bool,
    tag_values: tuple[str, ...],
) -> None:
    """Run a Celery worker for one or more regions (a delegate) and/or the control queue.

    It registers in the worker registry (vmfarm workers) and renews its entry every
    VMFARM_HEARTBEAT_INTERVAL seconds until it stops."""
    from app.delegates import MAX_TAGS, normalise_tags
    from app.settings import get_settings
    from app.worker import run_worker

    if not regions and not control:
        raise click.UsageError("give --region R (repeatable) and/or --control")
    try:
        tags = normalise_tags(",".join(tag_values))
    except ValueError as exc:
        raise click.BadParameter(str(exc), param_hint="--tags") from None
    if len(tags) > MAX_TAGS:
        raise click.BadParameter(f"at most {MAX_TAGS} tags (got {len(tags)})", param_hint="--tags")
    if tags and not regions:
        raise click.UsageError("--tags select region work: give --region too")
    if get_settings().embedded:
        fail(
            "a standalone worker needs a broker: set VMFARM_BROKER_URL "
            "(e.g. redis://127.0.0.1:6379/0)"
        )
    try:
        run_worker(
            regions=list(regions),
            control=control,
            concurrency=concurrency,
            loglevel=loglevel,
            name=name,
            beat=beat,
            tags=tags,
        )
    except ValueError as exc:
        raise click.BadParameter(str(exc), param_hint="--region") from None


# --- workers --------------------------------------------------------------------------------------


def fleet_report() -> dict[str, Any]:
    """The registry and the queues, as ``vmfarm workers -o json`` prints them."""
    from app.celery import CONTROL_QUEUE
    from app.delegates import all_workers, parse_queue, queue_depths
    from app.settings import get_settings

    settings = get_settings()
    everyone = all_workers()
    for w in everyone:
        w["status"] = "live" if w["live"] else "stale"
    known = {q for w in everyone for q in w["queues"]}
    depths = queue_depths(known)
    queues: list[dict[str, Any]] = []
    for q, depth in depths.items():
        parsed = parse_queue(q)
        region, tags = (parsed[0], list(parsed[1])) if parsed else (None, [])
        queues.append(
            {
                "name": q,
                "region": region,
                "tags": tags,
                "depth": depth,
                "consumers": [w["name"] for w in everyone if w["live"] and q in w["queues"]],
            }
        )
    regions: dict[str, dict[str, Any]] = {}
    for w in everyone:
        for r in w["regions"] or []:
            regions.setdefault(r, {"workers": [], "queues": []})["workers"].append(w["name"])
        if CONTROL_QUEUE in w["queues"]:
            regions.setdefault("control", {"workers": [], "queues": []})["workers"].append(
                w["name"]
            )
    for info in queues:
        key = info["region"] or ("control" if info["name"] == CONTROL_QUEUE else None)
        if key is not None:
            regions.setdefault(key, {"workers": [], "queues": []})["queues"].append(info["name"])
    return {
        "broker": "redis"
        if settings.celery_broker.startswith(("redis://", "rediss://"))
        else "other",
        "embedded": settings.embedded,
        "heartbeat_timeout": settings.heartbeat_timeout,
        "workers": everyone,
        "queues": queues,
        "regions": dict(sorted(regions.items())),
    }


@click.command()
@click.option(
    "--forget",
    "forget",
    multiple=True,
    metavar="NAME",
    help="Remove this stale worker from the registry (repeatable); a live one stays.",
)
@click.option(
    "--forget-stale",
    is_flag=True,
    help="Remove every worker not heard from within VMFARM_HEARTBEAT_TIMEOUT.",
)
@output_option
@pass_cli
def workers(cli: Cli, forget: tuple[str, ...], forget_stale: bool, output: str) -> None:
    """Workers per region: tags, concurrency, tasks in flight, last heartbeat (a worker not
    heard from within VMFARM_HEARTBEAT_TIMEOUT is stale), and the depth of every queue."""
    if forget or forget_stale:
        from app.delegates import forget_workers

        try:
            gone = forget_workers(forget, stale=forget_stale)
        except LookupError as exc:
            fail_input(exc)
            return
        if output == "json":
            cli.json({"forgotten": gone})
        else:
            cli.out.print(
                f"forgot {len(gone)} worker(s)" + (f": {', '.join(gone)}" if gone else "")
            )
        return
    report = fleet_report()
    if output == "json":
        cli.json(report)
        return
    if report["embedded"]:
        cli.err.print(
            "embedded mode (no VMFARM_BROKER_URL): the worker runs inside "
            "`vmfarm run`; there is no fleet to show."
        )
    by_name = {w["name"]: w for w in report["workers"]}
    by_queue = {q["name"]: q for q in report["queues"]}
    if not report["regions"]:
        cli.out.print("no worker has registered and no queue is known")
    for region, entry in report["regions"].items():
        title = "control" if region == "control" else f"region {region}"
        table = Table(title=title, title_justify="left")
        for c in ("worker", "status", "tags", "concurrency", "in flight", "last beat"):
            table.add_column(c, no_wrap=True)
        for n in entry["workers"]:
            w = by_name[n]
            table.add_row(
                w["name"],
                Text(w["status"], style="green" if w["live"] else "red"),
                ", ".join(w["tags"]) or "-",
                f"{w['concurrency']} ({w['pool']})",
                str(w["in_flight"]),
                f"{w['age']:.0f}s ago",
            )
        if not entry["workers"]:
            table.add_row("(none)", Text("no worker", style="red"), "", "", "", "")
        cli.out.print(table)
        for q in entry["queues"]:
            info = by_queue[q]
            depth = "unknown" if info["depth"] is None else str(info["depth"])
            consumers = ", ".join(info["consumers"])
            style = "" if consumers or not info["depth"] else "red"
            cli.out.print(
                Text(
                    f"  queue {q}: {depth} waiting; "
                    + (f"consumed by {consumers}" if consumers else "no live worker consumes it"),
                    style=style,
                )
            )


# --- hosts ----------------------------------------------------------------------------------------


def _infra_of(loaded: Any) -> dict[str, Any]:
    """An infrastructure as a resolved stage holds it (app.definitions.loader.resolve_stage)."""
    from app.definitions.bundle import provider_of

    return {
        "identifier": loaded.ident,
        "name": loaded.model.metadata.name,
        "provider": provider_of(loaded.model),
        "spec": loaded.model.spec.spec.model_dump(mode="json", by_alias=True, exclude_none=True),
        "source": f"{loaded.doc.file}:{loaded.doc.pos(loaded.base or ('metadata',))[0]}",
    }


def _has_input(value: Any) -> bool:
    if isinstance(value, dict):
        return any(_has_input(v) for v in value.values())
    if isinstance(value, list):
        return any(_has_input(v) for v in value)
    return isinstance(value, str) and "<+input" in value


def collect_infrastructures(
    files: tuple[str, ...], *, pipeline: str | None, infra_id: str | None, inputs: dict[str, str]
) -> tuple[str | None, list[dict[str, Any]]]:
    """(pipeline identifier, infrastructures with the stages using them) from the files: those
    of the chosen pipeline's stages, or every one when the files define no pipeline; only
    ``infra_id`` if given (any infrastructure of the files). Raises SpecError/SpecErrors for
    bad input."""
    from app.definitions import choose_pipeline, load
    from app.definitions.resolve import resolve_stages

    bundle = load(files, inputs=inputs, require_inputs=False)
    found: dict[str, dict[str, Any]] = {}
    pipe_id: str | None = None
    if bundle.pipelines or pipeline:
        pipe = choose_pipeline(bundle, pipeline)
        pipe_id = pipe.ident
        for stage in resolve_stages(bundle, pipe, execution_id="<hosts>", strict_inputs=False):
            for infra in stage["infrastructures"]:
                # The worker tags that list it: those of the first stage that uses it.
                tags = sorted(
                    {
                        *stage.get("delegateSelectors", []),
                        *(infra["spec"].get("delegateSelectors") or []),
                    }
                )
                entry = found.setdefault(
                    infra["identifier"],
                    {
                        **infra,
                        "stages": [],
                        "tags": tags,
                        "fallback": stage.get("delegateFallback"),
                    },
                )
                entry["stages"].append(stage["identifier"])
    else:
        for loaded in bundle.infrastructures.values():
            found[loaded.ident] = {**_infra_of(loaded), "stages": []}
    if infra_id is not None:
        if infra_id not in found and infra_id in bundle.infrastructures:
            found[infra_id] = {**_infra_of(bundle.infrastructures[infra_id]), "stages": []}
        if infra_id not in found:
            where = f"pipeline '{pipe_id}'" if pipe_id else "the files"
            raise SpecError(
                f"no infrastructure '{infra_id}' in {where} (known: "
                f"{', '.join(sorted(found)) or 'none'})",
                file="--infra",
            )
        found = {infra_id: found[infra_id]}
    for infra in found.values():
        infra.setdefault("tags", sorted(infra["spec"].get("delegateSelectors") or []))
        infra.setdefault("fallback", None)
        if _has_input(infra["spec"]):
            file, _, line = str(infra["source"]).rpartition(":")
            raise SpecError(
                f"infrastructure '{infra['identifier']}' has a runtime input "
                "(<+input>) with no value: give it with --set",
                file=file or str(infra["source"]),
                line=int(line) if line.isdigit() else 0,
            )
    return pipe_id, list(found.values())


@click.command()
@files_argument
@click.option("--infra", "infra_id", help="Only this infrastructure (identifier).")
@pipeline_option
@input_options(inputs_help="An input set file or folder (repeatable); --set wins.")
@click.option(
    "--wait",
    "wait",
    type=float,
    default=60,
    show_default=True,
    help="Service mode: seconds to wait for the region workers' answer.",
)
@output_option
@pass_cli
def hosts(
    cli: Cli,
    files: tuple[str, ...],
    infra_id: str | None,
    pipeline: str | None,
    sets: tuple[str, ...],
    input_files: tuple[str, ...],
    wait: float,
    output: str,
) -> None:
    """Preview the hosts of the infrastructures a pipeline deploys to (or of --infra ID).

    In service mode (VMFARM_BROKER_URL set) a worker of each cloud infrastructure's region
    lists its hosts (task vmfarm.discover, as in a run), with that worker's credentials: this
    machine needs none. Embedded, discovery runs here, with this machine's credentials. Exit 1
    when an infrastructure cannot be listed, 2 on bad input."""
    from app.errors import DiscoveryError
    from app.providers.base import Host, discover
    from app.settings import get_settings

    try:
        pipe_id, infras = collect_infrastructures(
            files, pipeline=pipeline, infra_id=infra_id, inputs=gather_inputs(input_files, sets)
        )
    except (SpecError, SpecErrors, ConfigError) as exc:
        fail_input(exc)
    remote = [] if get_settings().embedded else [i for i in infras if i["provider"] != "static"]
    answers: dict[str, dict[str, Any]] = {}
    if remote:
        from app.coordinator import discover_on_workers

        keep = ("identifier", "name", "provider", "spec", "source")
        try:
            listed = discover_on_workers(
                [({k: i[k] for k in keep}, i["tags"], i["fallback"]) for i in remote], timeout=wait
            )
        except ValueError as exc:  # an invalid tag name
            fail(str(exc))
        answers = {i["identifier"]: a for i, a in zip(remote, listed, strict=True)}
    results: list[dict[str, Any]] = []
    failed = False
    for infra in infras:
        entry: dict[str, Any] = {
            "identifier": infra["identifier"],
            "name": infra["name"],
            "provider": infra["provider"],
            "region": infra["spec"].get("region"),
            "source": infra["source"],
            "stages": infra["stages"],
        }
        answer = answers.get(infra["identifier"])
        if answer is not None:
            if answer.get("queue"):
                entry["discovered_by"] = {
                    "worker": answer.get("worker"),
                    "queue": answer.get("queue"),
                }
            if answer.get("error"):
                entry["error"] = {
                    "message": str(answer["error"]),
                    "error_class": str(answer.get("error_class") or "Unknown"),
                }
                failed = True
            else:
                found = [Host.from_dict(h) for h in answer.get("hosts", [])]
        else:
            try:
                found = discover(infra)
            except DiscoveryError as exc:
                entry["error"] = {"message": str(exc), "error_class": exc.error_class}
                failed = True
            except (SpecError, SpecErrors, ConfigError) as exc:
                fail_input(exc)
        if "error" not in entry:
            entry["hosts"] = [
                {
                    "name": h.name,
                    "address": h.address,
                    "region": h.region,
                    "public_ip": h.public_ip,
                    "private_ip": h.private_ip,
                    "slot": None if h.attributes.get("slot") is None else str(h.attributes["slot"]),
                    "port": h.port,
                    "user": h.user,
                }
                for h in found
            ]
            if entry["region"] is None:
                entry["region"] = ", ".join(sorted({h.region for h in found})) or None
        results.append(entry)
    if output == "json":
        cli.json({"pipeline": pipe_id, "infrastructures": results})
    else:
        _print_hosts(cli, results)
    for entry in results:
        if "error" in entry:
            error(
                f"infrastructure '{entry['identifier']}' ({entry['provider']}): discovery "
                f"failed [{entry['error']['error_class']}]: {entry['error']['message']}"
            )
    if failed:
        sys.exit(1)


def _print_hosts(cli: Cli, results: list[dict[str, Any]]) -> None:
    for entry in results:
        used = f"; stages {', '.join(entry['stages'])}" if entry["stages"] else ""
        cli.out.print(
            Text.assemble(
                "infrastructure ",
                (entry["identifier"], "bold"),
                f" ({entry['provider']}, region {entry['region'] or '-'}{used}) {entry['source']}",
            )
        )
        if "error" in entry:
            cli.out.print(
                Text(f"  discovery failed [{entry['error']['error_class']}]", style="red")
            )
            continue
        table = Table(box=None, pad_edge=False)
        for c in ("host", "address", "region", "public ip", "private ip", "slot"):
            table.add_column(c, no_wrap=True)
        for h in entry["hosts"]:
            table.add_row(
                h["name"],
                h["address"],
                h["region"],
                h["public_ip"] or "-",
                h["private_ip"] or "-",
                h["slot"] or "-",
            )
        cli.out.print(table)
        by = entry.get("discovered_by")
        cli.out.print(
            f"  {len(entry['hosts'])} host(s)"
            + (f", listed by {by['worker']} ({by['queue']})" if by else "")
        )
