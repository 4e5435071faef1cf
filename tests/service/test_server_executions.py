"""The execution API as a team uses it: people signed in through a real OIDC provider submit,
follow and approve; approvals belong to the verified subject, whatever the request says.

erin, frank and grace are release_managers (their tokens' groups claim); the server binds that
group to a deployer role. bob is bound to nothing."""

from __future__ import annotations

import threading
import uuid
from typing import Any

import httpx
import jwt
from sqlalchemy import create_engine, text

from app.db import normalise_url
from app.server.routes.executions import iter_events
from tests.service.conftest import Server, gated_pipeline, sign_in

EX = "/api/v1/executions"
IMPOSTOR_HEADERS = {
    "X-User": "frank",
    "X-Vmfarm-User": "frank",
    "X-Forwarded-User": "frank",
    "X-Remote-User": "frank",
    "Remote-User": "frank",
}

PRODUCTION = """\
apiVersion: v1
kind: Service
metadata:
  name: shop
spec:
  serviceDefinition:
    type: SSH
---
apiVersion: v1
kind: Environment
metadata:
  name: prod
spec:
  type: Production
---
apiVersion: v1
kind: Infrastructure
metadata:
  name: prod-hosts
spec:
  environmentRef: prod
  deploymentType: Ssh
  type: Pdc
  spec:
    region: r1
    hosts:
      - hostname: 127.0.1.201
---
apiVersion: v1
kind: Pipeline
metadata:
  name: to-production
spec:
  stages:
    - stage:
        name: Deploy
        identifier: deploy
        type: Deployment
        spec:
          service:
            serviceRef: shop
          environment:
            environmentRef: prod
            infrastructureDefinitions:
              - identifier: prod_hosts
          execution:
            steps:
              - step:
                  type: Command
                  name: Work
                  identifier: work
                  spec:
                    commandUnits:
                      - identifier: note
                        type: Script
                        spec:
                          source:
                            type: Inline
                            spec:
                              script: echo deployed
"""


def _bearer(token: str, **extra: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}", **extra}


def _person(server: Server, subject: str) -> str:
    return str(sign_in(server.oidc.url, subject, client_id="vmfarm")["id_token"])


def _sql(pg_url: str, query: str, **params: Any) -> list[Any]:
    engine = create_engine(normalise_url(pg_url))
    try:
        with engine.connect() as conn:
            return list(conn.execute(text(query), params).all())
    finally:
        engine.dispose()


def _executions_of(pg_url: str, pipeline: str) -> int:
    return int(_sql(pg_url, "SELECT count(*) FROM execution WHERE pipeline = :p", p=pipeline)[0][0])


class Follower(threading.Thread):
    """Reads an execution's event stream until the server ends it."""

    def __init__(self, server: Server, token: str, ex_id: str) -> None:
        super().__init__(daemon=True)
        self.url = f"{server.url}{EX}/{ex_id}/events"
        self.token = token
        self.events: list[tuple[str, dict[str, Any]]] = []
        self.content_type = ""
        self.opened = threading.Event()

    def run(self) -> None:
        with httpx.stream(
            "GET", self.url, headers=_bearer(self.token), timeout=httpx.Timeout(10, read=120)
        ) as resp:
            self.content_type = resp.headers.get("content-type", "")
            self.opened.set()
            for event in iter_events(resp.iter_lines()):
                self.events.append(event)


