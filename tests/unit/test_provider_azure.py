"""Azure host discovery settings checked at load and region names. Discovery with the real Azure
clients against the fake ARM server is in tests/cloud/test_provider_azure.py.
"""

from __future__ import annotations

import os
from typing import Any

import pytest

from app.errors import ConfigError
from app.providers import azure
from tests.fakes.azure_arm import SUBSCRIPTION

DEAD_PROXY = "http://127.0.0.1:9"


def _isolate(monkeypatch: pytest.MonkeyPatch) -> None:
    """No Azure settings from the machine, and no way out of loopback."""
    for var in list(os.environ):
        if var.startswith(("AZURE_", "VMFARM_AZURE_", "MSI_", "IDENTITY_", "IMDS_")):
            monkeypatch.delenv(var)
    for var in ("HTTPS_PROXY", "HTTP_PROXY", "ALL_PROXY", "https_proxy", "http_proxy", "all_proxy"):
        monkeypatch.setenv(var, DEAD_PROXY)
    monkeypatch.setenv("NO_PROXY", "127.0.0.1,localhost")
    monkeypatch.setenv("no_proxy", "127.0.0.1,localhost")


def infra(spec: dict[str, Any] | None = None, **extra: Any) -> dict[str, Any]:
    base: dict[str, Any] = {
        "connectorRef": "azure_conn",
        "subscriptionId": SUBSCRIPTION,
        "resourceGroup": "rg-web",
        "hostConnectionType": "PrivateIP",
        "connection": {"user": "azureuser", "privateKeyFile": "/keys/id_ed25519"},
    }
    base.update(spec or {})
    base.update(extra)
    return {
        "identifier": "azure_prod",
        "name": "Azure prod",
        "provider": "azure",
        "source": "env.yaml:12",
        "spec": base,
    }


def test_missing_settings_are_config_errors_naming_the_field(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    _isolate(monkeypatch)
    with pytest.raises(ConfigError, match="subscriptionId"):
        azure.discover(infra(subscriptionId=None))
    with pytest.raises(ConfigError, match="resourceGroup"):
        azure.discover(infra(resourceGroup=None))
    with pytest.raises(ConfigError, match="hostFilter type 'AwsInstanceFilter'"):
        azure.discover(infra(hostFilter={"type": "AwsInstanceFilter", "spec": {}}))
    monkeypatch.setenv("AZURE_SUBSCRIPTION_ID", SUBSCRIPTION)
    assert azure.AzureTarget.from_infra(infra(subscriptionId=None)).subscription == SUBSCRIPTION


def test_region_names_are_normalised() -> None:
    assert azure.normalize_region("East US") == "eastus"
    assert azure.normalize_region("westeurope") == "westeurope"
    assert azure.AzureTarget.from_infra(infra(region="East US 2")).location == "eastus2"
