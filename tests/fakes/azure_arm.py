"""A fake Azure Resource Manager (and Microsoft Entra token endpoint) on 127.0.0.1, for tests.

The real ``azure-mgmt-compute`` / ``azure-mgmt-network`` clients and the real
``azure.identity.ClientSecretCredential`` talk to it over HTTPS (bearer tokens need TLS; see
``/work/shared/research/cloud-sdk-local-endpoints.md``). It serves the REST paths those clients
call, with bodies shaped like the public Azure REST API reference:

* ``GET /{tenant}/v2.0/.well-known/openid-configuration`` and
  ``POST /{tenant}/oauth2/v2.0/token`` (client-credentials grant; the secret is checked)
* virtual machines: list in a resource group (``$expand=instanceView`` honoured), list in the
  subscription, get, ``/instanceView``
* scale sets: list; scale-set VMs: list (``$expand=instanceView``), ``/instanceView``
* network interfaces: list / get; scale-set NICs (list for a scale set, get for one instance)
* public IP addresses: list / get; scale-set public IPs (list, get)

Every list is paged (``page_size``) with an absolute ``nextLink`` carrying ``$skiptoken``.
Unknown subscriptions and resource groups answer 404 ``SubscriptionNotFound`` /
``ResourceGroupNotFound``; a missing or unknown bearer token answers 401
``InvalidAuthenticationToken``. ``fail()`` injects errors (401, 403, 429 with ``Retry-After``,
5xx) for the next matching requests. Every request is recorded in ``requests``.

Usage::

    arm = FakeArm(tmp_path).start()
    arm.add_vm("rg-web", "web-1", private_ip="10.0.0.4", public_ip="203.0.113.4",
               tags={"env": "prod"})
    arm.add_scale_set("rg-web", "ss1")
    arm.add_scale_set_vm("rg-web", "ss1", "0", private_ip="10.0.1.4")
    ...  # point the SDK at arm.url, trust arm.ca_file, authenticate at arm.url
    arm.stop()
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import json
import re
import ssl
import threading
import uuid
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlencode, urlsplit

SUBSCRIPTION = "00000000-0000-0000-0000-000000000000"
TENANT = "11111111-1111-1111-1111-111111111111"
CLIENT_ID = "22222222-2222-2222-2222-222222222222"
CLIENT_SECRET = "fake-client-secret"  # a test value, accepted only by this fake

COMPUTE = "Microsoft.Compute"
NETWORK = "Microsoft.Network"


def make_self_signed_cert(directory: Path) -> tuple[Path, Path]:
    """A self-signed certificate for 127.0.0.1 / localhost that is its own CA (so it can be
    given as the CA bundle). Returns (cert.pem, key.pem)."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import rsa
    from cryptography.x509.oid import NameOID

    directory.mkdir(parents=True, exist_ok=True)
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "127.0.0.1")])
    now = dt.datetime.now(dt.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=2))
        .add_extension(
            x509.SubjectAlternativeName(
                [x509.IPAddress(ipaddress.ip_address("127.0.0.1")), x509.DNSName("localhost")]
            ),
            critical=False,
        )
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    cert_file, key_file = directory / "arm-cert.pem", directory / "arm-key.pem"
    cert_file.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_file.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.TraditionalOpenSSL,
            serialization.NoEncryption(),
        )
    )
    return cert_file, key_file


@dataclass
class Recorded:
    """One request the fake received."""

    method: str
    path: str
    query: dict[str, str]
    headers: dict[str, str]
    body: str
    status: int = 0

    @property
    def path_lower(self) -> str:
        return self.path.lower()


@dataclass
class _Failure:
    pattern: re.Pattern[str]
    status: int
    code: str
    message: str
    headers: dict[str, str]
    remaining: int  # -1: forever
    method: str | None


@dataclass
class _Nic:
    id: str
    name: str
    location: str
    vm_id: str
    private_ip: str | None
    public_ip_id: str | None
    ipconfig_name: str
    primary: bool = True
    secondary_ips: list[str] = field(default_factory=list)  # non-primary ipconfigs, listed first


@dataclass
class _Pip:
    id: str
    name: str
    location: str
    address: str | None
    ipconfig_id: str


@dataclass
class _Vm:
    id: str
    name: str
    location: str
    tags: dict[str, str]
    power_state: str
    size: str
    computer_name: str
    nic_ids: list[str]
    vmss_id: str | None = None  # a Flexible scale set this VM belongs to
    zones: list[str] = field(default_factory=list)


