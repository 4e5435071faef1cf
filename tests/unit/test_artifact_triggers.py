"""Artifact triggers without a server: Harness's ``source: {type: Artifact}`` document for
AmazonS3, ArtifactoryRegistry and Nexus3Registry, what is refused by name with file:line and
the field, the build's conditions, and the input set it fills (<+trigger.artifact.build>)."""

from __future__ import annotations

from pathlib import Path

import pytest

from app.errors import SpecError, SpecErrors
from app.triggers import inputs_of, load_text
from app.triggers.repository import Build, _literal_prefix, matches, newest

DATA = Path(__file__).resolve().parents[1] / "data" / "triggers"
GOOD = (DATA / "on_build.yaml").read_text()
WEBHOOK = (DATA / "on_publish.yaml").read_text()

S3 = """\
trigger:
  name: s3
  identifier: on_s3
  pipelineIdentifier: deploy_web
  source:
    type: Artifact
    spec:
      type: AmazonS3
      spec:
        connectorRef: aws_prod
        region: eu-west-1
        bucketName: releases
        filePathRegex: web/web-.*\\.tar\\.gz
"""

NEXUS = """\
trigger:
  name: nexus
  identifier: on_nexus
  pipelineIdentifier: deploy_web
  source:
    type: Artifact
    spec:
      type: Nexus3Registry
      spec:
        connectorRef: nexus
        repository: maven-releases
        repositoryFormat: maven
        groupId: com.acme
        artifactId: web
        extension: tar.gz
"""


def errors_of(text: str) -> list[SpecError]:
    with pytest.raises((SpecError, SpecErrors)) as info:
        load_text(text, "t.yaml")
    exc = info.value
    return exc.errors if isinstance(exc, SpecErrors) else [exc]  # type: ignore[union-attr]


def test_the_three_sources_load_as_harness_writes_them() -> None:
    art = load_text(GOOD, "on_build.yaml")[0]
    assert (art.kind, art.id, art.pipeline) == ("artifact", "on_build", "artifact_deploy")
    assert art.artifact.type == "ArtifactoryRegistry"
    assert art.artifact.spec.artifact_directory == "web"
    assert art.connector_line == 13 and art.conditions == []
    s3 = load_text(S3, "s3.yaml")[0]
    assert (s3.artifact.spec.bucket_name, s3.artifact.spec.region) == ("releases", "eu-west-1")
    nexus = load_text(NEXUS, "n.yaml")[0]
    assert (nexus.artifact.spec.group_id, nexus.artifact.spec.artifact_id) == ("com.acme", "web")
    raw = NEXUS.replace("repositoryFormat: maven", "repositoryFormat: raw").replace(
        "        groupId: com.acme\n        artifactId: web\n        extension: tar.gz\n",
        "        group: /web\n",
    )
    assert load_text(raw, "r.yaml")[0].artifact.spec.group == "/web"
    # and a webhook trigger is still one
    assert load_text(WEBHOOK, "w.yaml")[0].kind == "webhook"


def test_the_build_fills_the_input_set_as_a_runtime_input() -> None:
    art = load_text(GOOD, "on_build.yaml")[0]
    got = inputs_of(art.body.input_yaml, None, {}, source=art.source, build="web-1.4.2.tar.gz")
    assert got == {"pipeline.artifact_deploy.variables.version": "web-1.4.2.tar.gz"}
    hostile = "1.0'; touch /tmp/x ;'\nfoo: [bar"
    got = inputs_of(art.body.input_yaml, None, {}, source=art.source, build=hostile)
    assert list(got.values()) == [hostile]


