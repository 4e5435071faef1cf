"""The reference's blue-green on AWS: ELBv2 target groups and classic load balancers switched
together, on moto in server mode on 127.0.0.1 (boto3 through AWS_ENDPOINT_URL, fake
credentials).

First the switch alone (AwsLoadBalancersSwitch) against an ip and an instance target group and a
classic load balancer; then whole runs of tests/data/reference_bluegreen/pipeline.yaml (the
reference's block) on real sshd lab hosts that moto lists as EC2 instances, with the target
group the reference names, ARN and all.
"""

from __future__ import annotations

import json
import textwrap
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from unittest import mock

import boto3
import pytest

from app.errors import TrafficError
from app.traffic import HostIds, traffic_switch_from_spec
from app.traffic.aws import AwsLoadBalancersSwitch
from tests.alloc import Allocator
from tests.conftest import base_env, moto_server, run_vmfarm

REGION = "us-east-1"
DATA = Path(__file__).resolve().parents[1] / "data" / "reference_bluegreen"
REFERENCE_ARN = (
    "arn:aws:elasticloadbalancing:us-east-1:123456789012:targetgroup/web-app-tg/1234567890123456"
)


@pytest.fixture(scope="module")
def aws(tmp_path_factory: pytest.TempPathFactory, alloc: Allocator) -> Iterator[str]:
    """moto on 127.0.0.1, reached through AWS_ENDPOINT_URL as a worker's configuration would;
    emptied first (moto's state is shared by every moto server of the test session)."""
    with moto_server(tmp_path_factory, alloc, region=REGION) as url:
        urllib.request.urlopen(
            urllib.request.Request(f"{url}/moto-api/reset", method="POST"), timeout=10
        ).close()
        yield url


def client(url: str, service: str) -> Any:
    return boto3.client(service, region_name=REGION, endpoint_url=url)


def network(url: str, cidr: str, subnet_cidr: str) -> tuple[str, str]:
    ec2 = client(url, "ec2")
    vpc = ec2.create_vpc(CidrBlock=cidr)["Vpc"]["VpcId"]
    subnet = ec2.create_subnet(VpcId=vpc, CidrBlock=subnet_cidr)["Subnet"]["SubnetId"]
    return vpc, subnet


def instance(url: str, subnet: str, ip: str, tags: dict[str, str] | None = None) -> str:
    ec2 = client(url, "ec2")
    spec: dict[str, Any] = {
        "ImageId": "ami-12c6146b",
        "MinCount": 1,
        "MaxCount": 1,
        "SubnetId": subnet,
        "PrivateIpAddress": ip,
    }
    if tags:
        spec["TagSpecifications"] = [
            {"ResourceType": "instance", "Tags": [{"Key": k, "Value": v} for k, v in tags.items()]}
        ]
    iid: str = ec2.run_instances(**spec)["Instances"][0]["InstanceId"]
    return iid


def target_group(
    url: str, vpc: str, *, name: str, target_type: str, fixed_id: str | None = None
) -> str:
    """A target group on port 8080; ``fixed_id`` makes its ARN end in that id (moto draws it
    at random; the reference's pipeline names a fixed one)."""
    from moto.elbv2 import models as elbv2_models

    create = client(url, "elbv2").create_target_group
    kwargs = {
        "Name": name,
        "Protocol": "HTTP",
        "Port": 8080,
        "VpcId": vpc,
        "TargetType": target_type,
    }
    if fixed_id is None:
        arn: str = create(**kwargs)["TargetGroups"][0]["TargetGroupArn"]
        return arn
    with mock.patch.object(elbv2_models.mock_random, "get_random_hex", return_value=fixed_id):
        arn = create(**kwargs)["TargetGroups"][0]["TargetGroupArn"]
    return arn


def classic(url: str, name: str) -> str:
    client(url, "elb").create_load_balancer(
        LoadBalancerName=name,
        AvailabilityZones=[f"{REGION}a"],
        Listeners=[{"Protocol": "HTTP", "LoadBalancerPort": 80, "InstancePort": 8080}],
    )
    return name


