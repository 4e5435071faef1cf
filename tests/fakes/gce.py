"""A fake Google Compute Engine REST API on 127.0.0.1, for the real google-cloud-compute clients.

It answers the paths the SDK (REST transport) calls for host discovery, with bodies shaped like
the public Compute API reference (``kind``, ``items``, ``nextPageToken``, ``networkInterfaces``,
``accessConfigs``, ``labels``, ``tags``, ``status``)::

    GET  /compute/v1/projects/P/zones/Z/instances                  instances.list
    GET  /compute/v1/projects/P/zones/Z/instances/NAME             instances.get
    GET  /compute/v1/projects/P/aggregated/instances               instances.aggregatedList
    GET  /compute/v1/projects/P/aggregated/instanceGroups          instanceGroups.aggregatedList
    GET  /compute/v1/projects/P/zones/Z/instanceGroups             instanceGroups.list
    POST /compute/v1/projects/P/zones/Z/instanceGroups/G/listInstances
    POST /compute/v1/projects/P/regions/R/instanceGroups/G/listInstances   (regional groups)
    GET  /compute/v1/projects/P/regions/R                          regions.get
    GET  /compute/v1/projects/P/zones                              zones.list

Lists are paged: ``page_size`` items per page (or ``maxResults`` if smaller), the next page
named by an opaque ``nextPageToken`` that the client sends back as ``pageToken``. ``filter``
is honoured for the subset discovery sends (``status = RUNNING``, ``labels.KEY = "value"``,
``name = x``, ``!=``, several parenthesised terms ANDed); a filter it cannot read is a 400, as
from the real API. Set ``honor_filter=False`` to ignore filters (callers must then filter).

Errors use Google's body ``{"error": {"code", "message", "errors": [{"message", "domain",
"reason"}]}}``: an unknown project is a 404 ("The resource 'projects/P' was not found"); an
unknown zone is a 400 "Invalid value for field 'zone': 'Z'. Unknown zone." as the real API
answers (``unknown_zone_status=404`` makes it a 404); ``fail(...)`` injects 401/403/429/503
answers, for a number of requests or forever. Every request is recorded in ``requests``.

Usage::

    with FakeGce(page_size=2) as gce:
        gce.add_instance("p1", "us-central1-a", "web-1", private_ip="10.0.0.2",
                         labels={"env": "prod"}, tags=["web"])
        os.environ["VMFARM_GCP_ENDPOINT"] = gce.url      # http://127.0.0.1:PORT
"""

from __future__ import annotations

import json
import re
import threading
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qs, urlsplit

SELF_BASE = "https://www.googleapis.com/compute/v1"


def region_of(zone: str) -> str:
    """``us-central1-a`` -> ``us-central1``."""
    return zone.rsplit("-", 1)[0]


@dataclass
class Recorded:
    """One request as the fake saw it."""

    method: str
    path: str
    query: dict[str, str]
    body: Any
    headers: dict[str, str]


@dataclass
class Fault:
    """An injected error answer. ``times=None`` means forever."""

    status: int
    times: int | None = 1
    match: str = ""
    method: str = ""
    reason: str = ""
    message: str = ""
    hits: int = 0


@dataclass
class Group:
    project: str
    name: str
    zone: str | None
    region: str | None
    members: list[tuple[str, str]] = field(default_factory=list)  # (zone, instance name)
    id: int = 0

    @property
    def scope(self) -> str:
        return f"zones/{self.zone}" if self.zone else f"regions/{self.region}"


class FilterError(ValueError):
    pass


_TERM = re.compile(r'^\s*([A-Za-z][\w.\-]*)\s*(=|!=)\s*(?:"([^"]*)"|([^\s()"]+))\s*$')


