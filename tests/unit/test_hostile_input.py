"""Hostile and careless pipeline files are refused at load, quickly, naming file:line and the
field: YAML bombs, runaway nesting and size, catastrophic .regex() inputs, keys that free-form
maps would have dropped in silence, phase fields that contradict the stage, and the test-only
Noop connection. Each case runs ``vmfarm validate`` in-process, as a user would.

No test here measures time: a case that hung would be stopped by its timeout marker.
"""

from __future__ import annotations

import textwrap
from pathlib import Path

import pytest
from click.testing import CliRunner, Result

from app.definitions import yamlload
from app.definitions.yamlload import MAX_FILE_BYTES, load_documents
from app.errors import SpecError
from cli.main import main

SERVICE = """\
apiVersion: v1
kind: Service
metadata: {name: web}
spec:
  serviceDefinition:
    type: SSH
    spec:
      artifacts:
        primary:
          type: %(atype)s
          spec:
%(aspec)s
"""
ENVIRONMENT = """\
apiVersion: v1
kind: Environment
metadata: {name: prod}
spec: {type: PreProduction}
"""
STATIC = """\
apiVersion: v1
kind: Infrastructure
metadata: {name: hosts, identifier: hosts}
spec:
  environmentRef: prod
  type: Pdc
  spec:
    connection: {type: %(ctype)s}
    hosts: [{hostname: 10.0.0.1}]
"""
AWS = """\
apiVersion: v1
kind: Infrastructure
metadata: {name: hosts, identifier: hosts}
spec:
  environmentRef: prod
  type: SshWinRmAws
  spec:
    region: us-east-1
    hostFilter:
      type: AwsInstanceFilter
      spec:
%(fspec)s
"""
PIPELINE = """\
apiVersion: v1
kind: Pipeline
metadata: {name: deploy}
spec:
  stages:
    - stage:
        name: Deploy
        identifier: deploy
        type: Deployment
        spec:
          service: {serviceRef: web}
          environment: {environmentRef: prod, infrastructureDefinitions: [{identifier: hosts}]}
          rolloutDeployment:
            phases:
              - phase:
                  name: Phase 1
%(phase)s
                  instanceCount: "50%%"
                  instanceUnitType: PERCENTAGE
              - phase:
                  name: Phase 2
                  instanceCount: "100%%"
                  instanceUnitType: PERCENTAGE
          execution:
            steps:
              - step:
                  type: Command
                  name: Hello
                  identifier: hello
                  spec:
                    commandUnits:
                      - identifier: hello
                        type: Script
                        spec: {source: {type: Inline, spec: {script: echo hello}}}
"""


def indent(text: str, spaces: int) -> str:
    return textwrap.indent(textwrap.dedent(text).strip("\n"), " " * spaces)


def files(
    tmp_path: Path,
    *,
    atype: str = "Http",
    aspec: str = "url: https://example.com/web-<+artifact.tag>.tgz\ntag: 1.0",
    infra: str | None = None,
    phase: str = "deploymentType: SSH",
) -> list[str]:
    """A valid set of files, with one part replaced."""
    docs = {
        "service.yaml": SERVICE % {"atype": atype, "aspec": indent(aspec, 12)},
        "environment.yaml": ENVIRONMENT,
        "infrastructure.yaml": infra or STATIC % {"ctype": "SSH"},
        "pipeline.yaml": PIPELINE % {"phase": indent(phase, 18)},
    }
    for name, text in docs.items():
        (tmp_path / name).write_text(text)
    return [str(tmp_path / name) for name in docs]


def validate(*args: str) -> Result:
    return CliRunner().invoke(main, ["validate", *args], env={"COLUMNS": "10000", "NO_COLOR": "1"})


def line_of(path: str, needle: str) -> int:
    lines = Path(path).read_text().splitlines()
    return next(i for i, line in enumerate(lines, 1) if needle in line)


