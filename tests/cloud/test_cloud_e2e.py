"""End to end on three clouds: each region's worker holds its cloud's credentials, lists the
hosts (a `vmfarm.discover` task on its own queue) and deploys to them over SSH.

The clouds are fakes that run here: moto in server mode for EC2, and small HTTP(S) servers for
Azure Resource Manager and GCP Compute that the real SDK clients talk to (tests/fakes). They
return the lab's addresses (leased from the allocator), so the deployment reaches real sshd
hosts. The CLI and the control worker get no cloud credentials at all.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.alloc import Allocator
from tests.conftest import REPO, Cluster, _wait_for_workers, run_vmfarm
from tests.fakes.azure_arm import CLIENT_ID, CLIENT_SECRET, SUBSCRIPTION, TENANT, FakeArm
from tests.fakes.gce import FakeGce

DEAD_PROXY = "http://127.0.0.1:9"
NO_WAY_OUT = {
    "HTTPS_PROXY": DEAD_PROXY,
    "HTTP_PROXY": DEAD_PROXY,
    "https_proxy": DEAD_PROXY,
    "http_proxy": DEAD_PROXY,
    "NO_PROXY": "127.0.0.1,localhost",
    "no_proxy": "127.0.0.1,localhost",
    "AWS_EC2_METADATA_DISABLED": "true",
    "GCE_METADATA_HOST": "127.0.0.1:9",
    "GCE_METADATA_IP": "127.0.0.1:9",
}


@pytest.fixture(scope="module")
def clouds(
    tmp_path_factory: pytest.TempPathFactory, lab: Any, alloc: Allocator
) -> Iterator[dict[str, Any]]:
    """EC2 (us-east-1) with hosts 1-2, Azure (eastus) with 3-4, GCP (us-central1) with 5-6,
    plus a stopped instance in each that must not be deployed to."""
    import boto3
    from moto.server import ThreadedMotoServer

    addrs = [h.address for h in lab.hosts]
    # The stopped instances' addresses are leased too: nothing listens there, and nothing may.
    stopped = alloc.addresses(3)
    off = stopped.addresses
    lease = alloc.port()
    port = lease.port
    moto = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    moto.start()
    # moto's state is per process, shared by every moto server of the test session: start
    # from an empty cloud whatever other test modules created.
    urllib.request.urlopen(
        urllib.request.Request(f"http://127.0.0.1:{port}/moto-api/reset", method="POST"), timeout=10
    ).close()
    aws_env = {
        "AWS_ENDPOINT_URL": f"http://127.0.0.1:{port}",
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": "testing",
        "AWS_DEFAULT_REGION": "us-east-1",
    }
    ec2 = boto3.client(
        "ec2",
        region_name="us-east-1",
        endpoint_url=aws_env["AWS_ENDPOINT_URL"],
        aws_access_key_id="testing",
        aws_secret_access_key="testing",
    )
    vpc = ec2.create_vpc(CidrBlock="127.0.0.0/16")["Vpc"]["VpcId"]
    subnet = ec2.create_subnet(VpcId=vpc, CidrBlock="127.0.1.0/24")["Subnet"]["SubnetId"]
    for ip, state in ((addrs[0], "running"), (addrs[1], "running"), (off[0], "stopped")):
        iid = ec2.run_instances(
            ImageId="ami-12c6146b",
            MinCount=1,
            MaxCount=1,
            SubnetId=subnet,
            PrivateIpAddress=ip,
            TagSpecifications=[
                {"ResourceType": "instance", "Tags": [{"Key": "App", "Value": "web"}]}
            ],
        )["Instances"][0]["InstanceId"]
        if state == "stopped":
            ec2.stop_instances(InstanceIds=[iid])

    arm = FakeArm(tmp_path_factory.mktemp("arm-certs")).start()
    arm.add_vm("rg-web", "web-1", private_ip=addrs[2], tags={"app": "web"})
    arm.add_vm("rg-web", "web-2", private_ip=addrs[3], tags={"app": "web"})
    arm.add_vm(
        "rg-web", "web-off", private_ip=off[1], tags={"app": "web"}, power_state="deallocated"
    )
    azure_env = {
        "AZURE_TENANT_ID": TENANT,
        "AZURE_CLIENT_ID": CLIENT_ID,
        "AZURE_CLIENT_SECRET": CLIENT_SECRET,
        "AZURE_AUTHORITY_HOST": arm.url,
        "VMFARM_AZURE_ENDPOINT": arm.url,
        "VMFARM_AZURE_CA_BUNDLE": str(arm.ca_file),
    }

    gce = FakeGce().start()
    gce.add_instance(
        "lab-project", "us-central1-a", "gce-1", private_ip=addrs[4], labels={"app": "web"}
    )
    gce.add_instance(
        "lab-project", "us-central1-b", "gce-2", private_ip=addrs[5], labels={"app": "web"}
    )
    gce.add_instance(
        "lab-project",
        "us-central1-a",
        "gce-off",
        private_ip=off[2],
        labels={"app": "web"},
        status="TERMINATED",
    )
    gcp_env = {"VMFARM_GCP_ENDPOINT": gce.url}
    try:
        yield {"aws": aws_env, "azure": azure_env, "gcp": gcp_env, "arm": arm, "gce": gce}
    finally:
        gce.stop()
        arm.stop()
        moto.stop()
        lease.release()
        stopped.release()


def _files(tmp_path: Path, lab: Any, *, tags: str = "", fallback: bool = False) -> list[str]:
    conn = textwrap.indent(
        textwrap.dedent(f"""\
        connection:
          user: root
          privateKeyFile: {lab.key_file}
          knownHostsFile: {lab.known_hosts_file}
        """),
        "    ",
    )
    selectors = f"        delegateSelectors: [{tags}]\n" if tags else ""
    if fallback:
        selectors += "        delegateFallback: []\n"
    text = (
        textwrap.dedent("""\
        apiVersion: v1
        kind: Service
        metadata: {name: web, identifier: web}
        spec:
          serviceDefinition: {type: Ssh}
        ---
        apiVersion: v1
        kind: Environment
        metadata: {name: clouds, identifier: clouds}
        spec: {type: Production}
        ---
        apiVersion: v1
        kind: Infrastructure
        metadata: {name: ec2, identifier: ec2}
        spec:
          environmentRef: clouds
          type: SshWinRmAws
          spec:
            region: us-east-1
            hostConnectionType: PrivateIP
            hostFilter:
              type: AwsInstanceFilter
              spec: {tags: {App: web}}
        CONN---
        apiVersion: v1
        kind: Infrastructure
        metadata: {name: azure, identifier: azure}
        spec:
          environmentRef: clouds
          type: SshWinRmAzure
          spec:
            subscriptionId: "SUB"
            resourceGroup: rg-web
            region: eastus
            hostConnectionType: PrivateIP
            hostFilter:
              type: AzureVmFilter
              spec: {tags: {app: web}}
        CONN---
        apiVersion: v1
        kind: Infrastructure
        metadata: {name: gce, identifier: gce}
        spec:
          environmentRef: clouds
          type: SshWinRmGcp
          spec:
            project: lab-project
            region: us-central1
            hostConnectionType: PrivateIP
            hostFilter:
              type: GcpInstanceFilter
              spec: {labels: {app: web}}
        CONN---
        apiVersion: v1
        kind: Pipeline
        metadata: {name: clouds, identifier: clouds}
        spec:
          stages:
            - stage:
                name: Deploy
                identifier: deploy
                type: Deployment
        SELECTORS        spec:
                  service: {serviceRef: web}
                  environment:
                    environmentRef: clouds
                    infrastructureDefinitions:
                      - identifier: ec2
                      - identifier: azure
                      - identifier: gce
                  execution:
                    steps:
                      - step:
                          type: Command
                          name: Mark
                          identifier: mark
                          spec:
                            commandUnits:
                              - identifier: mark
                                type: Script
                                spec:
                                  source:
                                    type: Inline
                                    spec:
                                      script: |
                                        mkdir -p /opt/cloud
                                        echo "<+instance.name> <+pipeline.executionId>" \
                                          > /opt/cloud/marker
        """)
        .replace("CONN", conn)
        .replace("SUB", SUBSCRIPTION)
        .replace("SELECTORS", selectors)
    )
    path = tmp_path / "clouds.yaml"
    path.write_text(text)
    return [str(path)]


@pytest.fixture(scope="module")
def cloud_workers(
    cluster: Cluster, clouds: dict[str, Any], tmp_path_factory: pytest.TempPathFactory
) -> Iterator[list[str]]:
    """One worker per cloud region, each with only its own cloud's credentials."""
    logs = tmp_path_factory.mktemp("cloud-workers")
    procs = []
    names = []
    for region, cloud, extra in (
        ("us-east-1", "aws", ["--tags", "prod"]),
        ("eastus", "azure", []),
        ("us-central1", "gcp", []),
    ):
        env = {k: v for k, v in cluster.env.items() if not k.startswith(("AWS_", "AZURE_"))}
        env.update(NO_WAY_OUT)
        env.update(clouds[cloud])
        name = f"w-{cloud}@test"
        with (logs / f"{cloud}.log").open("wb") as log:
            procs.append(
                subprocess.Popen(
                    [
                        sys.executable,
                        "-m",
                        "cli.main",
                        "worker",
                        "--region",
                        region,
                        "-c",
                        "4",
                        "-n",
                        name,
                        *extra,
                    ],
                    env=env,
                    cwd=REPO,
                    stdout=log,
                    stderr=subprocess.STDOUT,
                    start_new_session=True,
                )
            )
        names.append(name)
    _wait_for_workers(cluster.env, names)
    yield names
    for p in procs:
        if p.poll() is None:
            os.killpg(p.pid, signal.SIGTERM)
    for p in procs:
        try:
            p.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(p.pid, signal.SIGKILL)


