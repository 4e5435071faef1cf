"""AWS EC2 host discovery against moto in server mode on 127.0.0.1.

The provider is called as a worker would call it: boto3's default chain finds the endpoint
(AWS_ENDPOINT_URL) and credentials (AWS_ACCESS_KEY_ID ...) in the environment. Every request
goes to 127.0.0.0/8: the moto server, or a small local server that answers like a throttling
EC2, or a closed local port. Each test tags its own instances (``Fleet``) so that tests sharing
the server never see each other's hosts.
"""

from __future__ import annotations

import functools
import pickle
import threading
import urllib.request
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from uuid import uuid4

import boto3
import pytest

from app.definitions.loader import choose_pipeline, load
from app.definitions.resolve import resolve
from app.errors import DiscoveryError
from app.providers import aws
from app.providers import base as providers
from tests.alloc import Allocator
from tests.conftest import moto_server

REPO = Path(__file__).resolve().parents[2]
DATA = REPO / "tests" / "data"
EAST, WEST = "us-east-1", "eu-west-1"


@pytest.fixture(scope="module")
def moto_url(tmp_path_factory: pytest.TempPathFactory, alloc: Allocator) -> Iterator[str]:
    """moto in server mode on 127.0.0.1, boto3 pointed at it (tests/conftest.moto_server)."""
    with moto_server(tmp_path_factory, alloc, region=EAST) as url:
        yield url


@pytest.fixture()
def aws_env(moto_url: str, monkeypatch: pytest.MonkeyPatch) -> str:
    """The module's moto environment, for tests that change part of it (monkeypatch undoes)."""
    return moto_url


def ec2(region: str) -> Any:
    return boto3.client("ec2", region_name=region)


@functools.cache
def image(region: str) -> str:
    images = ec2(region).describe_images(Owners=["amazon"])["Images"]
    return str(images[0]["ImageId"])


def launch(
    region: str,
    tags: dict[str, str],
    *,
    count: int = 1,
    subnet: str | None = None,
    stopped: bool = False,
) -> list[str]:
    """Run ``count`` instances in one reservation; their ids."""
    args: dict[str, Any] = {
        "ImageId": image(region),
        "MinCount": count,
        "MaxCount": count,
        "InstanceType": "t3.micro",
    }
    if tags:
        args["TagSpecifications"] = [
            {"ResourceType": "instance", "Tags": [{"Key": k, "Value": v} for k, v in tags.items()]}
        ]
    if subnet:
        args["SubnetId"] = subnet
    ids = [i["InstanceId"] for i in ec2(region).run_instances(**args)["Instances"]]
    if stopped:
        ec2(region).stop_instances(InstanceIds=ids)
    return ids


def described(region: str, ids: list[str]) -> dict[str, dict[str, Any]]:
    """What EC2 says about these instances, by id."""
    out: dict[str, dict[str, Any]] = {}
    for r in ec2(region).describe_instances(InstanceIds=ids)["Reservations"]:
        for i in r["Instances"]:
            out[i["InstanceId"]] = i
    return out


def infra(spec: dict[str, Any], ident: str = "aws_test") -> dict[str, Any]:
    return {
        "identifier": ident,
        "name": ident,
        "provider": "aws",
        "source": "test.yaml:1",
        "spec": spec,
    }


def filtered(regions: list[str], filter_tags: dict[str, Any], **spec: Any) -> dict[str, Any]:
    """An infrastructure with an AwsInstanceFilter, and other ``spec`` fields."""
    return infra(
        {
            "connectorRef": "aws_connector",
            **spec,
            "hostFilter": {
                "type": "AwsInstanceFilter",
                "spec": {"regions": regions, "tags": filter_tags},
            },
        }
    )


@pytest.fixture()
def count_pages(monkeypatch: pytest.MonkeyPatch) -> dict[str, int]:
    """DescribeInstances calls made by the provider, by region (counted on its real clients)."""
    calls: dict[str, int] = {}
    real: Callable[[Any, str], Any] = aws._client

    def counting_client(session: Any, region: str) -> Any:
        client = real(session, region)

        def count(**_: Any) -> None:
            calls[region] = calls.get(region, 0) + 1

        client.meta.events.register("after-call.ec2.DescribeInstances", count)
        return client

    monkeypatch.setattr(aws, "_client", counting_client)
    return calls


# -- discovery against moto ---------------------------------------------------------------------


