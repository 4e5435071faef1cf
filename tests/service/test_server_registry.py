"""The registry on a real server, people signed in through the real OIDC provider: apply,
list, read and history with versions and diffs; RBAC decides who may change which environment;
a run's environments come from the registry only, and it records the versions it used.

This server's RBAC (its own file): alice administers everything, erin may change and deploy to
non-production environments only, carol may read the registry, bob holds nothing."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
from sqlalchemy import create_engine, text

from app.db import normalise_url
from tests.alloc import Allocator
from tests.conftest import REDIS_BASE
from tests.service.conftest import SERVER_USERS, Provider, Server, _server, sign_in

REG = "/api/v1/registry"
EX = "/api/v1/executions"

RBAC = """
roles:
  admin: ["registry:*", "environment:*", "pipeline:*"]
  non-production: ["registry:*", "pipeline:*", "environment:view",
                   "environment:edit:non-production", "environment:deploy:non-production"]
  reader: [registry:view, pipeline:view]
bindings:
  - role: admin
    users: [alice]
  - role: non-production
    users: [erin]
  - role: reader
    users: [carol]
"""


@pytest.fixture(scope="module")
def reg_server(
    pg_url: str, oidc: Provider, alloc: Allocator, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Server]:
    root = tmp_path_factory.mktemp("registry-server")
    (root / "rbac.yaml").write_text(RBAC)
    (root / "users.yaml").write_text(SERVER_USERS)
    with alloc.port() as leased, alloc.redis_db(REDIS_BASE) as broker:
        yield from _server(pg_url, oidc, root, root / "rbac.yaml", leased.port, broker.url)


@pytest.fixture(scope="module")
def people(reg_server: Server) -> dict[str, dict[str, str]]:
    return {
        who: {
            "Authorization": "Bearer "
            + str(sign_in(reg_server.oidc.url, who, client_id="vmfarm")["id_token"])
        }
        for who in ("alice", "erin", "carol", "bob")
    }


def _env(name: str, kind: str = "PreProduction", extra: str = "") -> str:
    return (
        f"apiVersion: v1\nkind: Environment\nmetadata:\n  name: {name}\n"
        f"spec:\n  type: {kind}\n{extra}"
    )


def _infra(name: str, env: str) -> str:
    return f"""\
apiVersion: v1
kind: Infrastructure
metadata:
  name: {name}
spec:
  environmentRef: {env}
  deploymentType: Ssh
  type: Pdc
  spec:
    region: r1
    hosts:
      - hostname: 127.0.1.202
"""


def _service(name: str) -> str:
    return (
        f"apiVersion: v1\nkind: Service\nmetadata:\n  name: {name}\n"
        "spec:\n  serviceDefinition:\n    type: SSH\n"
    )


def _pipeline(name: str, *, service: str, env: str, infra: str) -> str:
    """An approval (the run waits there: no worker needed), then a deployment."""
    return f"""\
apiVersion: v1
kind: Pipeline
metadata:
  name: {name}
spec:
  stages:
    - stage:
        name: Approve
        identifier: approve
        type: Approval
        spec:
          execution:
            steps:
              - step:
                  type: HarnessApproval
                  name: Approve
                  identifier: approve
                  timeout: 1d
                  spec:
                    approvalMessage: Go?
                    approvers:
                      userGroups: [release_managers]
                      minimumCount: 1
    - stage:
        name: Deploy
        identifier: deploy
        type: Deployment
        spec:
          service:
            serviceRef: {service}
          environment:
            environmentRef: {env}
            infrastructureDefinitions:
              - identifier: {infra}
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


def _apply(server: Server, who: dict[str, str], files: dict[str, str]) -> httpx.Response:
    return httpx.post(server.url + REG, headers=who, json={"files": files}, timeout=30)


def _sql(pg_url: str, query: str, **params: Any) -> list[Any]:
    engine = create_engine(normalise_url(pg_url))
    try:
        with engine.connect() as conn:
            return list(conn.execute(text(query), params).all())
    finally:
        engine.dispose()


