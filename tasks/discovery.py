"""Host discovery as a region task: the region's workers hold the cloud credentials and reach
the provider's endpoints, so they list the hosts (``vmfarm.discover`` on ``vmfarm.<region>``,
or on the tag queue ``vmfarm.<region>[tags]`` when the kwargs name tags; see app.delegates)."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

from app.celery import app

log = logging.getLogger("vmfarm.tasks")


@app.task(name="vmfarm.discover", bind=True)
def discover_hosts(
    self: Any, *, infra: dict[str, Any], region: str, tags: Sequence[str] = ()
) -> dict[str, Any]:
    """The hosts of one resolved infrastructure (``plan['stages'][i]['infrastructures'][j]``).

    ``region`` and ``tags`` only route the task (app.celery.route_task). Returns
    ``{"hosts": [Host.to_dict(), ...], "worker": ..., "queue": ...}``, or, when discovery
    fails, ``{"error": message, "error_class": Authentication|Connectivity|Unknown,
    "error_type": DiscoveryError|ConfigError|..., "infrastructure": id, "worker", "queue"}``:
    a failure is data, never raised; the caller decides what it means for the run.
    """
    from app.errors import ConfigError, DiscoveryError
    from app.providers.base import discover

    req = self.request
    where = {"worker": req.hostname, "queue": (req.delivery_info or {}).get("routing_key")}
    ident = str(infra.get("identifier", ""))
    try:
        hosts = discover(infra)
    except DiscoveryError as exc:
        return {
            "error": str(exc),
            "error_class": exc.error_class,
            "error_type": "DiscoveryError",
            "infrastructure": ident,
            **where,
        }
    except ConfigError as exc:
        return {
            "error": str(exc),
            "error_class": "Unknown",
            "error_type": "ConfigError",
            "infrastructure": ident,
            **where,
        }
    except Exception as exc:  # a provider bug: still the caller's decision, with the details
        log.exception("discovery of infrastructure %s failed unexpectedly", ident)
        return {
            "error": f"infrastructure '{ident}': discovery failed: {type(exc).__name__}: {exc}",
            "error_class": "Unknown",
            "error_type": type(exc).__name__,
            "infrastructure": ident,
            **where,
        }
    return {"hosts": [h.to_dict() for h in hosts], **where}
