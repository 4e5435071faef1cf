"""Webhook triggers on a real server: a CI system starts the stored pipeline with a signed
delivery and nobody's credentials; a wrong signature is refused and audited; a repeated
delivery starts nothing new; conditions and payload values as the trigger says.

The server's secret store is its environment (VMFARM_SECRET_PUBLISH_HOOK); its RBAC file lets
the subject ``trigger:<id>`` deploy to non-production environments only. The pipeline starts
with an approval, so runs wait there: no worker is needed to see what was started."""

from __future__ import annotations

import hashlib
import hmac
import json
import uuid
from collections.abc import Iterator
from typing import Any

import httpx
import pytest

from tests.alloc import Allocator
from tests.conftest import REDIS_BASE
from tests.service.conftest import (
    SERVER_USERS,
    Provider,
    Server,
    _server,
    approved_release_pipeline,
    bearer,
    sql,
)

SECRET = "s3cret-" + uuid.uuid4().hex
REG = "/api/v1/registry"
HOOKS = "/api/v1/webhooks"

RBAC = """
roles:
  admin: ["registry:*", "environment:*", "pipeline:*"]
  trigger: ["pipeline:execute", "environment:view", "environment:deploy:non-production"]
  nothing: []
bindings:
  - role: admin
    users: [alice]
  - role: trigger
    groups: [webhooks]
  - role: nothing
    users: [bob]
"""
USERS = SERVER_USERS + '  webhooks: ["trigger:{pre}", "trigger:{prod}"]\n'


@pytest.fixture(scope="module")
def ids() -> dict[str, str]:
    tag = uuid.uuid4().hex[:6]
    return {
        "pre": f"on_publish_{tag}",
        "prod": f"to_prod_{tag}",
        "pipe": f"hooked_{tag}",
        "prodpipe": f"hooked_prod_{tag}",
        "svc": f"hooksvc_{tag}",
        "env": f"hookenv_{tag}",
        "prodenv": f"hookprod_{tag}",
    }


@pytest.fixture(scope="module")
def hook_server(
    pg_url: str,
    oidc: Provider,
    alloc: Allocator,
    tmp_path_factory: pytest.TempPathFactory,
    ids: dict[str, str],
) -> Iterator[Server]:
    root = tmp_path_factory.mktemp("webhook-server")
    (root / "rbac.yaml").write_text(RBAC)
    (root / "users.yaml").write_text(USERS.format(**ids))
    with alloc.port() as leased, alloc.redis_db(REDIS_BASE) as broker:
        yield from _server(
            pg_url,
            oidc,
            root,
            root / "rbac.yaml",
            leased.port,
            broker.url,
            extra_env={"VMFARM_SECRET_PUBLISH_HOOK": SECRET},
        )


def _pipeline(name: str, env: str, infra: str, svc: str) -> str:
    return approved_release_pipeline(name, env=env, infra=infra, svc=svc, version="^[^|]+$")


def _trigger(ident: str, pipeline: str) -> str:
    return f"""\
trigger:
  name: Deploy on publish
  identifier: {ident}
  enabled: true
  pipelineIdentifier: {pipeline}
  encryptedWebhookSecretIdentifier: publish_hook
  source:
    type: Webhook
    spec:
      type: Custom
      spec:
        payloadConditions:
          - key: <+trigger.payload.branch>
            operator: Equals
            value: main
        headerConditions:
          - key: <+trigger.header['X-Build-Event']>
            operator: Equals
            value: published
  inputYaml: |
    pipeline:
      identifier: {pipeline}
      variables:
        - name: version
          type: String
          value: <+trigger.payload.release.version>
"""


def _env_files(ids: dict[str, str]) -> dict[str, str]:
    def env(name: str, kind: str) -> str:
        return (
            f"apiVersion: v1\nkind: Environment\nmetadata:\n  name: {name}\nspec:\n  type: {kind}\n"
        )

    def infra(name: str, env: str, host: str) -> str:
        return (
            f"apiVersion: v1\nkind: Infrastructure\nmetadata:\n  name: {name}\nspec:\n"
            f"  environmentRef: {env}\n  deploymentType: Ssh\n  type: Pdc\n  spec:\n"
            f"    region: r1\n    hosts:\n      - hostname: {host}\n"
        )

    return {
        "envs.yaml": env(ids["env"], "PreProduction")
        + "---\n"
        + env(ids["prodenv"], "Production")
        + "---\n"
        + infra(ids["env"] + "_hosts", ids["env"], "127.0.1.211")
        + "---\n"
        + infra(ids["prodenv"] + "_hosts", ids["prodenv"], "127.0.1.212"),
        "svc.yaml": (
            f"apiVersion: v1\nkind: Service\nmetadata:\n  name: {ids['svc']}\n"
            "spec:\n  serviceDefinition:\n    type: SSH\n"
        ),
        "pipes.yaml": _pipeline(ids["pipe"], ids["env"], ids["env"] + "_hosts", ids["svc"])
        + "---\n"
        + _pipeline(ids["prodpipe"], ids["prodenv"], ids["prodenv"] + "_hosts", ids["svc"]),
        "triggers.yaml": _trigger(ids["pre"], ids["pipe"])
        + "---\n"
        + _trigger(ids["prod"], ids["prodpipe"]),
    }