def test_the_executor_may_not_approve_and_two_other_members_let_the_run_proceed(
    server: Server, pg_url: str
) -> None:
    erin, frank, grace = (_person(server, u) for u in ("erin", "frank", "grace"))
    # Given erin submits a run whose approval needs two release managers, not the executor,
    # while her request claims to come from frank
    resp = httpx.post(
        server.url + EX,
        headers=_bearer(erin, **IMPOSTOR_HEADERS),
        json={
            "files": {
                "pipeline.yaml": gated_pipeline(
                    "release", groups=["release_managers"], minimum=2, disallow_executor=True
                )
            }
        },
    )
    assert resp.status_code == 201, resp.text
    ex_id = resp.json()["id"]
    report = httpx.get(f"{server.url}{EX}/{ex_id}", headers=_bearer(frank)).json()
    assert (report["status"], report["created_by"]) == ("WAITING", "erin")
    # and frank follows it over server-sent events
    follower = Follower(server, frank, ex_id)
    follower.start()
    assert follower.opened.wait(30)
    assert follower.content_type.startswith("text/event-stream")

    # When erin approves her own run: refused, and it still waits
    resp = httpx.post(f"{server.url}{EX}/{ex_id}/approve", headers=_bearer(erin))
    assert resp.status_code == 403
    assert "erin started this execution" in resp.json()["detail"]
    # frank approves, with headers naming grace: his vote, one of two
    resp = httpx.post(
        f"{server.url}{EX}/{ex_id}/approve",
        headers=_bearer(frank, **{k: "grace" for k in IMPOSTOR_HEADERS}),
        json={"comment": "looks good"},
    )
    assert resp.status_code == 200, resp.text
    assert resp.json()["outcome"] == "approved by frank (1 of 2)"
    # a second vote from frank does not count
    resp = httpx.post(f"{server.url}{EX}/{ex_id}/approve", headers=_bearer(frank))
    assert resp.status_code == 403 and "already approved" in resp.json()["detail"]
    assert (
        httpx.get(f"{server.url}{EX}/{ex_id}", headers=_bearer(frank)).json()["status"] == "WAITING"
    )
    # grace approves: two others, so the run goes past the approval
    resp = httpx.post(f"{server.url}{EX}/{ex_id}/approve", headers=_bearer(grace))
    assert resp.status_code == 200, resp.text
    assert "approved by grace (2 of 2)" in resp.json()["outcome"]

    # Then it has succeeded, the approval naming frank and grace
    report = httpx.get(f"{server.url}{EX}/{ex_id}", headers=_bearer(erin)).json()
    assert report["status"] == "SUCCEEDED"
    verdict = report["stages"][0]["phases"][0]["verdict"]
    assert [a["user"] for a in verdict["approvals"]] == ["frank", "grace"]
    assert verdict["approvals"][0]["comment"] == "looks good"
    # the follower saw it wait, then succeed, and the stream ended
    follower.join(60)
    assert not follower.is_alive()
    statuses = [d["status"] for name, d in follower.events if name == "status"]
    assert statuses[0] == "WAITING" and statuses[-1] == "SUCCEEDED"
    assert follower.events[-1] == ("end", {"id": ex_id, "status": "SUCCEEDED"})
    # and the audit trail names the verified subjects, each with how they signed in
    rows = _sql(
        pg_url,
        'SELECT "user", action, outcome, detail FROM auditevent '
        "WHERE execution_id = :e ORDER BY id",
        e=ex_id,
    )
    assert [(r[0], r[1], r[2]) for r in rows] == [
        ("erin", "run", "submitted"),
        ("erin", "approve", "refused"),
        ("frank", "approve", "approved"),
        ("frank", "approve", "refused"),
        ("grace", "approve", "approved"),
    ]
    for user, _, _, detail in rows:
        assert detail["actor"]["subject"] == user and detail["actor"]["kind"] == "oidc"
        assert detail["actor"]["groups"] == ["release_managers"]


def test_a_body_field_naming_a_user_is_refused_not_ignored(server: Server, pg_url: str) -> None:
    erin = _person(server, "erin")
    before = _executions_of(pg_url, "impostor")
    for field in ("user", "created_by", "actor"):
        resp = httpx.post(
            server.url + EX,
            headers=_bearer(erin),
            json={
                "files": {"p.yaml": gated_pipeline("impostor", groups=["release_managers"])},
                field: "frank",
            },
        )
        assert resp.status_code == 422, resp.text
    assert _executions_of(pg_url, "impostor") == before
    # the same on a decision
    resp = httpx.post(
        server.url + EX,
        headers=_bearer(erin),
        json={"files": {"p.yaml": gated_pipeline("impostor", groups=["release_managers"])}},
    )
    ex_id = resp.json()["id"]
    resp = httpx.post(
        f"{server.url}{EX}/{ex_id}/approve", headers=_bearer(erin), json={"user": "frank"}
    )
    assert resp.status_code == 422
    assert (
        httpx.get(f"{server.url}{EX}/{ex_id}", headers=_bearer(erin)).json()["status"] == "WAITING"
    )