def test_discovers_exactly_the_running_matching_instances_across_regions_and_pages(
    aws_env: str, monkeypatch: pytest.MonkeyPatch, count_pages: dict[str, int]
) -> None:
    fleet = uuid4().hex
    prod_web = {"Fleet": fleet, "Environment": "production", "App": "web"}
    # Given, in us-east-1, 8 matching running instances in 7 reservations (2 pages of 5) ...
    east = [i for _ in range(6) for i in launch(EAST, prod_web)] + launch(EAST, prod_web, count=2)
    # ... and in eu-west-1, 3 more
    west = launch(WEST, prod_web, count=2) + launch(WEST, prod_web)
    # and instances that must not come back: stopped, another environment, another app,
    # missing a tag, other regions' look-alikes
    launch(EAST, prod_web, count=2, stopped=True)
    launch(WEST, prod_web, stopped=True)
    launch(EAST, {**prod_web, "Environment": "staging"})
    launch(WEST, {**prod_web, "App": "db"})
    launch(EAST, {"Fleet": fleet, "Environment": "production"})
    launch("ap-southeast-2", prod_web)
    monkeypatch.setattr(aws, "PAGE_SIZE", 5)

    # When the hosts of an infrastructure filtering on those tags in both regions are discovered
    hosts = aws.discover(
        filtered(
            [EAST, WEST],
            {"Environment": "production", "App": "web"},
            tags={"Fleet": fleet},
            connection={"user": "ubuntu", "port": 2200},
        )
    )

    # Then exactly the running matching ones come back, sorted by region then instance id
    assert [(h.region, h.name) for h in hosts] == (
        [(WEST, i) for i in sorted(west)] + [(EAST, i) for i in sorted(east)]
    )
    # with their private addresses (the default), both IPs, and the connection settings
    truth = {**described(EAST, east), **described(WEST, west)}
    for h in hosts:
        inst = truth[h.name]
        assert h.address == inst["PrivateIpAddress"] == h.private_ip
        assert h.public_ip == inst["PublicIpAddress"]
        assert h.infrastructure == "aws_test"
        assert (h.user, h.port) == ("ubuntu", 2200)
        assert h.attributes["instanceId"] == h.name
        assert h.attributes["instanceType"] == "t3.micro"
        assert h.attributes["availabilityZone"] == inst["Placement"]["AvailabilityZone"]
        assert h.attributes["availabilityZone"].startswith(h.region)
        assert h.attributes["tags"] == {"Fleet": fleet, "Environment": "production", "App": "web"}
        assert h.attributes["tag:App"] == "web"
    # and every page was followed: us-east-1 took more than one
    assert count_pages[EAST] >= 2
    assert count_pages[WEST] == 1


def test_a_list_of_tag_values_matches_any_of_them(aws_env: str) -> None:
    fleet = uuid4().hex
    web = launch(EAST, {"Fleet": fleet, "App": "web"})
    api = launch(EAST, {"Fleet": fleet, "App": "api"})
    launch(EAST, {"Fleet": fleet, "App": "db"})

    hosts = aws.discover(filtered([EAST], {"Fleet": fleet, "App": ["web", "api"]}))

    assert [h.name for h in hosts] == sorted(web + api)


def test_spec_region_is_used_when_the_filter_names_no_regions(aws_env: str) -> None:
    fleet = uuid4().hex
    ids = launch(WEST, {"Fleet": fleet})
    launch(EAST, {"Fleet": fleet})

    hosts = aws.discover(infra({"region": WEST, "tags": {"Fleet": fleet}}))

    assert [(h.region, h.name) for h in hosts] == [(WEST, ids[0])]


def test_public_ip_mode_connects_to_the_public_addresses(aws_env: str) -> None:
    fleet = uuid4().hex
    ids = launch(EAST, {"Fleet": fleet, "Name": "web-1"}) + launch(WEST, {"Fleet": fleet})

    hosts = aws.discover(filtered([EAST, WEST], {"Fleet": fleet}, hostConnectionType="PublicIP"))

    truth = {**described(EAST, ids[:1]), **described(WEST, ids[1:])}
    assert {h.name for h in hosts} == set(ids)
    for h in hosts:
        assert h.address == truth[h.name]["PublicIpAddress"] == h.public_ip
        assert h.address != truth[h.name]["PrivateIpAddress"]
    assert hosts[1].attributes["name"] == "web-1"  # us-east-1 sorts after eu-west-1