@pytest.fixture(scope="module")
def stored(hook_server: Server, ids: dict[str, str]) -> dict[str, str]:
    resp = httpx.post(
        hook_server.url + REG,
        headers=bearer(hook_server, "alice"),
        json={"files": _env_files(ids)},
        timeout=60,
    )
    assert resp.status_code == 200, resp.text
    kinds = {(a["kind"], a["id"]) for a in resp.json()["applied"]}
    assert ("Trigger", ids["pre"]) in kinds and ("Trigger", ids["prod"]) in kinds
    return ids


def _sign(body: bytes, secret: str = SECRET) -> str:
    return "sha256=" + hmac.new(secret.encode(), body, hashlib.sha256).hexdigest()


def _deliver(
    server: Server,
    trigger: str,
    payload: dict[str, Any],
    *,
    delivery: str | None = None,
    event: str = "published",
    secret: str = SECRET,
    signature: str | None = None,
) -> httpx.Response:
    body = json.dumps(payload).encode()
    headers = {"Content-Type": "application/json", "X-Build-Event": event}
    headers["X-Hub-Signature-256"] = signature if signature is not None else _sign(body, secret)
    if delivery:
        headers["X-GitHub-Delivery"] = delivery
    return httpx.post(f"{server.url}{HOOKS}/{trigger}", content=body, headers=headers, timeout=60)


def _runs(pg_url: str, pipeline: str) -> list[tuple[str, str, str]]:
    rows = sql(
        pg_url,
        "SELECT id, created_by, CAST(plan AS TEXT) FROM execution WHERE pipeline = :p "
        "ORDER BY created_at",
        p=pipeline,
    )
    return [(r[0], r[1], r[2]) for r in rows]


def test_a_signed_delivery_starts_exactly_one_run_with_the_payloads_version(
    hook_server: Server, stored: dict[str, str], pg_url: str
) -> None:
    version = f"2.{uuid.uuid4().int % 1000}.7"
    delivery = uuid.uuid4().hex
    payload = {"branch": "main", "release": {"version": version}}
    # When the CI system delivers a signed "published" event for main
    resp = _deliver(hook_server, stored["pre"], payload, delivery=delivery)
    # Then one execution starts, as the trigger, with the payload's version
    assert resp.status_code == 201, resp.text
    ex_id = resp.json()["execution"]
    runs = _runs(pg_url, stored["pipe"])
    assert [r[0] for r in runs] == [ex_id]
    assert runs[0][1] == f"trigger:{stored['pre']}"
    report = httpx.get(
        f"{hook_server.url}/api/v1/executions/{ex_id}", headers=bearer(hook_server, "alice")
    ).json()
    assert report["status"] == "WAITING"
    assert f"Deploy {version}?" in json.dumps(report)
    # and the same delivery again (the CI system retries) starts nothing new
    again = _deliver(hook_server, stored["pre"], payload, delivery=delivery)
    assert again.status_code == 200, again.text
    assert again.json()["outcome"] == "duplicate" and again.json()["execution"] == ex_id
    # nor does the same body replayed without its delivery id, twice
    bare = {"branch": "main", "release": {"version": version + "-bare"}}
    first = _deliver(hook_server, stored["pre"], bare)
    replay = _deliver(hook_server, stored["pre"], bare)
    assert first.status_code == 201 and replay.json()["outcome"] == "duplicate"
    assert len(_runs(pg_url, stored["pipe"])) == 2


@pytest.mark.parametrize(
    "how",
    ["no signature", "wrong secret", "tampered body", "sha1"],
)
def test_a_delivery_without_the_triggers_signature_is_refused_and_audited(
    hook_server: Server, stored: dict[str, str], pg_url: str, how: str
) -> None:
    before = len(_runs(pg_url, stored["pipe"]))
    payload = {"branch": "main", "release": {"version": "6.6.6"}}
    body = json.dumps(payload).encode()
    if how == "no signature":
        resp = httpx.post(
            f"{hook_server.url}{HOOKS}/{stored['pre']}",
            content=body,
            headers={"X-Build-Event": "published"},
        )
    elif how == "wrong secret":
        resp = _deliver(hook_server, stored["pre"], payload, secret="guessed")
    elif how == "tampered body":
        resp = _deliver(
            hook_server,
            stored["pre"],
            {"branch": "main", "release": {"version": "6.6.7"}},
            signature=_sign(body),
        )
    else:
        sig = "sha1=" + hmac.new(SECRET.encode(), body, hashlib.sha1).hexdigest()
        resp = _deliver(hook_server, stored["pre"], payload, signature=sig)
    assert resp.status_code == 401, resp.text
    assert SECRET not in resp.text
    assert len(_runs(pg_url, stored["pipe"])) == before
    refused = sql(
        pg_url,
        "SELECT outcome, CAST(detail AS TEXT) FROM auditevent WHERE action = 'webhook' "
        'AND "user" = :u ORDER BY id DESC LIMIT 1',
        u=f"trigger:{stored['pre']}",
    )
    assert refused and refused[0][0] == "refused"
    assert SECRET not in refused[0][1]


