"""Connectors: both document shapes, every type's schema, credentials by secret reference only,
and connectorRef resolved at validate and plan alike (app.definitions.connectors)."""

from __future__ import annotations

import json
import textwrap
from pathlib import Path
from typing import Any

import pytest

from app.definitions.loader import choose_pipeline, load
from app.definitions.native import convert_text
from app.definitions.resolve import resolve
from app.errors import SpecError, SpecErrors

GOOD = Path(__file__).resolve().parents[1] / "data" / "good"

ARTIFACTORY_HARNESS = """\
connector:
  name: artifactory_connector
  identifier: artifactory_connector
  orgIdentifier: default
  projectIdentifier: web
  type: Artifactory
  spec:
    artifactoryServerUrl: https://acme.jfrog.io/artifactory
    auth:
      type: UsernamePassword
      spec:
        username: ci
        passwordRef: account.art_pw
"""
ARTIFACTORY_DOCUMENT = """\
apiVersion: v1
kind: Connector
metadata:
  name: artifactory_connector
  identifier: artifactory_connector
  orgIdentifier: default
  projectIdentifier: web
spec:
  type: Artifactory
  spec:
    artifactoryServerUrl: https://acme.jfrog.io/artifactory
    auth:
      type: UsernamePassword
      spec:
        username: ci
        passwordRef: account.art_pw
"""

# One valid connector of each type, as Harness writes them (the `connector:` body's type/spec).
VALID: dict[str, str] = {
    "Artifactory": """\
        type: Artifactory
        spec:
          artifactoryServerUrl: https://acme.jfrog.io/artifactory
          auth: {type: UsernamePassword, spec: {username: ci, passwordRef: art_pw}}
    """,
    "Nexus": """\
        type: Nexus
        spec:
          nexusServerUrl: https://nexus.acme.io
          version: 3.x
          auth: {type: UsernamePassword, spec: {usernameRef: nexus_user, passwordRef: nx_pw}}
    """,
    "Http": """\
        type: Http
        spec:
          url: https://downloads.acme.io/releases
          auth: {type: Anonymous}
    """,
    "HttpHelmRepo": """\
        type: HttpHelmRepo
        spec:
          helmRepoUrl: https://charts.acme.io
          auth: {type: UsernamePassword, spec: {username: ci, passwordRef: helm_pw}}
    """,
    "Aws": """\
        type: Aws
        spec:
          credential:
            type: ManualConfig
            spec: {accessKey: AKIAEXAMPLE, secretKeyRef: account.aws_sk}
          executeOnDelegate: true
    """,
    "Azure": """\
        type: Azure
        spec:
          credential:
            type: ManualConfig
            spec:
              applicationId: app-id
              tenantId: tenant-id
              auth: {type: Secret, spec: {secretRef: azure_secret}}
          azureEnvironmentType: AZURE
    """,
    "Gcp": """\
        type: Gcp
        spec:
          credential: {type: InheritFromDelegate}
    """,
    "Git": """\
        type: Git
        spec:
          url: https://git.acme.io/org
          connectionType: Account
          validationRepo: infra
          branchName: main
          type: Http
          spec: {username: ci, passwordRef: git_token}
    """,
}


def connector(body: str, name: str = "conn") -> str:
    return f"connector:\n  name: {name}\n  identifier: {name}\n" + textwrap.indent(
        textwrap.dedent(body), "  "
    )


def load_text(tmp_path: Path, text: str, name: str = "connectors.yaml") -> Any:
    path = tmp_path / name
    path.write_text(text)
    return load([path])


def refusals(tmp_path: Path, *texts: tuple[str, str]) -> list[SpecError]:
    paths = []
    for name, text in texts:
        (tmp_path / name).write_text(text)
        paths.append(tmp_path / name)
    with pytest.raises((SpecError, SpecErrors)) as exc:
        load(paths)
    return exc.value.errors if isinstance(exc.value, SpecErrors) else [exc.value]


def line_of(text: str, needle: str) -> int:
    return next(i for i, line in enumerate(text.split("\n"), 1) if needle in line)


# --- the two shapes ------------------------------------------------------------------------------


def test_harness_shape_and_document_shape_are_the_same_connector(tmp_path: Path) -> None:
    a = load_text(tmp_path, ARTIFACTORY_HARNESS, "a.yaml").connectors["artifactory_connector"]
    b = load_text(tmp_path, ARTIFACTORY_DOCUMENT, "b.yaml").connectors["artifactory_connector"]
    assert a.model.model_dump() == b.model.model_dump()
    assert a.model.spec.type == "Artifactory"
    assert a.model.spec.spec.auth.spec.password_ref == "account.art_pw"
    assert a.model.metadata.project_identifier == "web"


