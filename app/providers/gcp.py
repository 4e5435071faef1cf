"""GCP Compute Engine host discovery: the running VM instances an infrastructure names.

What is read, from a resolved infrastructure's ``spec`` (the file's camelCase keys)::

    spec:
      connectorRef: gcp_conn          # a Gcp connector; InheritFromDelegate: ADC (below)
      project: my-project             # required
      region: us-central1             # without zones: every zone of the region, in one
                                      #   instances.aggregatedList call
      zones: [us-central1-a, us-central1-b]   # these zones only (each must be in region)
      zone: us-central1-a             # (the reference's form) one zone
      hostConnectionType: PrivateIP   # PrivateIP (default): networkInterfaces[0].networkIP
                                      # PublicIP: networkInterfaces[0].accessConfigs[0].natIP
                                      # Hostname: the instance's hostname, else its zonal DNS
                                      #   name NAME.ZONE.c.PROJECT.internal
      tags: {env: prod}               # key/value: instance labels that must all match
      hostFilter:
        type: GcpInstanceFilter       # or GcpInstanceGroupFilter; absent or All = no filter
        spec:
          labels: {env: prod}         # instance labels, all must match (merged with spec.tags)
          networkTags: [web]          # network tags (tags.items), all must be present
          tags: [web-app, production] # (the reference's form) a list means network tags,
                                      #   a mapping means labels
          zones: [us-central1-a]      # (the reference's form) same as spec.zones
          instanceGroups: [web-mig]   # GcpInstanceGroupFilter: zonal or regional instance
                                      #   groups, by name; none named = every group in scope
      connection: {user: deploy, privateKeyFile: ~/.ssh/id_ed25519}

Only instances whose ``status`` is ``RUNNING`` become hosts. Labels are also sent to the API as
a server-side ``filter`` (``(status = RUNNING) (labels.env = "prod")``) and every condition is
checked again on what comes back, so the result is the same whether or not the server filters.
``GcpInstanceGroupFilter`` lists each group's running members (``instanceGroups.listInstances``
or ``regionInstanceGroups.listInstances``; groups are located with
``instanceGroups.aggregatedList``), fetches each member with ``instances.get`` and applies the
same label and network-tag conditions; members outside ``zones`` (if given) are left out.

Each host is named after its instance (``NAME.ZONE`` when two zones hold the same name), its
region is the zone without its last ``-x``, and its attributes are ``zone``, ``machineType``
(short name), ``labels``, ``networkTags``, ``id`` and ``project`` (and ``slot`` from a ``slot``
label, for blue-green).

Credentials and endpoint:

* A Gcp connector with ``credential: {type: ManualConfig, spec: {secretKeyRef: <id>}}``: the
  service account JSON key in that secret, resolved on the worker that discovers.
* Otherwise (no connector, or ``InheritFromDelegate``): Application Default Credentials
  (``google.auth.default()``, scope ``compute.readonly``): ``GOOGLE_APPLICATION_CREDENTIALS``,
  ``gcloud auth application-default login``, or the worker's service account on GCP.
* ``VMFARM_GCP_ENDPOINT=http://127.0.0.1:PORT`` sends every call to that base URL instead of
  ``https://compute.googleapis.com`` (REST transport; give the scheme, ``http://`` is used as
  written) and uses anonymous credentials (no Authorization header), for tests against a fake
  server. ``VMFARM_GCP_AUTH=adc`` keeps ADC with a custom endpoint (e.g. Private Service
  Connect). Credentials are never logged.

Calls are retried with exponential backoff on 429, 500, 502, 503, 504, 403 rate-limit reasons
and connection failures, up to ``RetryPolicy.deadline`` seconds. Failures become
``DiscoveryError`` with ``error_class`` ``Authentication`` (401, 403, missing or unusable
credentials), ``Connectivity`` (unreachable, throttled or unavailable past the retries) or
``Unknown`` (an unknown project, zone, region or instance group is named as such).
"""

from __future__ import annotations

import logging
import os
import re
from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

from app.errors import ConfigError, DiscoveryError
from app.providers.base import Host, cloud_host, connector_credential

log = logging.getLogger(__name__)

