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

OPEN = {("GET", "/api/health"), ("GET", "/api/v1/auth/config")}


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