def parse_filter(text: str) -> list[tuple[str, str, str]]:
    """``(status = RUNNING) (labels.env = "prod")`` -> [(field, op, value), ...]."""
    text = text.strip()
    if not text:
        return []
    if text.startswith("("):
        parts = re.findall(r"\(([^()]*)\)", text)
        if re.sub(r"\([^()]*\)", "", text).strip():
            raise FilterError(text)
    else:
        parts = [text]
    terms = []
    for part in parts:
        m = _TERM.match(part)
        if not m:
            raise FilterError(text)
        value = m.group(3) if m.group(3) is not None else m.group(4)
        terms.append((m.group(1), m.group(2), value))
    return terms


def _matches(obj: dict[str, Any], terms: list[tuple[str, str, str]]) -> bool:
    for fld, op, value in terms:
        cur: Any = obj
        for part in fld.split("."):
            cur = cur.get(part) if isinstance(cur, dict) else None
        actual = None if cur is None else str(cur)
        if (actual == value) != (op == "="):
            return False
    return True


class FakeGce:
    """The fake server. ``start()`` binds 127.0.0.1 on a free port; ``url`` is its base."""

    def __init__(
        self, *, page_size: int = 500, unknown_zone_status: int = 400, honor_filter: bool = True
    ) -> None:
        self.page_size = page_size
        self.unknown_zone_status = unknown_zone_status
        self.honor_filter = honor_filter
        self.projects: dict[str, set[str]] = {}  # project -> zones
        self.instances: dict[tuple[str, str, str], dict[str, Any]] = {}  # (project, zone, name)
        self.groups: list[Group] = []
        self.faults: list[Fault] = []
        self.requests: list[Recorded] = []
        self._lock = threading.Lock()
        self._next_id = 1000000000000000000
        self._server: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None

    # --- lifecycle ------------------------------------------------------------------------------

    def start(self) -> FakeGce:
        fake = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def do_GET(self) -> None:
                fake._handle(self, "GET")

            def do_POST(self) -> None:
                fake._handle(self, "POST")

            def log_message(self, format: str, *args: Any) -> None:
                pass

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        self._thread = threading.Thread(
            target=self._server.serve_forever, args=(0.05,), name="fake-gce", daemon=True
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

    def __enter__(self) -> FakeGce:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    @property
    def url(self) -> str:
        assert self._server is not None, "start() the fake first"
        host, port = self._server.server_address[:2]
        return f"http://{host!s}:{port}"

    # --- state ----------------------------------------------------------------------------------

    def add_project(self, project: str) -> None:
        with self._lock:
            self.projects.setdefault(project, set())

    def add_zone(self, project: str, zone: str) -> None:
        with self._lock:
            self.projects.setdefault(project, set()).add(zone)

    def add_instance(
        self,
        project: str,
        zone: str,
        name: str,
        *,
        status: str = "RUNNING",
        private_ip: str | None = None,
        public_ip: str | None = None,
        labels: dict[str, str] | None = None,
        tags: list[str] | None = None,
        machine_type: str = "e2-small",
        hostname: str | None = None,
        with_nic: bool = True,
    ) -> dict[str, Any]:
        """Add (or replace) an instance; returns its JSON body, which may be edited."""
        with self._lock:
            self.projects.setdefault(project, set()).add(zone)
            self._next_id += 1
            zone_url = f"{SELF_BASE}/projects/{project}/zones/{zone}"
            body: dict[str, Any] = {
                "kind": "compute#instance",
                "id": str(self._next_id),
                "creationTimestamp": "2026-01-01T00:00:00.000-07:00",
                "name": name,
                "status": status,
                "zone": zone_url,
                "machineType": f"{zone_url}/machineTypes/{machine_type}",
                "labels": dict(labels or {}),
                "tags": {"items": list(tags or []), "fingerprint": "42WmSpB8rSM="},
                "networkInterfaces": [],
                "selfLink": f"{zone_url}/instances/{name}",
            }
            if hostname:
                body["hostname"] = hostname
            if with_nic:
                nic: dict[str, Any] = {
                    "kind": "compute#networkInterface",
                    "name": "nic0",
                    "network": f"{SELF_BASE}/projects/{project}/global/networks/default",
                    "networkIP": private_ip or "",
                }
                if public_ip:
                    nic["accessConfigs"] = [
                        {
                            "kind": "compute#accessConfig",
                            "name": "External NAT",
                            "type": "ONE_TO_ONE_NAT",
                            "natIP": public_ip,
                            "networkTier": "PREMIUM",
                        }
                    ]
                body["networkInterfaces"].append(nic)
            if not body["labels"]:
                del body["labels"]
            self.instances[(project, zone, name)] = body
            return body

    def set_status(self, project: str, zone: str, name: str, status: str) -> None:
        with self._lock:
            self.instances[(project, zone, name)]["status"] = status

    def add_instance_group(
        self,
        project: str,
        name: str,
        *,
        zone: str | None = None,
        region: str | None = None,
        members: list[tuple[str, str]] | list[str] | None = None,
    ) -> Group:
        """A zonal (``zone=``) or regional (``region=``) instance group. ``members`` are
        instance names (in the group's zone) or ``(zone, name)`` pairs."""
        assert (zone is None) != (region is None), "give zone or region"
        pairs: list[tuple[str, str]] = []
        for m in members or []:
            if isinstance(m, tuple):
                pairs.append(m)
            else:
                assert zone is not None, "regional group members must be (zone, name)"
                pairs.append((zone, m))
        with self._lock:
            self.projects.setdefault(project, set())
            if zone:
                self.projects[project].add(zone)
            self._next_id += 1
            group = Group(project, name, zone, region, pairs, self._next_id)
            self.groups.append(group)
            return group

    def fail(
        self,
        status: int,
        *,
        times: int | None = 1,
        match: str = "",
        method: str = "",
        reason: str = "",
        message: str = "",
    ) -> Fault:
        """Answer the next ``times`` requests whose path contains ``match`` with ``status``."""
        fault = Fault(status, times, match, method, reason, message)
        with self._lock:
            self.faults.append(fault)
        return fault

    def clear_faults(self) -> None:
        with self._lock:
            self.faults.clear()

    def requests_to(self, fragment: str, method: str = "") -> list[Recorded]:
        with self._lock:
            return [
                r
                for r in self.requests
                if fragment in r.path and (not method or r.method == method)
            ]

    # --- HTTP -----------------------------------------------------------------------------------

    def _handle(self, h: BaseHTTPRequestHandler, method: str) -> None:
        length = int(h.headers.get("Content-Length") or 0)
        raw = h.rfile.read(length) if length else b""
        try:
            body = json.loads(raw) if raw else None
        except ValueError:
            body = raw.decode(errors="replace")
        parts = urlsplit(h.path)
        query = {k: v[-1] for k, v in parse_qs(parts.query, keep_blank_values=True).items()}
        headers = {k.lower(): v for k, v in h.headers.items()}
        rec = Recorded(method, parts.path, query, body, headers)
        with self._lock:
            self.requests.append(rec)
            fault = self._take_fault(rec)
        if fault is not None:
            reason = fault.reason or {
                401: "authError",
                403: "forbidden",
                429: "rateLimitExceeded",
                503: "backendError",
            }.get(fault.status, "error")
            message = fault.message or {
                401: "Request had invalid authentication credentials.",
                403: "Required 'compute.instances.list' permission for 'projects/p'",
                429: "Quota exceeded for quota metric 'Read requests'.",
                503: "The service is currently unavailable.",
            }.get(fault.status, "fake failure")
            self._send_error(h, fault.status, message, reason)
            return
        try:
            status, payload = self._route(method, parts.path, query, body)
        except _HttpError as e:
            self._send_error(h, e.status, e.message, e.reason)
            return
        self._send(h, status, payload)

    def _take_fault(self, rec: Recorded) -> Fault | None:
        for fault in self.faults:
            if fault.match and fault.match not in rec.path:
                continue
            if fault.method and fault.method != rec.method:
                continue
            if fault.times is not None and fault.hits >= fault.times:
                continue
            fault.hits += 1
            return fault
        return None

    def _send(self, h: BaseHTTPRequestHandler, status: int, payload: Any) -> None:
        data = json.dumps(payload).encode()
        h.send_response(status)
        h.send_header("Content-Type", "application/json; charset=UTF-8")
        h.send_header("Content-Length", str(len(data)))
        h.end_headers()
        h.wfile.write(data)

    def _send_error(
        self, h: BaseHTTPRequestHandler, status: int, message: str, reason: str
    ) -> None:
        self._send(
            h,
            status,
            {
                "error": {
                    "code": status,
                    "message": message,
                    "errors": [{"message": message, "domain": "global", "reason": reason}],
                }
            },
        )

    # --- routes ---------------------------------------------------------------------------------

    _ROUTES: list[tuple[str, re.Pattern[str], str]] = [
        (
            "GET",
            re.compile(r"^/compute/v1/projects/([^/]+)/zones/([^/]+)/instances$"),
            "_list_instances",
        ),
        (
            "GET",
            re.compile(r"^/compute/v1/projects/([^/]+)/zones/([^/]+)/instances/([^/]+)$"),
            "_get_instance",
        ),
        (
            "GET",
            re.compile(r"^/compute/v1/projects/([^/]+)/aggregated/instances$"),
            "_aggregated_instances",
        ),
        (
            "GET",
            re.compile(r"^/compute/v1/projects/([^/]+)/aggregated/instanceGroups$"),
            "_aggregated_groups",
        ),
        (
            "GET",
            re.compile(r"^/compute/v1/projects/([^/]+)/zones/([^/]+)/instanceGroups$"),
            "_list_groups",
        ),
        (
            "POST",
            re.compile(
                r"^/compute/v1/projects/([^/]+)/zones/([^/]+)/instanceGroups/"
                r"([^/]+)/listInstances$"
            ),
            "_zonal_group_instances",
        ),
        (
            "POST",
            re.compile(
                r"^/compute/v1/projects/([^/]+)/regions/([^/]+)/instanceGroups/"
                r"([^/]+)/listInstances$"
            ),
            "_regional_group_instances",
        ),
        ("GET", re.compile(r"^/compute/v1/projects/([^/]+)/regions/([^/]+)$"), "_get_region"),
        ("GET", re.compile(r"^/compute/v1/projects/([^/]+)/zones$"), "_list_zones"),
    ]

    def _route(self, method: str, path: str, query: dict[str, str], body: Any) -> tuple[int, Any]:
        for m, rx, handler in self._ROUTES:
            match = rx.match(path)
            if match and m == method:
                with self._lock:
                    result: tuple[int, Any] = getattr(self, handler)(
                        *match.groups(), query=query, body=body
                    )
                    return result
        raise _HttpError(404, f"fake GCE has no route for {method} {path}", "notFound")

    def _project(self, project: str) -> set[str]:
        if project not in self.projects:
            raise _HttpError(404, f"The resource 'projects/{project}' was not found", "notFound")
        return self.projects[project]

    def _zone(self, project: str, zone: str) -> None:
        if zone not in self._project(project):
            if self.unknown_zone_status == 404:
                raise _HttpError(
                    404, f"The resource 'projects/{project}/zones/{zone}' was not found", "notFound"
                )
            raise _HttpError(
                self.unknown_zone_status,
                f"Invalid value for field 'zone': '{zone}'. Unknown zone.",
                "invalid",
            )

    def _filtered(self, items: list[dict[str, Any]], query: dict[str, str]) -> list[dict[str, Any]]:
        text = query.get("filter", "")
        try:
            terms = parse_filter(text)
        except FilterError:
            raise _HttpError(
                400,
                f"Invalid value for field 'filter': '{text}'. Invalid list filter expression.",
                "invalid",
            ) from None
        if not self.honor_filter:
            return items
        return [i for i in items if _matches(i, terms)]

    def _page(self, items: list[Any], query: dict[str, str]) -> tuple[list[Any], str | None]:
        size = self.page_size
        if query.get("maxResults"):
            size = max(1, min(size, int(query["maxResults"])))
        token = query.get("pageToken", "")
        start = 0
        if token:
            m = re.fullmatch(r"p(\d+)", token)
            if not m:
                raise _HttpError(400, f"Invalid value for field 'pageToken': '{token}'.", "invalid")
            start = int(m.group(1))
        end = start + size
        return items[start:end], (f"p{end}" if end < len(items) else None)

    def _sorted_instances(self, project: str, zones: set[str]) -> list[dict[str, Any]]:
        return [
            self.instances[k] for k in sorted(self.instances) if k[0] == project and k[1] in zones
        ]

    def _list_instances(
        self, project: str, zone: str, *, query: dict[str, str], body: Any
    ) -> tuple[int, Any]:
        self._zone(project, zone)
        items = self._filtered(self._sorted_instances(project, {zone}), query)
        page, token = self._page(items, query)
        out: dict[str, Any] = {
            "kind": "compute#instanceList",
            "id": f"projects/{project}/zones/{zone}/instances",
            "selfLink": f"{SELF_BASE}/projects/{project}/zones/{zone}/instances",
            "items": page,
        }
        if token:
            out["nextPageToken"] = token
        if not page:
            del out["items"]
        return 200, out

    def _get_instance(
        self, project: str, zone: str, name: str, *, query: dict[str, str], body: Any
    ) -> tuple[int, Any]:
        self._zone(project, zone)
        inst = self.instances.get((project, zone, name))
        if inst is None:
            raise _HttpError(
                404,
                f"The resource 'projects/{project}/zones/{zone}/instances/{name}' was not found",
                "notFound",
            )
        return 200, inst

    def _aggregated_instances(
        self, project: str, *, query: dict[str, str], body: Any
    ) -> tuple[int, Any]:
        zones = self._project(project)
        items = self._filtered(self._sorted_instances(project, zones), query)
        page, token = self._page(items, query)
        scoped: dict[str, Any] = {}
        for inst in page:
            zone = inst["zone"].rsplit("/", 1)[-1]
            scoped.setdefault(f"zones/{zone}", {"instances": []})["instances"].append(inst)
        for zone in sorted(zones):
            scoped.setdefault(
                f"zones/{zone}",
                {
                    "warning": {
                        "code": "NO_RESULTS_ON_PAGE",
                        "message": f"There are no results for scope 'zones/{zone}' on this page.",
                        "data": [{"key": "scope", "value": f"zones/{zone}"}],
                    }
                },
            )
        out: dict[str, Any] = {
            "kind": "compute#instanceAggregatedList",
            "id": f"projects/{project}/aggregated/instances",
            "items": scoped,
        }
        if token:
            out["nextPageToken"] = token
        return 200, out

    def _group_body(self, g: Group) -> dict[str, Any]:
        loc = f"{SELF_BASE}/projects/{g.project}/{g.scope}"
        out: dict[str, Any] = {
            "kind": "compute#instanceGroup",
            "id": str(g.id),
            "name": g.name,
            "size": len(g.members),
            "selfLink": f"{loc}/instanceGroups/{g.name}",
            "network": f"{SELF_BASE}/projects/{g.project}/global/networks/default",
        }
        if g.zone:
            out["zone"] = loc
        else:
            out["region"] = loc
        return out

    def _aggregated_groups(
        self, project: str, *, query: dict[str, str], body: Any
    ) -> tuple[int, Any]:
        self._project(project)
        groups = self._filtered(
            [self._group_body(g) for g in self.groups if g.project == project], query
        )
        page, token = self._page(groups, query)
        scoped: dict[str, Any] = {}
        for g in page:
            scope = (
                "zones/" + g["zone"].rsplit("/", 1)[-1]
                if "zone" in g
                else "regions/" + g["region"].rsplit("/", 1)[-1]
            )
            scoped.setdefault(scope, {"instanceGroups": []})["instanceGroups"].append(g)
        out: dict[str, Any] = {"kind": "compute#instanceGroupAggregatedList", "items": scoped}
        if token:
            out["nextPageToken"] = token
        return 200, out

    def _list_groups(
        self, project: str, zone: str, *, query: dict[str, str], body: Any
    ) -> tuple[int, Any]:
        self._zone(project, zone)
        groups = self._filtered(
            [self._group_body(g) for g in self.groups if g.project == project and g.zone == zone],
            query,
        )
        page, token = self._page(groups, query)
        out: dict[str, Any] = {"kind": "compute#instanceGroupList", "items": page}
        if token:
            out["nextPageToken"] = token
        return 200, out

    def _group(
        self, project: str, name: str, *, zone: str | None = None, region: str | None = None
    ) -> Group:
        for g in self.groups:
            if g.project == project and g.name == name and g.zone == zone and g.region == region:
                return g
        where = f"zones/{zone}" if zone else f"regions/{region}"
        raise _HttpError(
            404,
            f"The resource 'projects/{project}/{where}/instanceGroups/{name}' was not found",
            "notFound",
        )

    def _members(self, g: Group, query: dict[str, str], body: Any) -> tuple[int, Any]:
        state = (body or {}).get("instanceState", "ALL") if isinstance(body, dict) else "ALL"
        items = []
        for zone, name in g.members:
            inst = self.instances.get((g.project, zone, name))
            status = inst["status"] if inst else "TERMINATED"
            if state == "RUNNING" and status != "RUNNING":
                continue
            items.append(
                {
                    "instance": f"{SELF_BASE}/projects/{g.project}/zones/{zone}/instances/{name}",
                    "status": status,
                }
            )
        page, token = self._page(items, query)
        out: dict[str, Any] = {"kind": "compute#instanceGroupsListInstances", "items": page}
        if token:
            out["nextPageToken"] = token
        return 200, out

    def _zonal_group_instances(
        self, project: str, zone: str, name: str, *, query: dict[str, str], body: Any
    ) -> tuple[int, Any]:
        self._zone(project, zone)
        return self._members(self._group(project, name, zone=zone), query, body)

    def _regional_group_instances(
        self, project: str, region: str, name: str, *, query: dict[str, str], body: Any
    ) -> tuple[int, Any]:
        self._get_region(project, region, query=query, body=body)
        return self._members(self._group(project, name, region=region), query, body)

    def _regions(self, project: str) -> set[str]:
        regions = {region_of(z) for z in self._project(project)}
        regions |= {g.region for g in self.groups if g.project == project and g.region}
        return regions

    def _get_region(
        self, project: str, region: str, *, query: dict[str, str], body: Any
    ) -> tuple[int, Any]:
        if region not in self._regions(project):
            raise _HttpError(
                404, f"The resource 'projects/{project}/regions/{region}' was not found", "notFound"
            )
        zones = sorted(z for z in self.projects[project] if region_of(z) == region)
        return 200, {
            "kind": "compute#region",
            "name": region,
            "status": "UP",
            "selfLink": f"{SELF_BASE}/projects/{project}/regions/{region}",
            "zones": [f"{SELF_BASE}/projects/{project}/zones/{z}" for z in zones],
        }

    def _list_zones(self, project: str, *, query: dict[str, str], body: Any) -> tuple[int, Any]:
        items = [
            {
                "kind": "compute#zone",
                "name": z,
                "status": "UP",
                "region": f"{SELF_BASE}/projects/{project}/regions/{region_of(z)}",
            }
            for z in sorted(self._project(project))
        ]
        page, token = self._page(items, query)
        out: dict[str, Any] = {"kind": "compute#zoneList", "items": page}
        if token:
            out["nextPageToken"] = token
        return 200, out


class _HttpError(Exception):
    def __init__(self, status: int, message: str, reason: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.reason = reason
