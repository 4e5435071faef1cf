"""Azure host discovery: running virtual machines and scale-set VMs of some resource groups.

What it reads is an infrastructure's ``spec`` as the loader resolves it (an ``Infrastructure``
of ``type: SshWinRmAzure``, or an Environment's inline ``cloudProviderType: Azure``
definition; the Harness reference's shape)::

    spec:
      connectorRef: azure_conn              # an Azure connector; InheritFromDelegate: the worker's
      subscriptionId: "1234...-..."         # or AZURE_SUBSCRIPTION_ID on the worker
      resourceGroup: rg-web                 # and/or hostFilter.spec.resourceGroups
      region: eastus                        # optional: only VMs in this location
      hostConnectionType: PrivateIP         # PrivateIP (default) | PublicIP | Hostname
      tags: {env: prod}                     # optional: every tag must match
      hostFilter:
        type: AzureVMSSFilter               # AzureVMSSFilter | AzureVmFilter | HostNames | All
        spec:
          resourceGroups: [rg-web, rg-api]
          tags: {Application: web-app}      # merged with spec.tags
          scaleSets: [web-vmss]             # AzureVMSSFilter: only these scale sets
          hostNames: [web-1]                # HostNames: only these VM names
      connection: {user: azureuser, privateKeyFile: ~/.ssh/id_ed25519}

Which machines:

* ``AzureVmFilter``: virtual machines (``virtual_machines.list(rg, expand="instanceView")``),
  including the members of Flexible scale sets, which are ordinary VMs.
* ``AzureVMSSFilter``: the instances of the scale sets of those groups (optionally only the
  named ones): Uniform scale sets through ``virtual_machine_scale_set_vms.list(rg, name,
  expand="instanceView")``, Flexible ones through their member VMs.
* no filter, ``All`` or ``HostNames``: both.

Only VMs whose instance view says ``PowerState/running`` are hosts. Tag names match without
regard to case (as Azure treats them), values exactly; a scale-set VM's tags are its own over
its scale set's. The address comes from the primary IP configuration of the VM's primary
network interface (the scale-set NIC APIs for Uniform scale sets), or its public IP address
(``PublicIP``), or the VM's computer name (``Hostname``). A running VM without the address asked
for is an error naming it, rather than a silently smaller fleet.

Hosts: name = the VM name (``web-1``; a Uniform scale-set instance ``web-vmss_3``), region = the
VM's location (``eastus``), attributes ``id``, ``resourceGroup``, ``subscriptionId``,
``location``, ``tags``, ``vmss`` (scale set name or None), ``instanceId``, ``size``,
``computerName``, ``zones``. Names that occur in two resource groups get ``.<resource group>``
appended so that host names stay unique.

Credentials and endpoint (worker environment; nothing is needed on the real cloud beyond the
usual Azure variables):

* An Azure connector with ``credential: {type: ManualConfig, spec: {applicationId, tenantId,
  auth: {type: Secret, spec: {secretRef: <id>}}}}``: that service principal, its secret
  resolved on the worker that discovers. ``InheritFromDelegate`` (or no connector): below.
* ``AZURE_TENANT_ID`` + ``AZURE_CLIENT_ID`` + ``AZURE_CLIENT_SECRET``: a service principal
  (``ClientSecretCredential``); otherwise ``DefaultAzureCredential`` (managed identity,
  workload identity, Azure CLI login, ...).
* ``AZURE_AUTHORITY_HOST``: the Microsoft Entra authority (sovereign clouds, or a test server;
  a loopback authority turns msal's instance discovery off, which would call
  login.microsoftonline.com).
* ``VMFARM_AZURE_ENDPOINT``: the Resource Manager base URL (default: the public cloud's).
* ``VMFARM_AZURE_SCOPE``: the token scope, if not ``https://management.azure.com/.default``.
* ``VMFARM_AZURE_CA_BUNDLE``: a CA bundle file to trust for both (private endpoints, tests).
* ``VMFARM_AZURE_RETRY_TOTAL`` / ``VMFARM_AZURE_RETRY_BACKOFF``: azure-core's retry count and
  backoff factor in seconds (defaults 10 and 0.8). 408/429/5xx are retried, honouring
  ``Retry-After``; a throttle that outlasts them is a ``Connectivity`` error.

Errors: ``ConfigError`` for a missing setting (named); ``DiscoveryError`` otherwise, with
``error_class`` ``Authentication`` (rejected credentials or no permission), ``Connectivity``
(endpoint unreachable, throttled or failing past the retries) or ``Unknown``; an unknown
subscription or resource group is named. No secret is ever logged or put in a message.
"""

