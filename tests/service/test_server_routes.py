"""Every route of the server checks who calls and what they may do: no token is 401, a token
without the route's permission is 403, a token with it succeeds. The table is the server's
own OpenAPI document, so a new route without a permission fails here."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import httpx
import pytest

from tests.service.conftest import Server, gated_pipeline, sign_in

OPEN = {
    ("GET", "/api/health"),
    ("GET", "/api/v1/auth/config"),
    # authenticated by the trigger's own secret (tests/service/test_webhooks.py)
    ("POST", "/api/v1/webhooks/{trigger_id}"),
}


def _bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


def _routes(server: Server) -> list[tuple[str, str, str | None]]:
    doc = httpx.get(server.url + "/api/openapi.json").json()
    return [
        (method.upper(), path, op.get("x-permission"))
        for path, ops in doc["paths"].items()
        for method, op in ops.items()
    ]


def _person(server: Server, subject: str) -> str:
    return str(sign_in(server.oidc.url, subject, client_id="vmfarm")["id_token"])


def _api_token(server: Server, creator: str, name: str, role: str) -> dict[str, Any]:
    resp = httpx.post(
        server.url + "/api/v1/tokens",
        headers=_bearer(creator),
        json={"name": name, "roles": [role], "expires": "1d"},
    )
    assert resp.status_code == 201, resp.text
    return dict(resp.json())


@dataclass
class Setup:
    """What a route is called on: a fresh victim token, executions made by alice."""

    server: Server
    alice: str
    victim: str

    def waiting(self, group: str = "ci") -> str:
        """A new execution waiting for one approval by ``group`` (ci: the "holder" tokens)."""
        resp = httpx.post(
            self.server.url + "/api/v1/executions",
            headers=_bearer(self.alice),
            json={"files": {"gate.yaml": gated_pipeline("routes", groups=[group])}},
        )
        assert resp.status_code == 201, resp.text
        return str(resp.json()["id"])

    def succeeded(self) -> str:
        """A new execution that succeeded (alice approved it: she may, here)."""
        ex_id = self.waiting("deployers")
        resp = httpx.post(
            self.server.url + f"/api/v1/executions/{ex_id}/approve", headers=_bearer(self.alice)
        )
        assert resp.status_code == 200 and "succeeded" in resp.text, resp.text
        return ex_id

    def ended(self) -> str:
        """A new execution that has ended (aborted while it waited)."""
        ex_id = self.waiting()
        resp = httpx.post(
            self.server.url + f"/api/v1/executions/{ex_id}/abort", headers=_bearer(self.alice)
        )
        assert resp.status_code == 200, resp.text
        return ex_id


EX = "/api/v1/executions"
REG = "/api/v1/registry"
# A Service: what a holder of registry:apply alone may store (no environment is touched).
ROUTE_SERVICE = """\
apiVersion: v1
kind: Service
metadata:
  name: routes_svc
spec:
  serviceDefinition:
    type: SSH
"""


def _stored(s: Setup) -> str:
    """The Service above, stored (by alice), for the registry's reads."""
    resp = httpx.post(
        s.server.url + REG, headers=_bearer(s.alice), json={"files": {"s.yaml": ROUTE_SERVICE}}
    )
    assert resp.status_code == 200, resp.text
    return "routes_svc"


