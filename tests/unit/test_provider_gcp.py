"""GCP host discovery settings checked at load. Discovery with the real google-cloud-compute
clients against a fake GCE server is in tests/cloud/test_provider_gcp.py.
"""

from __future__ import annotations

from typing import Any

import pytest

from app.errors import ConfigError
from app.providers.gcp import discover

P = "shop-prod"
A, B, C = "us-central1-a", "us-central1-b", "us-central1-c"
EU = "europe-west1-b"


@pytest.fixture(autouse=True)
def _offline(monkeypatch: pytest.MonkeyPatch) -> None:
    """Only 127.0.0.0/8: no proxy, and no GCE metadata server lookups if ADC is ever asked."""
    for var in (
        "HTTP_PROXY",
        "HTTPS_PROXY",
        "http_proxy",
        "https_proxy",
        "ALL_PROXY",
        "all_proxy",
        "VMFARM_GCP_AUTH",
        "GOOGLE_APPLICATION_CREDENTIALS",
    ):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("NO_PROXY", "127.0.0.1,localhost")
    monkeypatch.setenv("GCE_METADATA_HOST", "127.0.0.1:9")
    monkeypatch.setenv("GCE_METADATA_IP", "127.0.0.1:9")
    monkeypatch.setenv("CLOUDSDK_CONFIG", "/nonexistent-gcloud-config")


def infra(**spec: Any) -> dict[str, Any]:
    return {
        "identifier": "gcp_prod",
        "name": "GCP prod",
        "provider": "gcp",
        "source": "env.yaml:12",
        "spec": {
            "connectorRef": "gcp_conn",
            "project": P,
            "connection": {"user": "deploy", "privateKeyFile": "/keys/id"},
            **spec,
        },
    }


# --- instance filter by zones ---------------------------------------------------------------


# --- by region: aggregatedList ----------------------------------------------------------------


# --- labels and network tags -------------------------------------------------------------------


# --- instance groups ----------------------------------------------------------------------------


# --- unknown project / zone, auth, retries ----------------------------------------------------


# --- credentials -------------------------------------------------------------------------------


# --- settings ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("spec", "field"),
    [
        ({"project": None, "zones": [A]}, "spec.project"),
        ({"zones": []}, "spec.region"),
        ({"region": "us-central1", "zones": [EU]}, "spec.zones"),
        ({"zones": ["us-central1"]}, "spec.zones"),
        ({"zones": [A], "hostConnectionType": "Carrier"}, "hostConnectionType"),
        ({"zones": [A], "hostFilter": {"type": "AwsInstanceFilter"}}, "hostFilter.type"),
        (
            {
                "zones": [A],
                "hostFilter": {"type": "GcpInstanceFilter", "spec": {"instanceGroups": ["g"]}},
            },
            "instanceGroups",
        ),
        (
            {
                "zones": [A],
                "hostFilter": {"type": "GcpInstanceFilter", "spec": {"labels": ["env"]}},
            },
            "hostFilter.spec.labels",
        ),
    ],
)
def test_bad_settings_are_config_errors_naming_the_field(spec: dict[str, Any], field: str) -> None:
    with pytest.raises(ConfigError) as exc:
        discover(infra(**spec))
    assert field in str(exc.value) and "gcp_prod" in str(exc.value)


# --- through the real loader ---------------------------------------------------------------------