from __future__ import annotations

import ipaddress
import logging
import os
import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from functools import partial
from typing import Any, TypeVar
from urllib.parse import urlsplit

from app.errors import ConfigError, DiscoveryError
from app.providers.base import DEFAULT_REGION, Host, cloud_host, connector_credential

log = logging.getLogger(__name__)

ENDPOINT_ENV = "VMFARM_AZURE_ENDPOINT"
SCOPE_ENV = "VMFARM_AZURE_SCOPE"
CA_BUNDLE_ENV = "VMFARM_AZURE_CA_BUNDLE"
RETRY_TOTAL_ENV = "VMFARM_AZURE_RETRY_TOTAL"
RETRY_BACKOFF_ENV = "VMFARM_AZURE_RETRY_BACKOFF"

VM_FILTER, VMSS_FILTER = "AzureVmFilter", "AzureVMSSFilter"
CONNECTION_TYPES = ("PrivateIP", "PublicIP", "Hostname")
_REGION_BAD = re.compile(r"[^a-z0-9-]+")

T = TypeVar("T")


# --- settings --------------------------------------------------------------------------------


@dataclass
class AzureTarget:
    """What one infrastructure asks for, read and checked from its ``spec``."""

    identifier: str
    subscription: str
    resource_groups: list[str]
    location: str | None = None
    connection_type: str = "PrivateIP"
    want_vms: bool = True
    want_scale_sets: bool = True
    scale_sets: list[str] | None = None
    host_names: list[str] | None = None
    tags: dict[str, str] = field(default_factory=dict)

    @classmethod
    def from_infra(cls, infra: dict[str, Any]) -> AzureTarget:
        ident = str(infra.get("identifier") or "")
        where = f"infrastructure '{ident}' ({infra.get('source', '')})"
        spec = infra.get("spec") or {}
        hf = spec.get("hostFilter") or {}
        hf_type = str(hf.get("type") or "All")
        hf_spec = hf.get("spec") or {}

        subscription = str(
            spec.get("subscriptionId") or os.environ.get("AZURE_SUBSCRIPTION_ID") or ""
        ).strip()
        if not subscription:
            raise ConfigError(
                f"{where}: the Azure infrastructure needs 'subscriptionId' "
                "(spec.subscriptionId, or AZURE_SUBSCRIPTION_ID on the worker)"
            )
        groups: list[str] = []
        for g in [
            *_str_list(hf_spec.get("resourceGroups"), f"{where}: hostFilter.spec.resourceGroups"),
            spec.get("resourceGroup"),
        ]:
            if g and str(g).strip().lower() not in {x.lower() for x in groups}:
                groups.append(str(g).strip())
        if not groups:
            raise ConfigError(
                f"{where}: the Azure infrastructure needs 'resourceGroup' "
                "(spec.resourceGroup or hostFilter.spec.resourceGroups)"
            )
        conn = str(spec.get("hostConnectionType") or "PrivateIP")
        if conn not in CONNECTION_TYPES:
            raise ConfigError(
                f"{where}: hostConnectionType '{conn}' is not one of " + ", ".join(CONNECTION_TYPES)
            )
        if hf_type not in (VM_FILTER, VMSS_FILTER, "All", "HostNames"):
            raise ConfigError(
                f"{where}: hostFilter type '{hf_type}' does not apply to Azure "
                f"(use {VM_FILTER}, {VMSS_FILTER}, HostNames or All)"
            )
        tags: dict[str, str] = {}
        for source in (spec.get("tags") or {}, hf_spec.get("tags") or {}):
            if not isinstance(source, dict):
                raise ConfigError(f"{where}: 'tags' must be a map of tag name to value")
            tags.update({str(k): _tag_text(v) for k, v in source.items()})
        region = spec.get("region")
        scale_sets = hf_spec.get("scaleSets")
        host_names = hf_spec.get("hostNames") if hf_type == "HostNames" else None
        if hf_type == "HostNames" and not host_names:
            raise ConfigError(f"{where}: a HostNames filter needs 'hostNames' in hostFilter.spec")
        return cls(
            identifier=ident,
            subscription=subscription,
            resource_groups=groups,
            location=normalize_region(str(region)) if region else None,
            connection_type=conn,
            want_vms=hf_type != VMSS_FILTER,
            want_scale_sets=hf_type != VM_FILTER,
            scale_sets=_str_list(scale_sets, f"{where}: hostFilter.spec.scaleSets")
            if scale_sets
            else None,
            host_names=_str_list(host_names, f"{where}: hostFilter.spec.hostNames")
            if host_names
            else None,
            tags=tags,
        )