# How to call each route: (method, path) -> a function of the Setup giving (path, json body).
CALLS: dict[tuple[str, str], Callable[[Setup], tuple[str, dict[str, Any] | None]]] = {
    ("POST", "/api/v1/tokens"): lambda _: (
        "/api/v1/tokens",
        {"name": "made", "roles": ["only-token-create"], "expires": "1h"},
    ),
    ("GET", "/api/v1/tokens"): lambda _: ("/api/v1/tokens", None),
    ("DELETE", "/api/v1/tokens/{token_id}"): lambda s: (f"/api/v1/tokens/{s.victim}", None),
    ("POST", EX): lambda _: (EX, {"files": {"gate.yaml": gated_pipeline("made", groups=["ci"])}}),
    ("GET", EX): lambda _: (EX, None),
    ("GET", EX + "/{execution_id}"): lambda s: (f"{EX}/{s.ended()}", None),
    ("GET", EX + "/{execution_id}/logs"): lambda s: (f"{EX}/{s.ended()}/logs", None),
    ("GET", EX + "/{execution_id}/events"): lambda s: (f"{EX}/{s.ended()}/events", None),
    ("POST", EX + "/{execution_id}/approve"): lambda s: (f"{EX}/{s.waiting()}/approve", None),
    ("POST", EX + "/{execution_id}/reject"): lambda s: (
        f"{EX}/{s.waiting()}/reject",
        {"comment": "not today"},
    ),
    ("POST", EX + "/{execution_id}/abort"): lambda s: (f"{EX}/{s.waiting()}/abort", None),
    ("POST", EX + "/{execution_id}/retry"): lambda s: (f"{EX}/{s.ended()}/retry", None),
    ("POST", EX + "/{execution_id}/rollback"): lambda s: (f"{EX}/{s.succeeded()}/rollback", None),
    ("POST", REG): lambda _: (REG, {"files": {"s.yaml": ROUTE_SERVICE}}),
    ("GET", "/api/v1/triggers"): lambda _: ("/api/v1/triggers", None),
    ("GET", REG + "/{kind}"): lambda _: (f"{REG}/service", None),
    ("GET", REG + "/{kind}/{ident}"): lambda s: (f"{REG}/service/{_stored(s)}", None),
    ("GET", REG + "/{kind}/{ident}/history"): lambda s: (
        f"{REG}/Service/{_stored(s)}/history",
        None,
    ),
}
# What the holder of exactly the permission gets when it is not 2xx: allowed, and then told
# why there is nothing to do (an approval has no hosts to roll back).
HOLDER = {("POST", EX + "/{execution_id}/rollback"): (409, "changed no host")}


def test_every_route_but_health_names_its_permission_and_is_in_the_table(server: Server) -> None:
    routes = _routes(server)
    assert {(m, p) for m, p, perm in routes if perm is None} == OPEN
    assert {(m, p) for m, p, perm in routes if perm is not None} == set(CALLS)


def test_health_says_the_ledger_and_broker_answer_without_a_token(server: Server) -> None:
    resp = httpx.get(server.url + "/api/health")
    assert resp.status_code == 200
    assert resp.json() == {"status": "ok", "ledger": True, "broker": True}


def test_every_route_refuses_the_unauthenticated_and_the_unauthorised(server: Server) -> None:
    alice = _person(server, "alice")  # token-admin and deployer through her deployers group
    carol = _person(server, "carol")  # a viewer of pipelines: nothing else
    bob = _person(server, "bob")  # in a group the server binds to nothing
    wrong_audience = str(sign_in(server.oidc.url, "alice", client_id="other-app")["id_token"])
    checked = []
    for method, path, permission in _routes(server):
        if permission is None:
            continue
        victim = _api_token(server, alice, "victim", "only-token-view")["id"]
        url_path, body = CALLS[(method, path)](Setup(server, alice, victim))

        def call(
            headers: dict[str, str],
            url_path: str = url_path,
            body: dict[str, Any] | None = body,
            method: str = method,
        ) -> httpx.Response:
            return httpx.request(method, server.url + url_path, headers=headers, json=body)

        # Given no token, a malformed one, or a valid one for another client: 401
        for headers in (
            {},
            _bearer("garbage"),
            _bearer("vmf_" + "x" * 43),
            _bearer(wrong_audience),
            {"Authorization": f"Basic {alice}"},
        ):
            resp = call(headers)
            assert resp.status_code == 401, (method, path, headers.keys(), resp.text)
            assert resp.headers["www-authenticate"].startswith("Bearer")
        # A person and a token without the permission: 403, and nothing happened
        others = {"only-token-create", "only-token-view", "only-token-revoke"} - {
            f"only-{permission.replace(':', '-')}"
        }
        other = _api_token(server, alice, "other", sorted(others)[0])["token"]
        person = bob if permission == "pipeline:view" else carol
        for token in (person, other):
            resp = call(_bearer(token))
            assert resp.status_code == 403, (method, path, resp.text)
            assert permission in resp.json()["detail"]
        # A token holding exactly that permission: 2xx
        holder = _api_token(server, alice, "holder", f"only-{permission.replace(':', '-')}")
        resp = call(_bearer(holder["token"]))
        if (method, path) in HOLDER:
            code, why = HOLDER[(method, path)]
            assert resp.status_code == code and why in resp.text, (method, path, resp.text)
        else:
            assert 200 <= resp.status_code < 300, (method, path, resp.text)
        checked.append((method, path))
    assert len(checked) == len(CALLS)