def test_hostname_mode_connects_to_the_dns_name(aws_env: str) -> None:
    fleet = uuid4().hex
    ids = launch(EAST, {"Fleet": fleet, "App": "web"})

    hosts = aws.discover(filtered([EAST], {"Fleet": fleet}, hostConnectionType="Hostname"))

    assert [h.address for h in hosts] == [described(EAST, ids)[ids[0]]["PublicDnsName"]]


def test_public_ip_mode_refuses_a_matching_instance_without_a_public_ip(aws_env: str) -> None:
    fleet = uuid4().hex
    vpc = ec2(EAST).create_vpc(CidrBlock="10.77.0.0/16")["Vpc"]["VpcId"]
    subnet = ec2(EAST).create_subnet(VpcId=vpc, CidrBlock="10.77.1.0/24")["Subnet"]["SubnetId"]
    launch(EAST, {"Fleet": fleet})
    private = launch(EAST, {"Fleet": fleet}, subnet=subnet)
    assert "PublicIpAddress" not in described(EAST, private)[private[0]]

    with pytest.raises(DiscoveryError) as err:
        aws.discover(filtered([EAST], {"Fleet": fleet}, hostConnectionType="PublicIP"))

    assert private[0] in str(err.value)
    assert "public IP" in str(err.value) and "PrivateIP" in str(err.value)
    # while PrivateIP mode reaches both, and a VPC filter narrows to that subnet's VPC
    assert len(aws.discover(filtered([EAST], {"Fleet": fleet}))) == 2
    in_vpc = aws.discover(
        infra(
            {
                "region": EAST,
                "hostFilter": {
                    "type": "AwsInstanceFilter",
                    "spec": {"tags": {"Fleet": fleet}, "vpcs": [vpc]},
                },
            }
        )
    )
    assert [h.name for h in in_vpc] == private


def test_nothing_matching_is_an_empty_list(aws_env: str) -> None:
    assert aws.discover(filtered([EAST, WEST], {"Fleet": uuid4().hex})) == []


# -- through the loader and the provider registry -------------------------------------------


def test_loader_output_dispatches_to_the_aws_provider(aws_env: str) -> None:
    # Given the two forms a user writes (inline in an Environment, and an Infrastructure)
    bundle = load([DATA / "infra_aws.yaml"])
    plan = resolve(bundle, choose_pipeline(bundle, None), execution_id="EX1").to_json()
    inline, standalone = plan["stages"][0]["infrastructures"]
    # the loader resolves them to the dict the provider reads
    assert inline["provider"] == standalone["provider"] == "aws"
    assert inline["spec"]["region"] == WEST
    assert inline["spec"]["tags"] == {"Fleet": "loader-inline"}
    assert inline["spec"]["hostConnectionType"] == "PublicIP"
    assert inline["spec"]["connection"]["privateKeyFile"] == str(DATA / "keys" / "aws.pem")
    assert standalone["spec"]["hostFilter"] == {
        "type": "AwsInstanceFilter",
        "spec": {
            "regions": [EAST, WEST],
            "tags": {"Fleet": "loader-filter", "App": ["web", "api"]},
        },
    }
    # and instances exist for them
    inline_ids = launch(WEST, {"Fleet": "loader-inline"})
    launch(WEST, {"Fleet": "loader-inline"}, stopped=True)
    east = launch(EAST, {"Fleet": "loader-filter", "App": "web"})
    west = launch(WEST, {"Fleet": "loader-filter", "App": "api"})
    launch(WEST, {"Fleet": "loader-filter", "App": "db"})

    # When the registry discovers their hosts
    inline_hosts = providers.discover(inline)
    standalone_hosts = providers.discover(standalone)

    # Then the aws provider answered, with the file's connection settings
    assert [h.name for h in inline_hosts] == inline_ids
    h = inline_hosts[0]
    assert h.address == described(WEST, inline_ids)[h.name]["PublicIpAddress"]
    assert (h.user, h.port, h.region) == ("ec2-user", 2222, WEST)
    assert h.private_key_file == str(DATA / "keys" / "aws.pem")
    assert h.infrastructure == "aws_inline"
    assert [(h.region, h.name) for h in standalone_hosts] == [(WEST, west[0]), (EAST, east[0])]
    assert {h.user for h in standalone_hosts} == {"ubuntu"}
    # and the hosts survive the trip through the broker
    assert [providers.Host.from_dict(h.to_dict()) for h in standalone_hosts] == standalone_hosts


