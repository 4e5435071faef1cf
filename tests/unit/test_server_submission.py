"""What the server refuses in submitted pipeline files before loading them: anything that
names a path or runs a process on the server's or a worker's own machine."""

from __future__ import annotations

import pytest

from app.server.routes.executions import local_references

INFRA = """\
apiVersion: v1
kind: Infrastructure
metadata:
  name: hosts
spec:
  environmentRef: lab
  deploymentType: Ssh
  type: Pdc
  spec:
    connection:
      type: {connection}
{extra}    hosts:
      - hostname: 10.0.0.1
"""


@pytest.mark.parametrize(
    ("connection", "extra", "where", "what"),
    [
        ("Local", "", "f.yaml:11:13", "type Local"),
        ("Sandbox", "", "f.yaml:11:13", "type Sandbox"),
        ("SSH", "      privateKeyFile: ~/.ssh/id_ed25519\n", "f.yaml:12:7", "privateKeyFile"),
        ("SSH", "      knownHostsFile: /etc/ssh/known\n", "f.yaml:12:7", "knownHostsFile"),
    ],
)
def test_a_file_naming_the_servers_machines_is_refused_with_its_place(
    connection: str, extra: str, where: str, what: str
) -> None:
    (problem,) = local_references("f.yaml", INFRA.format(connection=connection, extra=extra))
    assert problem.startswith(f"{where}: {what}")


def test_a_local_artifact_is_refused_and_a_remote_one_is_not() -> None:
    service = (
        "kind: Service\nspec:\n  serviceDefinition:\n    spec:\n      artifacts:\n"
        "        primary:\n          type: {}\n          spec: {{path: /etc/shadow}}\n"
    )
    assert local_references("s.yaml", service.format("Local"))[0].startswith("s.yaml:7:17")
    assert local_references("s.yaml", service.format("Http")) == []


def test_an_ssh_infrastructure_with_its_key_in_the_secrets_store_passes() -> None:
    extra = "      privateKeySecret: lab-key\n"
    assert local_references("f.yaml", INFRA.format(connection="SSH", extra=extra)) == []
