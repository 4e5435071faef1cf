"""Artifact triggers on real servers: two ``vmfarm server`` processes on one ledger poll every
artifact trigger's repository every 0.3 s. A new S3 object (moto in server mode) or a new
file in an Artifactory folder starts exactly one execution with that build as
``<+trigger.artifact.build>``; builds there at the first poll, builds seen again and builds
the other server saw start nothing; a repository that refuses is shown by ``vmfarm triggers``.

A small HTTP server in the test stands in for Artifactory (tests/fakes/repository_api: the
File List API's real answer shape). The pipeline starts with an approval, so runs wait there:
no worker is needed to see what was started."""

from __future__ import annotations

import json
import uuid
from collections.abc import Iterator

import boto3
import httpx
import pytest

from tests.alloc import Allocator
from tests.conftest import REDIS_BASE, base_env, moto_server, run_vmfarm
from tests.fakes.repository_api import RepositoryApi
from tests.service.conftest import (
    SERVER_USERS,
    Provider,
    Server,
    _server,
    approved_release_pipeline,
    bearer,
    sql,
)
from tests.waiting import wait_for

REG = "/api/v1/registry"
REGION = "eu-west-1"
POLL = "0.3"

RBAC = """
roles:
  admin: ["registry:*", "environment:*", "pipeline:*", "token:*"]
  trigger: ["pipeline:execute", "environment:view", "environment:deploy:non-production"]
bindings:
  - role: admin
    users: [alice]
  - role: trigger
    groups: [pollers]
"""


@pytest.fixture(scope="module")
def ids() -> dict[str, str]:
    tag = uuid.uuid4().hex[:6]
    return {
        "s3": f"on_s3_{tag}",
        "art": f"on_art_{tag}",
        "down": f"on_down_{tag}",
        "denied": f"on_denied_{tag}",
        "pipe": f"polled_{tag}",
        "svc": f"pollsvc_{tag}",
        "env": f"pollenv_{tag}",
        "bucket": f"releases-{tag}",
    }


@pytest.fixture(scope="module")
def repos() -> Iterator[tuple[RepositoryApi, RepositoryApi]]:
    with RepositoryApi() as good, RepositoryApi() as down:
        down.status = 401
        yield good, down


@pytest.fixture(scope="module")
def moto_url(tmp_path_factory: pytest.TempPathFactory, alloc: Allocator) -> Iterator[str]:
    with moto_server(tmp_path_factory, alloc, region=REGION) as url:
        yield url


@pytest.fixture(scope="module")
def servers(
    pg_url: str,
    oidc: Provider,
    alloc: Allocator,
    tmp_path_factory: pytest.TempPathFactory,
    ids: dict[str, str],
    moto_url: str,
) -> Iterator[list[Server]]:
    """Two server processes on one ledger and one broker, both polling (the AWS environment
    moto_server set reaches them: base_env copies it)."""
    users = SERVER_USERS + f'  pollers: ["trigger:{ids["s3"]}", "trigger:{ids["art"]}"]\n'
    running: list[Server] = []
    gens = []
    with alloc.redis_db(REDIS_BASE) as broker:
        for n in range(2):
            root = tmp_path_factory.mktemp(f"poll-server-{n}")
            (root / "rbac.yaml").write_text(RBAC)
            (root / "users.yaml").write_text(users)
            lease = alloc.port()
            gen = _server(
                pg_url,
                oidc,
                root,
                root / "rbac.yaml",
                lease.port,
                broker.url,
                extra_env={"VMFARM_ARTIFACT_POLL_INTERVAL": POLL},
            )
            running.append(next(gen))
            gens.append((gen, lease))
        try:
            yield running
        finally:
            for gen, lease in gens:
                for _ in gen:  # stops the server
                    pass
                lease.release()


