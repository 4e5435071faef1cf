"""ElbV2Switch against moto in server mode on 127.0.0.1 (boto3 with endpoint_url).

Fake credentials come from the environment, for these tests only; nothing contacts AWS (the
instance metadata service is disabled too, so the credential chain never leaves 127.0.0.1).
"""

from __future__ import annotations

import pickle
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any
from uuid import uuid4

import boto3
import pytest

from app.errors import TrafficError
from app.traffic import traffic_switch_from_spec
from app.traffic.elbv2 import ElbV2Switch
from tests.alloc import Allocator
from tests.conftest import moto_server

REGION = "us-east-1"


@pytest.fixture(scope="module")
def moto_url(tmp_path_factory: pytest.TempPathFactory, alloc: Allocator) -> Iterator[str]:
    """moto in server mode on 127.0.0.1 (tests/conftest.moto_server); the switch is given the
    endpoint explicitly, as a user's configuration would."""
    with moto_server(tmp_path_factory, alloc, region=REGION, endpoint_env=False) as url:
        yield url


def client(moto_url: str, service: str) -> Any:
    return boto3.client(service, region_name=REGION, endpoint_url=moto_url)


def target_group(moto_url: str, *, target_type: str, port: int = 8080) -> str:
    """A new VPC and a target group in it; its ARN."""
    vpc = client(moto_url, "ec2").create_vpc(CidrBlock="10.0.0.0/16")["Vpc"]["VpcId"]
    group = client(moto_url, "elbv2").create_target_group(
        Name=f"tg-{uuid4().hex[:12]}",
        Protocol="HTTP",
        Port=port,
        VpcId=vpc,
        TargetType=target_type,
    )["TargetGroups"][0]
    arn: str = group["TargetGroupArn"]
    return arn


def registered(moto_url: str, arn: str) -> list[str]:
    """What AWS says is registered (not draining), as sorted id:port strings."""
    rows = client(moto_url, "elbv2").describe_target_health(TargetGroupArn=arn)
    return sorted(
        f"{r['Target']['Id']}:{r['Target']['Port']}"
        for r in rows["TargetHealthDescriptions"]
        if r["TargetHealth"]["State"] != "draining"
    )


BLUE = ["10.0.1.10:8080", "10.0.1.11:8080"]
GREEN = ["10.0.2.20:8080", "10.0.2.21:8080"]


def test_switch_registers_green_then_deregisters_blue(moto_url: str, tmp_path: Path) -> None:
    # Given an ip target group serving blue, and a switch built from a pipeline spec
    arn = target_group(moto_url, target_type="ip")
    client(moto_url, "elbv2").register_targets(
        TargetGroupArn=arn, Targets=[{"Id": b.split(":")[0], "Port": 8080} for b in BLUE]
    )
    sw = traffic_switch_from_spec(
        {"type": "AwsElbV2", "region": REGION, "targetGroupArn": arn, "endpointUrl": moto_url},
        state_dir=tmp_path,
    )
    assert isinstance(sw, ElbV2Switch)
    assert sorted(sw.live()) == BLUE

    # When traffic switches to green (one target without a port: the group's port applies)
    result = sw.switch([GREEN[0], "10.0.2.21"])

    # Then green is registered, blue deregistered, and the result says so
    assert sorted(result.added) == GREEN and sorted(result.removed) == BLUE
    assert sorted(result.previous) == BLUE and sorted(result.live) == GREEN
    assert registered(moto_url, arn) == GREEN == sorted(sw.live())

    # And repeating it changes nothing
    again = sw.switch(list(reversed(GREEN)))
    assert not again.changed and sorted(again.previous) == GREEN
    assert registered(moto_url, arn) == GREEN

    # And a rollback is a switch back to what the first switch replaced
    back = sw.switch(result.previous)
    assert sorted(back.added) == BLUE and sorted(back.removed) == GREEN
    assert registered(moto_url, arn) == BLUE
    assert back.to_dict()["changed"] is True
    sw.close()


def instances(moto_url: str, count: int) -> list[str]:
    ec2 = client(moto_url, "ec2")
    image = ec2.describe_images()["Images"][0]["ImageId"]
    reservation = ec2.run_instances(ImageId=image, MinCount=count, MaxCount=count)
    return [i["InstanceId"] for i in reservation["Instances"]]