def _versions(pg_url: str, ident: str, kind: str = "Environment") -> list[int]:
    return [
        r[0]
        for r in _sql(
            pg_url,
            "SELECT version FROM registryversion WHERE kind = :k AND ident = :i ORDER BY version",
            k=kind,
            i=ident,
        )
    ]


def _unique(prefix: str) -> str:
    return f"{prefix}_{uuid.uuid4().hex[:6]}"


def test_apply_creates_versions_and_get_list_and_history_show_them(
    reg_server: Server, people: dict[str, dict[str, str]], pg_url: str
) -> None:
    env, svc = _unique("stage"), _unique("svc")
    # Given alice applies an environment and a service
    resp = _apply(reg_server, people["alice"], {"a.yaml": _env(env) + "---\n" + _service(svc)})
    assert resp.status_code == 200, resp.text
    assert resp.json()["applied"] == [
        {"kind": "Environment", "id": env, "version": 1, "changed": True},
        {"kind": "Service", "id": svc, "version": 1, "changed": True},
    ]
    # When she applies the same again: nothing changes
    resp = _apply(reg_server, people["alice"], {"a.yaml": _env(env) + "---\n" + _service(svc)})
    assert [(a["version"], a["changed"]) for a in resp.json()["applied"]] == [
        (1, False),
        (1, False),
    ]
    # and then the environment as Production: a second version of it alone
    resp = _apply(
        reg_server,
        people["alice"],
        {"b.yaml": _service(svc), "c.yml": _env(env, "Production")},
    )
    assert resp.status_code == 200, resp.text
    assert {(a["id"], a["version"], a["changed"]) for a in resp.json()["applied"]} == {
        (env, 2, True),
        (svc, 1, False),
    }
    assert _versions(pg_url, env) == [1, 2] and _versions(pg_url, svc, "Service") == [1]
    # Then the list shows the latest, with who and the environment's type
    listed = httpx.get(f"{reg_server.url}{REG}/ENVIRONMENT", headers=people["carol"]).json()
    mine = next(e for e in listed if e["id"] == env)
    assert (mine["kind"], mine["version"], mine["author"], mine["type"]) == (
        "Environment",
        2,
        "alice",
        "Production",
    )
    # a read gives the latest text, or the version asked for
    now = httpx.get(f"{reg_server.url}{REG}/environment/{env}", headers=people["carol"]).json()
    assert now["version"] == 2 and "type: Production" in now["text"]
    old = httpx.get(
        f"{reg_server.url}{REG}/environment/{env}",
        headers=people["carol"],
        params={"version": 1},
    ).json()
    assert old["version"] == 1 and "type: PreProduction" in old["text"]
    # the history says who changed what
    hist = httpx.get(f"{reg_server.url}{REG}/environment/{env}/history", headers=people["carol"])
    assert [(h["version"], h["author"]) for h in hist.json()] == [(1, "alice"), (2, "alice")]
    assert "+  type: PreProduction" in hist.json()[0]["diff"]
    assert "-  type: PreProduction\n+  type: Production\n" in hist.json()[1]["diff"]
    # unknown entries, versions and kinds are 404
    for path, params in (
        (f"environment/{env}_none", {}),
        (f"environment/{env}", {"version": 3}),
        (f"trigger/{env}", {}),
    ):
        resp = httpx.get(f"{reg_server.url}{REG}/{path}", headers=people["carol"], params=params)
        assert resp.status_code == 404, (path, resp.text)
    # and each applied version is in the audit trail, by alice
    rows = _sql(
        pg_url,
        "SELECT detail->>'version' FROM auditevent WHERE action = 'registry-apply' "
        "AND outcome = 'applied' AND detail->>'id' = :i AND \"user\" = 'alice'",
        i=env,
    )
    assert sorted(r[0] for r in rows) == ["1", "2"]