def assert_refused(res: Result, path: str, needle: str, *words: str) -> None:
    """Exit 2, and an error at ``path``:<the line holding needle>: saying every word."""
    assert res.exit_code == 2, res.output
    where = f"{path}:{line_of(path, needle)}:"
    errors = [line for line in res.output.splitlines() if line.startswith(f"error: {where}")]
    assert errors, f"no error at {where} in:\n{res.output}"
    assert any(all(w in e for w in words) for e in errors), res.output


def test_the_valid_files_load(tmp_path: Path) -> None:
    res = validate(*files(tmp_path))
    assert res.exit_code == 0, res.output


# --- YAML limits -----------------------------------------------------------------------------

BOMB = """\
a: &a ["lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol"]
b: &b [*a, *a, *a, *a, *a, *a, *a, *a, *a]
c: &c [*b, *b, *b, *b, *b, *b, *b, *b, *b]
d: &d [*c, *c, *c, *c, *c, *c, *c, *c, *c]
e: &e [*d, *d, *d, *d, *d, *d, *d, *d, *d]
f: &f [*e, *e, *e, *e, *e, *e, *e, *e, *e]
g: &g [*f, *f, *f, *f, *f, *f, *f, *f, *f]
h: &h [*g, *g, *g, *g, *g, *g, *g, *g, *g]
i: &i [*h, *h, *h, *h, *h, *h, *h, *h, *h]
"""