def _files(ids: dict[str, str], good: RepositoryApi, down: RepositoryApi) -> dict[str, str]:
    pipeline = approved_release_pipeline(
        ids["pipe"],
        env=ids["env"],
        infra=f"{ids['env']}_hosts",
        svc=ids["svc"],
        version="^[A-Za-z0-9._/-]+$",
    )

    def connector(name: str, url: str) -> str:
        return (
            f"connector:\n  name: {name}\n  identifier: {name}\n  type: Artifactory\n"
            f"  spec:\n    artifactoryServerUrl: {url}\n    auth:\n      type: Anonymous\n"
        )

    def trigger(ident: str, source: str) -> str:
        return (
            f"trigger:\n  name: {ident}\n  identifier: {ident}\n  enabled: true\n"
            f"  pipelineIdentifier: {ids['pipe']}\n  source:\n    type: Artifact\n"
            f"    spec:\n{source}"
            "  inputYaml: |\n    pipeline:\n"
            f"      identifier: {ids['pipe']}\n      variables:\n        - name: version\n"
            "          type: String\n          value: <+trigger.artifact.build>\n"
        )

    artifactory = (
        "      type: ArtifactoryRegistry\n      spec:\n        connectorRef: {conn}\n"
        "        repository: releases\n        repositoryFormat: generic\n"
        "        artifactDirectory: web\n        eventConditions:\n"
        "          - key: build\n            operator: Regex\n"
        "            value: ^web-.*\\.tar\\.gz$\n"
    )
    s3 = (
        "      type: AmazonS3\n      spec:\n"
        f"        region: {REGION}\n        bucketName: {ids['bucket']}\n"
        "        filePathRegex: web/web-.*\\.tar\\.gz\n"
    )
    return {
        "env.yaml": (
            f"apiVersion: v1\nkind: Environment\nmetadata:\n  name: {ids['env']}\n"
            "spec:\n  type: PreProduction\n---\n"
            f"apiVersion: v1\nkind: Infrastructure\nmetadata:\n  name: {ids['env']}_hosts\n"
            f"spec:\n  environmentRef: {ids['env']}\n  deploymentType: Ssh\n  type: Pdc\n"
            "  spec:\n    region: r1\n    hosts:\n      - hostname: 127.0.1.221\n"
        ),
        "svc.yaml": (
            f"apiVersion: v1\nkind: Service\nmetadata:\n  name: {ids['svc']}\n"
            "spec:\n  serviceDefinition:\n    type: SSH\n"
        ),
        "pipe.yaml": pipeline,
        "connectors.yaml": connector(f"art_{ids['art']}", good.url)
        + "---\n"
        + connector(f"down_{ids['down']}", down.url),
        "triggers.yaml": trigger(ids["s3"], s3)
        + "---\n"
        + trigger(ids["art"], artifactory.format(conn=f"art_{ids['art']}"))
        + "---\n"
        + trigger(ids["down"], artifactory.format(conn=f"down_{ids['down']}"))
        + "---\n"
        + trigger(ids["denied"], s3.replace("web/web-", "api/api-")),
    }


def _runs(pg_url: str, trigger: str) -> list[tuple[str, str]]:
    """(execution id, plan) of the runs the trigger started."""
    rows = sql(
        pg_url,
        "SELECT id, CAST(plan AS TEXT) FROM execution WHERE created_by = :u ORDER BY created_at",
        u=f"trigger:{trigger}",
    )
    return [(r[0], r[1]) for r in rows]


def _polls(pg_url: str, trigger: str) -> int:
    """How many polls have ended since the row was made (its time, as a changing value)."""
    rows = sql(pg_url, "SELECT polled_at FROM artifactpoll WHERE trigger_id = :t", t=trigger)
    return 0 if not rows else int(rows[0][0].timestamp() * 1000)


def _several_polls(pg_url: str, trigger: str, n: int = 4) -> None:
    """Wait until the trigger has been polled ``n`` more times (by either server)."""
    for _ in range(n):
        before = _polls(pg_url, trigger)
        wait_for(
            lambda b=before: _polls(pg_url, trigger) != b, 30, f"a poll of {trigger}", interval=0.2
        )


@pytest.fixture(scope="module")
def stored(
    servers: list[Server],
    ids: dict[str, str],
    repos: tuple[RepositoryApi, RepositoryApi],
    moto_url: str,
    pg_url: str,
) -> dict[str, str]:
    good, down = repos
    s3 = boto3.client("s3", region_name=REGION, endpoint_url=moto_url)
    s3.create_bucket(Bucket=ids["bucket"], CreateBucketConfiguration={"LocationConstraint": REGION})
    s3.put_object(Bucket=ids["bucket"], Key="web/web-1.0.tar.gz", Body=b"one")
    good.add("releases/web/web-1.0.tar.gz")
    resp = httpx.post(
        servers[0].url + REG,
        headers=bearer(servers[0]),
        json={"files": _files(ids, good, down)},
        timeout=60,
    )
    assert resp.status_code == 200, resp.text
    for t in (
        ids["s3"],
        ids["art"],
        ids["denied"],
    ):  # the first polls: what is there starts nothing
        wait_for(
            lambda t=t: sql(
                pg_url, "SELECT primed FROM artifactpoll WHERE trigger_id = :t AND primed", t=t
            ),
            30,
            f"the first poll of {t}",
            interval=0.2,
        )
    return ids