@dataclass
class _ScaleSetVm:
    id: str
    name: str
    instance_id: str
    location: str
    tags: dict[str, str]
    power_state: str
    size: str
    computer_name: str
    nic_ids: list[str]


@dataclass
class _ScaleSet:
    id: str
    name: str
    location: str
    tags: dict[str, str]
    size: str
    orchestration: str  # Uniform | Flexible
    vms: dict[str, _ScaleSetVm] = field(default_factory=dict)  # instance id -> VM (Uniform)
    nics: dict[str, _Nic] = field(default_factory=dict)  # lower id -> NIC
    pips: dict[str, _Pip] = field(default_factory=dict)  # lower id -> public IP


@dataclass
class _ResourceGroup:
    name: str
    location: str
    vms: dict[str, _Vm] = field(default_factory=dict)  # lower name
    scale_sets: dict[str, _ScaleSet] = field(default_factory=dict)  # lower name
    nics: dict[str, _Nic] = field(default_factory=dict)  # lower name
    pips: dict[str, _Pip] = field(default_factory=dict)  # lower name


class _Error(Exception):
    def __init__(
        self, status: int, code: str, message: str, headers: dict[str, str] | None = None
    ) -> None:
        super().__init__(message)
        self.status, self.code, self.message = status, code, message
        self.headers = headers or {}


def _statuses(power_state: str) -> list[dict[str, str]]:
    return [
        {
            "code": "ProvisioningState/succeeded",
            "level": "Info",
            "displayStatus": "Provisioning succeeded",
            "time": "2024-01-01T00:00:00+00:00",
        },
        {
            "code": f"PowerState/{power_state}",
            "level": "Info",
            "displayStatus": f"VM {power_state}",
        },
    ]