def in_group(url: str, arn: str) -> list[str]:
    """What AWS says the target group holds (not draining): sorted ids."""
    rows = client(url, "elbv2").describe_target_health(TargetGroupArn=arn)
    return sorted(
        r["Target"]["Id"]
        for r in rows["TargetHealthDescriptions"]
        if r["TargetHealth"]["State"] != "draining"
    )


def in_classic(url: str, name: str) -> list[str]:
    """The instances registered with a classic load balancer, sorted."""
    (lb,) = client(url, "elb").describe_load_balancers(LoadBalancerNames=[name])[
        "LoadBalancerDescriptions"
    ]
    return sorted(i["InstanceId"] for i in lb["Instances"])


# --- the switch alone -----------------------------------------------------------------------------


@pytest.fixture
def fleet(aws: str) -> dict[str, Any]:
    """Four running instances (blue: the first two), an ip and an instance target group and a
    classic load balancer, each holding blue."""
    vpc, subnet = network(aws, "10.0.0.0/16", "10.0.1.0/24")
    ips = ["10.0.1.10", "10.0.1.11", "10.0.1.20", "10.0.1.21"]
    hosts = {
        f"web-{n}": HostIds(name=f"web-{n}", instance_id=instance(aws, subnet, ip), private_ip=ip)
        for n, ip in enumerate(ips)
    }
    suffix = vpc[-8:]
    by_ip = target_group(aws, vpc, name=f"ip-{suffix}", target_type="ip")
    by_instance = target_group(aws, vpc, name=f"in-{suffix}", target_type="instance")
    clb = classic(aws, f"clb-{suffix}")
    blue = [hosts["web-0"], hosts["web-1"]]
    elbv2 = client(aws, "elbv2")
    elbv2.register_targets(
        TargetGroupArn=by_ip, Targets=[{"Id": str(h.private_ip), "Port": 8080} for h in blue]
    )
    elbv2.register_targets(
        TargetGroupArn=by_instance, Targets=[{"Id": str(h.instance_id), "Port": 8080} for h in blue]
    )
    client(aws, "elb").register_instances_with_load_balancer(
        LoadBalancerName=clb, Instances=[{"InstanceId": str(h.instance_id)} for h in blue]
    )
    return {"hosts": hosts, "ip": by_ip, "instance": by_instance, "classic": clb}


def switch_of(
    aws: str,
    fleet: dict[str, Any],
    groups: tuple[str, ...] = ("ip", "instance"),
    timeout: float = 30,
) -> AwsLoadBalancersSwitch:
    """The switch as a pipeline's traffic spec builds it, polling AWS quickly."""
    spec: dict[str, Any] = {
        "type": "AwsLoadBalancers",
        "region": REGION,
        "targetGroupArns": [fleet[g] for g in groups],
        "classicLoadBalancers": [fleet["classic"]],
        "timeout": timeout,
    }
    built = traffic_switch_from_spec(spec, state_dir=Path("/nonexistent"), hosts=fleet["hosts"])
    assert isinstance(built, AwsLoadBalancersSwitch)
    built.close()
    return AwsLoadBalancersSwitch(
        region=REGION,
        target_group_arns=spec["targetGroupArns"],
        classic_load_balancers=spec["classicLoadBalancers"],
        timeout=timeout,
        poll_interval=0.05,
        hosts=fleet["hosts"],
    )


def holds(aws: str, fleet: dict[str, Any], names: list[str]) -> bool:
    """Do the target groups and the classic load balancer hold exactly these hosts?"""
    hosts = [fleet["hosts"][n] for n in names]
    return (
        in_group(aws, fleet["ip"]) == sorted(str(h.private_ip) for h in hosts)
        and in_group(aws, fleet["instance"]) == sorted(str(h.instance_id) for h in hosts)
        and in_classic(aws, fleet["classic"]) == sorted(str(h.instance_id) for h in hosts)
    )