def test_a_new_s3_object_starts_exactly_one_run_with_its_key(
    servers: list[Server], stored: dict[str, str], moto_url: str, pg_url: str
) -> None:
    s3 = boto3.client("s3", region_name=REGION, endpoint_url=moto_url)
    _several_polls(pg_url, stored["s3"])
    assert _runs(pg_url, stored["s3"]) == []  # web-1.0 was there at the first poll
    # When the CI system publishes a new build to the bucket
    s3.put_object(Bucket=stored["bucket"], Key="web/web-1.1.tar.gz", Body=b"two")
    s3.put_object(Bucket=stored["bucket"], Key="web/readme.txt", Body=b"not a build")
    # Then one of the two servers starts one run with the new key as the build
    runs = wait_for(lambda: _runs(pg_url, stored["s3"]), 30, "a run", interval=0.2)
    _several_polls(pg_url, stored["s3"])
    runs = _runs(pg_url, stored["s3"])
    assert len(runs) == 1, runs
    ex_id, plan = runs[0]
    assert "web/web-1.1.tar.gz" in plan
    report = httpx.get(
        f"{servers[1].url}/api/v1/executions/{ex_id}", headers=bearer(servers[1])
    ).json()
    assert report["status"] == "WAITING"
    assert "Deploy web/web-1.1.tar.gz?" in json.dumps(report)
    rows = sql(
        pg_url,
        "SELECT build, outcome, execution_id FROM artifactbuild WHERE trigger_id = :t "
        "ORDER BY build",
        t=stored["s3"],
    )
    assert [(r[0], r[1], r[2]) for r in rows] == [
        ("web/web-1.0.tar.gz", "seen", None),
        ("web/web-1.1.tar.gz", "started", ex_id),
    ]
    audit = sql(
        pg_url,
        "SELECT outcome FROM auditevent WHERE action = 'artifact-trigger' AND \"user\" = :u",
        u=f"trigger:{stored['s3']}",
    )
    assert [r[0] for r in audit] == ["started"]


def test_a_new_artifactory_file_starts_one_run_and_conditions_choose(
    servers: list[Server],
    stored: dict[str, str],
    repos: tuple[RepositoryApi, RepositoryApi],
    pg_url: str,
) -> None:
    good, _ = repos
    # a file the eventCondition does not hold for starts nothing
    good.add("releases/web/notes.txt")
    _several_polls(pg_url, stored["art"])
    assert _runs(pg_url, stored["art"]) == []
    # two new builds in one poll: the newest starts, the other is recorded as skipped
    good.add("releases/web/web-2.0.tar.gz", "releases/web/web-2.1.tar.gz")
    wait_for(lambda: _runs(pg_url, stored["art"]), 30, "a run", interval=0.2)
    _several_polls(pg_url, stored["art"])
    runs = _runs(pg_url, stored["art"])
    assert len(runs) == 1 and "web-2.1.tar.gz" in runs[0][1], runs
    rows = sql(
        pg_url,
        "SELECT build, outcome, detail FROM artifactbuild WHERE trigger_id = :t",
        t=stored["art"],
    )
    outcomes = {r[0]: (r[1], r[2]) for r in rows}
    assert outcomes["web-2.1.tar.gz"] == ("started", "")
    assert outcomes["web-2.0.tar.gz"] == (
        "skipped",
        "a newer build came in the same poll: web-2.1.tar.gz",
    )
    assert outcomes["notes.txt"] == ("skipped", "an eventCondition does not hold")