def test_conditions_and_payload_values_decide_what_starts(
    hook_server: Server, stored: dict[str, str], pg_url: str
) -> None:
    before = len(_runs(pg_url, stored["pipe"]))
    # another branch, or another event: nothing starts, and the answer says why
    other = _deliver(hook_server, stored["pre"], {"branch": "dev", "release": {"version": "1"}})
    assert other.status_code == 200 and other.json()["outcome"] == "skipped"
    assert "branch" in other.json()["reason"]
    event = _deliver(
        hook_server, stored["pre"], {"branch": "main", "release": {"version": "1"}}, event="x"
    )
    assert event.json()["outcome"] == "skipped" and "X-Build-Event" in event.json()["reason"]
    # a payload without the version: refused, nothing started
    missing = _deliver(hook_server, stored["pre"], {"branch": "main", "release": {}})
    assert missing.status_code == 422 and "release.version" in missing.text
    # a value the input's regex refuses: refused as a --set value would be
    bad = _deliver(hook_server, stored["pre"], {"branch": "main", "release": {"version": "1|2"}})
    assert bad.status_code == 422, bad.text
    assert len(_runs(pg_url, stored["pipe"])) == before
    # a value with shell and YAML in it stays one value, recorded as given
    hostile = "1.0'; touch /tmp/pwned-$(id -u) ;'"
    ok = _deliver(hook_server, stored["pre"], {"branch": "main", "release": {"version": hostile}})
    assert ok.status_code == 201, ok.text
    report = httpx.get(
        f"{hook_server.url}/api/v1/executions/{ok.json()['execution']}",
        headers=bearer(hook_server, "alice"),
    ).json()
    assert f"Deploy {hostile}?" in json.dumps(report, ensure_ascii=False)


def test_the_trigger_deploys_only_where_its_subject_may(
    hook_server: Server, stored: dict[str, str], pg_url: str
) -> None:
    # The production pipeline's trigger is signed correctly, but trigger:<id> may deploy to
    # non-production environments only: refused by RBAC on the registry's facts
    resp = _deliver(
        hook_server, stored["prod"], {"branch": "main", "release": {"version": "9.9.9"}}
    )
    assert resp.status_code == 403, resp.text
    assert "environment:deploy:production" in resp.text
    assert _runs(pg_url, stored["prodpipe"]) == []
    # and the refused delivery may be sent again once allowed (it was not kept as started)
    rows = sql(
        pg_url, "SELECT count(*) FROM webhookdelivery WHERE trigger_id = :t", t=stored["prod"]
    )
    assert rows[0][0] == 0


def test_unknown_triggers_and_the_listing(
    hook_server: Server, stored: dict[str, str], pg_url: str
) -> None:
    assert _deliver(hook_server, "no_such_trigger", {"branch": "main"}).status_code == 404
    # vmfarm triggers' source: every trigger with its last deliveries, for registry:view only
    alice, bob = bearer(hook_server, "alice"), bearer(hook_server, "bob")
    assert httpx.get(hook_server.url + "/api/v1/triggers", headers=bob).status_code == 403
    listing = httpx.get(hook_server.url + "/api/v1/triggers", headers=alice).json()
    mine = {t["id"]: t for t in listing}
    assert mine[stored["pre"]]["pipeline"] == stored["pipe"]
    outcomes = {d["outcome"] for d in mine[stored["pre"]]["deliveries"]}
    assert outcomes <= {"started", "skipped"} and "started" in outcomes | {"skipped"}


def test_a_trigger_naming_no_stored_pipeline_is_refused_at_apply(
    hook_server: Server, stored: dict[str, str]
) -> None:
    resp = httpx.post(
        hook_server.url + REG,
        headers=bearer(hook_server, "alice"),
        json={"files": {"t.yaml": _trigger("dangling_" + stored["pre"], "no_such_pipeline")}},
    )
    assert resp.status_code == 422, resp.text
    assert "t.yaml:" in resp.text and "no_such_pipeline" in resp.text
