"""Command units: what each unit type renders for ``vmfarm plan`` and the context it renders in.
"""

from __future__ import annotations

from typing import Any

from app.definitions.expressions import Binder, Context, render
from app.providers.base import Host


def host_context(host: Host, stage: dict[str, Any]) -> Context:
    ctx = Context()
    for k, v in stage.get("externalValues", {}).items():
        ctx.set(k, v, external=True)
    for k, v in {
        "instance.name": host.name, "instance.hostName": host.address,
        "instance.host.hostName": host.address,
        "instance.host.privateIp": host.private_ip or host.address,
        "instance.host.publicIp": host.public_ip or host.address,
        "instance.host.port": host.port, "instance.host.region": host.region,
        "infra.region": host.region,
    }.items():
        ctx.set(k, v, external=True)
    return ctx


# The output a Release unit leaves: the releases the host holds, newest first.
RELEASES_OUTPUT = "vmfarm_releases"


def render_step(stage: dict[str, Any], step: dict[str, Any],
                host: Host | None) -> dict[str, Any]:
    """A step as it would run on ``host``: scripts rendered, unsafe values shown as the
    environment variables they travel in (for ``vmfarm plan``)."""
    out: dict[str, Any] = {"identifier": step["identifier"], "type": step["type"]}
    ctx = host_context(host, stage) if host else Context()
    spec = step["spec"]
    if step["type"] == "HealthCheck":
        out["check"] = {k: render(str(v), ctx) if isinstance(v, str) else v
                        for k, v in spec.items()}
        return out
    out["onDelegate"] = bool(spec.get("onDelegate"))
    out["environment"] = {v["name"]: render(str(v.get("value", "")), ctx)
                          for v in spec.get("environmentVariables", [])}
    units = []
    for unit in spec["commandUnits"]:
        if unit["type"] == "Script":
            binder = Binder()
            script = render(unit["spec"]["source"]["spec"]["script"], ctx, quote=True,
                            bind=binder)
            units.append({"identifier": unit["identifier"], "type": "Script",
                          "script": script, "values": binder.env})
        else:
            art = stage.get("artifact") or {}
            units.append({"identifier": unit["identifier"], "type": "Copy",
                          "source": (art.get("spec") or {}).get("path"),
                          "destination": render(unit["spec"]["destinationPath"], ctx).rstrip("/")
                          + "/" + str(art.get("fileName"))})
    out["units"] = units
    return out