def test_vmfarm_triggers_shows_polls_builds_and_a_repositorys_error(
    servers: list[Server],
    stored: dict[str, str],
    repos: tuple[RepositoryApi, RepositoryApi],
    pg_url: str,
) -> None:
    made = httpx.post(
        servers[0].url + "/api/v1/tokens",
        headers=bearer(servers[0]),
        json={"name": "poll-test", "roles": ["admin"], "expires": "1d"},
    )
    assert made.status_code in (200, 201), made.text
    env = base_env(VMFARM_SERVER=servers[1].url, VMFARM_TOKEN=made.json()["token"], COLUMNS="250")
    wait_for(
        lambda: sql(
            pg_url,
            "SELECT error FROM artifactpoll WHERE trigger_id = :t AND error <> ''",
            t=stored["down"],
        ),
        30,
        "the refused poll",
        interval=0.2,
    )
    res = run_vmfarm("triggers", env=env)
    assert res.returncode == 0, res.stderr
    out = res.stdout
    down = out[out.index(stored["down"]) :].split("\n")[:2]
    assert "polls ArtifactoryRegistry releases/web" in down[0]
    assert "FAILED" in down[1] and "HTTP 401" in down[1], out
    art = out[out.index(stored["art"]) :]
    assert "started" in art and "web-2.1.tar.gz" in art
    listing = run_vmfarm("triggers", "-o", "json", env=env)
    rows = {t["id"]: t for t in json.loads(listing.stdout)}
    assert rows[stored["down"]]["kind"] == "artifact"
    assert "HTTP 401" in rows[stored["down"]]["poll"]["error"]
    assert rows[stored["down"]]["builds"] == [] and _runs(pg_url, stored["down"]) == []
    # the servers kept serving and polling the others
    assert all(httpx.get(s.url + "/api/health").status_code == 200 for s in servers)
    # and a webhook delivery to an artifact trigger: there is no such webhook
    hook = httpx.post(f"{servers[0].url}/api/v1/webhooks/{stored['art']}", content=b"{}")
    assert hook.status_code == 404


def test_an_artifact_trigger_naming_no_connector_is_refused_at_apply(
    servers: list[Server], stored: dict[str, str]
) -> None:
    text_ = (
        f"trigger:\n  name: x\n  identifier: dangling_{stored['art']}\n"
        f"  pipelineIdentifier: {stored['pipe']}\n  source:\n    type: Artifact\n    spec:\n"
        "      type: ArtifactoryRegistry\n      spec:\n        connectorRef: no_such_conn\n"
        "        repository: releases\n"
    )
    resp = httpx.post(
        servers[0].url + REG, headers=bearer(servers[0]), json={"files": {"t.yaml": text_}}
    )
    assert resp.status_code == 422, resp.text
    assert "t.yaml:10" in resp.text and "no_such_conn" in resp.text


def test_a_build_whose_run_is_refused_is_recorded_and_not_tried_again(
    servers: list[Server], stored: dict[str, str], moto_url: str, pg_url: str
) -> None:
    # trigger:<denied> is bound to no role: its new build is refused as any user's run is
    s3 = boto3.client("s3", region_name=REGION, endpoint_url=moto_url)
    s3.put_object(Bucket=stored["bucket"], Key="api/api-3.0.tar.gz", Body=b"api")
    rows = wait_for(
        lambda: sql(
            pg_url,
            "SELECT outcome, detail FROM artifactbuild WHERE trigger_id = :t AND build = :b "
            "AND outcome <> 'pending'",
            t=stored["denied"],
            b="api/api-3.0.tar.gz",
        ),
        30,
        "the refused build",
        interval=0.2,
    )
    assert rows[0][0] == "failed" and "missing permission pipeline:execute" in rows[0][1], rows
    _several_polls(pg_url, stored["denied"])
    assert _runs(pg_url, stored["denied"]) == []
    assert [
        r[0]
        for r in sql(
            pg_url,
            "SELECT outcome FROM artifactbuild WHERE trigger_id = :t AND build = :b",
            t=stored["denied"],
            b="api/api-3.0.tar.gz",
        )
    ] == ["failed"]  # not tried again
    audit = sql(
        pg_url,
        "SELECT outcome FROM auditevent WHERE action = 'artifact-trigger' AND \"user\" = :u",
        u=f"trigger:{stored['denied']}",
    )
    assert [r[0] for r in audit] == ["refused"]
    assert all(httpx.get(s.url + "/api/health").status_code == 200 for s in servers)