@pytest.mark.parametrize(
    ("text", "old", "new", "field", "says"),
    [
        (GOOD, "type: ArtifactoryRegistry", "type: DockerRegistry", "spec.type", "not images"),
        (GOOD, "type: ArtifactoryRegistry", "type: Jenkins", "spec.type", "vmfarm polls"),
        (
            GOOD,
            "repositoryFormat: generic",
            "repositoryFormat: docker",
            "repositoryFormat",
            "generic",
        ),
        (
            GOOD,
            "        eventConditions:",
            "        artifactFilter: web/*.tgz\n        eventConditions:",
            "artifactFilter",
            "eventCondition on the build",
        ),
        (
            GOOD,
            "        eventConditions:",
            "        artifactPath: web-1.tgz\n        eventConditions:",
            "artifactPath",
            "leave artifactPath out",
        ),
        (
            GOOD,
            "        eventConditions:",
            "        jexlCondition: x\n        eventConditions:",
            "jexlCondition",
            "not supported",
        ),
        (
            GOOD,
            "        eventConditions:",
            "        metaDataConditions: [{key: a, operator: Equals, value: b}]\n"
            "        eventConditions:",
            "metaDataConditions",
            "not supported",
        ),
        (GOOD, "key: build", "key: <+trigger.payload.x>", "eventConditions[0].key", "key: build"),
        (GOOD, "operator: Regex", "operator: Like", "eventConditions[0].operator", "Regex"),
        (GOOD, "^web-.*\\.tar\\.gz$", "(a)\\1", "eventConditions[0]", "RE2"),
        (
            GOOD,
            "  enabled: true",
            "  enabled: true\n  encryptedWebhookSecretIdentifier: hook",
            "encryptedWebhookSecretIdentifier",
            "takes no deliveries",
        ),
        (
            GOOD,
            "<+trigger.artifact.build>",
            "<+trigger.payload.version>",
            "trigger.inputYaml",
            "no payload",
        ),
        (
            S3,
            "filePathRegex: web/web-.*\\.tar\\.gz",
            "filePathRegex: (?<=x)",
            "filePathRegex",
            "RE2",
        ),
        (S3, "bucketName: releases", "bucketName: <+input>", "bucketName", "fixed values"),
        (S3, "        bucketName: releases\n", "", "bucketName", "required"),
        (NEXUS, "repositoryFormat: maven", "repositoryFormat: npm", "repositoryFormat", "maven"),
        (NEXUS, "        artifactId: web\n", "", "trigger.source.spec", "artifactId"),
        (
            NEXUS,
            "        extension: tar.gz",
            "        extension: tar.gz\n        repositoryPort: '8181'",
            "repositoryPort",
            "not images",
        ),
        (NEXUS, "        extension: tar.gz", "        tag: v1.0", "tag", "leave tag out"),
        (
            WEBHOOK,
            "<+trigger.payload.release.version>",
            "<+trigger.artifact.build>",
            "trigger.inputYaml",
            "no artifact build",
        ),
    ],
)
def test_what_vmfarm_does_not_carry_out_is_refused_by_name_with_its_line(
    text: str, old: str, new: str, field: str, says: str
) -> None:
    assert old in text
    errs = errors_of(text.replace(old, new, 1))
    hit = [e for e in errs if field in e.field]
    assert hit, [f"{e} [{e.field}]" for e in errs]
    assert says in str(hit[0])
    assert hit[0].file == "t.yaml" and hit[0].line > 1


def test_conditions_and_the_newest_build() -> None:
    art = load_text(GOOD, "on_build.yaml")[0]
    conds = art.artifact.spec.event_conditions
    assert matches(conds, "web-1.0.tar.gz") and not matches(conds, "api-1.0.tar.gz")
    assert matches([], "anything")
    found = [Build("a", "2026-01-02T00:00:00Z"), Build("b", "2026-01-03T00:00:00Z"), Build("c", "")]
    assert newest(found) == Build("b", "2026-01-03T00:00:00Z")
    assert newest([Build("x"), Build("y")]) == Build("y")  # no times: the last listed
    assert newest([]) is None


@pytest.mark.parametrize(
    ("regex", "prefix"),
    [
        ("web/web-.*\\.tar\\.gz", "web/web-"),
        ("web/app-1\\.2", "web/app-1.2"),
        ("builds/v?1", "builds/"),
        (".*", ""),
        ("(a|b)/x", ""),
    ],
)
def test_an_s3_poll_lists_below_the_regexs_literal_prefix(regex: str, prefix: str) -> None:
    assert _literal_prefix(regex) == prefix


def _connector(ctype: str, url: str) -> object:
    from app.definitions.models.connector import ConnectorSpec

    key = {"Artifactory": "artifactoryServerUrl", "Nexus": "nexusServerUrl"}[ctype]
    return ConnectorSpec.model_validate(
        {
            "kind": "Connector",
            "metadata": {"name": ctype.lower()},
            "spec": {"type": ctype, "spec": {key: url, "auth": {"type": "Anonymous"}}},
        }
    ).spec


