"""Provider-neutral host records, and the registry that finds a provider for an infrastructure.

Providers turn an infrastructure definition into ``Host`` records; SDKs are imported lazily so
that loading a file or running on static hosts never needs a cloud SDK.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

from app.errors import ConfigError

DEFAULT_REGION = "default"


@dataclass(frozen=True)
class Host:
    """One target host, whatever found it."""

    name: str
    address: str
    region: str
    infrastructure: str
    port: int = 22
    user: str = "root"
    connection: str = "SSH"  # SSH | Sandbox | Local
    private_key_file: str | None = None
    known_hosts_file: str | None = None
    host_key_policy: str = "strict"
    connect_timeout: float = 10.0
    sandbox_root: str | None = None
    public_ip: str | None = None
    private_ip: str | None = None
    attributes: dict[str, Any] = field(default_factory=dict)
    # Secret ids (never values) of SSH credentials: private_key, passphrase, password.
    credentials: dict[str, str] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Host:
        return cls(**data)


def cloud_host(
    infra: dict[str, Any],
    *,
    name: str,
    address: str,
    region: str,
    public_ip: str | None = None,
    private_ip: str | None = None,
    attributes: dict[str, Any] | None = None,
) -> Host:
    """A discovered host, with the infrastructure's ``connection`` settings (user, port, key,
    known_hosts, host key policy) applied as for a static host."""
    conn = (infra.get("spec") or {}).get("connection") or {}
    attributes = dict(attributes or {})
    # Blue-green reads a host's set from its "slot" attribute: a cloud tag or label gives it.
    for key in ("tags", "labels"):
        found = attributes.get(key)
        if isinstance(found, dict) and found.get("slot") and not attributes.get("slot"):
            attributes["slot"] = str(found["slot"])
    return Host(
        name=name,
        address=address,
        region=region,
        infrastructure=str(infra["identifier"]),
        port=int(conn.get("port", 22)),
        user=conn.get("user", "root"),
        connection=conn.get("type", "SSH"),
        private_key_file=conn.get("privateKeyFile"),
        known_hosts_file=conn.get("knownHostsFile"),
        host_key_policy=conn.get("hostKeyPolicy", "strict"),
        connect_timeout=float(conn.get("connectTimeout", 10.0)),
        public_ip=public_ip,
        private_ip=private_ip,
        attributes=attributes,
        credentials=credentials_of(conn),
    )


def credentials_of(conn: dict[str, Any]) -> dict[str, str]:
    """The secret ids of a connection's SSH credentials."""
    return {
        kind: str(conn[key])
        for kind, key in (
            ("private_key", "privateKeySecret"),
            ("passphrase", "passphraseSecret"),
            ("password", "passwordSecret"),
        )
        if conn.get(key)
    }


def discover(infra: dict[str, Any]) -> list[Host]:
    """Hosts of one resolved infrastructure (``plan['stages'][i]['infrastructures'][j]``).

    Each provider module exposes ``discover(infra) -> list[Host]`` and imports its SDK lazily.
    """
    import importlib

    provider = infra.get("provider")
    module = {
        "static": "app.providers.static",
        "aws": "app.providers.aws",
        "azure": "app.providers.azure",
        "gcp": "app.providers.gcp",
    }.get(str(provider))
    if module is None:
        raise ConfigError(
            f"infrastructure '{infra.get('identifier')}' "
            f"({infra.get('source', '')}) names an unknown provider {provider!r}"
        )
    try:
        mod = importlib.import_module(module)
    except ModuleNotFoundError as exc:
        raise ConfigError(
            f"infrastructure '{infra.get('identifier')}' ({infra.get('source', '')}) uses the "
            f"{provider} provider, which needs the Python package {exc.name!r}; install it on "
            "the workers of that region"
        ) from None
    hosts: list[Host] = mod.discover(infra)
    return hosts


def connector_credential(infra: dict[str, Any]) -> dict[str, Any] | None:
    """The infrastructure's connector credential with its secrets resolved here, on the worker
    that discovers (``{"type": "ManualConfig", "accessKey": ..., "secretKey": ...}``: each
    ``<name>Ref`` becomes ``<name>``); None when the connector inherits the worker's own
    credentials (``InheritFromDelegate``) or there is no connector. A secret that cannot be
    resolved raises DiscoveryError (Authentication) naming its id, never a value."""
    from app.errors import DiscoveryError
    from app.secrets import SecretError, resolve

    connector = infra.get("connector") or {}
    cred = dict(connector.get("credential") or {})
    if cred.get("type") != "ManualConfig":
        return None
    out: dict[str, Any] = {}
    for key, value in cred.items():
        if not key.endswith("Ref"):
            out[key] = value
            continue
        try:
            out[key[:-3]] = resolve([str(value)])[str(value).strip()]
        except SecretError as exc:
            raise DiscoveryError(
                f"infrastructure '{infra.get('identifier')}': connector "
                f"'{connector.get('identifier')}': {key} {str(value)!r} cannot be resolved on "
                f"this worker: {exc}",
                infrastructure=str(infra.get("identifier", "")),
                error_class="Authentication",
            ) from None
    return out