class FakeArm:
    """The fake ARM server. ``start()`` returns self; ``url`` is ``https://127.0.0.1:PORT``."""

    def __init__(
        self,
        cert_dir: Path,
        *,
        subscription: str = SUBSCRIPTION,
        page_size: int = 2,
        tls: bool = True,
        expand_instance_view: bool = True,
        tenant: str = TENANT,
        client_id: str = CLIENT_ID,
        client_secret: str = CLIENT_SECRET,
    ) -> None:
        self.cert_dir = Path(cert_dir)
        self.subscription = subscription
        self.page_size = page_size
        self.tls = tls
        # False: behave like an API version that ignores $expand=instanceView on lists.
        self.expand_instance_view = expand_instance_view
        self.tenant = tenant
        self.clients: dict[str, str] = {client_id: client_secret}
        self.require_token = True
        self.resource_groups: dict[str, _ResourceGroup] = {}
        self.requests: list[Recorded] = []
        self.tokens_issued: list[str] = []
        self.ca_file: Path | None = None
        self._failures: list[_Failure] = []
        self._lock = threading.RLock()
        self._server: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None

    # --- lifecycle -----------------------------------------------------------------------

    def start(self) -> FakeArm:
        handler = type("_Handler", (_Handler,), {"arm": self})
        server = _QuietServer(("127.0.0.1", 0), handler)
        server.daemon_threads = True
        if self.tls:
            cert, key = make_self_signed_cert(self.cert_dir)
            ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
            ctx.load_cert_chain(cert, key)
            self.ca_file = cert
            server.socket = ctx.wrap_socket(
                server.socket, server_side=True, do_handshake_on_connect=False
            )
        self._server = server
        self._thread = threading.Thread(
            target=server.serve_forever,
            name="fake-arm",
            kwargs={"poll_interval": 0.05},
            daemon=True,
        )
        self._thread.start()
        return self

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None
        if self._thread is not None:
            self._thread.join(timeout=5)
            self._thread = None

    def __enter__(self) -> FakeArm:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    @property
    def port(self) -> int:
        assert self._server is not None, "start() the fake first"
        return int(self._server.server_address[1])

    @property
    def url(self) -> str:
        return f"{'https' if self.tls else 'http'}://127.0.0.1:{self.port}"

    # --- inventory -----------------------------------------------------------------------

    def _rg_id(self, rg: str) -> str:
        return f"/subscriptions/{self.subscription}/resourceGroups/{rg}"

    def add_resource_group(self, name: str, location: str = "eastus") -> _ResourceGroup:
        with self._lock:
            return self.resource_groups.setdefault(name.lower(), _ResourceGroup(name, location))

    def _group(self, rg: str) -> _ResourceGroup:
        return self.add_resource_group(rg)

    def add_vm(
        self,
        rg: str,
        name: str,
        *,
        private_ip: str | None = None,
        public_ip: str | None = None,
        tags: dict[str, str] | None = None,
        power_state: str = "running",
        location: str = "eastus",
        size: str = "Standard_B1s",
        computer_name: str | None = None,
        nic_resource_group: str | None = None,
        scale_set: str | None = None,
        extra_nics: int = 0,
        secondary_ips: list[str] | None = None,
        zones: list[str] | None = None,
    ) -> _Vm:
        """A VM with one primary NIC (``<name>-nic``, in ``nic_resource_group`` or the VM's)
        and, if ``public_ip``, a public IP ``<name>-pip``. ``scale_set`` makes it a member of
        that (Flexible) scale set. ``extra_nics`` adds secondary NICs (10.99.x.y, listed
        first so that code must pick the primary one); ``secondary_ips`` adds non-primary IP
        configurations to the primary NIC, listed before its primary one."""
        with self._lock:
            group = self._group(rg)
            vm_id = f"{self._rg_id(group.name)}/providers/{COMPUTE}/virtualMachines/{name}"
            nic_rg = self._group(nic_resource_group or group.name)
            nic_ids = []
            for k in range(extra_nics):
                sec = self._add_nic(
                    nic_rg,
                    f"{name}-nic{k + 2}",
                    location,
                    vm_id,
                    f"10.99.{len(nic_rg.nics) % 250}.{k + 10}",
                    None,
                    primary=False,
                )
                nic_ids.append(sec.id)
            pip_id = None
            nic_name = f"{name}-nic"
            ipconfig_id = (
                f"{self._rg_id(nic_rg.name)}/providers/{NETWORK}/networkInterfaces/"
                f"{nic_name}/ipConfigurations/ipconfig1"
            )
            if public_ip is not None:
                pip = _Pip(
                    id=f"{self._rg_id(nic_rg.name)}/providers/{NETWORK}/publicIPAddresses/"
                    f"{name}-pip",
                    name=f"{name}-pip",
                    location=location,
                    address=public_ip,
                    ipconfig_id=ipconfig_id,
                )
                nic_rg.pips[pip.name.lower()] = pip
                pip_id = pip.id
            nic = self._add_nic(nic_rg, nic_name, location, vm_id, private_ip, pip_id)
            nic.secondary_ips = list(secondary_ips or [])
            nic_ids.append(nic.id)
            vmss_id = None
            if scale_set is not None:
                vmss_id = group.scale_sets[scale_set.lower()].id
            vm = _Vm(
                id=vm_id,
                name=name,
                location=location,
                tags=dict(tags or {}),
                power_state=power_state,
                size=size,
                computer_name=computer_name or name,
                nic_ids=nic_ids,
                vmss_id=vmss_id,
                zones=list(zones or []),
            )
            group.vms[name.lower()] = vm
            return vm

    def _add_nic(
        self,
        group: _ResourceGroup,
        name: str,
        location: str,
        vm_id: str,
        private_ip: str | None,
        pip_id: str | None,
        *,
        primary: bool = True,
    ) -> _Nic:
        nic = _Nic(
            id=f"{self._rg_id(group.name)}/providers/{NETWORK}/networkInterfaces/{name}",
            name=name,
            location=location,
            vm_id=vm_id,
            private_ip=private_ip,
            public_ip_id=pip_id,
            ipconfig_name="ipconfig1",
            primary=primary,
        )
        group.nics[name.lower()] = nic
        return nic

    def add_scale_set(
        self,
        rg: str,
        name: str,
        *,
        location: str = "eastus",
        tags: dict[str, str] | None = None,
        size: str = "Standard_D2s_v3",
        orchestration: str = "Uniform",
    ) -> _ScaleSet:
        """A scale set. Uniform: add instances with ``add_scale_set_vm``; Flexible: add VMs
        with ``add_vm(..., scale_set=name)``."""
        with self._lock:
            group = self._group(rg)
            ss = _ScaleSet(
                id=f"{self._rg_id(group.name)}/providers/{COMPUTE}/virtualMachineScaleSets/{name}",
                name=name,
                location=location,
                tags=dict(tags or {}),
                size=size,
                orchestration=orchestration,
            )
            group.scale_sets[name.lower()] = ss
            return ss

    def add_scale_set_vm(
        self,
        rg: str,
        scale_set: str,
        instance_id: str,
        *,
        private_ip: str | None = None,
        public_ip: str | None = None,
        tags: dict[str, str] | None = None,
        power_state: str = "running",
        computer_name: str | None = None,
    ) -> _ScaleSetVm:
        """An instance of a Uniform scale set, named ``<scaleset>_<instance id>``, with the
        scale set's NIC (``<scaleset>-nic``) and, if ``public_ip``, its per-instance public IP.
        ``tags`` default to the scale set's."""
        with self._lock:
            group = self._group(rg)
            ss = group.scale_sets[scale_set.lower()]
            vm_id = f"{ss.id}/virtualMachines/{instance_id}"
            nic_name = f"{ss.name}-nic"
            nic_id = f"{vm_id}/networkInterfaces/{nic_name}"
            ipconfig_id = f"{nic_id}/ipConfigurations/{ss.name}-ipconfig"
            pip_id = None
            if public_ip is not None:
                pip = _Pip(
                    id=f"{ipconfig_id}/publicIPAddresses/{ss.name}-pip",
                    name=f"{ss.name}-pip",
                    location=ss.location,
                    address=public_ip,
                    ipconfig_id=ipconfig_id,
                )
                ss.pips[pip.id.lower()] = pip
                pip_id = pip.id
            ss.nics[nic_id.lower()] = _Nic(
                id=nic_id,
                name=nic_name,
                location=ss.location,
                vm_id=vm_id,
                private_ip=private_ip,
                public_ip_id=pip_id,
                ipconfig_name=f"{ss.name}-ipconfig",
            )
            vm = _ScaleSetVm(
                id=vm_id,
                name=f"{ss.name}_{instance_id}",
                instance_id=instance_id,
                location=ss.location,
                tags=dict(ss.tags if tags is None else tags),
                power_state=power_state,
                size=ss.size,
                computer_name=computer_name or f"{ss.name}{int(instance_id):06x}",
                nic_ids=[nic_id],
            )
            ss.vms[instance_id] = vm
            return vm

    def set_power_state(self, rg: str, name: str, power_state: str) -> None:
        with self._lock:
            self.resource_groups[rg.lower()].vms[name.lower()].power_state = power_state

    def fail(
        self,
        path_pattern: str,
        status: int,
        *,
        times: int = 1,
        code: str | None = None,
        message: str | None = None,
        retry_after: str | None = None,
        headers: dict[str, str] | None = None,
        method: str | None = None,
    ) -> None:
        """Answer the next ``times`` requests whose path matches ``path_pattern`` (a regex,
        case-insensitive, searched) with an ARM error. ``times=-1``: every one. 429 gets a
        ``Retry-After`` header (``retry_after``, default ``"0"``)."""
        default_codes = {
            401: "InvalidAuthenticationToken",
            403: "AuthorizationFailed",
            404: "ResourceNotFound",
            429: "TooManyRequests",
            500: "InternalServerError",
            503: "ServiceUnavailable",
        }
        hdrs = dict(headers or {})
        if status == 429 or retry_after is not None:
            hdrs.setdefault("Retry-After", retry_after if retry_after is not None else "0")
        with self._lock:
            self._failures.append(
                _Failure(
                    pattern=re.compile(path_pattern, re.I),
                    status=status,
                    code=code or default_codes.get(status, "Error"),
                    message=message or _default_message(status, self.subscription),
                    headers=hdrs,
                    remaining=times,
                    method=method,
                )
            )

    def clear_failures(self) -> None:
        with self._lock:
            self._failures.clear()

    # --- request log ---------------------------------------------------------------------

    def arm_requests(self) -> list[Recorded]:
        """Requests to ARM (``/subscriptions/...``), in order."""
        with self._lock:
            return [r for r in self.requests if r.path_lower.startswith("/subscriptions/")]

    def token_requests(self) -> list[Recorded]:
        with self._lock:
            return [r for r in self.requests if r.path_lower.endswith("/oauth2/v2.0/token")]

    def count(self, path_pattern: str) -> int:
        rx = re.compile(path_pattern, re.I)
        with self._lock:
            return sum(1 for r in self.requests if rx.search(r.path))

    # --- request handling ----------------------------------------------------------------

    def handle(
        self, method: str, raw_path: str, headers: dict[str, str], body: str
    ) -> tuple[int, dict[str, str], bytes]:
        parts = urlsplit(raw_path)
        query = {k: v[-1] for k, v in parse_qs(parts.query, keep_blank_values=True).items()}
        rec = Recorded(method, parts.path, query, headers, body)
        with self._lock:
            self.requests.append(rec)
        try:
            status, payload, extra = self._route(method, parts.path, query, headers, body)
        except _Error as e:
            status, payload, extra = (
                e.status,
                {"error": {"code": e.code, "message": e.message}},
                e.headers,
            )
        rec.status = status
        data = json.dumps(payload).encode()
        out = {
            "Content-Type": "application/json; charset=utf-8",
            "x-ms-request-id": str(uuid.uuid4()),
            **extra,
        }
        return status, out, data

    def _route(
        self, method: str, path: str, query: dict[str, str], headers: dict[str, str], body: str
    ) -> tuple[int, Any, dict[str, str]]:
        low = path.lower()
        with self._lock:
            for f in self._failures:
                if (
                    f.remaining != 0
                    and f.pattern.search(path)
                    and (f.method is None or f.method == method)
                ):
                    if f.remaining > 0:
                        f.remaining -= 1
                    raise _Error(f.status, f.code, f.message, f.headers)
        m = re.fullmatch(r"/([^/]+)/v2\.0/\.well-known/openid-configuration", low)
        if m and method == "GET":
            return 200, self._openid(path.split("/")[1]), {}
        m = re.fullmatch(r"/([^/]+)/oauth2/v2\.0/token", low)
        if m and method == "POST":
            return self._token(path.split("/")[1], body)
        if not low.startswith("/subscriptions/"):
            raise _Error(501, "NoRouteInFake", f"the fake ARM has no route for {method} {path}")
        self._check_token(headers)
        if method != "GET":
            raise _Error(501, "NoRouteInFake", f"the fake ARM has no route for {method} {path}")
        return 200, self._arm_get(path, query), {}

    def _openid(self, tenant: str) -> dict[str, Any]:
        base = f"{self.url}/{tenant}"
        return {
            "token_endpoint": f"{base}/oauth2/v2.0/token",
            "authorization_endpoint": f"{base}/oauth2/v2.0/authorize",
            "device_authorization_endpoint": f"{base}/oauth2/v2.0/devicecode",
            "issuer": f"{self.url}/{tenant}/v2.0",
            "token_endpoint_auth_methods_supported": ["client_secret_post", "private_key_jwt"],
            "response_types_supported": ["code", "id_token", "token"],
        }

    def _token(self, tenant: str, body: str) -> tuple[int, Any, dict[str, str]]:
        form = {k: v[-1] for k, v in parse_qs(body, keep_blank_values=True).items()}
        if tenant.lower() != self.tenant.lower():
            return (
                400,
                {
                    "error": "invalid_tenant",
                    "error_description": f"AADSTS90002: Tenant '{tenant}' not found.",
                },
                {},
            )
        cid, secret = form.get("client_id", ""), form.get("client_secret", "")
        if cid not in self.clients:
            return (
                400,
                {
                    "error": "unauthorized_client",
                    "error_description": f"AADSTS700016: Application with identifier "
                    f"'{cid}' was not found in the directory.",
                },
                {},
            )
        if self.clients[cid] != secret:
            return (
                401,
                {
                    "error": "invalid_client",
                    "error_description": "AADSTS7000215: Invalid client secret provided.",
                },
                {},
            )
        token = f"fake-aad-{uuid.uuid4().hex}"
        with self._lock:
            self.tokens_issued.append(token)
        return (
            200,
            {
                "token_type": "Bearer",
                "expires_in": 3600,
                "ext_expires_in": 3600,
                "access_token": token,
            },
            {},
        )

    def _check_token(self, headers: dict[str, str]) -> None:
        if not self.require_token:
            return
        auth = {k.lower(): v for k, v in headers.items()}.get("authorization", "")
        token = auth[7:] if auth.lower().startswith("bearer ") else ""
        with self._lock:
            ok = token in self.tokens_issued
        if not ok:
            raise _Error(
                401,
                "InvalidAuthenticationToken",
                "The access token is invalid."
                if token
                else "Authentication failed. The 'Authorization' header is missing.",
                {
                    "WWW-Authenticate": 'Bearer authorization_uri="'
                    + self.url
                    + '", error="invalid_token"'
                },
            )

    def _arm_get(self, path: str, query: dict[str, str]) -> Any:
        segs = [s for s in path.split("/") if s]
        low = [s.lower() for s in segs]
        if low[1] != self.subscription.lower():
            raise _Error(
                404, "SubscriptionNotFound", f"The subscription '{segs[1]}' could not be found."
            )
        expand = query.get("$expand", "").lower() == "instanceview" and self.expand_instance_view
        rest, rl = segs[2:], low[2:]
        # Subscription-wide lists.
        if rl[:1] == ["providers"] and len(rl) == 3:
            kind = (rl[1], rl[2])
            items: list[Any]
            if kind == ("microsoft.compute", "virtualmachines"):
                items = [
                    self._vm_json(v, expand or query.get("statusOnly") == "true")
                    for g in self._groups()
                    for v in g.vms.values()
                ]
            elif kind == ("microsoft.network", "networkinterfaces"):
                items = [_nic_json(n) for g in self._groups() for n in g.nics.values()]
            elif kind == ("microsoft.network", "publicipaddresses"):
                items = [_pip_json(p) for g in self._groups() for p in g.pips.values()]
            else:
                raise _Error(501, "NoRouteInFake", f"the fake ARM has no route for GET {path}")
            return self._page(path, query, items)
        if rl[:1] != ["resourcegroups"] or len(rl) < 2:
            raise _Error(501, "NoRouteInFake", f"the fake ARM has no route for GET {path}")
        with self._lock:
            group = self.resource_groups.get(rl[1])
        if group is None:
            raise _Error(
                404, "ResourceGroupNotFound", f"Resource group '{rest[1]}' could not be found."
            )
        tail, tl = rest[2:], rl[2:]
        if len(tl) < 3 or tl[0] != "providers":
            raise _Error(501, "NoRouteInFake", f"the fake ARM has no route for GET {path}")
        ns, typ, args, al = tl[1], tl[2], tail[3:], tl[3:]
        if ns == "microsoft.compute" and typ == "virtualmachines":
            if not args:
                return self._page(
                    path, query, [self._vm_json(v, expand) for v in group.vms.values()]
                )
            vm = group.vms.get(al[0]) or _not_found(group, "virtualMachines", args[0])
            if al[1:] == []:
                return self._vm_json(vm, expand)
            if al[1:] == ["instanceview"]:
                return {
                    "computerName": vm.computer_name,
                    "osName": "ubuntu",
                    "statuses": _statuses(vm.power_state),
                }
        if ns == "microsoft.compute" and typ == "virtualmachinescalesets":
            if not args:
                return self._page(path, query, [_vmss_json(s) for s in group.scale_sets.values()])
            ss = group.scale_sets.get(al[0]) or _not_found(
                group, "virtualMachineScaleSets", args[0]
            )
            sub, sl = args[1:], al[1:]
            if sl == []:
                return _vmss_json(ss)
            if sl == ["virtualmachines"]:
                return self._page(path, query, [_ssvm_json(v, expand) for v in ss.vms.values()])
            if len(sl) >= 2 and sl[0] == "virtualmachines":
                vm2 = ss.vms.get(sub[1]) or _not_found(
                    group, f"virtualMachineScaleSets/{ss.name}/virtualMachines", sub[1]
                )
                if sl[2:] == []:
                    return _ssvm_json(vm2, expand)
                if sl[2:] == ["instanceview"]:
                    return {
                        "computerName": vm2.computer_name,
                        "statuses": _statuses(vm2.power_state),
                    }
                if len(sl) >= 4 and sl[2] == "networkinterfaces":
                    nic_id = f"{vm2.id}/networkInterfaces/{sub[3]}".lower()
                    nic = ss.nics.get(nic_id) or _not_found(group, "networkInterfaces", sub[3])
                    if len(sl) == 4:
                        return _nic_json(nic)
                    if (
                        len(sl) == 8
                        and sl[4] == "ipconfigurations"
                        and sl[6] == "publicipaddresses"
                    ):
                        pid = f"{nic_id}/ipconfigurations/{sl[5]}/publicipaddresses/{sl[7]}"
                        pip = ss.pips.get(pid) or _not_found(group, "publicIPAddresses", sub[7])
                        return _pip_json(pip)
            if sl == ["networkinterfaces"]:
                return self._page(path, query, [_nic_json(n) for n in ss.nics.values()])
            if sl == ["publicipaddresses"]:
                return self._page(path, query, [_pip_json(p) for p in ss.pips.values()])
        if ns == "microsoft.network" and typ == "networkinterfaces":
            if not args:
                return self._page(path, query, [_nic_json(n) for n in group.nics.values()])
            if len(al) == 1:
                return _nic_json(
                    group.nics.get(al[0])
                    or _not_found(group, "Microsoft.Network/networkInterfaces", args[0])
                )
        if ns == "microsoft.network" and typ == "publicipaddresses":
            if not args:
                return self._page(path, query, [_pip_json(p) for p in group.pips.values()])
            if len(al) == 1:
                return _pip_json(
                    group.pips.get(al[0])
                    or _not_found(group, "Microsoft.Network/publicIPAddresses", args[0])
                )
        raise _Error(501, "NoRouteInFake", f"the fake ARM has no route for GET {path}")

    def _groups(self) -> list[_ResourceGroup]:
        with self._lock:
            return list(self.resource_groups.values())

    def _page(self, path: str, query: dict[str, str], items: list[Any]) -> dict[str, Any]:
        start = int(query.get("$skiptoken") or 0)
        size = max(1, self.page_size)
        page: dict[str, Any] = {"value": items[start : start + size]}
        if start + size < len(items):
            nxt = {k: v for k, v in query.items() if k != "$skiptoken"}
            nxt["$skiptoken"] = str(start + size)
            page["nextLink"] = f"{self.url}{path}?{urlencode(nxt)}"
        return page

    def _vm_json(self, vm: _Vm, with_view: bool) -> dict[str, Any]:
        props: dict[str, Any] = {
            "vmId": str(uuid.uuid5(uuid.NAMESPACE_URL, vm.id)),
            "provisioningState": "Succeeded",
            "hardwareProfile": {"vmSize": vm.size},
            "osProfile": {
                "computerName": vm.computer_name,
                "adminUsername": "azureuser",
                "linuxConfiguration": {"disablePasswordAuthentication": True},
            },
            "storageProfile": {
                "imageReference": {
                    "publisher": "Canonical",
                    "offer": "ubuntu-24_04-lts",
                    "sku": "server",
                    "version": "latest",
                },
                "osDisk": {"osType": "Linux", "createOption": "FromImage"},
            },
            "networkProfile": {
                "networkInterfaces": [
                    {"id": i, "properties": {"primary": k == len(vm.nic_ids) - 1}}
                    for k, i in enumerate(vm.nic_ids)
                ]
            },
        }
        if vm.vmss_id:
            props["virtualMachineScaleSet"] = {"id": vm.vmss_id}
        if with_view:
            props["instanceView"] = {
                "computerName": vm.computer_name,
                "statuses": _statuses(vm.power_state),
            }
        out: dict[str, Any] = {
            "id": vm.id,
            "name": vm.name,
            "type": "Microsoft.Compute/virtualMachines",
            "location": vm.location,
            "tags": vm.tags,
            "properties": props,
        }
        if vm.zones:
            out["zones"] = vm.zones
        return out