@pytest.fixture(params=["libyaml", "pure-python"])
def parser(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """Both of the loader's parsers: libyaml's (when PyYAML has it), and PyYAML's own, the one
    every error is reported with."""
    if request.param == "pure-python":
        monkeypatch.setattr(yamlload, "_FAST", None)
    elif yamlload._FAST is None:
        pytest.fail("PyYAML was built without libyaml")
    return str(request.param)


@pytest.mark.timeout(30)
def test_a_billion_laughs_is_refused_at_the_alias_that_overflows(
    tmp_path: Path, parser: str
) -> None:
    bomb = tmp_path / "bomb.yaml"
    bomb.write_text(BOMB)
    assert bomb.stat().st_size < 500
    res = validate(str(bomb))
    # f: expands 9 x 9^5 values: the first alias there passes the limit of copied values
    assert_refused(
        res, str(bomb), "f: &f", "YAML aliases copy more than 100,000 values", "MAX_ALIAS_NODES"
    )


@pytest.mark.timeout(30)
@pytest.mark.parametrize(
    "text",
    [
        "a: " + "[" * 5000 + "]" * 5000 + "\n",
        "- " * 5000 + "x\n",
        "a:\n" + "".join(" " * i + f"k{i}:\n" for i in range(1, 200)),
    ],
)
def test_values_nested_too_deep_are_refused(tmp_path: Path, parser: str, text: str) -> None:
    deep = tmp_path / "deep.yaml"
    deep.write_text(text)
    with pytest.raises(SpecError) as exc:
        load_documents(deep.read_text(), str(deep))
    assert "nested more than 64 deep (limit MAX_DEPTH)" in exc.value.message
    assert exc.value.line >= 1 and exc.value.file == str(deep)


@pytest.mark.timeout(30)
def test_many_aliases_to_one_anchor_are_refused(tmp_path: Path) -> None:
    many = tmp_path / "many.yaml"
    many.write_text("a: &x 1\nb: [" + ", ".join(["*x"] * 10_001) + "]\n")
    res = validate(str(many))
    assert_refused(res, str(many), "b: [", "more than 10,000 YAML aliases", "MAX_ALIASES")


@pytest.mark.timeout(30)
def test_a_file_beyond_the_size_limit_is_refused_before_it_is_read(tmp_path: Path) -> None:
    big = tmp_path / "big.yaml"
    with big.open("w") as fh:
        fh.write("# " + "x" * (MAX_FILE_BYTES - 1) + "\n")
    res = validate(str(big))
    assert res.exit_code == 2, res.output
    assert f"error: {big}:1:" in res.output and "MAX_FILE_BYTES" in res.output


def test_anchors_and_merge_keys_within_the_limits_still_load(tmp_path: Path) -> None:
    paths = files(tmp_path, aspec="url: &u https://example.com/web-<+artifact.tag>.tgz\ntag: 1.0")
    env = Path(paths[1])
    env.write_text(
        "apiVersion: v1\nkind: Environment\nmetadata: {name: prod}\n"
        "spec:\n  base: &base {type: PreProduction}\n  <<: *base\n"
    )
    res = validate(*paths)
    assert res.exit_code == 2  # 'base' is not a field: the merge was read, the key checked
    assert "unknown field 'base'" in res.output
    env.write_text(
        "apiVersion: v1\nkind: Environment\nmetadata: &m {name: prod}\n"
        "spec: {type: PreProduction, tags: {x: &v one, y: *v}}\n"
    )
    assert validate(*paths).exit_code == 0


# --- .regex() runtime inputs ---------------------------------------------------------------

REGEX_SERVICE = """\
apiVersion: v1
kind: Service
metadata: {name: web}
spec:
  serviceDefinition:
    type: SSH
    spec:
      variables:
        - name: version
          type: String
          value: <+input>.regex(%s)
"""


@pytest.mark.timeout(30)
@pytest.mark.parametrize("pattern", ["(a+)+$", "(a|aa)+$", "(a*)*b", "^(\\w+\\s?)*$"])
@pytest.mark.parametrize("length", [40, 60])
def test_a_catastrophic_pattern_answers_in_linear_time(
    tmp_path: Path, pattern: str, length: int
) -> None:
    svc = tmp_path / "service.yaml"
    svc.write_text(REGEX_SERVICE % pattern)
    res = validate(str(svc), "--set", f"version={'a' * length}!")
    assert_refused(res, str(svc), "<+input>", "does not match", pattern)
    assert validate(str(svc), "--set", "version=aaaa").exit_code == (
        0 if pattern != "(a*)*b" else 2
    )


@pytest.mark.parametrize(
    ("pattern", "why"), [("(a)\\1", "backreferences"), ("v(?=1)", "look-around")]
)
def test_a_pattern_re2_cannot_run_is_refused_at_load_without_any_value(
    tmp_path: Path, pattern: str, why: str
) -> None:
    svc = tmp_path / "service.yaml"
    svc.write_text(REGEX_SERVICE % pattern)
    res = validate(str(svc))
    assert_refused(
        res, str(svc), "<+input>", f"<+input>.regex({pattern}) cannot be used", why, "RE2"
    )


# --- every map is a schema ------------------------------------------------------------------


def test_a_misspelt_checksum_key_is_an_error_with_a_suggestion(tmp_path: Path) -> None:
    paths = files(
        tmp_path, aspec="url: https://example.com/web.tgz\ntag: 1.0\nsha256sum: " + "0" * 64
    )
    res = validate(*paths)
    assert_refused(
        res,
        paths[0],
        "sha256sum:",
        "unknown field 'sha256sum'",
        "did you mean 'sha256'?",
        "artifacts.primary.spec.sha256sum",
    )


@pytest.mark.parametrize(
    ("atype", "aspec", "needle", "words"),
    [
        (
            "Local",
            "path: ./app\ntag: 1.0\nurl: https://x/y",
            "url:",
            ["unknown field 'url' in a Local artifact's spec"],
        ),
        (
            "AmazonS3",
            "bucket: b\nkey: k.tgz\nbucketname: c",
            "bucketname",
            ["did you mean 'bucketName'?"],
        ),
        (
            "Nexus3Registry",
            "baseUrl: https://n\nrepository: r\nrepositoryFormat: docker\nartifactPath: a.tgz",
            "repositoryFormat",
            ["not supported", "raw"],
        ),
        (
            "Nexus3Registry",
            "baseUrl: https://n\nrepository: r\nrepositoryFormat: raw\n"
            "spec: {groupId: com.acme, artifactId: web}",
            "repositoryFormat",
            ["maven path"],
        ),
        (
            "Artifactory",
            "url: https://a/x.tgz\nconnectorRef: art",
            "url:",
            ["'url' next to connectorRef", "the connector names the server"],
        ),
        (
            "Artifactory",
            "connectorRef: art\nartifactPath: a/x.tgz\npasswordRef: pw",
            "passwordRef",
            ["the connector gives the credentials"],
        ),
        (
            "Jenkins",
            "jobName: j\nartifactPath: a.tgz\nconnectorRef: art",
            "connectorRef",
            ["not supported for a Jenkins artifact"],
        ),
        # Secrets are named, never written: a value in the file would be stored with every plan.
        (
            "Http",
            "url: https://a/x.tgz\nusername: u\npassword: hunter2",
            "password:",
            ["a password written in the file is refused", "passwordRef: <secret id>"],
        ),
        (
            "Jenkins",
            "url: https://a/x.tgz\ntoken: <+input>",
            "token:",
            ["a token written in the file is refused", "tokenRef"],
        ),
        (
            "Artifactory",
            "url: https://u:hunter2@a/x.tgz",
            "url:",
            ["a password in url is refused", "passwordRef"],
        ),
        # Credentials go over https only.
        (
            "Http",
            "url: http://a/x.tgz\nusername: u\npasswordRef: pw",
            "url:",
            ["credentials are sent over https only", "use an https:// URL"],
        ),
        (
            "Nexus3Registry",
            "baseUrl: http://n\nrepository: r\nartifactPath: a.tgz\ntokenRef: t",
            "baseUrl:",
            ["credentials are sent over https only"],
        ),
        # allowUnverified is a real switch of remote artifacts, and only of those.
        (
            "Http",
            "url: https://a/x.tgz\nallowUnverified: yes please",
            "allowUnverified",
            ["allowUnverified must be true or false"],
        ),
        (
            "Local",
            "path: ./app\ntag: 1.0\nallowUnverified: true",
            "allowUnverified",
            ["unknown field 'allowUnverified' in a Local artifact's spec"],
        ),
    ],
)
def test_artifact_specs_are_checked_per_type(
    tmp_path: Path, atype: str, aspec: str, needle: str, words: list[str]
) -> None:
    paths = files(tmp_path, atype=atype, aspec=aspec)
    assert_refused(validate(*paths), paths[0], needle, *words)


def test_credentials_named_by_reference_over_https_load(tmp_path: Path) -> None:
    paths = files(
        tmp_path,
        atype="Artifactory",
        aspec=(
            "url: https://a/x-<+artifact.tag>.tgz\ntag: 1.0\nusername: deployer\n"
            "passwordRef: account.artifactory_pw\nallowUnverified: true"
        ),
    )
    assert validate(*paths).exit_code == 0
    paths = files(
        tmp_path, aspec=('url: https://a/x.tgz\ntag: 1.0\ntoken: <+secrets.getValue("ci_token")>')
    )
    res = validate(*paths)
    assert res.exit_code == 0, res.output


def test_a_misspelt_host_filter_key_is_an_error_with_a_suggestion(tmp_path: Path) -> None:
    paths = files(tmp_path, infra=AWS % {"fspec": indent("regionz: [us-east-1]", 8)})
    res = validate(*paths)
    assert_refused(
        res,
        paths[2],
        "regionz:",
        "unknown field 'regionz'",
        "did you mean 'regions'?",
        "hostFilter.spec.regionz",
    )


def test_a_host_filter_that_does_not_apply_to_the_provider_is_refused(tmp_path: Path) -> None:
    infra = (AWS % {"fspec": indent("tags: {App: web}", 8)}).replace(
        "type: AwsInstanceFilter", "type: AzureVmFilter"
    )
    paths = files(tmp_path, infra=infra)
    assert_refused(
        validate(*paths), paths[2], "AzureVmFilter", "does not apply to an AWS infrastructure"
    )


def test_ssh_settings_of_a_local_connection_are_not_ignored(tmp_path: Path) -> None:
    paths = files(tmp_path, infra=STATIC % {"ctype": "Local, user: deploy"})
    assert_refused(
        validate(*paths), paths[2], "connection:", "'user' is not supported by a Local connection"
    )


@pytest.mark.parametrize(
    ("phase", "needle", "words"),
    [
        (
            "computeProviderType: QUANTUM",
            "computeProviderType",
            ["unknown computeProviderType 'QUANTUM'", "computeProviderType"],
        ),
        (
            "computeProviderType: AWS",
            "computeProviderType",
            ["contradicts", "PHYSICAL_DATA_CENTER"],
        ),
        (
            "infraDefinitionId: aws_prod_infra",
            "infraDefinitionId",
            ["'aws_prod_infra' is not an infrastructure of this stage (hosts)"],
        ),
        ("serviceId: api", "serviceId", ["not the stage's service 'web'"]),
        ("deploymentType: WinRm", "deploymentType", ["contradicts the stage's deploymentType"]),
    ],
)
def test_reference_phase_fields_must_agree_with_the_stage(
    tmp_path: Path, phase: str, needle: str, words: list[str]
) -> None:
    paths = files(tmp_path, phase=phase)
    assert_refused(validate(*paths), paths[3], needle, *words)


def test_reference_phase_fields_that_agree_load(tmp_path: Path) -> None:
    paths = files(
        tmp_path,
        phase="deploymentType: SSH\ncomputeProviderType: "
        "PHYSICAL_DATA_CENTER\ninfraDefinitionId: hosts\nserviceId: web",
    )
    res = validate(*paths)
    assert res.exit_code == 0, res.output


def test_harness_verification_keys_are_not_silently_ignored(tmp_path: Path) -> None:
    # A canary analysis with half its keys (tests/unit/test_canary_analysis.py has the rest)
    paths = files(
        tmp_path,
        phase="steps:\n  - type: VERIFICATION\n    name: Check\n"
        "    properties: {analysisType: Prometheus}",
    )
    assert_refused(
        validate(*paths), paths[3], "analysisType", "a canary analysis needs comparisonStrategy"
    )
    paths = files(
        tmp_path,
        phase="steps:\n  - type: VERIFICATION\n    name: Check\n"
        "    properties: {analysisProvider: Prometheus}",
    )
    assert_refused(
        validate(*paths),
        paths[3],
        "analysisProvider",
        "'analysisProvider' is not supported",
        "healthCheck",
    )


# --- the test-only connection --------------------------------------------------------------


def test_a_noop_connection_in_a_pipeline_file_is_refused(tmp_path: Path) -> None:
    paths = files(tmp_path, infra=STATIC % {"ctype": "Noop"})
    res = validate(*paths)
    assert_refused(
        res,
        paths[2],
        "connection:",
        "connection type Noop is not allowed",
        "VMFARM_TEST_CONNECTION",
        "spec.spec.connection.type",
    )


def test_only_the_workers_setting_makes_hosts_no_ops(monkeypatch: pytest.MonkeyPatch) -> None:
    from app.connectors.base import HostTarget
    from app.connectors.noop import NoopConnector
    from app.connectors.pool import default_connector, pool_key
    from app.errors import ConfigError

    target = HostTarget(hostname="127.0.1.48")
    monkeypatch.delenv("VMFARM_TEST_CONNECTION", raising=False)
    assert not isinstance(default_connector(target), NoopConnector)
    monkeypatch.setenv("VMFARM_TEST_CONNECTION", "noop")
    assert isinstance(default_connector(target), NoopConnector)
    assert pool_key(target)[-1] == "noop"
    monkeypatch.setenv("VMFARM_TEST_CONNECTION", "nop")  # a typo must not mean "real hosts"
    with pytest.raises(ConfigError, match="VMFARM_TEST_CONNECTION='nop' names no test"):
        default_connector(target)