def test_a_revoked_api_token_is_refused_from_then_on(server: Server) -> None:
    alice = _person(server, "alice")
    made = _api_token(server, alice, "ci", "only-token-view")
    assert (
        httpx.get(server.url + "/api/v1/tokens", headers=_bearer(made["token"])).status_code == 200
    )
    assert (
        httpx.delete(
            server.url + f"/api/v1/tokens/{made['id']}", headers=_bearer(alice)
        ).status_code
        == 204
    )
    resp = httpx.get(server.url + "/api/v1/tokens", headers=_bearer(made["token"]))
    assert resp.status_code == 401 and "revoked" in resp.json()["detail"]


def test_the_token_list_shows_no_token_or_hash_and_creation_is_audited(
    server: Server, pg_url: str
) -> None:
    from sqlalchemy import create_engine, text

    from app.db import normalise_url

    alice = _person(server, "alice")
    made = _api_token(server, alice, "audited", "only-token-view")
    listed = httpx.get(server.url + "/api/v1/tokens", headers=_bearer(alice)).text
    assert made["token"] not in listed and "hash" not in listed
    engine = create_engine(normalise_url(pg_url))
    try:
        with engine.connect() as conn:
            row = conn.execute(
                text(
                    'SELECT "user", outcome, detail FROM auditevent '
                    "WHERE action = 'token-create' "
                    "AND detail::text LIKE :ref"
                ),
                {"ref": f"%{made['id']}%"},
            ).one()
    finally:
        engine.dispose()
    assert row[0] == "alice" and row[1] == "created"
    assert row[2]["actor"]["subject"] == "alice" and made["token"] not in str(row[2])


@pytest.mark.parametrize("roles", [["token-admin"], ["no-such-role"]])
def test_a_token_cannot_be_made_stronger_than_its_maker(server: Server, roles: list[str]) -> None:
    alice = _person(server, "alice")
    weak = _api_token(server, alice, "weak", "only-token-create")["token"]
    resp = httpx.post(
        server.url + "/api/v1/tokens",
        headers=_bearer(weak),
        json={"name": "escalated", "roles": roles},
    )
    assert resp.status_code in (403, 422), resp.text
    assert "token" not in resp.json() or not str(resp.json().get("token", "")).startswith("vmf_")


# --- the web console ------------------------------------------------------------------------
# Its pages sign in with a session cookie, not a bearer token: a page without a session
# redirects to the sign-in, a form without one is 401; a person without the permission gets
# 403; one with it gets through (2xx, or the redirect an action answers with). Every console
# route is here or in CONSOLE_OPEN, checked against the application's own routes.

CONSOLE_OPEN = {
    ("GET", "/console"),
    ("GET", "/console/"),
    ("GET", "/console/login"),
    ("GET", "/console/callback"),
    ("GET", "/console/signed-out"),
    ("GET", "/console/static/{name}"),
    ("POST", "/console/logout"),  # a session and its CSRF token, no permission
}
C = "/console/executions"


def _registry_pages_available() -> bool:
    from app.server.console.registry_pages import available

    return available()