def test_one_switch_moves_target_groups_and_classic_load_balancer_together(
    aws: str, fleet: dict[str, Any]
) -> None:
    # Given blue (web-0, web-1) in an ip group, an instance group and a classic load balancer
    with switch_of(aws, fleet) as sw:
        assert sorted(sw.live()) == ["web-0", "web-1"]
        # When traffic switches to green
        result = sw.switch(["web-2", "web-3"])
        # Then every load balancer holds green, each by its own id, and blue is gone
        assert holds(aws, fleet, ["web-2", "web-3"])
        assert sorted(result.added) == ["web-2", "web-3"]
        assert sorted(result.removed) == sorted(result.previous) == ["web-0", "web-1"]
        assert sorted(result.balancers[f"classic load balancer {fleet['classic']}"]) == sorted(
            str(fleet["hosts"][n].instance_id) for n in ("web-2", "web-3")
        )
        # And again changes nothing; switching back is the rollback
        assert not sw.switch(["web-3", "web-2"]).changed
        sw.switch(result.previous)
        assert holds(aws, fleet, ["web-0", "web-1"])


def test_a_host_without_an_instance_id_fails_the_switch_before_anything_moves(
    aws: str, fleet: dict[str, Any]
) -> None:
    # Given green hosts of which one is a static host with no instance id
    fleet["hosts"]["web-3"] = HostIds(name="web-3", private_ip="10.0.1.21")
    with switch_of(aws, fleet) as sw, pytest.raises(TrafficError) as caught:
        sw.switch(["web-2", "web-3"])
    # Then the error names the host and what to do, and blue keeps every load balancer
    message = str(caught.value)
    assert "host web-3 has no EC2 instance id" in message
    assert "attributes.instanceId" in message and "Nothing was switched" in message
    assert holds(aws, fleet, ["web-0", "web-1"])


@pytest.mark.parametrize("groups", [("ip", "instance"), ("ip",)], ids=["both", "ip-only"])
def test_green_that_never_comes_in_service_is_taken_out_of_every_load_balancer(
    aws: str, fleet: dict[str, Any], groups: tuple[str, ...]
) -> None:
    # Given a green instance that stops once it is registered with the classic load balancer
    # (registered last, after the target groups took green): the instance target group sees
    # it stopped, the classic load balancer never has it InService
    stopped = str(fleet["hosts"]["web-3"].instance_id)
    sw = switch_of(aws, fleet, groups, timeout=1)
    with sw:
        classic_lb = next(m for m in sw._members if "classic" in m.label)
        real = classic_lb.register

        def register_then_stop(ids: list[str]) -> None:
            real(ids)
            client(aws, "ec2").stop_instances(InstanceIds=[stopped])

        with (
            mock.patch.object(classic_lb, "register", register_then_stop),
            pytest.raises(TrafficError) as caught,
        ):
            sw.switch(["web-2", "web-3"])
    # Then the switch fails saying which instance, and blue alone holds every load balancer
    message = str(caught.value)
    assert stopped in message and "blue keeps the traffic" in message
    if groups == ("ip",):
        assert (
            f"did not come InService within 1 s in classic load balancer {fleet['classic']}"
            in message
        )
    assert in_group(aws, fleet["ip"]) == ["10.0.1.10", "10.0.1.11"]
    assert in_classic(aws, fleet["classic"]) == sorted(
        str(fleet["hosts"][n].instance_id) for n in ("web-0", "web-1")
    )
    if "instance" in groups:
        assert holds(aws, fleet, ["web-0", "web-1"])


# --- the reference's pipeline, run ----------------------------------------------------------------


def _infrastructure(tmp_path: Path, lab: Any) -> Path:
    """The reference's AWS infrastructure (tests/data/reference_bluegreen/infrastructure.yaml)
    with the lab's SSH settings, reaching hosts by private IP (moto gives the lab's addresses
    as private IPs, and no public ones)."""
    text = (DATA / "infrastructure.yaml").read_text()
    text = text.replace("hostConnectionType: PublicIP", "hostConnectionType: PrivateIP")
    text += textwrap.indent(
        textwrap.dedent(f"""\
        connection:
          user: root
          privateKeyFile: {lab.key_file}
          knownHostsFile: {lab.known_hosts_file}
        """),
        "    ",
    )
    path = tmp_path / "infrastructure.yaml"
    path.write_text(text)
    return path