# -- settings in the file -----------------------------------------------------------------------


# -- failures -----------------------------------------------------------------------------------


def moto_auth(url: str, initial_free_requests: str) -> None:
    """Turn moto's IAM checks on ("0": from the next request) or off ("inf")."""
    req = urllib.request.Request(
        f"{url}/moto-api/reset-auth",
        method="POST",
        data=initial_free_requests.encode(),
        headers={"Content-Type": "text/plain"},
    )
    with urllib.request.urlopen(req, timeout=30) as resp:
        assert resp.status == 200


def test_credentials_aws_does_not_know_are_an_authentication_error(
    aws_env: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "AKIAUNKNOWNUNKNOWN00")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "s3cr3t-never-printed")
    moto_auth(aws_env, "0")
    try:
        with pytest.raises(DiscoveryError) as err:
            aws.discover(filtered([EAST], {"Fleet": "any"}, hostConnectionType="PublicIP"))
    finally:
        moto_auth(aws_env, "inf")
    assert err.value.error_class == "Authentication"
    assert err.value.infrastructure == "aws_test"
    text = str(err.value)
    assert "AuthFailure" in text and EAST in text and "credentials from env" in text
    assert "s3cr3t" not in text and "AKIAUNKNOWN" not in text
    # and it crosses the broker intact
    back = pickle.loads(pickle.dumps(err.value))
    assert (back.error_class, str(back)) == ("Authentication", text)