ENDPOINT_ENV = "VMFARM_GCP_ENDPOINT"
AUTH_ENV = "VMFARM_GCP_AUTH"
SCOPES = ("https://www.googleapis.com/auth/compute.readonly",)
RATE_LIMIT_REASONS = frozenset(
    {"rateLimitExceeded", "userRateLimitExceeded", "quotaExceeded", "RATE_LIMIT_EXCEEDED"}
)
_ZONE_RE = re.compile(r"^[a-z][a-z0-9-]*-[a-z]$")
_MEMBER_RE = re.compile(r"projects/([^/]+)/zones/([^/]+)/instances/([^/?#]+)$")
_SAFE_LABEL = re.compile(r"^[\w-]+$")


@dataclass(frozen=True)
class RetryPolicy:
    """Backoff for retryable API failures: ``initial`` s, times ``multiplier`` up to
    ``maximum`` s, for ``deadline`` s in all; ``request_timeout`` s per HTTP request."""

    initial: float = 1.0
    maximum: float = 20.0
    multiplier: float = 2.0
    deadline: float = 90.0
    request_timeout: float = 30.0


DEFAULT_RETRY = RetryPolicy()


@dataclass
class _Query:
    """What one infrastructure asks for, read and checked from its spec."""

    ident: str
    project: str
    region: str | None
    zones: list[str]
    connection_type: str
    filter_type: str
    labels: dict[str, str] = field(default_factory=dict)
    network_tags: list[str] = field(default_factory=list)
    groups: list[str] = field(default_factory=list)
    names: list[str] = field(default_factory=list)

    @property
    def where(self) -> str:
        if self.zones:
            return f"project '{self.project}', zone(s) {', '.join(self.zones)}"
        return f"project '{self.project}', region '{self.region}'"


def region_of(zone: str) -> str:
    """``us-central1-a`` -> ``us-central1``."""
    return zone.rsplit("-", 1)[0]


def _short(url: str) -> str:
    return url.rstrip("/").rsplit("/", 1)[-1] if url else ""