def test_an_invalid_document_is_refused_with_its_place_and_nothing_is_stored(
    reg_server: Server, people: dict[str, dict[str, str]], pg_url: str
) -> None:
    good, bad = _unique("good"), _unique("bad")
    resp = _apply(
        reg_server, people["alice"], {"good.yaml": _env(good), "bad.yaml": _env(bad, "Staging")}
    )
    assert resp.status_code == 422, resp.text
    assert resp.json()["detail"].startswith("bad.yaml:6:9: ") and "spec.type" in resp.text
    resp = _apply(reg_server, people["alice"], {"good.yaml": _env(good), "y.yaml": "a: [\n"})
    assert resp.status_code == 422 and resp.json()["detail"].startswith("y.yaml:2:1: invalid YAML")
    # an infrastructure of an environment nobody stored
    resp = _apply(reg_server, people["alice"], {"i.yaml": _infra(bad, f"{bad}_env")})
    assert resp.status_code == 422 and "environmentRef" in resp.text, resp.text
    assert "/tmp" not in resp.text
    assert _versions(pg_url, good) == [] and _versions(pg_url, bad) == []


def test_without_registry_apply_nothing_is_stored(
    reg_server: Server, people: dict[str, dict[str, str]], pg_url: str
) -> None:
    name = _unique("nope")
    for who in ("bob", "carol"):
        resp = _apply(reg_server, people[who], {"e.yaml": _env(name)})
        assert resp.status_code == 403 and "registry:apply" in resp.json()["detail"]
    resp = httpx.get(f"{reg_server.url}{REG}/environment", headers=people["bob"])
    assert resp.status_code == 403 and "registry:view" in resp.json()["detail"]
    assert _versions(pg_url, name) == []


def test_a_non_production_editor_cannot_change_the_production_environment(
    reg_server: Server, people: dict[str, dict[str, str]], pg_url: str
) -> None:
    prod, dev = _unique("prod"), _unique("dev")
    # Given alice stored a Production and a PreProduction environment
    resp = _apply(
        reg_server, people["alice"], {"e.yaml": _env(prod, "Production") + "---\n" + _env(dev)}
    )
    assert resp.status_code == 200, resp.text
    # erin may change the PreProduction one and add hosts to it
    resp = _apply(
        reg_server,
        people["erin"],
        {"dev.yaml": _env(dev, extra="  description: dev hosts\n"), "i.yaml": _infra(dev, dev)},
    )
    assert resp.status_code == 200, resp.text
    # but not the Production one: not changed, not relabelled, no hosts added, not moved there
    for files in (
        {"p.yaml": _env(prod, "Production", extra="  description: mine now\n")},
        {"p.yaml": _env(prod, "PreProduction")},
        {"i.yaml": _infra(_unique("sneak"), prod)},
        {"i.yaml": _infra(dev, prod)},
        {"dev.yaml": _env(dev, "Production")},
    ):
        resp = _apply(reg_server, people["erin"], files)
        assert resp.status_code == 403, (files, resp.text)
        assert "environment:edit:production" in resp.json()["detail"]
    assert _versions(pg_url, prod) == [1] and _versions(pg_url, dev) == [1, 2]
    refused = _sql(
        pg_url,
        "SELECT count(*) FROM auditevent WHERE action = 'registry-apply' "
        "AND outcome = 'refused' AND \"user\" = 'erin' AND detail->>'environment' = :e",
        e=prod,
    )
    assert refused[0][0] >= 3


def _executions(pg_url: str, pipeline: str) -> int:
    return int(_sql(pg_url, "SELECT count(*) FROM execution WHERE pipeline = :p", p=pipeline)[0][0])


def _production(server: Server, who: dict[str, str]) -> dict[str, str]:
    """Store a Production environment, its hosts and a service; their ids."""
    ids = {"env": _unique("prod"), "infra": _unique("hosts"), "svc": _unique("shop")}
    resp = _apply(
        server,
        who,
        {
            "env.yaml": _env(ids["env"], "Production"),
            "infra.yaml": _infra(ids["infra"], ids["env"]),
            "svc.yaml": _service(ids["svc"]),
        },
    )
    assert resp.status_code == 200, resp.text
    return ids