def test_hosts_found_on_three_clouds_are_deployed_through_their_region_workers(
    cluster: Cluster, lab: Any, cloud_workers: list[str], tmp_path: Path
) -> None:
    files = _files(tmp_path, lab)
    res = cluster.vmfarm("run", *files, "-o", "json", timeout=240)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr
    report = json.loads(res.stdout)
    stage = report["stages"][0]
    by_region: dict[str, set[str]] = {}
    for h in stage["hosts"]:
        by_region.setdefault(h["region"], set()).add(h["host"])
        assert h["status"] == "SUCCEEDED"
        # the step ran on the worker of the host's cloud region, through that region's queue
        assert h["steps"][0]["queue"] == f"vmfarm.{h['region']}"
    assert set(by_region) == {"us-east-1", "eastus", "us-central1"}
    assert by_region["eastus"] == {"web-1", "web-2"}
    assert by_region["us-central1"] == {"gce-1", "gce-2"}
    assert len(by_region["us-east-1"]) == 2 and all(
        n.startswith("i-") for n in by_region["us-east-1"]
    )
    # every running instance got the deployment, at its lab address; the stopped ones did not
    for h in lab.hosts:
        marker = (Path(h.host_dir) / "opt" / "cloud" / "marker").read_text().split()
        assert marker[1] == report["id"]
    assert {h["host"]: h["region"] for h in stage["hosts"]}["web-1"] == "eastus"
    # discovery ran as tasks on each cloud's own worker (the CLI has no credentials)
    discover = next(p for p in stage["phases"] if p["kind"] == "discover")
    assert {w["worker"] for w in discover["verdict"]["workers"]} == set(cloud_workers)
    # ... and the reports say so: discovery, not a failed gate
    assert stage["discovery"]["status"] == "SUCCEEDED" and stage["discovery"]["hosts"] == 6
    shown = run_vmfarm("status", report["id"], env=cluster.env)
    assert shown.returncode == 0, shown.stderr
    assert "discovery: 6 host(s) listed by " in shown.stdout and "FAILED" not in shown.stdout
    assert all(name in shown.stdout for name in cloud_workers)


