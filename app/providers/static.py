"""Static (Harness "PDC") infrastructure: a list of hosts written in the file."""

from __future__ import annotations

from typing import Any

from app.providers.base import DEFAULT_REGION, Host, credentials_of


def discover_static(infra: dict[str, Any]) -> list[Host]:
    """Hosts of a ``type: Pdc`` infrastructure, with the shared connection settings applied."""
    spec = infra.get("spec", {})
    conn = spec.get("connection") or {}
    default_region = spec.get("region") or DEFAULT_REGION
    hosts: list[Host] = []
    for h in spec.get("hosts", []):
        port = int(h.get("port") or conn.get("port") or 22)
        address = str(h["hostname"])
        attributes = {**h.get("hostAttributes", {}), **h.get("attributes", {})}
        hosts.append(
            Host(
                name=address if port == 22 else f"{address}:{port}",
                address=address,
                region=h.get("region") or default_region,
                infrastructure=str(infra["identifier"]),
                port=port,
                user=h.get("user") or conn.get("user") or "root",
                connection=conn.get("type", "SSH"),
                private_key_file=h.get("privateKeyFile") or conn.get("privateKeyFile"),
                known_hosts_file=conn.get("knownHostsFile"),
                host_key_policy=conn.get("hostKeyPolicy", "strict"),
                connect_timeout=float(conn.get("connectTimeout", 10.0)),
                sandbox_root=h.get("sandboxRoot"),
                public_ip=h.get("publicIp") or attributes.get("publicIp"),
                private_ip=h.get("privateIp") or attributes.get("privateIp"),
                attributes=attributes,
                credentials=credentials_of(conn),
            )
        )
    return hosts


discover = discover_static
