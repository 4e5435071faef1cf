"""Secrets and the worker's environment, as an attacker on the worker or on a host sees them.

A real embedded ``vmfarm run`` (its Celery worker in the CLI process) runs an ``onDelegate`` step
that records its environment, then an SSH step on a real lab host that uses a secret; each step
waits for the test while it samples ``ps -eo args``, as any local user could. The lab hosts are
sshd processes on this machine (own mount namespaces, the same process table), so one listing
shows the worker's processes and the host's.
"""

from __future__ import annotations

import os
import secrets
import stat
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.conftest import REPO, base_env

PIPELINE = """\
apiVersion: v1
kind: Service
metadata: {{name: app}}
spec: {{serviceDefinition: {{type: SSH}}}}
---
apiVersion: v1
kind: Environment
metadata: {{name: lab}}
spec: {{type: PreProduction}}
---
apiVersion: v1
kind: Pipeline
metadata: {{name: clean}}
spec:
  stages:
    - stage:
        name: Deploy
        identifier: deploy
        type: Deployment
        spec:
          service: {{serviceRef: app}}
          environment:
            environmentRef: lab
            infrastructureDefinitions: [{{identifier: lab}}]
          execution:
            steps:
              - step:
                  type: Command
                  name: On the worker
                  identifier: delegate
                  spec:
                    onDelegate: true
                    environmentVariables:
                      - {{name: DECLARED, value: declared-value}}
                      - {{name: TOKEN, value: '<+secrets.getValue("deploy_token")>'}}
                    commandUnits:
                      - identifier: env
                        type: Script
                        spec:
                          source:
                            type: Inline
                            spec:
                              script: |
                                env > {out}/delegate.env
                                touch {out}/delegate.started
                                while [ ! -e {out}/delegate.go ]; do sleep 0.05; done
              - step:
                  type: Command
                  name: On the host
                  identifier: host
                  spec:
                    environmentVariables:
                      - {{name: TOKEN, value: '<+secrets.getValue("deploy_token")>'}}
                    commandUnits:
                      - identifier: use
                        type: Script
                        spec:
                          source:
                            type: Inline
                            spec:
                              script: |
                                test "$TOKEN" = "<+secrets.getValue('deploy_token')>" || exit 9
                                touch {out}/host.started
                                while [ ! -e {out}/host.go ]; do sleep 0.05; done
"""

# What bash itself adds to a command's environment.
BASH_OWN = {"PWD", "OLDPWD", "SHLVL", "_"}


def one_host_infrastructure(lab: Any, path: Path) -> Path:
    """The lab's infrastructure with its first host only."""
    infra = yaml.safe_load(Path(lab.infrastructure_file).read_text())
    infra["spec"]["spec"]["hosts"] = infra["spec"]["spec"]["hosts"][:1]
    path.write_text(yaml.safe_dump(infra))
    return path


def wait_for(path: Path, proc: subprocess.Popen[str], timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while not path.exists():
        if proc.poll() is not None:
            out, err = proc.communicate()
            pytest.fail(f"vmfarm ended before {path.name}: {out[-2000:]}{err[-3000:]}")
        if time.monotonic() > deadline:
            pytest.fail(f"{path.name} did not appear within {timeout:g} s")
        time.sleep(0.05)


def process_args() -> str:
    """Every process's command line, as `ps -eo args` shows them to any user."""
    return subprocess.run(["ps", "-eo", "args"], capture_output=True, text=True, check=True).stdout


@pytest.mark.timeout(240)
def test_delegate_sees_only_what_it_declared_and_no_secret_is_in_any_argv(
    lab: Any, tmp_path: Path
) -> None:
    # Given a worker whose environment holds its own secrets, and a referenced and an
    # unreferenced secret in the env backend
    out = tmp_path / "out"
    out.mkdir()
    token, unreferenced = f"tok-{secrets.token_hex(8)}", f"other-{secrets.token_hex(8)}"
    worker_only = {
        "VMFARM_SECRETS_KEY": f"key-{secrets.token_hex(8)}",
        "AWS_SECRET_ACCESS_KEY": f"aws-{secrets.token_hex(8)}",
    }
    (tmp_path / "p.yaml").write_text(PIPELINE.format(out=out))
    infra = one_host_infrastructure(lab, tmp_path / "infra.yaml")
    env = base_env(
        VMFARM_HOME=str(tmp_path / "home"),
        VMFARM_SECRETS="env",
        VMFARM_SECRET_DEPLOY_TOKEN=token,
        VMFARM_SECRET_UNREFERENCED=unreferenced,
        **worker_only,
    )
    hidden = [token, unreferenced, *worker_only.values()]

    # When the pipeline runs (embedded: the worker is the vmfarm process)
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "cli.main",
            "run",
            str(tmp_path / "p.yaml"),
            str(infra),
            "-o",
            "json",
        ],
        env=env,
        cwd=REPO,
        text=True,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    try:
        # Then while the delegate step runs, no process shows a secret or the script
        wait_for(out / "delegate.started", proc)
        listing = process_args()
        assert not [s for s in hidden if s in listing]
        assert "delegate.go" not in listing
        assert "bash -s" in listing  # (the step's shell is there: its script came on stdin)
        (out / "delegate.go").touch()

        # And while the SSH step runs on the host with the secret, neither
        wait_for(out / "host.started", proc)
        listing = process_args()
        assert not [s for s in hidden if s in listing]
        assert "host.go" not in listing
        (out / "host.go").touch()
        stdout, stderr = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert proc.returncode == 0, stdout[-2000:] + stderr[-3000:]

    # And the delegate's environment held what it declared (the secret it references
    # included), the worker's PATH, HOME and LANG, and nothing else of the worker's
    seen = dict(
        line.split("=", 1)
        for line in (out / "delegate.env").read_text().splitlines()
        if "=" in line and not line.startswith((" ", "\t"))
    )
    assert seen["DECLARED"] == "declared-value"
    assert seen["TOKEN"] == token
    allowed = {"DECLARED", "TOKEN", "PATH", "HOME", "LANG"} | BASH_OWN
    assert set(seen) - allowed == set()
    text = (out / "delegate.env").read_text()
    assert not [s for s in (unreferenced, *worker_only.values()) if s in text]
    assert os.environ.get("PATH") == seen.get("PATH") or "PATH" not in os.environ

    # And what the run kept under VMFARM_HOME is nobody else's: the folder 0700, the ledger,
    # broker and result files (and SQLite's own files beside them) 0600, no file open to others
    home = tmp_path / "home"
    assert stat.S_IMODE(home.stat().st_mode) == 0o700
    kept = {p.name: stat.S_IMODE(p.stat().st_mode) for p in home.iterdir() if p.is_file()}
    assert {"vmfarm.db", "broker.sqlite", "results.sqlite"} <= set(kept)
    assert kept == dict.fromkeys(kept, 0o600)
    assert not [p for p in home.rglob("*") if p.is_file() and p.stat().st_mode & 0o077]
