"""Terraform steps with a broker: TerraformPlan and TerraformApply (InheritFromPlan) run on
the control worker (their delegate, a separate process), and the apply's output lists the
hosts that a later Deployment stage deploys to on the region workers (real sshd lab hosts)."""

from __future__ import annotations

import json
import textwrap
from pathlib import Path
from typing import Any

import yaml

from tests.conftest import DATA, Cluster

OUTPUT = "<+pipeline.stages.provision.spec.execution.steps.apply.output.web_ips>"


def test_a_terraform_output_names_the_hosts_the_next_stage_deploys_to(
    cluster: Cluster, lab: Any, tmp_path: Path
) -> None:
    # Given an infrastructure whose hosts are the Terraform apply's output, and a
    # configuration that outputs the lab's r1 hosts
    infra = yaml.safe_load(lab.infrastructure_file.read_text())
    r1 = [h["hostname"] for h in infra["spec"]["spec"]["hosts"] if h["region"] == "r1"]
    infra["metadata"] = {"name": "made", "identifier": "made"}
    infra["spec"]["spec"]["region"] = "r1"
    infra["spec"]["spec"]["hosts"] = [{"hostname": OUTPUT}]
    (tmp_path / "infra.yaml").write_text(yaml.safe_dump(infra))
    prov = f"lab_{tmp_path.name[-12:].replace('-', '_')}"
    main_tf = textwrap.indent(f'output "web_ips" {{\n  value = {json.dumps(r1)}\n}}\n', " " * 34)
    (tmp_path / "pipeline.yaml").write_text(
        f"""\
apiVersion: v1
kind: Pipeline
metadata: {{name: provisioned}}
spec:
  stages:
    - stage:
        name: Provision
        identifier: provision
        type: Custom
        spec:
          execution:
            steps:
              - step:
                  type: TerraformPlan
                  name: Plan
                  identifier: plan
                  spec:
                    provisionerIdentifier: {prov}
                    configuration:
                      command: Apply
                      configFiles:
                        store:
                          type: Inline
                          spec:
                            files:
                              - name: main.tf
                                content: |
{main_tf}
              - step:
                  type: TerraformApply
                  name: Apply
                  identifier: apply
                  spec:
                    provisionerIdentifier: {prov}
                    configuration: {{type: InheritFromPlan}}
    - stage:
        name: Deploy
        identifier: deploy
        type: Deployment
        spec:
          deploymentType: Ssh
          service: {{serviceRef: custom_app}}
          environment:
            environmentRef: lab
            infrastructureDefinitions: [{{identifier: made}}]
          execution:
            steps:
              - step:
                  type: Command
                  name: Hello
                  identifier: hello
                  spec:
                    commandUnits:
                      - identifier: hello
                        name: Hello
                        type: Script
                        spec:
                          source: {{type: Inline, spec: {{script: echo hello <+instance.hostName>}}}}
"""
    )

    # When it runs with the broker
    res = cluster.vmfarm(
        "run",
        str(DATA / "custom" / "service.yaml"),
        str(tmp_path / "infra.yaml"),
        str(tmp_path / "pipeline.yaml"),
        "-o",
        "json",
    )

    # Then the control worker planned and applied, and the region workers deployed to the
    # hosts the apply output
    assert res.returncode == 0, res.stdout + res.stderr + cluster.worker_logs()
    report = json.loads(res.stdout)
    assert report["status"] == "SUCCEEDED"
    provision, deploy = report["stages"]
    assert [h["host"] for h in provision["hosts"]] == ["delegate"]
    assert sorted(h["host"] for h in deploy["hosts"]) == sorted(r1)
    state = json.loads(
        (cluster.home / "terraform" / prov / "state" / "terraform.tfstate").read_text()
    )
    assert state["outputs"]["web_ips"]["value"] == r1
    logs = cluster.vmfarm("logs", report["id"]).stdout
    assert all(f"hello {h}" in logs for h in r1)