def test_a_submitted_file_that_redefines_a_registered_environment_is_refused(
    reg_server: Server, people: dict[str, dict[str, str]], pg_url: str
) -> None:
    ids = _production(reg_server, people["alice"])
    pipe = _unique("relabel")
    files = {
        "run.yaml": _env(ids["env"], "PreProduction")
        + "---\n"
        + _pipeline(pipe, service=ids["svc"], env=ids["env"], infra=ids["infra"])
    }
    # erin may deploy to PreProduction: relabelling the Production environment is refused
    resp = httpx.post(reg_server.url + EX, headers=people["erin"], json={"files": files})
    assert resp.status_code == 422, resp.text
    assert resp.json()["detail"].startswith("run.yaml:2:7: Environment ")
    assert "comes from the registry" in resp.json()["detail"]
    # so is an infrastructure of its own
    files = {
        "run.yaml": _infra(ids["infra"], ids["env"])
        + "---\n"
        + _pipeline(pipe, service=ids["svc"], env=ids["env"], infra=ids["infra"])
    }
    resp = httpx.post(reg_server.url + EX, headers=people["alice"], json={"files": files})
    assert resp.status_code == 422 and "Infrastructure" in resp.json()["detail"]
    assert _executions(pg_url, pipe) == 0
    # and with the registry's environment, erin is refused by its type: Production
    files = {"run.yaml": _pipeline(pipe, service=ids["svc"], env=ids["env"], infra=ids["infra"])}
    resp = httpx.post(reg_server.url + EX, headers=people["erin"], json={"files": files})
    assert resp.status_code == 403 and "environment:deploy:production" in resp.text, resp.text
    assert _executions(pg_url, pipe) == 0


def test_a_run_of_a_stored_pipeline_records_the_registry_versions_it_used(
    reg_server: Server, people: dict[str, dict[str, str]], pg_url: str
) -> None:
    alice = people["alice"]
    ids = _production(reg_server, alice)
    pipe = _unique("stored")
    resp = _apply(
        reg_server,
        alice,
        {"p.yaml": _pipeline(pipe, service=ids["svc"], env=ids["env"], infra=ids["infra"])},
    )
    assert resp.status_code == 200, resp.text
    # and an environment changed once since it was stored
    resp = _apply(
        reg_server, alice, {"env.yaml": _env(ids["env"], "Production", "  description: live\n")}
    )
    assert resp.json()["applied"][0]["version"] == 2
    # When alice runs the stored pipeline by its id, with no files
    resp = httpx.post(reg_server.url + EX, headers=alice, json={"pipeline": pipe, "set": {}})
    assert resp.status_code == 201, resp.text
    first = resp.json()["id"]
    report = httpx.get(f"{reg_server.url}{EX}/{first}", headers=alice).json()
    # Then it is recorded with the versions it was resolved with
    assert report["pipeline"] == pipe and report["created_by"] == "alice"
    assert sorted((u["kind"], u["id"], u["version"]) for u in report["registry"]) == sorted(
        [
            ("Pipeline", pipe, 1),
            ("Environment", ids["env"], 2),
            ("Infrastructure", ids["infra"], 1),
            ("Service", ids["svc"], 1),
        ]
    )
    # and a later change of the environment does not change what that run used
    _apply(reg_server, alice, {"env.yaml": _env(ids["env"], "Production", "  description: x\n")})
    again = httpx.get(f"{reg_server.url}{EX}/{first}", headers=alice).json()
    assert ("Environment", ids["env"], 2) in {
        (u["kind"], u["id"], u["version"]) for u in again["registry"]
    }
    # erin (non-production only) may not run it: the registry says the environment is Production
    resp = httpx.post(reg_server.url + EX, headers=people["erin"], json={"pipeline": pipe})
    assert resp.status_code == 403 and "environment:deploy:production" in resp.text
    # an unknown stored pipeline is 404, and nothing given at all is 422
    resp = httpx.post(reg_server.url + EX, headers=alice, json={"pipeline": f"{pipe}_none"})
    assert resp.status_code == 404 and "registry" in resp.text
    assert httpx.post(reg_server.url + EX, headers=alice, json={}).status_code == 422
    assert _executions(pg_url, pipe) == 1