def test_an_api_token_approves_as_itself_and_its_id_is_recorded(
    server: Server, pg_url: str
) -> None:
    # Given alice made a token "holder" that may approve (the server's users file puts the
    # token's subject in group ci), and erin submitted a run that group approves
    alice, erin = _person(server, "alice"), _person(server, "erin")
    made = httpx.post(
        server.url + "/api/v1/tokens",
        headers=_bearer(alice),
        json={"name": "holder", "roles": ["only-pipeline-approve"], "expires": "1h"},
    ).json()
    ex_id = httpx.post(
        server.url + EX,
        headers=_bearer(erin),
        json={"files": {"p.yaml": gated_pipeline("by-token", groups=["ci"])}},
    ).json()["id"]
    # When the token approves
    resp = httpx.post(f"{server.url}{EX}/{ex_id}/approve", headers=_bearer(made["token"]))
    assert resp.status_code == 200, resp.text
    # Then the vote and the audit row name the token and its id
    report = httpx.get(f"{server.url}{EX}/{ex_id}", headers=_bearer(erin)).json()
    vote = report["stages"][0]["phases"][0]["verdict"]["approvals"][0]
    assert (vote["user"], vote["token_id"]) == ("token:holder", made["id"])
    (detail,) = [
        r[0]
        for r in _sql(
            pg_url,
            "SELECT detail FROM auditevent WHERE execution_id = :e AND action = 'approve'",
            e=ex_id,
        )
    ]
    assert detail["actor"] == {"subject": "token:holder", "kind": "token", "ref": made["id"]}
    assert made["token"] not in str(detail)


def test_without_the_permission_to_deploy_nothing_is_recorded(server: Server, pg_url: str) -> None:
    # The environment and its hosts are the registry's (a submitted file may not define them)
    service, environment, hosts, pipeline = PRODUCTION.split("---\n")
    resp = httpx.post(
        server.url + "/api/v1/registry",
        headers=_bearer(_person(server, "alice")),
        json={"files": {"prod.yaml": environment + "---\n" + hosts}},
    )
    assert resp.status_code == 200, resp.text
    files = {"files": {"production.yaml": service + "---\n" + pipeline}}
    before = _executions_of(pg_url, "to_production")
    # A person without pipeline:execute is refused by the route
    resp = httpx.post(server.url + EX, headers=_bearer(_person(server, "bob")), json=files)
    assert resp.status_code == 403 and "pipeline:execute" in resp.json()["detail"]
    # A token with pipeline:execute but not environment:deploy:production is refused by the
    # server's RBAC configuration on the resolved plan
    alice = _person(server, "alice")
    made = httpx.post(
        server.url + "/api/v1/tokens",
        headers=_bearer(alice),
        json={"name": "executor", "roles": ["only-pipeline-execute"], "expires": "1h"},
    ).json()
    resp = httpx.post(server.url + EX, headers=_bearer(made["token"]), json=files)
    assert resp.status_code == 403, resp.text
    assert "environment:deploy:production" in resp.json()["detail"]
    assert _executions_of(pg_url, "to_production") == before
    (detail,) = [
        r[0]
        for r in _sql(
            pg_url,
            "SELECT detail FROM auditevent WHERE action = 'run' AND outcome = 'refused' "
            "AND detail->'actor'->>'ref' = :ref",
            ref=made["id"],
        )
    ]
    assert detail["permission"] == "environment:deploy:production"


def test_a_submitted_file_may_not_name_the_servers_own_machines(
    server: Server, pg_url: str
) -> None:
    erin = _person(server, "erin")
    before = _executions_of(pg_url, "to_production")
    local = PRODUCTION.replace(
        "    region: r1\n",
        "    region: r1\n    connection:\n"
        "      type: SSH\n      privateKeyFile: /etc/vmfarm/id_ed25519\n",
    )
    resp = httpx.post(
        server.url + EX, headers=_bearer(erin), json={"files": {"production.yaml": local}}
    )
    assert resp.status_code == 422
    assert resp.json()["detail"].startswith("production.yaml:28:7: privateKeyFile names a path")
    resp = httpx.post(
        server.url + EX, headers=_bearer(erin), json={"files": {"../escape.yaml": PRODUCTION}}
    )
    assert resp.status_code == 422 and "'../escape.yaml'" in resp.json()["detail"]
    assert _executions_of(pg_url, "to_production") == before


def test_a_bad_file_is_refused_with_its_place_and_no_server_path(server: Server) -> None:
    erin = _person(server, "erin")
    bad = gated_pipeline("bad", groups=["release_managers"]).replace(
        "minimumCount: 1", "minimumCount: many"
    )
    resp = httpx.post(server.url + EX, headers=_bearer(erin), json={"files": {"bad.yaml": bad}})
    assert resp.status_code == 422
    assert resp.json()["detail"].startswith("bad.yaml:")
    assert "/tmp" not in resp.json()["detail"]