def test_the_reference_block_deploys_to_staging_then_switches_every_load_balancer(
    lab8: Any, aws: str, tmp_path: Path
) -> None:
    # Given four lab hosts listed by EC2 with the reference infrastructure's tags, the
    # reference's target group (its ARN as written) and classic load balancer, and production
    # (the first two instances, as discovery orders them) holding the traffic
    vpc, subnet = network(aws, "127.0.0.0/16", "127.0.1.0/24")
    lab_hosts = lab8.hosts[:4]
    by_id = {
        instance(aws, subnet, h.address, {"Environment": "production", "Application": "web-app"}): h
        for h in lab_hosts
    }
    ids = sorted(by_id)
    production, staging = ids[:2], ids[2:]
    arn = target_group(
        aws, vpc, name="web-app-tg", target_type="instance", fixed_id="1234567890123456"
    )
    assert arn == REFERENCE_ARN
    classic(aws, "web-app-clb")
    client(aws, "elbv2").register_targets(
        TargetGroupArn=arn, Targets=[{"Id": i, "Port": 8080} for i in production]
    )
    client(aws, "elb").register_instances_with_load_balancer(
        LoadBalancerName="web-app-clb", Instances=[{"InstanceId": i} for i in production]
    )
    for h in lab_hosts:
        (Path(h.host_dir) / "opt" / "web-app" / "version").unlink(missing_ok=True)
    env = base_env(VMFARM_HOME=str(tmp_path / "home"))
    files = [
        str(DATA / "service.yaml"),
        str(DATA / "environment.yaml"),
        str(_infrastructure(tmp_path, lab8)),
        str(DATA / "pipeline.yaml"),
    ]

    def version(iid: str) -> str | None:
        f = Path(by_id[iid].host_dir) / "opt" / "web-app" / "version"
        return f.read_text().strip() if f.exists() else None

    def run(*args: str, ok: bool = True) -> dict[str, Any]:
        res = run_vmfarm(*args, "-o", "json", env=env, timeout=240)
        assert (res.returncode == 0) == ok, res.stdout[-3000:] + res.stderr[-3000:]
        return dict(json.loads(res.stdout))

    # When the pipeline runs version 1
    report = run("run", *files, "--set", "version=1")
    # Then staging got version 1, production nothing, and both load balancers hold staging only
    assert [version(i) for i in ids] == [None, None, "1", "1"]
    assert in_group(aws, arn) == staging and in_classic(aws, "web-app-clb") == staging
    planned = next(p for p in report["stages"][0]["plan"] if p["kind"] == "switch")
    assert planned["name"] == "Switch Load Balancer to green"
    switch = next(p for p in report["stages"][0]["phases"] if p["kind"] == "switch")
    assert sorted(switch["verdict"]["result"]["added"]) == staging
    assert sorted(switch["verdict"]["result"]["removed"]) == production

    # When version 2 runs, the old production set is staging now
    second = run("run", *files, "--set", "version=2")
    assert [version(i) for i in ids] == ["2", "2", "1", "1"]
    assert in_group(aws, arn) == production and in_classic(aws, "web-app-clb") == production

    # When version 2 is rolled back, traffic goes back to the hosts that still run version 1
    run("rollback", second["id"])
    assert in_group(aws, arn) == staging and in_classic(aws, "web-app-clb") == staging

    # When the classic load balancer is gone and version 3 runs, the switch fails: the run
    # fails saying so, and the hosts on version 1 keep the traffic in the target group
    client(aws, "elb").delete_load_balancer(LoadBalancerName="web-app-clb")
    third = run("run", *files, "--set", "version=3", ok=False)
    assert third["status"] == "FAILED"
    failed = next(p for p in third["stages"][0]["phases"] if p["kind"] == "switch")
    assert failed["status"] == "FAILED"
    assert "classic load balancer web-app-clb" in failed["verdict"]["error"]
    assert "LoadBalancerNotFound" in failed["verdict"]["error"]
    assert in_group(aws, arn) == staging