def _default_message(status: int, subscription: str) -> str:
    return {
        401: "The access token is invalid.",
        403: "The client 'fake-client' with object id 'fake-object' does not have "
        "authorization to perform action 'Microsoft.Compute/virtualMachines/read' over "
        f"scope '/subscriptions/{subscription}' or the scope is invalid.",
        429: "The request is being throttled.",
        500: "An internal server error occurred.",
        503: "The service is unavailable.",
    }.get(status, f"Fake error {status}.")


def _not_found(group: _ResourceGroup, kind: str, name: str) -> Any:
    raise _Error(
        404,
        "ResourceNotFound",
        f"The Resource '{kind}/{name}' under resource group '{group.name}' was not "
        "found. For more details please go to https://aka.ms/ARMResourceNotFoundFix",
    )


def _vmss_json(ss: _ScaleSet) -> dict[str, Any]:
    return {
        "id": ss.id,
        "name": ss.name,
        "type": "Microsoft.Compute/virtualMachineScaleSets",
        "location": ss.location,
        "tags": ss.tags,
        "sku": {"name": ss.size, "tier": "Standard", "capacity": len(ss.vms)},
        "properties": {
            "provisioningState": "Succeeded",
            "orchestrationMode": ss.orchestration,
            "upgradePolicy": {"mode": "Manual"},
        },
    }