def _str_list(value: Any, what: str) -> list[str]:
    if value is None:
        return []
    if isinstance(value, str):
        return [value]
    if not isinstance(value, list):
        raise ConfigError(f"{what} must be a list of names")
    return [str(v) for v in value]


def _tag_text(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    return str(v)


def normalize_region(location: str) -> str:
    """An Azure location as the API writes it (``East US`` -> ``eastus``)."""
    low = _REGION_BAD.sub("-", location.strip().lower().replace(" ", "")).strip("-")
    return low[:63] or DEFAULT_REGION


# --- SDK plumbing ----------------------------------------------------------------------------


def _is_loopback_url(url: str) -> bool:
    host = urlsplit(url if "//" in url else f"https://{url}").hostname or ""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _transport_kwargs() -> dict[str, Any]:
    kw: dict[str, Any] = {}
    ca = os.environ.get(CA_BUNDLE_ENV)
    if ca:
        kw["connection_verify"] = ca
    return kw


def _client_kwargs() -> dict[str, Any]:
    kw = _transport_kwargs()
    endpoint = os.environ.get(ENDPOINT_ENV)
    if endpoint:
        kw["base_url"] = endpoint.rstrip("/")
    scope = os.environ.get(SCOPE_ENV)
    if scope:
        kw["credential_scopes"] = [scope]
    for env, key, conv in (
        (RETRY_TOTAL_ENV, "retry_total", int),
        (RETRY_BACKOFF_ENV, "retry_backoff_factor", float),
    ):
        raw = os.environ.get(env)
        if raw:
            try:
                kw[key] = conv(raw)
            except ValueError:
                raise ConfigError(f"{env}={raw!r} is not a number") from None
    return kw


def make_credential(manual: dict[str, Any] | None = None) -> Any:
    """The connector's service principal (ManualConfig: ``applicationId``, ``tenantId`` and
    the secret ``secretRef`` names, resolved on this worker) when given; else the worker's:
    a service principal from ``AZURE_TENANT_ID`` / ``AZURE_CLIENT_ID`` / ``AZURE_CLIENT_SECRET``
    when all are set, else ``DefaultAzureCredential``."""
    from azure.identity import ClientSecretCredential, DefaultAzureCredential

    kw = _transport_kwargs()
    authority = os.environ.get("AZURE_AUTHORITY_HOST")
    if authority:
        kw["authority"] = authority
        if _is_loopback_url(authority):
            kw["disable_instance_discovery"] = True
    tenant, client = os.environ.get("AZURE_TENANT_ID"), os.environ.get("AZURE_CLIENT_ID")
    secret = os.environ.get("AZURE_CLIENT_SECRET")
    if manual is not None:
        tenant, client = str(manual["tenantId"]), str(manual["applicationId"])
        secret = str(manual["secret"])
    try:
        if tenant and client and secret:
            return ClientSecretCredential(tenant, client, secret, **kw)
        return DefaultAzureCredential(**kw)
    except ValueError as exc:  # e.g. a non-https authority, a malformed tenant id
        raise ConfigError(f"Azure credentials: {exc}") from None


def _clients(subscription: str, manual: dict[str, Any] | None = None) -> tuple[Any, Any, Any]:
    """(credential, compute client, network client); each is a context manager."""
    from azure.mgmt.compute import ComputeManagementClient
    from azure.mgmt.network import NetworkManagementClient

    kw = _client_kwargs()
    cred = make_credential(manual)
    return (
        cred,
        ComputeManagementClient(cred, subscription, **kw),
        NetworkManagementClient(cred, subscription, **kw),
    )


def _value(x: Any) -> Any:
    """An SDK enum's string, or the value itself."""
    return getattr(x, "value", x)


def _attr(obj: Any, *path: str) -> Any:
    for name in path:
        if obj is None:
            return None
        obj = getattr(obj, name, None)
    return obj


def _id_parts(resource_id: str) -> dict[str, str]:
    """``/subscriptions/S/resourceGroups/rg/providers/NS/type/name/sub/name`` as
    ``{"subscriptions": S, "resourcegroups": rg, "type": name, "sub": name}`` (keys lower)."""
    segs = [s for s in resource_id.split("/") if s]
    out: dict[str, str] = {}
    i = 0
    while i + 1 < len(segs):
        key = segs[i].lower()
        if key == "providers":
            i += 2
            continue
        out[key] = segs[i + 1]
        i += 2
    return out


def _not_found(exc: Exception) -> bool:
    return getattr(exc, "status_code", None) == 404


# --- discovery -------------------------------------------------------------------------------


@dataclass
class _Machine:
    """A VM or scale-set VM, as read from the compute API."""

    id: str
    name: str
    resource_group: str
    location: str
    tags: dict[str, str]
    size: str | None
    computer_name: str | None
    nic_refs: list[tuple[str, bool | None]]  # (NIC id, primary flag)
    power_state: str | None
    scale_set: str | None = None
    instance_id: str | None = None
    zones: list[str] = field(default_factory=list)


def _power_state(view: Any) -> str | None:
    for status in _attr(view, "statuses") or []:
        code = str(_attr(status, "code") or "")
        if code.lower().startswith("powerstate/"):
            return code.split("/", 1)[1].lower()
    return None


def _machine(vm: Any, rg: str, *, scale_set: str | None = None) -> _Machine:
    view = _attr(vm, "instance_view")
    nics = [
        (str(_attr(n, "id")), _attr(n, "primary"))
        for n in (_attr(vm, "network_profile", "network_interfaces") or [])
        if _attr(n, "id")
    ]
    vmss_id = _attr(vm, "virtual_machine_scale_set", "id")
    size = _attr(vm, "hardware_profile", "vm_size") or _attr(vm, "sku", "name")
    return _Machine(
        id=str(_attr(vm, "id") or ""),
        name=str(_attr(vm, "name") or ""),
        resource_group=rg,
        location=str(_attr(vm, "location") or ""),
        tags=dict(_attr(vm, "tags") or {}),
        size=str(_value(size)) if size else None,
        computer_name=_attr(vm, "os_profile", "computer_name") or _attr(view, "computer_name"),
        nic_refs=nics,
        power_state=_power_state(view) if view is not None else None,
        scale_set=scale_set
        or (_id_parts(str(vmss_id)).get("virtualmachinescalesets") if vmss_id else None),
        instance_id=_attr(vm, "instance_id"),
        zones=list(_attr(vm, "zones") or []),
    )


class _Network:
    """NIC and public IP look-ups, one list call per resource group or scale set, cached."""

    def __init__(self, network: Any) -> None:
        self.network = network
        self._nics: dict[str, dict[str, Any]] = {}  # scope -> lower id -> NIC
        self._pips: dict[str, dict[str, Any]] = {}  # scope -> lower id -> public IP

    @staticmethod
    def _index(items: Iterable[Any]) -> dict[str, Any]:
        return {str(_attr(x, "id") or "").lower(): x for x in items}

    def nic(self, nic_id: str) -> Any:
        p = _id_parts(nic_id)
        rg, ss = p.get("resourcegroups", ""), p.get("virtualmachinescalesets")
        ops = self.network.network_interfaces
        scope = f"{rg}/{ss}".lower() if ss else rg.lower()
        if scope not in self._nics:
            pager = (
                ops.list_virtual_machine_scale_set_network_interfaces(rg, ss)
                if ss
                else ops.list(rg)
            )
            self._nics[scope] = self._index(pager)
        found = self._nics[scope].get(nic_id.lower())
        if found is not None:
            return found
        try:  # created since the list was read, or listed under another id spelling
            if ss:
                return ops.get_virtual_machine_scale_set_network_interface(
                    rg, ss, p.get("virtualmachines", ""), p.get("networkinterfaces", "")
                )
            return ops.get(rg, p.get("networkinterfaces", ""))
        except Exception as exc:
            if _not_found(exc):
                return None
            raise

    def public_ip(self, pip_id: str) -> str | None:
        p = _id_parts(pip_id)
        rg, ss = p.get("resourcegroups", ""), p.get("virtualmachinescalesets")
        ops = self.network.public_ip_addresses
        scope = f"{rg}/{ss}".lower() if ss else rg.lower()
        if scope not in self._pips:
            pager = (
                ops.list_virtual_machine_scale_set_public_ip_addresses(rg, ss)
                if ss
                else ops.list(rg)
            )
            self._pips[scope] = self._index(pager)
        pip = self._pips[scope].get(pip_id.lower())
        if pip is None:
            try:
                pip = (
                    ops.get_virtual_machine_scale_set_public_ip_address(
                        rg,
                        ss,
                        p.get("virtualmachines", ""),
                        p.get("networkinterfaces", ""),
                        p.get("ipconfigurations", ""),
                        p.get("publicipaddresses", ""),
                    )
                    if ss
                    else ops.get(rg, p.get("publicipaddresses", ""))
                )
            except Exception as exc:
                if _not_found(exc):
                    return None
                raise
        addr = _attr(pip, "ip_address")
        return str(addr) if addr else None

    def addresses(self, m: _Machine, *, need_public: bool) -> tuple[str | None, str | None]:
        """(private IP, public IP) of the primary IP configuration of the primary NIC. The
        public IP is informational unless ``need_public``: not being allowed to read it then
        leaves it unknown instead of failing discovery."""
        flagged = [nic_id for nic_id, flag in m.nic_refs if flag]
        if flagged or len(m.nic_refs) == 1:
            nic = self.nic((flagged or [m.nic_refs[0][0]])[0])
        else:  # several NICs and the VM does not say which is primary: the NICs do
            nics = [n for n in (self.nic(i) for i, _ in m.nic_refs) if n is not None]
            nic = next((n for n in nics if _attr(n, "primary")), nics[0] if nics else None)
        if nic is None:
            return None, None
        configs = list(_attr(nic, "ip_configurations") or [])
        if not configs:
            return None, None
        ipc = next((c for c in configs if _attr(c, "primary")), configs[0])
        private = _attr(ipc, "private_ip_address")
        pip_id = _attr(ipc, "public_ip_address", "id")
        public = None
        if pip_id:
            try:
                public = self.public_ip(str(pip_id))
            except Exception as exc:
                if need_public or getattr(exc, "status_code", None) != 403:
                    raise
                log.warning("azure: not allowed to read public IP %s; leaving it unknown", pip_id)
        return (str(private) if private else None), public


class _Discovery:
    def __init__(self, target: AzureTarget, compute: Any, network: Any) -> None:
        self.t = target
        self.compute = compute
        self.net = _Network(network)
        self.scale_sets_seen: set[str] = set()  # lower names of the scale sets found

    def machines(self, rg: str) -> list[_Machine]:
        t = self.t
        vms: list[_Machine] | None = None

        def all_vms() -> list[_Machine]:
            nonlocal vms
            if vms is None:
                vms = [
                    _machine(v, rg)
                    for v in self.compute.virtual_machines.list(rg, expand="instanceView")
                ]
            return vms

        found: list[_Machine] = []
        if t.want_vms:
            found.extend(all_vms())
        if t.want_scale_sets:
            wanted = {s.lower() for s in t.scale_sets} if t.scale_sets else None
            for ss in self.compute.virtual_machine_scale_sets.list(rg):
                name = str(_attr(ss, "name") or "")
                if wanted is not None and name.lower() not in wanted:
                    continue
                self.scale_sets_seen.add(name.lower())
                if t.location and normalize_region(str(_attr(ss, "location") or "")) != t.location:
                    continue
                mode = str(_value(_attr(ss, "orchestration_mode")) or "Uniform")
                if mode.lower() == "flexible":
                    members = [m for m in all_vms() if (m.scale_set or "").lower() == name.lower()]
                else:
                    members = [
                        _machine(v, rg, scale_set=name)
                        for v in self.compute.virtual_machine_scale_set_vms.list(
                            rg, name, expand="instanceView"
                        )
                    ]
                for m in members:
                    m.tags = {**dict(_attr(ss, "tags") or {}), **m.tags}
                found.extend(members)
        return found

    def matches(self, m: _Machine) -> bool:
        t = self.t
        if t.location and normalize_region(m.location) != t.location:
            return False
        if t.host_names is not None and m.name.lower() not in {h.lower() for h in t.host_names}:
            return False
        have = {k.lower(): str(v) for k, v in m.tags.items()}
        return all(have.get(k.lower()) == v for k, v in t.tags.items())

    def running(self, m: _Machine) -> bool:
        if m.power_state is None:  # the list carried no instance view: ask for it
            if (
                m.scale_set
                and m.instance_id is not None
                and "/virtualmachinescalesets/" in m.id.lower()
            ):  # a Uniform instance
                view = self.compute.virtual_machine_scale_set_vms.get_instance_view(
                    m.resource_group, m.scale_set, m.instance_id
                )
            else:
                view = self.compute.virtual_machines.instance_view(m.resource_group, m.name)
            m.power_state = _power_state(view)
            m.computer_name = m.computer_name or _attr(view, "computer_name")
        return m.power_state == "running"


def _call(target: AzureTarget, what: str, fn: Callable[[], T], *, resource_group: str = "") -> T:
    """Run ``fn`` and turn Azure SDK errors into DiscoveryError naming ``what``."""
    try:
        return fn()
    except (ConfigError, DiscoveryError):
        raise
    except Exception as exc:
        raise _discovery_error(target, what, exc, resource_group) from exc


def _discovery_error(
    target: AzureTarget, what: str, exc: Exception, resource_group: str = ""
) -> DiscoveryError:
    from azure.core.exceptions import (
        ClientAuthenticationError,
        HttpResponseError,
        ServiceRequestError,
        ServiceResponseError,
    )

    ident = target.identifier
    status = getattr(exc, "status_code", None)
    err = getattr(exc, "error", None)
    code = str(_attr(err, "code") or "")
    detail = str(_attr(err, "message") or getattr(exc, "message", "") or exc).strip()
    detail = detail.splitlines()[0][:500] if detail else type(exc).__name__
    sub = target.subscription

    def fail(message: str, error_class: str = "Unknown") -> DiscoveryError:
        return DiscoveryError(
            f"infrastructure '{ident}': {message}", infrastructure=ident, error_class=error_class
        )

    if isinstance(exc, ClientAuthenticationError) and status is None:
        return fail(
            f"could not get an Azure access token while {what}: {detail} (check "
            "AZURE_TENANT_ID / AZURE_CLIENT_ID / AZURE_CLIENT_SECRET or the worker's "
            "managed identity)",
            "Authentication",
        )
    if status == 401 or isinstance(exc, ClientAuthenticationError):
        return fail(
            f"Azure rejected the credentials while {what} (401"
            f"{' ' + code if code else ''}: {detail})",
            "Authentication",
        )
    if status == 403:
        return fail(
            f"the Azure identity has no permission for {what} in subscription "
            f"'{sub}' (403{' ' + code if code else ''}: {detail}); it needs read access "
            "to virtual machines, scale sets and network interfaces (e.g. the Reader "
            "role)",
            "Authentication",
        )
    if status == 404:
        if code == "ResourceGroupNotFound":
            m = re.search(r"resource group '([^']+)'", detail, re.I)
            rg = m.group(1) if m else (resource_group or "?")
            return fail(
                f"resource group '{rg}' does not exist in subscription '{sub}' "
                f"(or the identity cannot see it): {detail}"
            )
        if code in ("SubscriptionNotFound", "InvalidSubscriptionId"):
            return fail(
                f"subscription '{sub}' was not found or is not visible to the Azure "
                f"identity ({code}: {detail})"
            )
        return fail(f"not found while {what} (404{' ' + code if code else ''}: {detail})")
    if status == 429:
        return fail(
            f"Azure kept throttling the requests while {what} (429: {detail}); retry later",
            "Connectivity",
        )
    if isinstance(status, int) and status >= 500:
        return fail(
            f"Azure Resource Manager failed while {what} ({status}"
            f"{' ' + code if code else ''}: {detail})",
            "Connectivity",
        )
    if isinstance(exc, ServiceRequestError | ServiceResponseError):
        return fail(
            f"could not reach Azure Resource Manager while {what}: {detail}", "Connectivity"
        )
    if isinstance(exc, HttpResponseError):
        return fail(f"Azure answered {status}{' ' + code if code else ''} while {what}: {detail}")
    return fail(f"{type(exc).__name__} while {what}: {detail}")


def discover(infra: dict[str, Any]) -> list[Host]:
    """The running VMs and scale-set VMs an Azure infrastructure selects, as hosts."""
    target = AzureTarget.from_infra(infra)
    cred, compute, network = _clients(target.subscription, connector_credential(infra))
    with cred, compute, network:
        d = _Discovery(target, compute, network)
        machines: dict[str, _Machine] = {}
        for rg in target.resource_groups:
            for m in _call(
                target,
                f"listing the VMs of resource group '{rg}'",
                partial(d.machines, rg),
                resource_group=rg,
            ):
                if m.id.lower() not in machines and d.matches(m):
                    machines[m.id.lower()] = m
        if target.scale_sets and target.want_scale_sets:
            missing = [s for s in target.scale_sets if s.lower() not in d.scale_sets_seen]
            if missing:
                raise DiscoveryError(
                    f"infrastructure '{target.identifier}': scale set(s) "
                    + ", ".join(f"'{s}'" for s in missing)
                    + " not found in resource group(s) "
                    + ", ".join(f"'{g}'" for g in target.resource_groups),
                    infrastructure=target.identifier,
                )
        running = [
            m
            for m in machines.values()
            if _call(
                target,
                f"reading the power state of VM '{m.name}'",
                partial(d.running, m),
                resource_group=m.resource_group,
            )
        ]
        hosts = _call(
            target, "reading network interfaces", lambda: _hosts(infra, target, d, running)
        )
    log.info(
        "azure: infrastructure %s: %d running of %d matching VMs in %s",
        target.identifier,
        len(hosts),
        len(machines),
        ", ".join(target.resource_groups),
    )
    return hosts


def _hosts(
    infra: dict[str, Any], t: AzureTarget, d: _Discovery, running: list[_Machine]
) -> list[Host]:
    counts: dict[str, int] = {}
    for m in running:
        counts[m.name.lower()] = counts.get(m.name.lower(), 0) + 1
    hosts: list[Host] = []
    lacking: list[str] = []
    for m in sorted(running, key=lambda m: (m.resource_group.lower(), m.name.lower())):
        private, public = d.net.addresses(m, need_public=t.connection_type == "PublicIP")
        address = {"PrivateIP": private, "PublicIP": public, "Hostname": m.computer_name or m.name}[
            t.connection_type
        ]
        if not address:
            lacking.append(f"{m.name} ({m.resource_group})")
            continue
        name = m.name if counts[m.name.lower()] == 1 else f"{m.name}.{m.resource_group}"
        hosts.append(
            cloud_host(
                infra,
                name=name,
                address=address,
                region=normalize_region(m.location),
                public_ip=public,
                private_ip=private,
                attributes={
                    "id": m.id,
                    "resourceGroup": m.resource_group,
                    "subscriptionId": t.subscription,
                    "location": m.location,
                    "tags": m.tags,
                    "vmss": m.scale_set,
                    "instanceId": m.instance_id,
                    "size": m.size,
                    "computerName": m.computer_name,
                    "zones": m.zones,
                },
            )
        )
    if lacking:
        kind = {"PrivateIP": "private IP address", "PublicIP": "public IP address"}.get(
            t.connection_type, "address"
        )
        hint = (
            " (use hostConnectionType PrivateIP, or give them public IPs)"
            if t.connection_type == "PublicIP"
            else ""
        )
        raise DiscoveryError(
            f"infrastructure '{t.identifier}': running VM(s) without a {kind}: "
            + ", ".join(lacking)
            + hint,
            infrastructure=t.identifier,
        )
    return hosts