def test_hosts_are_listed_by_the_region_workers_in_service_mode(
    cluster: Cluster, lab: Any, cloud_workers: list[str], tmp_path: Path
) -> None:
    # Given a CLI with no cloud credentials and no way out (the README says it needs none)
    env = {k: v for k, v in cluster.env.items() if not k.startswith(("AWS_", "AZURE_"))}
    env.update(NO_WAY_OUT)
    files = _files(tmp_path, lab)
    # When it previews the hosts
    res = run_vmfarm("hosts", *files, "-o", "json", env=env)
    # Then each cloud's worker listed its own, and only the running instances
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr
    shown = {i["identifier"]: i for i in json.loads(res.stdout)["infrastructures"]}
    assert {k: v["discovered_by"] for k, v in shown.items()} == {
        "ec2": {"worker": "w-aws@test", "queue": "vmfarm.us-east-1"},
        "azure": {"worker": "w-azure@test", "queue": "vmfarm.eastus"},
        "gce": {"worker": "w-gcp@test", "queue": "vmfarm.us-central1"},
    }
    assert {h["name"] for h in shown["azure"]["hosts"]} == {"web-1", "web-2"}
    assert {h["name"] for h in shown["gce"]["hosts"]} == {"gce-1", "gce-2"}
    assert sorted(h["address"] for i in shown.values() for h in i["hosts"]) == sorted(
        h.address for h in lab.hosts
    )
    text = run_vmfarm("hosts", *files, "--infra", "azure", env=env)
    assert text.returncode == 0, text.stderr
    assert "2 host(s), listed by w-azure@test (vmfarm.eastus)" in text.stdout
    # A region no live worker serves is named, exit 1 (nothing waits for an hour)
    orphan = Path(files[0]).read_text().replace("region: eastus", "region: westeurope")
    (tmp_path / "orphan.yaml").write_text(orphan)
    res = run_vmfarm("hosts", str(tmp_path / "orphan.yaml"), "--infra", "azure", env=env)
    assert res.returncode == 1, res.stdout + res.stderr
    assert "westeurope" in res.stderr and "no live worker" in res.stderr