def test_the_http_repositories_are_read_through_their_listing_apis() -> None:
    """A small HTTP server stands in for Artifactory and Nexus 3 (tests/fakes/repository_api:
    their real APIs' answer shapes, Nexus's in pages)."""
    from app.artifacts import ArtifactError
    from app.triggers.repository import builds
    from tests.fakes.repository_api import RepositoryApi

    with RepositoryApi(page_size=2) as repo:
        for name in ("web-1.0.tar.gz", "web-1.1.tar.gz", "notes.txt"):
            repo.add(f"releases/web/{name}")
        repo.add("releases/other/web-9.tar.gz")
        for version in ("1.0", "1.1", "1.2"):
            repo.add_maven("maven-releases", "com.acme", "web", version, "tar.gz")
        repo.add_maven("maven-releases", "com.acme", "web", "7.0", "jar")
        art = load_text(GOOD, "on_build.yaml")[0].artifact
        found = builds(art, _connector("Artifactory", repo.url), "trigger on_build")
        assert [b.build for b in found] == ["web-1.0.tar.gz", "web-1.1.tar.gz", "notes.txt"]
        assert newest(found) == found[-1]
        nexus = load_text(NEXUS, "n.yaml")[0].artifact
        found = builds(nexus, _connector("Nexus", repo.url), "trigger on_nexus")
        assert [b.build for b in found] == ["1.0", "1.1", "1.2"]  # two pages; not the jar
        raw = load_text(
            NEXUS.replace("repositoryFormat: maven", "repositoryFormat: raw")
            .replace(
                "        groupId: com.acme\n        artifactId: web\n        extension: tar.gz\n",
                "        group: /web\n",
            )
            .replace("maven-releases", "releases"),
            "r.yaml",
        )[0].artifact
        found = builds(raw, _connector("Nexus", repo.url), "trigger on_raw")
        assert sorted(b.build for b in found) == ["notes.txt", "web-1.0.tar.gz", "web-1.1.tar.gz"]
        # a connector of another type, and a repository that refuses: the message says so
        with pytest.raises(ArtifactError, match="takes an Artifactory connector"):
            builds(art, _connector("Nexus", repo.url), "trigger on_build")
        repo.status = 401
        with pytest.raises(ArtifactError, match=r"HTTP 401.*the trigger's connector credentials"):
            builds(art, _connector("Artifactory", repo.url), "trigger on_build")


def test_an_interval_of_zero_turns_polling_off(monkeypatch: pytest.MonkeyPatch) -> None:
    import threading

    from app.server import poller

    polled = threading.Event()
    monkeypatch.setattr(poller, "poll_all", lambda rbac: polled.set())
    off = poller.Poller(lambda: None, 0).start()
    assert not polled.wait(0.3) and not off._thread.is_alive()
    on = poller.Poller(lambda: None, 30).start()
    try:
        assert polled.wait(5) and on._thread.daemon  # the first poll at once, then every 30 s
    finally:
        on.stop()


def test_a_poll_on_sqlite_primes_then_starts_the_newest_new_build_once(
    ledger: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The poller's bookkeeping on the SQLite ledger; the repository and the run are stand-ins
    here (the service lane polls real ones on PostgreSQL)."""
    from sqlmodel import select

    from app.artifacts import ArtifactAuthError
    from app.db import session_scope
    from app.models import ArtifactBuild, ArtifactPoll
    from app.server import poller
    from app.server.routes import executions
    from app.triggers import repository

    trig = load_text(GOOD, "on_build.yaml")[0]
    held: list[Build] = [Build("web-1.0.tar.gz", "2026-01-01")]
    started: list[dict[str, str]] = []
    monkeypatch.setattr(poller, "_connector", lambda ref: None)
    monkeypatch.setattr(repository, "builds", lambda art, conn, what: list(held))
    monkeypatch.setattr(
        executions,
        "start_run",
        lambda actor, files, pipeline, inputs, cfg: started.append(dict(inputs)) or "ex1",
    )

    def rows() -> dict[str, tuple[str, str | None]]:
        with session_scope() as s:
            found = s.exec(select(ArtifactBuild)).all()
            return {r.build: (r.outcome, r.execution_id) for r in found}

    assert poller.poll(trig, lambda: None) is None  # the first poll: recorded, nothing started
    assert rows() == {"web-1.0.tar.gz": ("seen", None)} and started == []
    held += [Build("web-1.1.tar.gz", "2026-01-02"), Build("web-1.2.tar.gz", "2026-01-03")]
    held.append(Build("notes.txt", "2026-01-04"))  # newest, but its condition does not hold
    assert poller.poll(trig, lambda: None) == "ex1"
    assert started == [{"pipeline.artifact_deploy.variables.version": "web-1.2.tar.gz"}]
    assert rows()["web-1.2.tar.gz"] == ("started", "ex1")
    assert rows()["web-1.1.tar.gz"][0] == rows()["notes.txt"][0] == "skipped"
    assert poller.poll(trig, lambda: None) is None and len(started) == 1  # seen again

    # a repository that refuses: recorded on the poll, nothing else changes
    def refuse(art: object, conn: object, what: str) -> list[Build]:
        raise ArtifactAuthError(f"artifact {what}: refused (HTTP 401)")

    monkeypatch.setattr(repository, "builds", refuse)
    assert poller.poll(trig, lambda: None) is None
    with session_scope() as s:
        state = s.get(ArtifactPoll, "on_build")
        assert state is not None and "HTTP 401" in state.error and state.ok_at is not None
