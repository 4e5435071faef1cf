"""Command units in ``vmfarm plan`` and on the worker: every unit type shows what it will do,
and the worker sends the host exactly what the plan showed.

The pipeline has one unit of each type on static hosts that do not exist: ``vmfarm plan``
contacts no host. The worker side runs through ``app.units.run_unit`` (what the worker's step
loop calls) against a recording connector that stands in for a host.
"""

from __future__ import annotations

import json
import textwrap
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from app.connectors.base import CommandResult, Connector, HostTarget, OutputCallback
from tests.conftest import base_env, run_vmfarm

SHA = "5f70bf18a086007016e948b04aed3b82103a36bea41755b6cddfaf10ace3c6ef"
PASSWORD, SIGNATURE, DB_PASSWORD = "s3cr3t-pw", "sekrit-sig", "db-pa55-value"
GREETING = "hi; $(reboot)"  # a runtime input the shell must never evaluate
INPUTS = {"tag": "2.0.1", "greeting": GREETING}

SERVICE = textwrap.dedent(f"""\
    apiVersion: v1
    kind: Service
    metadata: {{name: app}}
    spec:
      serviceDefinition:
        type: Ssh
        spec:
          artifacts:
            primary:
              type: Http
              spec:
                url: https://127.0.1.10:8081/repo/app-<+artifact.tag>.tar.gz?X-Amz-Signature={SIGNATURE}
                username: deployer
                passwordRef: repo_password
                sha256: "{SHA}"
                tag: <+input>
    ---
    apiVersion: v1
    kind: Environment
    metadata: {{name: lab}}
    spec: {{type: PreProduction}}
    ---
    apiVersion: v1
    kind: Infrastructure
    metadata: {{name: lab}}
    spec:
      environmentRef: lab
      type: Pdc
      spec:
        region: r1
        connection: {{user: deploy}}
        hosts:
          - hostname: 127.0.1.10
          - hostname: 127.0.1.11
    """)

PIPELINE = textwrap.dedent("""\
    apiVersion: v1
    kind: Pipeline
    metadata: {name: units}
    spec:
      variables:
        - {name: greeting, type: String, value: <+input>}
      stages:
        - stage:
            name: Deploy
            identifier: deploy
            type: Deployment
            spec:
              service: {serviceRef: app}
              environment:
                environmentRef: lab
                infrastructureDefinitions: [{identifier: lab}]
              strategy: {type: Rolling, phases: [2]}
              execution:
                steps:
                  - step:
                      type: Command
                      name: Install
                      identifier: install
                      spec:
                        environmentVariables:
                          - {name: APP_HOME, value: /opt/app}
                        commandUnits:
                          - identifier: paths
                            type: Setup
                            spec:
                              paths: [/opt/app/<+artifact.tag>, /opt/app/logs]
                              owner: deploy:deploy
                              mode: "0750"
                          - identifier: fetch
                            type: DownloadArtifact
                            spec: {destinationPath: /opt/app/incoming}
                          - identifier: copy
                            type: Copy
                            spec: {sourceType: Artifact, destinationPath: /opt/app/pushed/}
                          - identifier: release
                            type: Release
                            spec: {deploymentPath: /opt/app/, keep: 5}
                          - identifier: migrate
                            type: Script
                            spec:
                              workingDirectory: /opt/app/current
                              source:
                                type: Inline
                                spec:
                                  script: |
                                    echo "migrating <+instance.hostName> to <+artifact.tag>"
                                    echo "<+pipeline.variables.greeting>" > "$APP_HOME/greeting"
                  - step:
                      type: Command
                      name: Start
                      identifier: start
                      spec:
                        outputVariables:
                          - {name: PID, value: pid}
                        commandUnits:
                          - identifier: start
                            type: Script
                            spec:
                              source:
                                type: Inline
                                spec:
                                  script: |
                                    ./start --db-password "<+secrets.getValue("db_password")>"
                                    pid=$!
    """)

SOURCE = "Http https://127.0.1.10:8081/repo/app-2.0.1.tar.gz?…"
SETUP_SCRIPT = (
    "set -e\nmkdir -p /opt/app/2.0.1 /opt/app/logs\n"
    "chown deploy:deploy /opt/app/2.0.1 /opt/app/logs\n"
    "chmod 0750 /opt/app/2.0.1 /opt/app/logs\nls -ld /opt/app/2.0.1 /opt/app/logs\n"
)