def test_vmfarm_convert_turns_one_shape_into_the_other() -> None:
    assert convert_text(ARTIFACTORY_HARNESS, "vmfarm").strip() == ARTIFACTORY_DOCUMENT.strip()
    assert convert_text(ARTIFACTORY_DOCUMENT, "harness").strip() == ARTIFACTORY_HARNESS.strip()


@pytest.mark.parametrize("ctype", sorted(VALID))
def test_every_connector_type_loads(tmp_path: Path, ctype: str) -> None:
    bundle = load_text(tmp_path, connector(VALID[ctype]))
    assert bundle.connectors["conn"].model.spec.type == ctype


# --- every type's schema -------------------------------------------------------------------------


@pytest.mark.parametrize("ctype", sorted(VALID))
def test_an_unknown_field_of_any_connector_type_is_refused_where_it_is(
    tmp_path: Path, ctype: str
) -> None:
    text = connector(VALID[ctype]).rstrip("\n") + "\n    tlsVerify: false\n"
    (err,) = refusals(tmp_path, ("c.yaml", text))
    assert "unknown field 'tlsVerify'" in err.message
    assert err.line == line_of(text, "tlsVerify")
    assert err.field == "connector.spec.tlsVerify"


@pytest.mark.parametrize(
    ("ctype", "written", "ref"),
    [
        ("Artifactory", "passwordRef: art_pw", "password: hunter2"),
        ("Nexus", "passwordRef: nx_pw", "password: hunter2"),
        ("HttpHelmRepo", "passwordRef: helm_pw", "password: hunter2"),
        ("Aws", "secretKeyRef: account.aws_sk", "secretKey: wJalrXUtnFEMI"),
        ("Git", "passwordRef: git_token", "password: ghp_abc"),
    ],
)
def test_a_secret_written_in_a_connector_is_refused_naming_the_ref_to_write(
    tmp_path: Path, ctype: str, written: str, ref: str
) -> None:
    text = connector(VALID[ctype].replace(written, f"{written}, {ref}"))
    errs = refusals(tmp_path, ("c.yaml", text))
    assert any(
        "a secret written in the file is refused" in e.message
        and written.split(":")[0] in e.message
        for e in errs
    ), [str(e) for e in errs]
    assert all("hunter2" not in str(e) and "wJalr" not in str(e) for e in errs)


@pytest.mark.parametrize(
    ("body", "says"),
    [
        (
            """\
        type: Azure
        spec:
          credential:
            type: ManualConfig
            spec: {applicationId: a, tenantId: t, clientSecret: s3cret,
                   auth: {type: Secret, spec: {secretRef: az}}}
     """,
            "secretRef: <secret id>",
        ),
        (
            """\
        type: Gcp
        spec:
          credential: {type: ManualConfig, spec: {secretKey: '{"private_key": "x"}'}}
     """,
            "secretKeyRef: <secret id>",
        ),
        (
            """\
        type: Artifactory
        spec:
          artifactoryServerUrl: http://acme.local/artifactory
          auth: {type: UsernamePassword, spec: {username: ci, passwordRef: art_pw}}
     """,
            "credentials are sent over https only",
        ),
        (
            """\
        type: Artifactory
        spec:
          artifactoryServerUrl: https://ci:hunter2@acme.local/artifactory
     """,
            "a user or password in the URL is refused",
        ),
        (
            """\
        type: Aws
        spec:
          credential: {type: ManualConfig, spec: {accessKey: AKIA, secretKeyRef: '<+input>'}}
     """,
            "names a secret by its id",
        ),
        (
            """\
        type: Aws
        spec:
          credential: {type: InheritFromDelegate}
          executeOnDelegate: false
     """,
            "executeOnDelegate: false is not supported",
        ),
        (
            """\
        type: Gcp
        spec:
          credential: {type: InheritFromDelegate}
          delegateSelectors: [gcp]
     """,
            "delegateSelectors on a connector are not supported",
        ),
        (
            """\
        type: Aws
        spec:
          credential:
            type: InheritFromDelegate
            crossAccountAccess: {crossAccountRoleArn: 'arn:aws:iam::1:role/x'}
     """,
            "crossAccountAccess (assuming a role) is not supported",
        ),
        (
            """\
        type: Git
        spec: {url: 'git@git.acme.io:org/repo.git', type: Ssh, spec: {username: git}}
     """,
            "type Ssh needs spec.sshKeyRef",
        ),
    ],
)
def test_connector_settings_vmfarm_cannot_carry_out_safely_are_refused(
    tmp_path: Path, body: str, says: str
) -> None:
    errs = refusals(tmp_path, ("c.yaml", connector(body)))
    assert any(says in e.message for e in errs), [str(e) for e in errs]
    assert all("hunter2" not in str(e) and "s3cret" not in str(e) for e in errs)