def _label_value(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    return str(v)


# --- reading the spec -------------------------------------------------------------------------


def _read(infra: dict[str, Any]) -> _Query:
    ident = str(infra.get("identifier", ""))
    source = infra.get("source", "")
    at = f"infrastructure '{ident}'" + (f" ({source})" if source else "")
    spec = infra.get("spec") or {}
    hf = spec.get("hostFilter") or {}
    hf_type = str(hf.get("type") or "All")
    hfs = hf.get("spec") or {}
    if not isinstance(hfs, dict):
        raise ConfigError(f"{at}: hostFilter.spec must be a mapping")
    if hf_type not in ("GcpInstanceFilter", "GcpInstanceGroupFilter", "All", "HostNames"):
        raise ConfigError(
            f"{at}: hostFilter.type {hf_type} does not apply to GCP (use "
            "GcpInstanceFilter or GcpInstanceGroupFilter)"
        )

    project = spec.get("project")
    if not project or not isinstance(project, str):
        raise ConfigError(f"{at}: the GCP project is missing (field spec.project)")

    region = spec.get("region") or None
    zones: list[str] = []
    for src, value in (
        ("spec.zones", spec.get("zones")),
        ("spec.zone", spec.get("zone")),
        ("hostFilter.spec.zones", hfs.get("zones")),
    ):
        if value in (None, "", []):
            continue
        items = [value] if isinstance(value, str) else value
        if not isinstance(items, list) or not all(isinstance(z, str) for z in items):
            raise ConfigError(f"{at}: {src} must be a zone name or a list of zone names")
        for z in items:
            if not _ZONE_RE.match(z):
                raise ConfigError(f"{at}: {src}: '{z}' is not a zone name (like us-central1-a)")
            if region and region_of(z) != region:
                raise ConfigError(
                    f"{at}: {src}: zone '{z}' is not in region '{region}' (spec.region)"
                )
            if z not in zones:
                zones.append(z)
    if not zones and not region:
        raise ConfigError(
            f"{at}: give the GCP region (field spec.region) or the zones (field spec.zones)"
        )

    ctype = spec.get("hostConnectionType") or "PrivateIP"
    if ctype not in ("PrivateIP", "PublicIP", "Hostname"):
        raise ConfigError(
            f"{at}: hostConnectionType must be PrivateIP, PublicIP or Hostname, not {ctype!r}"
        )

    labels: dict[str, str] = {}
    tags: list[str] = []

    def add_labels(src: str, value: Any) -> None:
        if not isinstance(value, dict):
            raise ConfigError(f"{at}: {src} must be a mapping of label keys to values")
        for k, v in value.items():
            if isinstance(v, dict | list) or v is None:
                raise ConfigError(f"{at}: {src}.{k} must be a single value")
            labels[str(k)] = _label_value(v)

    def add_tags(src: str, value: Any) -> None:
        items = [value] if isinstance(value, str) else value
        if not isinstance(items, list) or not all(isinstance(t, str) for t in items):
            raise ConfigError(f"{at}: {src} must be a list of network tags")
        tags.extend(t for t in items if t not in tags)

    if spec.get("tags"):
        add_labels("spec.tags", spec["tags"])
    if hfs.get("labels"):
        add_labels("hostFilter.spec.labels", hfs["labels"])
    if hfs.get("networkTags"):
        add_tags("hostFilter.spec.networkTags", hfs["networkTags"])
    if hfs.get("tags"):
        if isinstance(hfs["tags"], dict):
            add_labels("hostFilter.spec.tags", hfs["tags"])
        else:
            add_tags("hostFilter.spec.tags", hfs["tags"])

    groups: list[str] = []
    raw_groups = hfs.get("instanceGroups", hfs.get("instanceGroup"))
    if raw_groups not in (None, "", []):
        items = [raw_groups] if isinstance(raw_groups, str) else raw_groups
        if not isinstance(items, list) or not all(isinstance(g, str) and g for g in items):
            raise ConfigError(
                f"{at}: hostFilter.spec.instanceGroups must be a list of instance group names"
            )
        if hf_type != "GcpInstanceGroupFilter":
            raise ConfigError(
                f"{at}: hostFilter.spec.instanceGroups needs hostFilter.type GcpInstanceGroupFilter"
            )
        groups = [_short(g) for g in items]

    names: list[str] = []
    if hf_type == "HostNames":
        raw = hfs.get("hostNames") or hfs.get("names") or []
        if not isinstance(raw, list) or not all(isinstance(n, str) for n in raw):
            raise ConfigError(f"{at}: hostFilter.spec.hostNames must be a list of instance names")
        names = list(raw)

    return _Query(ident, project, region, zones, ctype, hf_type, labels, tags, groups, names)


# --- SDK plumbing ------------------------------------------------------------------------------


class _Api:
    """The SDK clients, credentials, retry and error mapping for one discovery."""

    def __init__(
        self, q: _Query, policy: RetryPolicy, manual: dict[str, Any] | None = None
    ) -> None:
        from google.api_core import retry as gretry  # lazy: SDKs load only when used

        self.q = q
        self.policy = policy
        self.endpoint = os.environ.get(ENDPOINT_ENV, "").strip() or None
        self._clients: dict[str, Any] = {}
        self._credentials: Any = None
        self.manual = manual  # the connector's service account key (ManualConfig), resolved
        # A custom endpoint means a fake server unless VMFARM_GCP_AUTH=adc says otherwise.
        self.anonymous = (
            bool(self.endpoint) and os.environ.get(AUTH_ENV, "").strip().lower() != "adc"
        )
        self.retry: Any = gretry.Retry(
            predicate=_retryable,
            initial=policy.initial,
            maximum=policy.maximum,
            multiplier=policy.multiplier,
            timeout=policy.deadline,
            on_error=self._on_retry,
        )

    def _on_retry(self, exc: Exception) -> None:
        log.info(
            "GCP Compute API call for infrastructure '%s' failed (%s); retrying",
            self.q.ident,
            _brief(exc),
        )

    @property
    def call(self) -> dict[str, Any]:
        """Keyword arguments for every SDK call."""
        return {"retry": self.retry, "timeout": self.policy.request_timeout}

    def credentials(self) -> Any:
        if self._credentials is None:
            if self.manual is not None:
                import json

                from google.oauth2 import service_account

                with self.errors("reading the connector's service account key (secretKeyRef)"):
                    try:
                        info = json.loads(str(self.manual["secretKey"]))
                    except ValueError:
                        raise DiscoveryError(
                            f"infrastructure '{self.q.ident}': the connector's secretKeyRef "
                            "does not hold a service account JSON key",
                            infrastructure=self.q.ident,
                            error_class="Authentication",
                        ) from None
                    self._credentials = service_account.Credentials.from_service_account_info(
                        info, scopes=list(SCOPES)
                    )
            elif self.anonymous:
                from google.auth.credentials import AnonymousCredentials

                self._credentials = AnonymousCredentials()
            else:
                import google.auth

                with self.errors("loading Application Default Credentials"):
                    creds, _ = google.auth.default(scopes=list(SCOPES))
                self._credentials = creds
        return self._credentials

    def client(self, kind: str) -> Any:
        """``InstancesClient``, ``InstanceGroupsClient``, ... (one of each per discovery)."""
        if kind not in self._clients:
            from google.cloud import compute_v1

            kw: dict[str, Any] = {"credentials": self.credentials(), "transport": "rest"}
            if self.endpoint:
                kw["client_options"] = {"api_endpoint": self.endpoint}
            self._clients[kind] = getattr(compute_v1, kind)(**kw)
        return self._clients[kind]

    @contextmanager
    def errors(
        self,
        what: str,
        *,
        zone: str | None = None,
        region: str | None = None,
        group: str | None = None,
    ) -> Iterator[None]:
        """Turn SDK, auth and transport exceptions raised inside into ``DiscoveryError``."""
        try:
            yield
        except DiscoveryError:
            raise
        except Exception as exc:
            mapped = self._map(exc, what, zone=zone, region=region, group=group)
            if mapped is None:
                raise
            raise mapped from exc

    def _map(
        self, exc: Exception, what: str, *, zone: str | None, region: str | None, group: str | None
    ) -> DiscoveryError | None:
        import google.auth.exceptions as gauth
        import requests
        from google.api_core import exceptions as gexc

        q = self.q
        endpoint = self.endpoint or "https://compute.googleapis.com"

        def err(message: str, error_class: str) -> DiscoveryError:
            return DiscoveryError(
                f"infrastructure '{q.ident}': {message}",
                infrastructure=q.ident,
                error_class=error_class,
            )

        if isinstance(exc, gexc.RetryError):
            cause = exc.cause if exc.cause is not None else exc
            return err(
                f"{what}: the GCP Compute API ({endpoint}) still failed after retrying "
                f"for {self.policy.deadline:g}s: {_brief(cause)}",
                "Connectivity",
            )
        if isinstance(exc, gauth.TransportError):
            return err(f"{what}: could not reach the Google token endpoint: {exc}", "Connectivity")
        if isinstance(exc, gauth.InvalidOperation) and self.anonymous:
            return err(
                f"{what}: the API answered 401 Unauthorized to anonymous credentials "
                f"(anonymous because {ENDPOINT_ENV} is set; set {AUTH_ENV}=adc to use "
                "Application Default Credentials with it)",
                "Authentication",
            )
        if isinstance(exc, gauth.DefaultCredentialsError):
            return err(
                f"{what}: no usable Google Application Default Credentials ({exc}). Set "
                "GOOGLE_APPLICATION_CREDENTIALS to a service-account key file, run "
                "`gcloud auth application-default login`, or run the worker on GCP "
                "with a service account",
                "Authentication",
            )
        if isinstance(exc, gauth.GoogleAuthError):
            return err(
                f"{what}: the GCP credentials were refused or could not be refreshed "
                f"({type(exc).__name__}: {exc})",
                "Authentication",
            )
        if isinstance(exc, gexc.Unauthorized):
            return err(
                f"{what}: GCP refused the credentials (401): {exc.message}", "Authentication"
            )
        if isinstance(exc, gexc.Forbidden):
            if _reasons(exc) & RATE_LIMIT_REASONS:
                return err(
                    f"{what}: throttled by the GCP Compute API (403): {exc.message}", "Connectivity"
                )
            return err(
                f"{what}: permission denied in {q.where} (403; the credentials need "
                f"compute.instances.list/get, e.g. roles/compute.viewer): {exc.message}",
                "Authentication",
            )
        if isinstance(
            exc,
            gexc.TooManyRequests
            | gexc.ServiceUnavailable
            | gexc.BadGateway
            | gexc.GatewayTimeout
            | gexc.DeadlineExceeded,
        ):
            return err(
                f"{what}: the GCP Compute API is throttling or unavailable ({_brief(exc)})",
                "Connectivity",
            )
        if isinstance(exc, requests.exceptions.ConnectionError | requests.exceptions.Timeout):
            return err(
                f"{what}: cannot reach the GCP Compute API at {endpoint} ({type(exc).__name__})",
                "Connectivity",
            )
        if isinstance(exc, gexc.NotFound | gexc.BadRequest):
            return err(self._not_found(exc, what, zone=zone, region=region, group=group), "Unknown")
        if isinstance(exc, gexc.GoogleAPICallError):
            return err(f"{what}: the GCP Compute API failed: {_brief(exc)}", "Unknown")
        return None

    def _not_found(
        self, exc: Any, what: str, *, zone: str | None, region: str | None, group: str | None
    ) -> str:
        msg = str(exc.message or "")
        project = self.q.project
        if f"'projects/{project}'" in msg or (
            not zone and not region and not group and isinstance(exc, _gexc().NotFound)
        ):
            return (
                f"GCP project '{project}' was not found (or is not visible to these "
                f"credentials); check spec.project. The API said: {msg}"
            )
        if zone and (f"zones/{zone}'" in msg or "zone" in msg.lower()) and not group:
            return (
                f"zone '{zone}' is not a zone of GCP project '{project}'; check "
                f"spec.zones. The API said: {msg}"
            )
        if group:
            where = f"zone '{zone}'" if zone else f"region '{region}'"
            return (
                f"instance group '{group}' was not found in {where} of GCP project "
                f"'{project}'. The API said: {msg}"
            )
        if region:
            return (
                f"region '{region}' is not a region of GCP project '{project}'; check "
                f"spec.region. The API said: {msg}"
            )
        return f"{what} in {self.q.where}: {exc.code} {msg}"


def _gexc() -> Any:
    from google.api_core import exceptions as gexc

    return gexc


def _reasons(exc: Any) -> set[str]:
    out: set[str] = set()
    for e in getattr(exc, "errors", None) or []:
        reason = e.get("reason") if isinstance(e, dict) else getattr(e, "reason", None)
        if reason:
            out.add(str(reason))
    if getattr(exc, "reason", None):
        out.add(str(exc.reason))
    return out


def _brief(exc: BaseException) -> str:
    code = getattr(exc, "code", None)
    message = getattr(exc, "message", None)
    if code is not None and message is not None:
        return f"{code} {message}"
    return f"{type(exc).__name__}: {exc}"


def _retryable(exc: Exception) -> bool:
    import requests
    from google.api_core import exceptions as gexc

    if isinstance(
        exc,
        gexc.TooManyRequests
        | gexc.ServiceUnavailable
        | gexc.InternalServerError
        | gexc.BadGateway
        | gexc.GatewayTimeout
        | gexc.DeadlineExceeded,
    ):
        return True
    if isinstance(exc, gexc.Forbidden):
        return bool(_reasons(exc) & RATE_LIMIT_REASONS)
    return isinstance(exc, requests.exceptions.ConnectionError | requests.exceptions.Timeout)


# --- filtering and building hosts ----------------------------------------------------------------


def _server_filter(q: _Query) -> str:
    """``(status = RUNNING) (labels.env = "prod")``; labels that cannot be quoted safely are
    left to the client-side check."""
    terms = ["(status = RUNNING)"]
    for k, v in sorted(q.labels.items()):
        if _SAFE_LABEL.match(k) and _SAFE_LABEL.match(v):
            terms.append(f'(labels.{k} = "{v}")')
    return " ".join(terms)


def _wanted(q: _Query, inst: Any) -> bool:
    if str(inst.status) != "RUNNING":
        return False
    labels = dict(inst.labels)
    if any(labels.get(k) != v for k, v in q.labels.items()):
        return False
    have = set(inst.tags.items) if "tags" in inst else set()
    if any(t not in have for t in q.network_tags):
        return False
    return not (q.names and inst.name not in q.names)


def _address(q: _Query, inst: Any, zone: str) -> tuple[str, str | None, str | None]:
    """(address, public_ip, private_ip); address is '' when the asked one is missing."""
    nic = inst.network_interfaces[0] if inst.network_interfaces else None
    private = (nic.network_i_p or None) if nic is not None else None
    public = None
    if nic is not None and nic.access_configs:
        public = nic.access_configs[0].nat_i_p or None
    if q.connection_type == "PublicIP":
        return public or "", public, private
    if q.connection_type == "Hostname":
        hostname = inst.hostname or f"{inst.name}.{zone}.c.{q.project}.internal"
        return hostname, public, private
    return private or "", public, private


def _hosts(infra: dict[str, Any], q: _Query, found: Iterable[Any]) -> list[Host]:
    by_link: dict[str, Any] = {}
    for inst in found:
        zone = _short(inst.zone)
        by_link.setdefault(f"{zone}/{inst.name}", inst)
    names = Counter(k.split("/", 1)[1] for k in by_link)
    hosts: list[Host] = []
    missing: list[str] = []
    for key in sorted(by_link, key=lambda k: (region_of(k.split("/")[0]), k)):
        inst = by_link[key]
        zone = key.split("/", 1)[0]
        address, public, private = _address(q, inst, zone)
        if not address:
            missing.append(f"{inst.name} ({zone})")
            continue
        labels = dict(inst.labels)
        attributes: dict[str, Any] = {
            "zone": zone,
            "machineType": _short(inst.machine_type),
            "labels": labels,
            "networkTags": list(inst.tags.items) if "tags" in inst else [],
            "id": str(inst.id),
            "project": q.project,
        }
        if labels.get("slot"):
            attributes["slot"] = labels["slot"]
        name = inst.name if names[inst.name] == 1 else f"{inst.name}.{zone}"
        hosts.append(
            cloud_host(
                infra,
                name=name,
                address=address,
                region=region_of(zone),
                public_ip=public,
                private_ip=private,
                attributes=attributes,
            )
        )
    if missing:
        what = (
            "an external IP (networkInterfaces[0].accessConfigs[0].natIP)"
            if q.connection_type == "PublicIP"
            else "an internal IP (networkInterfaces[0].networkIP)"
        )
        raise DiscoveryError(
            f"infrastructure '{q.ident}': hostConnectionType is {q.connection_type} but "
            f"running instance(s) {', '.join(missing)} have no {what}; give them one or "
            "change hostConnectionType",
            infrastructure=q.ident,
            error_class="Unknown",
        )
    return hosts


# --- the listings ------------------------------------------------------------------------------


def _instances_by_zone(api: _Api, q: _Query) -> list[Any]:
    client = api.client("InstancesClient")
    flt = _server_filter(q)
    out: list[Any] = []
    for zone in q.zones:
        with api.errors(f"listing instances in zone '{zone}'", zone=zone):
            pager = client.list(
                request={"project": q.project, "zone": zone, "filter": flt}, **api.call
            )
            out.extend(pager)
    return out


def _instances_by_region(api: _Api, q: _Query) -> list[Any]:
    assert q.region is not None
    client = api.client("InstancesClient")
    seen_region = False
    out: list[Any] = []
    with api.errors(f"listing instances of region '{q.region}' (aggregatedList)"):
        pager = client.aggregated_list(
            request={"project": q.project, "filter": _server_filter(q)}, **api.call
        )
        for scope, scoped in pager:
            kind, _, name = str(scope).partition("/")
            if kind != "zones" or region_of(name) != q.region:
                continue
            seen_region = True
            out.extend(scoped.instances)
    if not seen_region:
        # The aggregated list names every zone, with a warning when it has no results; a
        # region with no zone at all is checked once so that a typo is not "no hosts".
        with api.errors(f"looking up region '{q.region}'", region=q.region):
            api.client("RegionsClient").get(project=q.project, region=q.region, **api.call)
    return out


def _groups_in_scope(api: _Api, q: _Query) -> list[tuple[str, str, str]]:
    """(kind 'zones'|'regions', location, name) of the instance groups in scope."""
    in_scope_regions = {q.region} if q.region else {region_of(z) for z in q.zones}
    client = api.client("InstanceGroupsClient")
    found: list[tuple[str, str, str]] = []
    with api.errors("listing instance groups (aggregatedList)"):
        for scope, scoped in client.aggregated_list(request={"project": q.project}, **api.call):
            kind, _, loc = str(scope).partition("/")
            if kind == "zones":
                ok = loc in q.zones if q.zones else region_of(loc) == q.region
            elif kind == "regions":
                ok = loc in in_scope_regions
            else:
                ok = False
            if ok:
                found.extend((kind, loc, g.name) for g in scoped.instance_groups)
    if q.groups:
        missing = [g for g in q.groups if not any(name == g for _, _, name in found)]
        if missing:
            raise DiscoveryError(
                f"infrastructure '{q.ident}': instance group(s) {', '.join(missing)} not found "
                f"in {q.where} (hostFilter.spec.instanceGroups)",
                infrastructure=q.ident,
                error_class="Unknown",
            )
        found = [f for f in found if f[2] in q.groups]
    return found


def _group_members(api: _Api, q: _Query, kind: str, loc: str, name: str) -> list[Any]:
    from google.cloud import compute_v1

    if kind == "zones":
        with api.errors(f"listing instances of instance group '{name}'", zone=loc, group=name):
            return list(
                api.client("InstanceGroupsClient").list_instances(
                    project=q.project,
                    zone=loc,
                    instance_group=name,
                    instance_groups_list_instances_request_resource=(
                        compute_v1.InstanceGroupsListInstancesRequest(instance_state="RUNNING")
                    ),
                    **api.call,
                )
            )
    with api.errors(
        f"listing instances of regional instance group '{name}'", region=loc, group=name
    ):
        return list(
            api.client("RegionInstanceGroupsClient").list_instances(
                project=q.project,
                region=loc,
                instance_group=name,
                region_instance_groups_list_instances_request_resource=(
                    compute_v1.RegionInstanceGroupsListInstancesRequest(instance_state="RUNNING")
                ),
                **api.call,
            )
        )


def _instances_of_groups(api: _Api, q: _Query) -> list[Any]:
    members: dict[tuple[str, str, str], None] = {}
    for kind, loc, name in _groups_in_scope(api, q):
        items = _group_members(api, q, kind, loc, name)
        log.debug("instance group %s/%s has %d running members", loc, name, len(items))
        for item in items:
            m = _MEMBER_RE.search(str(item.instance))
            if m and (not q.zones or m.group(2) in q.zones):
                members.setdefault((m.group(1), m.group(2), m.group(3)), None)
    client = api.client("InstancesClient")
    gexc = _gexc()
    out: list[Any] = []
    for project, zone, name in members:
        try:
            with api.errors(f"reading instance '{name}' in zone '{zone}'", zone=zone):
                out.append(client.get(project=project, zone=zone, instance=name, **api.call))
        except DiscoveryError as exc:
            if isinstance(exc.__cause__, gexc.NotFound):
                log.info("instance %s/%s left its group during discovery; skipped", zone, name)
                continue
            raise
    return out


# --- entry point -------------------------------------------------------------------------------


def discover(infra: dict[str, Any], *, retry: RetryPolicy | None = None) -> list[Host]:
    """The running instances of a GCP infrastructure that pass its filters, as hosts."""
    q = _read(infra)
    api = _Api(q, retry or DEFAULT_RETRY, connector_credential(infra))
    source: Callable[[_Api, _Query], list[Any]]
    if q.filter_type == "GcpInstanceGroupFilter":
        source = _instances_of_groups
    elif q.zones:
        source = _instances_by_zone
    else:
        source = _instances_by_region
    found = [inst for inst in source(api, q) if _wanted(q, inst)]
    hosts = _hosts(infra, q, found)
    log.info("GCP infrastructure '%s': %d running instance(s) in %s", q.ident, len(hosts), q.where)
    return hosts