# unit identifier -> (fields of its JSON form, lines of the text plan)
EXPECTED: dict[str, tuple[dict[str, Any], list[str]]] = {
    "paths": (
        {
            "type": "Setup",
            "paths": ["/opt/app/2.0.1", "/opt/app/logs"],
            "owner": "deploy:deploy",
            "mode": "0750",
            "script": SETUP_SCRIPT,
        },
        [
            "[paths] setup /opt/app/2.0.1 /opt/app/logs (owner deploy:deploy, mode 0750):",
            *(f"  {line}" for line in SETUP_SCRIPT.splitlines()),
        ],
    ),
    "fetch": (
        {
            "type": "DownloadArtifact",
            "source": SOURCE,
            "destination": "/opt/app/incoming/app-2.0.1.tar.gz",
            "checksum": SHA,
        },
        [
            f"[fetch] download {SOURCE} -> /opt/app/incoming/app-2.0.1.tar.gz (by the host, "
            f"sha256 {SHA} checked):",
            """  printf '%s\\n' "$VMFARM_CURL_CONFIG" | curl -fsSL --retry 3 -K - -o """
            "/opt/app/incoming/app-2.0.1.tar.gz.part",
        ],
    ),
    "copy": (
        {
            "type": "Copy",
            "source": SOURCE,
            "destination": "/opt/app/pushed/app-2.0.1.tar.gz",
            "checksum": SHA,
        },
        [f"[copy] copy {SOURCE} -> /opt/app/pushed/app-2.0.1.tar.gz"],
    ),
    "release": (
        {
            "type": "Release",
            "source": SOURCE,
            "deploymentPath": "/opt/app",
            "version": "2.0.1",
            "releasesDirectory": "/opt/app/releases",
            "keep": 5,
            "current": "/opt/app/current",
            "currentTarget": "releases/2.0.1",
        },
        [
            f"[release] release 2.0.1 ({SOURCE}) into /opt/app/releases/2.0.1, keeping "
            "the newest 5",
            "  /opt/app/current -> releases/2.0.1",
        ],
    ),
    "migrate": (
        {
            "type": "Script",
            "script": 'echo "migrating 127.0.1.10 to 2.0.1"\n'
            'echo "${VMFARM_VALUE_1}" > "$APP_HOME/greeting"\n',
            "values": {"VMFARM_VALUE_1": GREETING},
            "workingDirectory": "/opt/app/current",
        },
        [
            "[migrate] script (in /opt/app/current):",
            '  echo "migrating 127.0.1.10 to 2.0.1"',
            f"  (with VMFARM_VALUE_1={GREETING!r})",
        ],
    ),
}


def _write(tmp: Path, service: str = SERVICE) -> list[str]:
    (tmp / "service.yaml").write_text(service)
    (tmp / "pipeline.yaml").write_text(PIPELINE)
    return [str(tmp / "service.yaml"), str(tmp / "pipeline.yaml")]


def _plan(files: list[str], home: Path, *extra: str) -> str:
    sets = [a for k, v in INPUTS.items() for a in ("--set", f"{k}={v}")]
    res = run_vmfarm("plan", *files, *sets, *extra, env=base_env(VMFARM_HOME=str(home)))
    assert res.returncode == 0, res.stderr
    assert "Traceback" not in res.stderr
    return res.stdout