def test_workers_read_the_registry_and_nobody_rewrites_a_version(
    reg_server: Server, people: dict[str, dict[str, str]], pg_url: str
) -> None:
    import psycopg
    from psycopg import errors

    from tests.service.conftest import worker_role_url
    from tests.service.test_db_roles import _login

    name = _unique("kept")
    assert _apply(reg_server, people["alice"], {"e.yaml": _env(name)}).status_code == 200
    # A region worker's role reads versions and what executions used, and writes neither
    with psycopg.connect(worker_role_url(pg_url), autocommit=True) as conn:
        row = conn.execute("SELECT text FROM registryversion WHERE ident = %s", (name,)).fetchone()
        assert row is not None and "PreProduction" in row[0]
        conn.execute("SELECT count(*) FROM registryuse").fetchone()
        for statement in (
            "INSERT INTO registryversion (kind, ident, version, text, author, created_at) "
            "VALUES ('Environment', %(n)s, 9, 'x', 'mallory', now())",
            "UPDATE registryversion SET text = 'x' WHERE ident = %(n)s",
            "DELETE FROM registryuse",
        ):
            with pytest.raises(errors.InsufficientPrivilege, match="permission denied"):
                conn.execute(statement, {"n": name})
    # The server's role adds versions but cannot change or remove one; nor can the owner
    server = _login(pg_url, "vmfarm_test_server", "vmfarm_server")
    for url, why in ((server, "permission denied"), (pg_url, "append-only")):
        with psycopg.connect(url, autocommit=True) as conn:
            for statement in (
                "UPDATE registryversion SET env_type = 'Production' WHERE ident = %(n)s",
                "DELETE FROM registryversion WHERE ident = %(n)s",
            ):
                with pytest.raises(errors.InsufficientPrivilege, match=why):
                    conn.execute(statement, {"n": name})
    assert _versions(pg_url, name) == [1]


def test_the_cli_refuses_a_relabelled_environment_with_exit_2_and_records_nothing(
    reg_server: Server, people: dict[str, dict[str, str]], pg_url: str, tmp_path: Any
) -> None:
    from tests.conftest import run_vmfarm
    from tests.service.test_cli_server_mode import cli_login

    ids = _production(reg_server, people["alice"])
    pipe = _unique("cli_relabel")
    run_file = tmp_path / "run.yaml"
    run_file.write_text(
        _env(ids["env"], "PreProduction")
        + "---\n"
        + _pipeline(pipe, service=ids["svc"], env=ids["env"], infra=ids["infra"])
    )
    erin = cli_login(reg_server, "erin", tmp_path / "erin")
    res = run_vmfarm("run", str(run_file), env=erin)
    assert res.returncode == 2, res.stdout + res.stderr
    assert "run.yaml:2:7" in res.stderr and "comes from the registry" in res.stderr
    assert _executions(pg_url, pipe) == 0


def test_only_an_environment_lists_a_type(
    reg_server: Server, people: dict[str, dict[str, str]]
) -> None:
    svc = _unique("typed")
    assert _apply(reg_server, people["alice"], {"s.yaml": _service(svc)}).status_code == 200
    listed = httpx.get(f"{reg_server.url}{REG}/service", headers=people["carol"]).json()
    assert set(next(e for e in listed if e["id"] == svc)) == {
        "kind",
        "id",
        "version",
        "author",
        "created_at",
    }