def test_a_connector_at_the_top_is_no_longer_pointed_elsewhere(tmp_path: Path) -> None:
    bundle = load_text(tmp_path, connector(VALID["Git"], "infra_repo"))
    assert sorted(bundle.connectors) == ["infra_repo"]


# --- connectorRef resolved -----------------------------------------------------------------------


def good_files(tmp_path: Path, service: str, extra: str = "") -> list[Path]:
    """tests/data/good with its service replaced, and ``extra`` documents."""
    out = []
    for name in ("environment.yaml", "infrastructure.yaml", "pipeline.yaml"):
        out.append(tmp_path / name)
        out[-1].write_text((GOOD / name).read_text())
    (tmp_path / "service.yaml").write_text(service)
    (tmp_path / "connectors.yaml").write_text(
        extra or "connector:\n  name: x\n  type: Http\n  spec: {url: 'https://x.example'}\n"
    )
    return [*out, tmp_path / "service.yaml", tmp_path / "connectors.yaml"]


def service(atype: str, spec: str) -> str:
    return (
        "apiVersion: v1\nkind: Service\nmetadata: {name: hello-app, identifier: hello_app}\n"
        "spec:\n  serviceDefinition:\n    type: Ssh\n    spec:\n      artifacts:\n"
        f"        primary:\n          type: {atype}\n          spec:\n"
        + textwrap.indent(textwrap.dedent(spec), " " * 12)
        + "      variables:\n        - {name: app_port, type: String, value: '8080'}\n"
        "        - {name: greeting, type: String, value: hi}\n"
    )


def planned(files: list[Path]) -> dict[str, Any]:
    bundle = load(files, inputs={"tag": "1.2.3"}, require_inputs=True)
    plan: dict[str, Any] = resolve(
        bundle, choose_pipeline(bundle, None), execution_id="EX1"
    ).to_json()
    return plan


def test_an_unknown_connector_ref_is_refused_at_validate_where_it_is_written(
    tmp_path: Path,
) -> None:
    svc = service(
        "Artifactory",
        "connectorRef: artifactory_conector\nartifactPath: apps/x.tgz\n"
        "tag: <+input>\nallowUnverified: true\n",
    )
    files = good_files(tmp_path, svc, ARTIFACTORY_HARNESS)
    with pytest.raises((SpecError, SpecErrors)) as exc:
        load(files)  # validate: the tag is still a runtime input
    errs = exc.value.errors if isinstance(exc.value, SpecErrors) else [exc.value]
    (err,) = errs
    assert err.file == str(tmp_path / "service.yaml")
    assert err.line == line_of(svc, "connectorRef")
    assert err.field == "spec.serviceDefinition.spec.artifacts.primary.spec.connectorRef"
    assert "Connector 'artifactory_conector' is not defined" in err.message
    assert "did you mean 'artifactory_connector'?" in err.message


def test_a_connector_of_the_wrong_type_is_refused_where_it_is_named(tmp_path: Path) -> None:
    svc = service("Artifactory", "connectorRef: repo\nartifactPath: apps/x.tgz\ntag: <+input>\n")
    errs = refusals(tmp_path, ("service.yaml", svc), ("c.yaml", connector(VALID["Git"], "repo")))
    assert any(
        "connector 'repo' is a Git connector; an Artifactory artifact takes an "
        "Artifactory connector"
        in e.message
        and e.line == line_of(svc, "connectorRef")
        for e in errs
    ), [str(e) for e in errs]


def test_the_plan_fetches_artifactory_from_the_connectors_server_by_secret_reference(
    tmp_path: Path,
) -> None:
    svc = service(
        "Artifactory",
        "connectorRef: account.artifactory_connector\n"
        "artifactPath: libs/web/\nfileName: web-<+artifact.tag>.tgz\n"
        "tag: <+input>\nallowUnverified: true\n",
    )
    plan = planned(good_files(tmp_path, svc, ARTIFACTORY_HARNESS))
    spec = plan["stages"][0]["artifact"]["spec"]
    assert spec["baseUrl"] == "https://acme.jfrog.io/artifactory"
    assert (spec["username"], spec["passwordRef"]) == ("ci", "account.art_pw")
    from app.artifacts.sources import resolve as source_of

    src = source_of(plan["stages"][0]["artifact"], require_secrets=False)
    assert src.url == "https://acme.jfrog.io/artifactory/libs/web/web-1.2.3.tgz"