@pytest.fixture(scope="module")
def planned(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """``vmfarm plan`` of the pipeline, as JSON and as text, run as a user would."""
    tmp = tmp_path_factory.mktemp("plan")
    files = _write(tmp)
    text = _plan(files, tmp / "home")
    shown = json.loads(_plan(files, tmp / "home", "-o", "json"))
    (stage,) = shown["stages"]
    units = {u["identifier"]: u for step in stage["steps"] for u in step["units"]}
    return {"files": files, "text": text, "stage": stage, "units": units}


@pytest.mark.parametrize("ident", list(EXPECTED))
def test_plan_shows_what_each_unit_type_will_do(planned: dict[str, Any], ident: str) -> None:
    fields, lines = EXPECTED[ident]
    unit = planned["units"][ident]
    assert {k: unit.get(k) for k in fields} == fields
    text_lines = [line.removeprefix("      ") for line in planned["text"].splitlines()]
    for line in lines:
        assert line in text_lines, f"{line!r} not in the text plan:\n{planned['text']}"


def test_plan_shows_the_download_script_and_where_each_unit_comes_from(
    planned: dict[str, Any],
) -> None:
    fetch = planned["units"]["fetch"]["script"]
    # the host writes a .part file and renames it: a file is whole or absent; then checks it
    assert (
        fetch.index("-K - -o /opt/app/incoming/app-2.0.1.tar.gz.part")
        < fetch.index("mv /opt/app/incoming/app-2.0.1.tar.gz.part")
        < fetch.index(SHA)
    )
    assert planned["stage"]["steps"][0]["environment"] == {"APP_HOME": "/opt/app"}
    start = planned["units"]["start"]
    assert start["outputVariables"] == {"PID": "pid"}
    assert "(prints output variables PID when it exits)" in planned["text"]


def test_plan_never_shows_credentials_signatures_or_secret_values(
    planned: dict[str, Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    # Given the URL's user:password, a presigned query and a secret the worker could resolve
    monkeypatch.setenv("VMFARM_SECRET_DB_PASSWORD", DB_PASSWORD)
    shown = json.dumps(planned["units"]) + planned["text"]
    # Then the plan names the source without them, and the secret only by its reference
    for leaked in (PASSWORD, SIGNATURE, "deployer", "X-Amz-Signature", DB_PASSWORD):
        assert leaked not in shown
    assert '<+secrets.getValue("db_password")>' in planned["units"]["start"]["script"]


# --- render and run agree -------------------------------------------------------------------


@dataclass
class Sent:
    script: str
    env: dict[str, str]
    workdir: str | None


@dataclass
class RecordingConnector(Connector):
    """Stands in for a host: records every command it is given and answers exit 0. Nothing is
    executed, nothing is copied."""

    target: HostTarget = field(default_factory=lambda: HostTarget(hostname="127.0.1.10"))
    sent: list[Sent] = field(default_factory=list)

    def connect(self) -> None:
        """Nothing to open."""

    def run(
        self,
        script: str,
        *,
        env: Mapping[str, str] | None = None,
        timeout: float | None = None,
        on_output: OutputCallback | None = None,
        workdir: str | None = None,
    ) -> CommandResult:
        """Record the command; report success."""
        self.sent.append(Sent(script, dict(env or {}), workdir))
        return CommandResult(exit_code=0)

    def put(self, local_path: str, remote_path: str, *, mode: int | None = None) -> None:
        """No unit of these tests copies a file."""
        raise AssertionError(f"unexpected put {local_path} -> {remote_path}")

    def get(self, remote_path: str, local_path: str) -> None:
        """No unit of these tests reads a file."""
        raise AssertionError(f"unexpected get {remote_path}")

    def close(self) -> None:
        """Nothing to close."""


@pytest.fixture
def worker(
    planned: dict[str, Any], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> Iterator[Callable[[str, str], Sent]]:
    """Run one unit as the worker does, on the host the plan was rendered for; returns what
    the host was sent."""
    from app import secrets
    from app.coordinator.submit import prepare
    from app.definitions.plan import CommandStepPlan, DeploymentStagePlan
    from app.units import HostSession, host_context, run_unit, step_environment, step_scope

    monkeypatch.setenv("VMFARM_HOME", str(tmp_path / "home"))
    monkeypatch.setenv("VMFARM_SECRETS", "env")
    monkeypatch.setenv("VMFARM_SECRET_DB_PASSWORD", DB_PASSWORD)
    monkeypatch.setenv("VMFARM_SECRET_REPO_PASSWORD", PASSWORD)
    secrets.reset()
    plan, hosts = prepare(planned["files"], pipeline=None, inputs=INPUTS, execution_id="test-units")
    stage, host = plan.stages[0], hosts[0][0]
    assert isinstance(stage, DeploymentStagePlan)
    assert host.name == planned["stage"]["rendered_for"]

    def run(step_id: str, unit_id: str) -> Sent:
        step = next(s for s in stage.steps if s.identifier == step_id)
        assert isinstance(step, CommandStepPlan)
        unit = next(u for u in step.spec.command_units if u.identifier == unit_id)
        ctx = host_context(host, stage)
        conn = RecordingConnector()
        done = run_unit(
            unit,
            step_scope(stage, step, ctx, secrets=True),
            HostSession(
                conn=conn,
                host=host,
                out=_Discard(),
                timeout=60,
                env=step_environment(step, ctx, secrets=True),
            ),
        )
        assert done.ok, done.error
        (sent,) = conn.sent
        return sent

    yield run
    secrets.reset()


class _Discard:
    def write(self, stream: str, text: str) -> None:
        """Output is not what these tests look at."""


@pytest.mark.parametrize(("step", "unit"), [("install", "paths"), ("install", "migrate")])
def test_the_worker_sends_the_host_exactly_what_the_plan_shows(
    planned: dict[str, Any], worker: Callable[[str, str], Sent], step: str, unit: str
) -> None:
    shown = planned["units"][unit]
    sent = worker(step, unit)
    assert sent.script == shown["script"]
    # the values the plan lists travel in the environment, with the step's variables
    environment = next(s for s in planned["stage"]["steps"] if s["identifier"] == step)[
        "environment"
    ]
    expected_env = {**environment, **shown["values"]} if shown["type"] == "Script" else {}
    assert sent.env == expected_env
    assert sent.workdir == shown.get("workingDirectory")


def test_a_secret_reaches_the_script_only_through_its_environment_on_the_worker(
    planned: dict[str, Any], worker: Callable[[str, str], Sent]
) -> None:
    shown = planned["units"]["start"]
    sent = worker("start", "start")
    # the script the plan showed, its secret reference bound to an environment variable
    # (after the values the plan showed), behind the trap that prints the output variables
    var = f"VMFARM_VALUE_{len(shown['values']) + 1}"
    script = shown["script"].replace('<+secrets.getValue("db_password")>', "${" + var + "}")
    trap, _, rest = sent.script.partition("trap __vmfarm_out EXIT\n")
    assert rest == script
    assert '"${pid}"' in trap and "PID=" in trap
    assert sent.env == {var: DB_PASSWORD}
    assert DB_PASSWORD not in sent.script


def test_the_host_downloads_with_credentials_curl_reads_from_stdin_never_from_its_argv(
    planned: dict[str, Any], worker: Callable[[str, str], Sent], tmp_path: Path
) -> None:
    # Given the DownloadArtifact unit, whose password the worker resolves from passwordRef
    shown = planned["units"]["fetch"]
    sent = worker("install", "fetch")
    # Then the host gets the script the plan showed, the URL and credentials only as curl's
    # config in the command's environment
    assert sent.script == shown["script"]
    config = sent.env["VMFARM_CURL_CONFIG"]
    assert f'user = "deployer:{PASSWORD}"' in config
    assert f"X-Amz-Signature={SIGNATURE}" in config
    assert PASSWORD not in sent.script and SIGNATURE not in sent.script
    assert sent.env["APP_HOME"] == "/opt/app"  # the step's environment reaches curl

    # When a real bash runs it (a curl that records its argv, stdin and environment)
    import subprocess

    from app.connectors.base import env_prelude

    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "curl").write_text(
        '#!/bin/sh\nprintf \'%s\\n\' "$*" > "$REC/argv"\ncat > "$REC/stdin"\n'
        'env > "$REC/env"\nwhile [ $# -gt 0 ]; do [ "$1" = -o ] && echo body > "$2"; '
        "shift; done\n"
    )
    (bin_dir / "curl").chmod(0o755)
    rec = tmp_path / "rec"
    rec.mkdir()
    script = sent.script.replace("/opt/app/incoming", str(tmp_path / "incoming"))
    script = script[: script.index("if command -v sha256sum")]  # (the bytes are not the build)
    done = subprocess.run(
        ["bash", "-s"],
        input=env_prelude(sent.env) + script,
        text=True,
        capture_output=True,
        env={"PATH": f"{bin_dir}:/usr/bin:/bin", "REC": str(rec)},
        check=False,
    )
    # Then curl had the credentials on stdin, none in its argv or its environment
    assert done.returncode == 0, done.stderr
    argv = (rec / "argv").read_text()
    assert "-K -" in argv and PASSWORD not in argv and SIGNATURE not in argv
    assert f'user = "deployer:{PASSWORD}"' in (rec / "stdin").read_text()
    assert PASSWORD not in (rec / "env").read_text()
    assert (tmp_path / "incoming" / "app-2.0.1.tar.gz").read_text() == "body\n"