def _ssvm_json(vm: _ScaleSetVm, with_view: bool) -> dict[str, Any]:
    props: dict[str, Any] = {
        "latestModelApplied": True,
        "provisioningState": "Succeeded",
        "vmId": str(uuid.uuid5(uuid.NAMESPACE_URL, vm.id)),
        "hardwareProfile": {},
        "osProfile": {"computerName": vm.computer_name, "adminUsername": "azureuser"},
        "networkProfile": {"networkInterfaces": [{"id": i} for i in vm.nic_ids]},
    }
    if with_view:
        props["instanceView"] = {
            "computerName": vm.computer_name,
            "statuses": _statuses(vm.power_state),
        }
    return {
        "id": vm.id,
        "name": vm.name,
        "instanceId": vm.instance_id,
        "type": "Microsoft.Compute/virtualMachineScaleSets/virtualMachines",
        "location": vm.location,
        "tags": vm.tags,
        "sku": {"name": vm.size, "tier": "Standard"},
        "properties": props,
    }


def _nic_json(nic: _Nic) -> dict[str, Any]:
    ipc: dict[str, Any] = {
        "privateIPAllocationMethod": "Dynamic",
        "primary": True,
        "provisioningState": "Succeeded",
        "privateIPAddressVersion": "IPv4",
    }
    if nic.private_ip is not None:
        ipc["privateIPAddress"] = nic.private_ip
    if nic.public_ip_id is not None:
        ipc["publicIPAddress"] = {"id": nic.public_ip_id}
    configs = [
        {
            "id": f"{nic.id}/ipConfigurations/secondary{k}",
            "name": f"secondary{k}",
            "type": "Microsoft.Network/networkInterfaces/ipConfigurations",
            "properties": {
                "privateIPAllocationMethod": "Static",
                "primary": False,
                "privateIPAddress": ip,
                "provisioningState": "Succeeded",
            },
        }
        for k, ip in enumerate(nic.secondary_ips)
    ]
    configs.append(
        {
            "id": f"{nic.id}/ipConfigurations/{nic.ipconfig_name}",
            "name": nic.ipconfig_name,
            "type": "Microsoft.Network/networkInterfaces/ipConfigurations",
            "properties": ipc,
        }
    )
    return {
        "id": nic.id,
        "name": nic.name,
        "type": "Microsoft.Network/networkInterfaces",
        "location": nic.location,
        "properties": {
            "provisioningState": "Succeeded",
            "primary": nic.primary,
            "virtualMachine": {"id": nic.vm_id},
            "ipConfigurations": configs,
        },
    }