def test_nexus_and_http_connectors_build_their_urls(tmp_path: Path) -> None:
    from app.artifacts.sources import resolve as source_of

    nexus = service(
        "Nexus3Registry",
        "connectorRef: conn\nrepository: releases\n"
        "artifactPath: web/web-<+artifact.tag>.tgz\n"
        "tag: <+input>\nsha256: " + "a" * 64 + "\n",
    )
    plan = planned(good_files(tmp_path, nexus, connector(VALID["Nexus"])))
    art = plan["stages"][0]["artifact"]
    assert art["spec"]["username"] == '<+secrets.getValue("nexus_user")>'
    assert (
        source_of(art, require_secrets=False).url
        == "https://nexus.acme.io/repository/releases/web/web-1.2.3.tgz"
    )
    http = service(
        "Http",
        "connectorRef: conn\nartifactPath: /web/<+artifact.tag>/web.tgz\n"
        "tag: <+input>\nallowUnverified: true\n",
    )
    plan = planned(good_files(tmp_path, http, connector(VALID["Http"])))
    assert (
        source_of(plan["stages"][0]["artifact"], require_secrets=False).url
        == "https://downloads.acme.io/releases/web/1.2.3/web.tgz"
    )


def test_an_artifact_naming_a_connector_takes_neither_a_url_nor_credentials(tmp_path: Path) -> None:
    svc = service(
        "Artifactory",
        "connectorRef: artifactory_connector\n"
        "url: https://other.example/x.tgz\npasswordRef: other\n"
        "tag: <+input>\n",
    )
    errs = refusals(tmp_path, ("service.yaml", svc), ("c.yaml", ARTIFACTORY_HARNESS))
    says = {e.message.split(":")[0] for e in errs}
    assert "'url' next to connectorRef" in says and "'passwordRef' next to connectorRef" in says


def test_validate_and_plan_agree_on_an_artifact_the_connector_cannot_locate(tmp_path: Path) -> None:
    """Nexus needs a repository: validate says so, with the tag still a runtime input."""
    svc = service(
        "Nexus3Registry",
        "connectorRef: conn\nartifactPath: web.tgz\ntag: <+input>\nallowUnverified: true\n",
    )
    files = good_files(tmp_path, svc, connector(VALID["Nexus"]))
    with pytest.raises(SpecError, match=r"spec\.repository is required") as exc:
        load(files)
    assert exc.value.file == str(tmp_path / "service.yaml")


def cloud_infra(ref_field: str, ref: str, provider: str) -> str:
    spec = {
        "aws": "region: us-east-1",
        "azure": "subscriptionId: sub\n    resourceGroup: rg",
        "gcp": "project: p\n    zone: us-central1-a",
    }[provider]
    itype = {"aws": "SshWinRmAws", "azure": "SshWinRmAzure", "gcp": "SshWinRmGcp"}[provider]
    return (
        f"apiVersion: v1\nkind: Infrastructure\nmetadata: {{name: cloud}}\nspec:\n"
        f"  environmentRef: test_env\n  type: {itype}\n  spec:\n    {ref_field}: {ref}\n"
        f"    {spec}\n"
    )


@pytest.mark.parametrize(
    ("provider", "ctype", "credential"),
    [
        (
            "aws",
            "Aws",
            {"type": "ManualConfig", "accessKey": "AKIAEXAMPLE", "secretKeyRef": "account.aws_sk"},
        ),
        (
            "azure",
            "Azure",
            {
                "type": "ManualConfig",
                "applicationId": "app-id",
                "tenantId": "tenant-id",
                "secretRef": "azure_secret",
            },
        ),
        ("gcp", "Gcp", {"type": "InheritFromDelegate"}),
    ],
)
def test_a_cloud_infrastructure_carries_its_connectors_secret_ids_into_the_plan(
    tmp_path: Path, provider: str, ctype: str, credential: dict[str, str]
) -> None:
    files = good_files(
        tmp_path, (GOOD / "service.yaml").read_text(), connector(VALID[ctype], "cloud_conn")
    )
    (tmp_path / "infrastructure.yaml").write_text(
        cloud_infra("cloudProviderRef", "account.cloud_conn", provider)
    )
    (GOOD / "app").exists()
    (tmp_path / "app").symlink_to(GOOD / "app")
    text = (tmp_path / "pipeline.yaml").read_text().replace("test_hosts", "cloud")
    (tmp_path / "pipeline.yaml").write_text(text)
    plan = planned(files)
    (infra,) = plan["stages"][0]["infrastructures"]
    assert infra["provider"] == provider
    assert infra["connector"] == {
        "identifier": "cloud_conn",
        "type": ctype,
        "credential": credential,
    }
    assert "hunter2" not in json.dumps(plan)