def test_an_expired_token_gets_401(server: Server, tmp_path: Any) -> None:
    from fastapi.testclient import TestClient

    from app.auth.oidc import OidcVerifier
    from app.server import create_app
    from app.server.settings import ServerSettings
    from tests.service.conftest import SERVER_RBAC

    # The server in this process, its clock an hour past the token's expiry
    token = _person(server, "erin")
    exp = jwt.decode(token, options={"verify_signature": False})["exp"]
    rbac = tmp_path / "rbac.yaml"
    rbac.write_text(SERVER_RBAC)
    api = create_app(ServerSettings(rbac_file=rbac, issuer=server.oidc.url, audience="vmfarm"))
    api.state.verifier = OidcVerifier(server.oidc.url, "vmfarm", clock=lambda: exp + 3600)
    with TestClient(api) as client:
        resp = client.post(
            EX,
            headers=_bearer(token),
            json={"files": {"p.yaml": gated_pipeline("late", groups=["release_managers"])}},
        )
    assert resp.status_code == 401
    assert "expired" in resp.json()["detail"]
    assert resp.headers["www-authenticate"].startswith(
        'Bearer realm="vmfarm", error="invalid_token"'
    )


def test_logs_and_the_list_read_the_ledger(server: Server) -> None:
    erin = _person(server, "erin")
    ex_id = httpx.post(
        server.url + EX,
        headers=_bearer(erin),
        json={"files": {"p.yaml": gated_pipeline("listed", groups=["release_managers"])}},
    ).json()["id"]
    listed = httpx.get(
        server.url + EX, headers=_bearer(erin), params={"status": "waiting", "limit": 100}
    ).json()
    assert {
        "id": ex_id,
        "pipeline": "listed",
        "status": "WAITING",
        "created_by": "erin",
    }.items() <= next(e for e in listed if e["id"] == ex_id).items()
    assert httpx.get(f"{server.url}{EX}/{ex_id}/logs", headers=_bearer(erin)).json() == []
    resp = httpx.get(server.url + EX, headers=_bearer(erin), params={"status": "DONE"})
    assert resp.status_code == 422 and "unknown execution status" in resp.text
    assert httpx.get(f"{server.url}{EX}/nosuch", headers=_bearer(erin)).status_code == 404
    assert httpx.get(f"{server.url}{EX}/nosuch/events", headers=_bearer(erin)).status_code == 404


def test_reading_an_execution_needs_view_on_the_environments_it_deploys_to(
    server: Server, pg_url: str, tmp_path: Any
) -> None:
    from sqlmodel import Session

    from app.definitions import choose_pipeline, load, resolve
    from app.models import Execution

    # Given a recorded execution of a Production deployment (written straight to the ledger:
    # this server has no worker to take one)
    path = tmp_path / "production.yaml"
    path.write_text(PRODUCTION)
    bundle = load([str(path)], inputs={}, require_inputs=True)
    ex_id = uuid.uuid4().hex[:12]
    plan = resolve(bundle, choose_pipeline(bundle, None), execution_id=ex_id).to_json()
    engine = create_engine(normalise_url(pg_url))
    try:
        with Session(engine) as s:
            s.add(
                Execution(
                    id=ex_id,
                    pipeline=plan["identifier"],
                    plan=plan,
                    created_by="alice",
                    status="FAILED",
                )
            )
            s.commit()
    finally:
        engine.dispose()
    # carol may view pipelines but no environment: refused, naming what she lacks
    resp = httpx.get(f"{server.url}{EX}/{ex_id}", headers=_bearer(_person(server, "carol")))
    assert resp.status_code == 403
    assert "environment:view:production" in resp.json()["detail"]
    for tail in ("/logs", "/events"):
        assert (
            httpx.get(
                f"{server.url}{EX}/{ex_id}{tail}", headers=_bearer(_person(server, "carol"))
            ).status_code
            == 403
        )
    # erin (a deployer: environment:*) reads it
    resp = httpx.get(f"{server.url}{EX}/{ex_id}/logs", headers=_bearer(_person(server, "erin")))
    assert resp.status_code == 200 and resp.json() == []