def test_credentials_without_permission_are_an_authentication_error(
    aws_env: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    iam = boto3.client("iam", region_name=EAST)
    user = f"nobody-{uuid4().hex[:8]}"
    iam.create_user(UserName=user)
    key = iam.create_access_key(UserName=user)["AccessKey"]
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", key["AccessKeyId"])
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", key["SecretAccessKey"])
    moto_auth(aws_env, "0")
    try:
        with pytest.raises(DiscoveryError) as err:
            aws.discover(filtered([WEST], {"Fleet": "any"}))
    finally:
        moto_auth(aws_env, "inf")
    assert err.value.error_class == "Authentication"
    assert "ec2:DescribeInstances" in str(err.value)
    assert key["SecretAccessKey"] not in str(err.value)


def test_no_credentials_at_all_is_an_authentication_error(
    aws_env: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("AWS_ACCESS_KEY_ID")
    monkeypatch.delenv("AWS_SECRET_ACCESS_KEY")

    with pytest.raises(DiscoveryError) as err:
        aws.discover(filtered([EAST], {"Fleet": "any"}))

    assert err.value.error_class == "Authentication"
    assert "AWS_PROFILE" in str(err.value)


def test_an_unreachable_endpoint_is_a_connectivity_error_naming_region_and_endpoint(
    aws_env: str, monkeypatch: pytest.MonkeyPatch, free_port: Callable[[], int]
) -> None:
    closed = f"http://127.0.0.1:{free_port()}"
    monkeypatch.setenv("AWS_ENDPOINT_URL_EC2", closed)
    monkeypatch.setattr(aws, "MAX_ATTEMPTS", 1)

    with pytest.raises(DiscoveryError) as err:
        aws.discover(filtered([WEST], {"Fleet": "any"}))

    assert err.value.error_class == "Connectivity"
    assert WEST in str(err.value) and closed in str(err.value)


def test_an_unknown_region_that_cannot_be_reached_is_called_misspelled(
    aws_env: str, monkeypatch: pytest.MonkeyPatch, free_port: Callable[[], int]
) -> None:
    # (Real AWS has no endpoint for it: the DNS lookup fails. Here a closed local port stands in.)
    monkeypatch.setenv("AWS_ENDPOINT_URL_EC2", f"http://127.0.0.1:{free_port()}")
    monkeypatch.setattr(aws, "MAX_ATTEMPTS", 1)

    with pytest.raises(DiscoveryError) as err:
        aws.discover(filtered(["us-esat-1"], {"Fleet": "any"}))

    assert err.value.error_class == "Unknown"
    assert "'us-esat-1'" in str(err.value) and "misspelled" in str(err.value)


class Throttling(BaseHTTPRequestHandler):
    """Answers every EC2 call as a throttled one, counting them."""

    calls = 0

    def do_POST(self) -> None:
        type(self).calls += 1
        self.rfile.read(int(self.headers.get("Content-Length") or 0))
        body = (
            b'<?xml version="1.0" encoding="UTF-8"?><Response><Errors><Error>'
            b"<Code>RequestLimitExceeded</Code><Message>Request limit exceeded.</Message>"
            b"</Error></Errors><RequestID>r1</RequestID></Response>"
        )
        self.send_response(503)
        self.send_header("Content-Type", "text/xml")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: Any) -> None:
        pass


def test_throttling_is_retried_then_reported_as_connectivity(
    aws_env: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    server = ThreadingHTTPServer(("127.0.0.1", 0), Throttling)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        monkeypatch.setenv("AWS_ENDPOINT_URL_EC2", f"http://127.0.0.1:{server.server_port}")
        monkeypatch.setattr(aws, "MAX_ATTEMPTS", 3)
        Throttling.calls = 0
        with pytest.raises(DiscoveryError) as err:
            aws.discover(filtered([EAST], {"Fleet": "any"}))
    finally:
        server.shutdown()
        server.server_close()
        thread.join()
    assert Throttling.calls == 3  # the first call and two retries
    assert err.value.error_class == "Connectivity"
    assert "RequestLimitExceeded" in str(err.value) and "throttl" in str(err.value)


# -- an Aws connector with its own credentials --------------------------------------------------


def test_a_manual_aws_connector_discovers_with_its_keys_resolved_on_the_worker(
    aws_env: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import json

    from app import secrets

    # Given an infrastructure whose connector gives an access key and names its secret key
    fleet = uuid4().hex
    ids = launch(EAST, {"Fleet": fleet, "App": "web"})
    (tmp_path / "files.yaml").write_text(
        (DATA / "infra_aws.yaml")
        .read_text()
        .replace("loader-filter", fleet)
        .replace(
            "      type: InheritFromDelegate\n",
            "      type: ManualConfig\n      spec:\n        accessKey: AKIACONNECTOR0000001\n"
            "        secretKeyRef: account.aws_secret_key\n",
        )
    )
    bundle = load([tmp_path / "files.yaml"])
    plan = resolve(bundle, choose_pipeline(bundle, None), execution_id="EX1").to_json()
    standalone = plan["stages"][0]["infrastructures"][1]
    assert standalone["connector"]["credential"] == {
        "type": "ManualConfig",
        "accessKey": "AKIACONNECTOR0000001",
        "secretKeyRef": "account.aws_secret_key",
    }
    # and a worker whose environment has no AWS credentials, only the secret
    monkeypatch.delenv("AWS_ACCESS_KEY_ID")
    monkeypatch.delenv("AWS_SECRET_ACCESS_KEY")
    monkeypatch.setenv("VMFARM_SECRETS", "env")
    monkeypatch.setenv("VMFARM_SECRET_AWS_SECRET_KEY", "connector-secret-key-never-shown")
    secrets.reset()
    signed: list[str] = []
    real: Callable[[Any, str], Any] = aws._client

    def watching(session: Any, region: str) -> Any:
        client = real(session, region)
        client.meta.events.register(
            "before-send.ec2.DescribeInstances",
            lambda request, **_: signed.append(str(request.headers.get("Authorization"))),
        )
        return client

    monkeypatch.setattr(aws, "_client", watching)
    try:
        # When the region's worker discovers the hosts (from the plan's infrastructure, which
        # is what the discovery task receives)
        hosts = providers.discover(json.loads(json.dumps(standalone)))
        # Then the connector's keys signed the calls and the hosts are found
        assert [h.name for h in hosts] == ids
        assert signed and all("Credential=AKIACONNECTOR0000001/" in a for a in signed)
        # And neither the plan nor the task's arguments hold the secret
        assert "connector-secret-key-never-shown" not in json.dumps(plan)
        # And a secret the worker does not hold is an Authentication failure naming its id
        monkeypatch.delenv("VMFARM_SECRET_AWS_SECRET_KEY")
        secrets.reset()
        with pytest.raises(DiscoveryError) as info:
            providers.discover(standalone)
        assert info.value.error_class == "Authentication"
        assert "secretKeyRef 'account.aws_secret_key'" in str(info.value)
    finally:
        secrets.reset()