@pytest.mark.parametrize(
    ("infra", "says"),
    [
        (
            cloud_infra("connectorRef", "gcp_conector", "gcp"),
            "Connector 'gcp_conector' is not defined in the given files; did you mean 'gcp_conn'?",
        ),
        (
            cloud_infra("connectorRef", "gcp_conn", "aws"),
            "connector 'gcp_conn' is a Gcp connector; an AWS infrastructure takes an Aws connector",
        ),
    ],
)
def test_an_infrastructures_connector_must_exist_and_fit(
    tmp_path: Path, infra: str, says: str
) -> None:
    errs = refusals(
        tmp_path,
        ("environment.yaml", (GOOD / "environment.yaml").read_text()),
        ("infra.yaml", infra),
        ("c.yaml", connector(VALID["Gcp"], "gcp_conn")),
    )
    (err,) = errs
    assert says in err.message
    assert (err.file, err.line) == (str(tmp_path / "infra.yaml"), line_of(infra, "connectorRef"))
    assert err.field == "spec.spec.connectorRef"


def test_a_git_connector_is_taken_by_nothing_yet(tmp_path: Path) -> None:
    """Terraform steps will read it; until then an artifact naming it is refused."""
    svc = service("Http", "connectorRef: repo\nartifactPath: x.tgz\ntag: <+input>\n")
    errs = refusals(tmp_path, ("service.yaml", svc), ("c.yaml", connector(VALID["Git"], "repo")))
    assert any("is a Git connector" in e.message for e in errs)


def test_an_s3_artifact_takes_an_aws_connectors_keys_by_reference(tmp_path: Path) -> None:
    svc = service(
        "AmazonS3",
        "connectorRef: conn\nbucketName: builds\n"
        "filePath: web/<+artifact.tag>/web.tgz\ntag: <+input>\n",
    )
    plan = planned(good_files(tmp_path, svc, connector(VALID["Aws"])))
    spec = plan["stages"][0]["artifact"]["spec"]
    assert (spec["accessKey"], spec["secretKeyRef"]) == ("AKIAEXAMPLE", "account.aws_sk")
    svc = service(
        "AmazonS3", "connectorRef: conn\nbucketName: builds\nfilePath: w.tgz\ntag: <+input>\n"
    )
    errs = refusals(tmp_path, ("service.yaml", svc), ("c.yaml", connector(VALID["Gcp"])))
    assert any("an AmazonS3 artifact takes an Aws connector" in e.message for e in errs)


# --- the worker's side: a cloud connector's secrets resolved where discovery runs ----------------


def test_the_discovering_worker_resolves_a_manual_connectors_secrets(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from app import secrets
    from app.errors import DiscoveryError
    from app.providers import azure
    from app.providers.base import connector_credential

    infra = {
        "identifier": "web",
        "connector": {
            "identifier": "az",
            "type": "Azure",
            "credential": {
                "type": "ManualConfig",
                "applicationId": "app-id",
                "tenantId": "tenant-id",
                "secretRef": "account.az_secret",
            },
        },
    }
    monkeypatch.setenv("VMFARM_SECRETS", "env")
    monkeypatch.setenv("VMFARM_SECRET_AZ_SECRET", "az-secret-value")
    for key in ("AZURE_TENANT_ID", "AZURE_CLIENT_ID", "AZURE_CLIENT_SECRET"):
        monkeypatch.delenv(key, raising=False)
    secrets.reset()
    try:
        manual = connector_credential(infra)
        assert manual == {
            "type": "ManualConfig",
            "applicationId": "app-id",
            "tenantId": "tenant-id",
            "secret": "az-secret-value",
        }
        cred = azure.make_credential(manual)
        assert type(cred).__name__ == "ClientSecretCredential"
        assert (
            connector_credential(
                {
                    **infra,
                    "connector": {
                        "identifier": "az",
                        "type": "Azure",
                        "credential": {"type": "InheritFromDelegate"},
                    },
                }
            )
            is None
        )
        monkeypatch.delenv("VMFARM_SECRET_AZ_SECRET")
        secrets.reset()
        with pytest.raises(DiscoveryError) as info:
            connector_credential(infra)
        assert info.value.error_class == "Authentication"
        assert "secretRef 'account.az_secret'" in str(info.value)
    finally:
        secrets.reset()