def _pip_json(pip: _Pip) -> dict[str, Any]:
    props: dict[str, Any] = {
        "provisioningState": "Succeeded",
        "publicIPAllocationMethod": "Static",
        "publicIPAddressVersion": "IPv4",
        "ipConfiguration": {"id": pip.ipconfig_id},
    }
    if pip.address is not None:
        props["ipAddress"] = pip.address
    return {
        "id": pip.id,
        "name": pip.name,
        "type": "Microsoft.Network/publicIPAddresses",
        "location": pip.location,
        "sku": {"name": "Standard"},
        "properties": props,
    }


class _Handler(BaseHTTPRequestHandler):
    arm: FakeArm
    timeout = 10

    def setup(self) -> None:
        if isinstance(self.request, ssl.SSLSocket):  # the handshake runs in this thread
            self.request.settimeout(self.timeout)
            self.request.do_handshake()
        super().setup()

    def log_message(self, format: str, *args: Any) -> None:  # quiet
        pass

    def _serve(self) -> None:
        length = int(self.headers.get("Content-Length") or 0)
        body = self.rfile.read(length).decode("utf-8", "replace") if length else ""
        status, headers, data = self.arm.handle(self.command, self.path, dict(self.headers), body)
        self.send_response(status)
        for k, v in headers.items():
            self.send_header(k, v)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    do_GET = do_POST = do_PUT = do_DELETE = do_PATCH = _serve


class _QuietServer(ThreadingHTTPServer):
    def handle_error(self, request: Any, client_address: Any) -> None:
        pass  # a client that drops a connection (or a failed TLS handshake) is not a test error