def test_green_that_cannot_be_registered_is_a_clear_error(moto_url: str) -> None:
    # Given an instance target group serving a running instance, and a stopped one as "green"
    blue, green = instances(moto_url, 2)
    client(moto_url, "ec2").stop_instances(InstanceIds=[green])
    arn = target_group(moto_url, target_type="instance", port=80)
    sw = ElbV2Switch(region=REGION, target_group_arn=arn, endpoint_url=moto_url, poll_interval=0.1)
    sw.switch([blue])
    assert sw.live() == [f"{blue}:80"]
    # When the switch goes to the stopped instance, AWS refuses to register it
    with pytest.raises(TrafficError) as caught:
        sw.switch([green])
    # Then the error names the operation, the ARN, the instance and what to check
    message = str(caught.value)
    assert "RegisterTargets" in message and arn in message and green in message
    assert "InvalidTarget" in message and "running instances" in message
    assert registered(moto_url, arn) == [f"{blue}:80"]


class StopsAfterRegistering:
    """A real elbv2 client whose instances stop right after they are registered."""

    def __init__(self, moto_url: str) -> None:
        self._elb = client(moto_url, "elbv2")
        self._ec2 = client(moto_url, "ec2")

    def register_targets(self, **kwargs: Any) -> Any:
        answer = self._elb.register_targets(**kwargs)
        self._ec2.stop_instances(InstanceIds=[t["Id"] for t in kwargs["Targets"]])
        return answer

    def __getattr__(self, name: str) -> Any:
        return getattr(self._elb, name)


def test_green_that_never_gets_healthy_is_taken_out_again(moto_url: str) -> None:
    # Given blue live, and green instances that stop once registered
    blue, green = instances(moto_url, 2)
    arn = target_group(moto_url, target_type="instance", port=80)
    client(moto_url, "elbv2").register_targets(TargetGroupArn=arn, Targets=[{"Id": blue}])
    sw = ElbV2Switch(
        region=REGION,
        target_group_arn=arn,
        endpoint_url=moto_url,
        poll_interval=0.1,
        timeout=30,
        client=StopsAfterRegistering(moto_url),
    )
    # When traffic switches to green
    began = time.monotonic()
    with pytest.raises(TrafficError) as caught:
        sw.switch([f"{green}:80"])
    # Then it fails at once (no 30 s wait), says why, deregisters green, and blue stays
    assert time.monotonic() - began < 15
    message = str(caught.value)
    assert green in message and "Target.InvalidState" in message and arn in message
    assert "blue keeps the traffic" in message
    assert registered(moto_url, arn) == [f"{blue}:80"]


def test_unknown_target_group_is_a_clear_error(moto_url: str) -> None:
    good = target_group(moto_url, target_type="ip")
    arn = good.rsplit("/", 1)[0] + "/0123456789abcdef"
    sw = ElbV2Switch(region=REGION, target_group_arn=arn, endpoint_url=moto_url)
    with pytest.raises(TrafficError) as caught:
        sw.switch(GREEN)
    message = str(caught.value)
    assert arn in message and "TargetGroupNotFound" in message
    assert "check targetGroupArn" in message
    with pytest.raises(TrafficError, match="TargetGroupNotFound"):
        sw.live()
    # It crosses the broker intact
    copy = pickle.loads(pickle.dumps(caught.value))
    assert str(copy) == message and copy.switch == arn


def test_backends_must_match_the_target_type(moto_url: str) -> None:
    arn = target_group(moto_url, target_type="ip")
    sw = ElbV2Switch(region=REGION, target_group_arn=arn, endpoint_url=moto_url)
    with pytest.raises(TrafficError, match="target type ip"):
        sw.switch(["i-0123456789abcdef0:8080"])
    with pytest.raises(TrafficError, match="invalid port"):
        sw.switch(["10.0.2.20:http"])
    with pytest.raises(TrafficError, match="empty set"):
        sw.switch([])
    assert registered(moto_url, arn) == []


def test_unreachable_endpoint_is_a_clear_error(moto_url: str, free_port: Callable[[], int]) -> None:
    # moto_url only for its credentials; nothing listens on this port
    endpoint = f"http://127.0.0.1:{free_port()}"
    arn = f"arn:aws:elasticloadbalancing:{REGION}:123456789012:targetgroup/web/0123456789abcdef"
    sw = ElbV2Switch(region=REGION, target_group_arn=arn, endpoint_url=endpoint, max_attempts=1)
    with pytest.raises(TrafficError, match="cannot reach") as caught:
        sw.live()
    assert endpoint in str(caught.value) and arn in str(caught.value)
