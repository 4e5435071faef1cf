"""AWS EC2 host discovery without an endpoint: settings and filters checked at load, the filters
sent to EC2, SDK errors mapped to vmfarm's error classes. Discovery against moto is in
tests/cloud/test_provider_aws.py.
"""

from __future__ import annotations

import subprocess
import sys
from http.server import BaseHTTPRequestHandler
from pathlib import Path
from typing import Any

import pytest
from botocore.exceptions import ClientError, EndpointConnectionError, NoCredentialsError

from app.errors import ConfigError
from app.providers import aws

REPO = Path(__file__).resolve().parents[2]
DATA = REPO / "tests" / "data"
EAST, WEST = "us-east-1", "eu-west-1"


def infra(spec: dict[str, Any], ident: str = "aws_test") -> dict[str, Any]:
    return {
        "identifier": ident,
        "name": ident,
        "provider": "aws",
        "source": "test.yaml:1",
        "spec": spec,
    }


# -- discovery against moto ---------------------------------------------------------------------


# -- through the loader and the provider registry -------------------------------------------


# -- settings in the file -----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("spec", "field"),
    [
        ({"connectorRef": "c", "tags": {"App": "web"}}, "spec.region"),
        (
            {"hostFilter": {"type": "AwsInstanceFilter", "spec": {"tags": {"App": "web"}}}},
            "spec.region",
        ),
        (
            {"hostFilter": {"type": "AwsInstanceFilter", "spec": {"regions": []}}},
            "hostFilter.spec.regions",
        ),
        (
            {"hostFilter": {"type": "AwsInstanceFilter", "spec": {"regions": "us-east-1"}}},
            "hostFilter.spec.regions",
        ),
        (
            {"hostFilter": {"type": "AwsInstanceFilter", "spec": {"regions": ["US East"]}}},
            "hostFilter.spec.regions",
        ),
        (
            {
                "region": EAST,
                "hostFilter": {"type": "AwsInstanceFilter", "spec": {"region": [EAST]}},
            },
            "hostFilter.spec.region",
        ),
        ({"region": EAST, "hostFilter": {"type": "AzureVmFilter", "spec": {}}}, "hostFilter.type"),
        (
            {"region": EAST, "hostFilter": {"type": "AwsInstanceFilter", "spec": {"tags": ["a"]}}},
            "hostFilter.spec.tags",
        ),
        (
            {
                "region": EAST,
                "hostFilter": {"type": "AwsInstanceFilter", "spec": {"tags": {"App": None}}},
            },
            "hostFilter.spec.tags.App",
        ),
        (
            {
                "region": EAST,
                "hostFilter": {"type": "AwsInstanceFilter", "spec": {"tags": {"App": []}}},
            },
            "hostFilter.spec.tags.App",
        ),
        (
            {
                "region": EAST,
                "tags": {"App": "web"},
                "hostFilter": {"type": "AwsInstanceFilter", "spec": {"tags": {"App": "api"}}},
            },
            "hostFilter.spec.tags",
        ),
        (
            {
                "region": EAST,
                "hostFilter": {"type": "AwsInstanceFilter", "spec": {"vpcs": "vpc-1"}},
            },
            "hostFilter.spec.vpcs",
        ),
        ({"region": EAST, "hostConnectionType": "Private"}, "spec.hostConnectionType"),
        ({"region": EAST, "hosts": [{"hostname": "10.0.0.1"}]}, "spec.hosts"),
    ],
)
def test_wrong_settings_are_config_errors_naming_the_field(
    spec: dict[str, Any], field: str
) -> None:
    with pytest.raises(ConfigError) as err:
        aws.discover(infra(spec, ident="aws_bad"))
    assert field in str(err.value)
    assert "aws_bad" in str(err.value) and "test.yaml:1" in str(err.value)


def test_filters_sent_to_ec2() -> None:
    query = aws.parse_infra(
        infra(
            {
                "region": EAST,
                "tags": {"Team": "platform", "Enabled": True},
                "hostFilter": {
                    "type": "AwsInstanceFilter",
                    "spec": {"regions": [WEST, EAST, WEST], "tags": {"App": ["web", 2]}},
                },
            }
        )
    )
    assert query.regions == [WEST, EAST]
    assert query.filters == [
        {"Name": "instance-state-name", "Values": ["running"]},
        {"Name": "tag:App", "Values": ["web", "2"]},
        {"Name": "tag:Enabled", "Values": ["true"]},
        {"Name": "tag:Team", "Values": ["platform"]},
    ]
    assert query.connection_type == "PrivateIP"


def test_reading_a_file_and_the_filters_never_imports_boto3() -> None:
    code = (
        "import sys; from app.providers import aws; from app.definitions.loader import load; "
        f"load([{str(DATA / 'infra_aws.yaml')!r}]); "
        "aws.parse_infra({'identifier': 'x', 'spec': {'region': 'us-east-1'}}); "
        "sys.exit(1 if 'boto3' in sys.modules or 'botocore' in sys.modules else 0)"
    )
    run = subprocess.run(
        [sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120
    )
    assert run.returncode == 0, run.stderr


# -- failures -----------------------------------------------------------------------------------


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


def client_error(code: str, status: int = 400, message: str = "m") -> ClientError:
    return ClientError(
        {
            "Error": {"Code": code, "Message": message},
            "ResponseMetadata": {"HTTPStatusCode": status},
        },
        "DescribeInstances",
    )


@pytest.mark.parametrize(
    ("exc", "error_class"),
    [
        (client_error("AuthFailure", 401), "Authentication"),
        (client_error("UnauthorizedOperation", 403), "Authentication"),
        (client_error("InvalidClientTokenId", 403), "Authentication"),
        (client_error("ExpiredToken", 400), "Authentication"),
        (client_error("OptInRequired", 401), "Authentication"),
        (NoCredentialsError(), "Authentication"),
        (client_error("RequestLimitExceeded", 503), "Connectivity"),
        (client_error("Throttling", 400), "Connectivity"),
        (client_error("InternalError", 500), "Connectivity"),
        (client_error("Whatever", 502), "Connectivity"),
        (
            EndpointConnectionError(endpoint_url="https://ec2.us-east-1.amazonaws.com"),
            "Connectivity",
        ),
        (client_error("InvalidParameterValue", 400), "Unknown"),
    ],
)
def test_sdk_errors_map_to_error_classes(exc: Exception, error_class: str) -> None:
    err = aws.discovery_error(exc, infrastructure="aws_prod", region=EAST)
    assert err is not None
    assert err.error_class == error_class
    assert EAST in str(err) and "aws_prod" in str(err)


def test_errors_never_show_a_password_from_an_endpoint_url() -> None:
    err = aws.discovery_error(
        EndpointConnectionError(endpoint_url="https://user:hunter2@proxy.example/ec2"),
        infrastructure="aws_prod",
        region=EAST,
        endpoint="https://user:hunter2@proxy.example/ec2",
    )
    assert err is not None and "hunter2" not in str(err)


def test_a_bug_is_not_disguised_as_a_discovery_error() -> None:
    assert aws.discovery_error(KeyError("x"), infrastructure="i", region=EAST) is None