CONSOLE: dict[tuple[str, str], tuple[str, Callable[[Setup], str]]] = {
    ("GET", C): ("pipeline:view", lambda _: C),
    ("GET", C + "/{execution_id}"): ("pipeline:view", lambda s: f"{C}/{s.ended()}"),
    ("GET", C + "/{execution_id}/hosts/{host}"): (
        "pipeline:view",
        lambda s: f"{C}/{s.ended()}/hosts/127.0.0.1",
    ),
    ("GET", C + "/{execution_id}/hosts/{host}/log"): (
        "pipeline:view",
        lambda s: f"{C}/{s.ended()}/hosts/127.0.0.1/log",
    ),
    ("GET", C + "/{execution_id}/confirm/{action}"): (
        "pipeline:approve",
        lambda s: f"{C}/{s.waiting('deployers')}/confirm/approve",
    ),
    ("POST", C + "/{execution_id}/approve"): (
        "pipeline:approve",
        lambda s: f"{C}/{s.waiting('deployers')}/approve",
    ),
    ("POST", C + "/{execution_id}/reject"): (
        "pipeline:approve",
        lambda s: f"{C}/{s.waiting('deployers')}/reject",
    ),
    ("POST", C + "/{execution_id}/abort"): ("pipeline:abort", lambda s: f"{C}/{s.waiting()}/abort"),
    ("POST", C + "/{execution_id}/retry"): ("pipeline:execute", lambda s: f"{C}/{s.ended()}/retry"),
    ("POST", C + "/{execution_id}/rollback"): (
        "pipeline:rollback",
        lambda s: f"{C}/{s.succeeded()}/rollback",
    ),
    ("POST", C + "/{execution_id}/intervene"): (
        "pipeline:intervene",
        lambda s: f"{C}/{s.waiting()}/intervene",
    ),
    ("GET", "/console/run"): ("pipeline:execute", lambda _: "/console/run"),
    ("POST", "/console/run"): ("pipeline:execute", lambda _: "/console/run"),
    ("GET", "/console/fleet"): ("fleet:view", lambda _: "/console/fleet"),
    ("GET", "/console/audit"): ("audit:view", lambda _: "/console/audit"),
}
RUN = gated_pipeline("console-run", groups=["ci"])
if _registry_pages_available():  # the registry's pages exist where the registry does
    CONSOLE[("GET", "/console/registry")] = ("registry:view", lambda _: "/console/registry")
    CONSOLE[("GET", "/console/registry/{kind}/{ident}")] = (
        "registry:view",
        lambda _: "/console/registry/environment/nowhere",
    )
# Allowed, and then told why there is nothing to do.
CONSOLE_HOLDER = {
    ("GET", "/console/registry/{kind}/{ident}"): (404, "in the registry"),
    ("GET", C + "/{execution_id}/hosts/{host}"): (404, "has no host"),
    ("POST", C + "/{execution_id}/rollback"): (409, "changed no host"),
    ("POST", C + "/{execution_id}/intervene"): (409, "intervention"),
}


def test_every_console_route_is_in_the_console_table() -> None:
    from app.server.console import auth, pages, registry_pages

    routes = [*auth.router.routes, *pages.router.routes]
    if registry_pages.available():
        routes += registry_pages.router.routes
    found = {
        (method, route.path)
        for route in routes
        for method in getattr(route, "methods", set()) - {"HEAD"}
    }
    assert found == CONSOLE_OPEN | set(CONSOLE)


def test_every_console_route_refuses_the_signed_out_and_the_unauthorised(server: Server) -> None:
    from tests.console_signin import console_sign_in

    alice = _person(server, "alice")
    people = {name: console_sign_in(server.url, name) for name in ("alice", "bob", "carol")}
    for (method, path), (permission, where) in CONSOLE.items():
        victim = _api_token(server, alice, "victim", "only-token-view")["id"]
        url_path = where(Setup(server, alice, victim))
        # Signed out: a page redirects to the sign-in, a form is refused
        resp = httpx.request(method, server.url + url_path)
        if method == "GET":
            assert resp.status_code == 303, (path, resp.text)
            assert resp.headers["location"].startswith("/console/login?next="), path
        else:
            assert resp.status_code == 401, (path, resp.text)
        # Signed in without the permission: 403 naming it (bob holds nothing, carol views)
        lacking = people["bob" if permission == "pipeline:view" else "carol"]
        if method == "GET":
            resp = lacking.get(url_path)
        else:
            resp = lacking.post(url_path, {"comment": "no", "action": "Ignore", "files": RUN})
        assert resp.status_code == 403, (path, resp.text)
        assert permission in resp.text, path
        # alice holds every permission here
        url_path = where(Setup(server, alice, victim))
        holder = people["alice"]
        if method == "GET":
            resp = holder.get(url_path)
        else:
            resp = holder.post(url_path, {"comment": "yes", "action": "Ignore", "files": RUN})
        if (method, path) in CONSOLE_HOLDER:
            code, why = CONSOLE_HOLDER[(method, path)]
            assert resp.status_code == code and why in resp.text, (path, resp.text)
        else:
            assert resp.status_code in (200, 303), (path, resp.status_code, resp.text)