def test_tagged_work_goes_to_tagged_workers_and_falls_back_where_allowed(
    cluster: Cluster, lab: Any, cloud_workers: list[str], tmp_path: Path
) -> None:
    # Only the AWS worker has tag prod; the stage allows any worker where none has it.
    res = cluster.vmfarm(
        "run", *_files(tmp_path, lab, tags="prod", fallback=True), "-o", "json", timeout=240
    )
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr
    queues = {
        h["region"]: h["steps"][0]["queue"] for h in json.loads(res.stdout)["stages"][0]["hosts"]
    }
    assert queues == {
        "us-east-1": "vmfarm.us-east-1[prod]",
        "eastus": "vmfarm.eastus",
        "us-central1": "vmfarm.us-central1",
    }


def test_a_run_whose_delegate_tags_no_live_worker_has_is_refused(
    cluster: Cluster, lab: Any, cloud_workers: list[str], tmp_path: Path
) -> None:
    # The AWS worker has tag prod; nobody has tag gpu.
    files = _files(tmp_path, lab, tags="gpu")
    before = run_vmfarm("executions", "-o", "json", env=cluster.env).stdout
    res = cluster.vmfarm("run", *files, timeout=120)
    # Only a worker of the region with the tags may list and deploy the hosts: none is live.
    assert res.returncode == 2, res.stdout + res.stderr
    assert (
        "infrastructure 'ec2': no live worker serves region us-east-1 with tags [gpu]" in res.stderr
    )
    assert run_vmfarm("executions", "-o", "json", env=cluster.env).stdout == before


def test_a_static_run_whose_tags_no_live_worker_has_is_refused_before_it_starts(
    cluster: Cluster, lab: Any, tmp_path: Path
) -> None:
    pipeline = tmp_path / "pipeline.yaml"
    pipeline.write_text(
        textwrap.dedent("""\
        apiVersion: v1
        kind: Service
        metadata: {name: live}
        spec:
          serviceDefinition: {type: SSH}
        ---
        apiVersion: v1
        kind: Environment
        metadata: {name: lab}
        spec: {type: PreProduction}
        ---
        apiVersion: v1
        kind: Pipeline
        metadata: {name: tagged}
        spec:
          delegateSelectors: [gpu]
          stages:
            - stage:
                name: Deploy
                identifier: deploy
                type: Deployment
                spec:
                  service: {serviceRef: live}
                  environment:
                    environmentRef: lab
                    infrastructureDefinitions: [{identifier: lab}]
                  execution:
                    steps:
                      - step:
                          type: Command
                          name: Touch
                          identifier: touch
                          spec:
                            commandUnits:
                              - identifier: touch
                                type: Script
                                spec:
                                  source: {type: Inline, spec: {script: touch /opt/tagged}}
        """)
    )
    before = run_vmfarm("executions", "-o", "json", env=cluster.env).stdout
    res = cluster.vmfarm("run", str(pipeline), str(lab.infrastructure_file))
    assert res.returncode == 2, res.stdout + res.stderr
    assert "no live worker serves region r1 with tags [gpu]" in res.stderr
    assert "nothing was run" in res.stderr
    assert run_vmfarm("executions", "-o", "json", env=cluster.env).stdout == before
    assert not any((Path(h.host_dir) / "opt" / "tagged").exists() for h in lab.hosts)
