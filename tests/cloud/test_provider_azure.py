"""Azure host discovery with the real azure-mgmt-compute / azure-mgmt-network clients and the real
``ClientSecretCredential``, against the fake ARM + token server in ``tests/fakes/azure_arm.py``.

Everything goes over HTTPS to 127.0.0.1 (the fake's self-signed certificate is trusted through
``VMFARM_AZURE_CA_BUNDLE``); proxies point at a dead loopback port so that any request aimed
elsewhere fails at once instead of leaving the machine.
"""

from __future__ import annotations

import os
import pickle
import textwrap
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from app.errors import DiscoveryError
from app.providers import azure
from app.providers.base import Host
from app.providers.base import discover as discover_any
from tests.fakes.azure_arm import CLIENT_ID, CLIENT_SECRET, SUBSCRIPTION, TENANT, FakeArm

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


def point_at(fake: FakeArm, monkeypatch: pytest.MonkeyPatch) -> None:
    """The worker environment of a user whose Azure is ``fake``."""
    _isolate(monkeypatch)
    monkeypatch.setenv("AZURE_TENANT_ID", TENANT)
    monkeypatch.setenv("AZURE_CLIENT_ID", CLIENT_ID)
    monkeypatch.setenv("AZURE_CLIENT_SECRET", CLIENT_SECRET)
    monkeypatch.setenv("AZURE_AUTHORITY_HOST", fake.url)
    monkeypatch.setenv("VMFARM_AZURE_ENDPOINT", fake.url)
    monkeypatch.setenv("VMFARM_AZURE_CA_BUNDLE", str(fake.ca_file))
    monkeypatch.setenv("VMFARM_AZURE_RETRY_BACKOFF", "0.001")


@pytest.fixture
def arm(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[FakeArm]:
    fake = FakeArm(tmp_path / "certs", page_size=2).start()
    try:
        point_at(fake, monkeypatch)
        yield fake
    finally:
        fake.stop()


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


def by_name(hosts: list[Host]) -> dict[str, Host]:
    names = [h.name for h in hosts]
    assert len(set(names)) == len(names), names
    return {h.name: h for h in hosts}


def fleet(arm: FakeArm) -> None:
    """Two resource groups with more VMs than a page, stopped and deallocated ones, a Uniform
    and a Flexible scale set."""
    arm.add_vm(
        "rg-web",
        "web-1",
        private_ip="10.0.0.4",
        public_ip="203.0.113.4",
        tags={"env": "prod", "role": "web"},
    )
    arm.add_vm(
        "rg-web",
        "web-2",
        private_ip="10.0.0.5",
        public_ip="203.0.113.5",
        tags={"env": "prod", "role": "web"},
        zones=["2"],
    )
    arm.add_vm(
        "rg-web",
        "web-3",
        private_ip="10.0.0.6",
        public_ip="203.0.113.6",
        tags={"env": "prod"},
        power_state="stopped",
    )
    arm.add_vm(
        "rg-web", "web-4", private_ip="10.0.0.7", public_ip="203.0.113.7", tags={"env": "staging"}
    )
    arm.add_vm(
        "rg-web",
        "web-5",
        private_ip="10.0.0.8",
        public_ip="203.0.113.8",
        tags={"env": "prod"},
        power_state="deallocated",
    )
    arm.add_scale_set("rg-web", "web-vmss", tags={"env": "prod", "role": "worker"})
    arm.add_scale_set_vm("rg-web", "web-vmss", "0", private_ip="10.0.1.4", public_ip="198.51.100.4")
    arm.add_scale_set_vm(
        "rg-web",
        "web-vmss",
        "1",
        private_ip="10.0.1.5",
        public_ip="198.51.100.5",
        power_state="deallocated",
    )
    arm.add_scale_set_vm("rg-web", "web-vmss", "2", private_ip="10.0.1.6", public_ip="198.51.100.6")
    arm.add_scale_set_vm("rg-web", "web-vmss", "3", private_ip="10.0.1.7", public_ip="198.51.100.7")
    arm.add_vm(
        "rg-api",
        "api-1",
        private_ip="10.1.0.4",
        public_ip="203.0.113.40",
        tags={"env": "prod"},
        location="westeurope",
        size="Standard_D4s_v5",
    )
    arm.add_vm(
        "rg-api",
        "api-2",
        private_ip="10.1.0.5",
        public_ip="203.0.113.41",
        tags={"env": "prod"},
        location="westeurope",
        power_state="stopped",
    )
    arm.add_vm(
        "rg-api",
        "api-3",
        private_ip="10.1.0.6",
        public_ip="203.0.113.42",
        tags={"env": "prod"},
        location="westeurope",
    )
    arm.add_scale_set(
        "rg-api", "api-flex", location="westeurope", tags={"env": "prod"}, orchestration="Flexible"
    )
    arm.add_vm(
        "rg-api",
        "api-flex_a1b2",
        private_ip="10.1.1.4",
        public_ip="203.0.113.50",
        location="westeurope",
        scale_set="api-flex",
    )
    arm.add_vm(
        "rg-api",
        "api-flex_c3d4",
        private_ip="10.1.1.5",
        location="westeurope",
        scale_set="api-flex",
        power_state="stopped",
    )


TWO_GROUPS = {"hostFilter": {"type": "All", "spec": {"resourceGroups": ["rg-web", "rg-api"]}}}
RUNNING = {
    "web-1",
    "web-2",
    "web-4",
    "web-vmss_0",
    "web-vmss_2",
    "web-vmss_3",
    "api-1",
    "api-3",
    "api-flex_a1b2",
}


def test_running_vms_and_scale_set_vms_of_two_groups_across_pages(arm: FakeArm) -> None:
    fleet(arm)
    hosts = azure.discover(infra(TWO_GROUPS))
    got = by_name(hosts)
    assert set(got) == RUNNING
    assert {n: (h.address, h.private_ip, h.public_ip, h.region) for n, h in got.items()} == {
        "web-1": ("10.0.0.4", "10.0.0.4", "203.0.113.4", "eastus"),
        "web-2": ("10.0.0.5", "10.0.0.5", "203.0.113.5", "eastus"),
        "web-4": ("10.0.0.7", "10.0.0.7", "203.0.113.7", "eastus"),
        "web-vmss_0": ("10.0.1.4", "10.0.1.4", "198.51.100.4", "eastus"),
        "web-vmss_2": ("10.0.1.6", "10.0.1.6", "198.51.100.6", "eastus"),
        "web-vmss_3": ("10.0.1.7", "10.0.1.7", "198.51.100.7", "eastus"),
        "api-1": ("10.1.0.4", "10.1.0.4", "203.0.113.40", "westeurope"),
        "api-3": ("10.1.0.6", "10.1.0.6", "203.0.113.42", "westeurope"),
        "api-flex_a1b2": ("10.1.1.4", "10.1.1.4", "203.0.113.50", "westeurope"),
    }
    web1, ss0, api1, flex = got["web-1"], got["web-vmss_0"], got["api-1"], got["api-flex_a1b2"]
    # The infrastructure's connection settings apply to discovered hosts.
    assert (web1.user, web1.private_key_file, web1.port, web1.infrastructure) == (
        "azureuser",
        "/keys/id_ed25519",
        22,
        "azure_prod",
    )
    assert web1.attributes["id"].endswith(
        "/resourceGroups/rg-web/providers/Microsoft.Compute/virtualMachines/web-1"
    )
    assert web1.attributes["resourceGroup"] == "rg-web"
    assert web1.attributes["tags"] == {"env": "prod", "role": "web"}
    assert web1.attributes["vmss"] is None
    assert web1.attributes["size"] == "Standard_B1s"
    assert got["web-2"].attributes["zones"] == ["2"]
    assert api1.attributes["size"] == "Standard_D4s_v5"
    assert ss0.attributes["vmss"] == "web-vmss"
    assert ss0.attributes["instanceId"] == "0"
    assert ss0.attributes["size"] == "Standard_D2s_v3"
    assert ss0.attributes["computerName"] == "web-vmss000000"
    assert ss0.attributes["tags"] == {"env": "prod", "role": "worker"}  # from the scale set
    assert flex.attributes["vmss"] == "api-flex"
    assert flex.attributes["resourceGroup"] == "rg-api"

    reqs = arm.arm_requests()
    # Every list was paged (page size 2) and every page was fetched.
    for path in (
        "/resourceGroups/rg-web/providers/Microsoft.Compute/virtualMachines",
        "/resourceGroups/rg-api/providers/Microsoft.Compute/virtualMachines",
        "/virtualMachineScaleSets/web-vmss/virtualMachines",
        "/resourceGroups/rg-web/providers/Microsoft.Network/networkInterfaces",
        "/virtualMachineScaleSets/web-vmss/networkInterfaces",
    ):
        pages = [r for r in reqs if r.path.endswith(path)]
        assert len(pages) >= 2, path
        assert pages[0].query.get("$skiptoken") is None
        assert all(r.query.get("$skiptoken") for r in pages[1:])
    vm_lists = [r for r in reqs if r.path.endswith("/virtualMachines")]
    assert all(r.query.get("$expand") == "instanceView" for r in vm_lists)
    # Power states came with the lists; no per-VM instance view calls.
    assert not [r for r in reqs if r.path.lower().endswith("/instanceview")]
    # The Flexible scale set's members are plain VMs: no scale-set VM API call for it.
    assert not [r for r in reqs if "/api-flex/" in r.path.lower()]
    # One token from the fake Entra endpoint, sent with every ARM request.
    assert len(arm.token_requests()) == 1
    assert all(r.status == 200 for r in arm.requests)
    body = arm.token_requests()[0].body
    assert "grant_type=client_credentials" in body
    assert "scope=https%3A%2F%2Fmanagement.azure.com%2F.default" in body


def test_public_ip_connection_type(arm: FakeArm) -> None:
    fleet(arm)
    got = by_name(
        azure.discover(
            infra(
                TWO_GROUPS,
                hostConnectionType="PublicIP",
                hostFilter={
                    "type": "AzureVmFilter",
                    "spec": {"resourceGroups": ["rg-web", "rg-api"]},
                },
            )
        )
    )
    assert {n: h.address for n, h in got.items()} == {
        "web-1": "203.0.113.4",
        "web-2": "203.0.113.5",
        "web-4": "203.0.113.7",
        "api-1": "203.0.113.40",
        "api-3": "203.0.113.42",
        "api-flex_a1b2": "203.0.113.50",
    }
    assert got["web-1"].private_ip == "10.0.0.4"
    scale = by_name(
        azure.discover(
            infra(hostConnectionType="PublicIP", hostFilter={"type": "AzureVMSSFilter", "spec": {}})
        )
    )
    assert {n: h.address for n, h in scale.items()} == {
        "web-vmss_0": "198.51.100.4",
        "web-vmss_2": "198.51.100.6",
        "web-vmss_3": "198.51.100.7",
    }
    # Per-instance public IPs come from the scale-set public IP list.
    assert arm.count(r"/virtualMachineScaleSets/web-vmss/publicipaddresses$") >= 1


def test_public_ip_missing_is_an_error_naming_the_vm(arm: FakeArm) -> None:
    arm.add_vm("rg-web", "web-1", private_ip="10.0.0.4", public_ip="203.0.113.4")
    arm.add_vm("rg-web", "web-2", private_ip="10.0.0.5")  # no public IP
    with pytest.raises(DiscoveryError) as ei:
        azure.discover(infra(hostConnectionType="PublicIP"))
    assert "web-2 (rg-web)" in str(ei.value)
    assert "public IP" in str(ei.value)
    assert "web-1" not in str(ei.value)
    assert ei.value.error_class == "Unknown"
    assert ei.value.infrastructure == "azure_prod"


def test_tag_filters_from_spec_and_host_filter(arm: FakeArm) -> None:
    fleet(arm)
    # spec.tags and hostFilter.spec.tags both apply; tag names are case-insensitive.
    got = azure.discover(
        infra(
            tags={"ENV": "prod"},
            hostFilter={
                "type": "All",
                "spec": {"resourceGroups": ["rg-web", "rg-api"], "tags": {"role": "web"}},
            },
        )
    )
    assert {h.name for h in got} == {"web-1", "web-2"}
    # Scale-set instances carry their scale set's tags.
    got = azure.discover(infra(tags={"role": "worker"}))
    assert {h.name for h in got} == {"web-vmss_0", "web-vmss_2", "web-vmss_3"}
    got = azure.discover(infra(TWO_GROUPS, tags={"env": "prod"}))
    assert {h.name for h in got} == RUNNING - {"web-4"}
    assert azure.discover(infra(tags={"env": "nowhere"})) == []


def test_filters_by_kind_scale_set_name_region_and_host_name(arm: FakeArm) -> None:
    fleet(arm)
    arm.add_scale_set("rg-web", "batch-vmss")
    arm.add_scale_set_vm("rg-web", "batch-vmss", "0", private_ip="10.0.2.4")
    vmss_only = {"type": "AzureVMSSFilter", "spec": {"resourceGroups": ["rg-web", "rg-api"]}}
    got = azure.discover(infra(hostFilter=vmss_only))
    assert {h.name for h in got} == {
        "web-vmss_0",
        "web-vmss_2",
        "web-vmss_3",
        "batch-vmss_0",
        "api-flex_a1b2",
    }
    named = {
        "type": "AzureVMSSFilter",
        "spec": {"resourceGroups": ["rg-web"], "scaleSets": ["web-vmss"]},
    }
    got = azure.discover(infra(hostFilter=named))
    assert {h.name for h in got} == {"web-vmss_0", "web-vmss_2", "web-vmss_3"}
    vms_only = {"type": "AzureVmFilter", "spec": {}}
    assert {h.name for h in azure.discover(infra(hostFilter=vms_only))} == {
        "web-1",
        "web-2",
        "web-4",
    }
    assert {h.name for h in azure.discover(infra(TWO_GROUPS, region="westeurope"))} == {
        "api-1",
        "api-3",
        "api-flex_a1b2",
    }
    names = {
        "type": "HostNames",
        "spec": {"resourceGroups": ["rg-web", "rg-api"], "hostNames": ["web-2", "API-3"]},
    }
    assert {h.name for h in azure.discover(infra(hostFilter=names))} == {"web-2", "api-3"}


def test_unknown_scale_set_name_is_named(arm: FakeArm) -> None:
    fleet(arm)
    with pytest.raises(DiscoveryError) as ei:
        azure.discover(
            infra(
                hostFilter={
                    "type": "AzureVMSSFilter",
                    "spec": {"scaleSets": ["web-vmss", "wbe-vmss"]},
                }
            )
        )
    assert "'wbe-vmss'" in str(ei.value)
    assert "'web-vmss'" not in str(ei.value)
    assert "rg-web" in str(ei.value)


def test_unknown_resource_group_is_named(arm: FakeArm) -> None:
    fleet(arm)
    with pytest.raises(DiscoveryError) as ei:
        azure.discover(
            infra(hostFilter={"type": "All", "spec": {"resourceGroups": ["rg-web", "rg-typo"]}})
        )
    err = ei.value
    assert "resource group 'rg-typo'" in str(err)
    assert SUBSCRIPTION in str(err)
    assert err.error_class == "Unknown"
    assert err.infrastructure == "azure_prod"
    assert pickle.loads(pickle.dumps(err)).error_class == "Unknown"
    # Not retried: a 404 is an answer.
    assert arm.count(r"/resourceGroups/rg-typo/") == 1


def test_unknown_subscription_is_named(arm: FakeArm) -> None:
    other = "99999999-9999-9999-9999-999999999999"
    with pytest.raises(DiscoveryError) as ei:
        azure.discover(infra(subscriptionId=other))
    assert f"subscription '{other}'" in str(ei.value)


def test_401_is_an_authentication_error(arm: FakeArm) -> None:
    fleet(arm)
    arm.fail(r"/providers/Microsoft.Compute/virtualMachines$", 401, times=-1)
    with pytest.raises(DiscoveryError) as ei:
        azure.discover(infra())
    assert ei.value.error_class == "Authentication"
    assert "401" in str(ei.value)
    assert "InvalidAuthenticationToken" in str(ei.value)
    assert CLIENT_SECRET not in str(ei.value)


def test_403_is_an_authentication_error_about_permissions(arm: FakeArm) -> None:
    fleet(arm)
    arm.fail(r"/virtualMachineScaleSets$", 403, times=-1)
    with pytest.raises(DiscoveryError) as ei:
        azure.discover(infra())
    assert ei.value.error_class == "Authentication"
    assert "AuthorizationFailed" in str(ei.value)
    assert "permission" in str(ei.value)


def test_public_ips_not_readable_are_only_fatal_when_needed(arm: FakeArm) -> None:
    arm.add_vm("rg-web", "web-1", private_ip="10.0.0.4", public_ip="203.0.113.4")
    arm.fail(r"/publicIPAddresses", 403, times=-1)
    (h,) = azure.discover(infra())
    assert (h.address, h.public_ip) == ("10.0.0.4", None)
    with pytest.raises(DiscoveryError) as ei:
        azure.discover(infra(hostConnectionType="PublicIP"))
    assert ei.value.error_class == "Authentication"


def test_bad_client_secret_is_an_authentication_error(
    arm: FakeArm, monkeypatch: pytest.MonkeyPatch
) -> None:
    fleet(arm)
    monkeypatch.setenv("AZURE_CLIENT_SECRET", "wrong-secret")
    with pytest.raises(DiscoveryError) as ei:
        azure.discover(infra())
    assert ei.value.error_class == "Authentication"
    assert "AADSTS7000215" in str(ei.value)
    assert "wrong-secret" not in str(ei.value)
    assert not arm.arm_requests()  # no token, no ARM call


def test_throttled_once_is_retried_and_succeeds(arm: FakeArm) -> None:
    fleet(arm)
    arm.fail(
        r"/resourceGroups/rg-web/providers/Microsoft.Compute/virtualMachines$", 429, retry_after="0"
    )
    got = azure.discover(infra())
    assert {h.name for h in got} == {
        "web-1",
        "web-2",
        "web-4",
        "web-vmss_0",
        "web-vmss_2",
        "web-vmss_3",
    }
    first_page = [
        r
        for r in arm.arm_requests()
        if r.path.endswith("/rg-web/providers/Microsoft.Compute/virtualMachines")
        and not r.query.get("$skiptoken")
    ]
    assert [r.status for r in first_page] == [429, 200]


def test_throttled_past_the_retries_is_a_connectivity_error(
    arm: FakeArm, monkeypatch: pytest.MonkeyPatch
) -> None:
    fleet(arm)
    monkeypatch.setenv("VMFARM_AZURE_RETRY_TOTAL", "2")
    arm.fail(r"/virtualMachineScaleSets$", 429, times=-1, retry_after="0")
    with pytest.raises(DiscoveryError) as ei:
        azure.discover(infra())
    assert ei.value.error_class == "Connectivity"
    assert "429" in str(ei.value)
    assert "rg-web" in str(ei.value)
    assert arm.count(r"/virtualMachineScaleSets$") == 3  # the first try and two retries


def test_server_errors_past_the_retries_are_connectivity_errors(
    arm: FakeArm, monkeypatch: pytest.MonkeyPatch
) -> None:
    fleet(arm)
    monkeypatch.setenv("VMFARM_AZURE_RETRY_TOTAL", "1")
    arm.fail(r"/Microsoft.Network/networkInterfaces$", 503, times=-1)
    with pytest.raises(DiscoveryError) as ei:
        azure.discover(infra())
    assert ei.value.error_class == "Connectivity"
    assert "503" in str(ei.value)


def test_unreachable_endpoint_is_a_connectivity_error(
    arm: FakeArm, monkeypatch: pytest.MonkeyPatch, free_port: Callable[[], int]
) -> None:
    port = free_port()  # leased, and nothing listens there
    monkeypatch.setenv("VMFARM_AZURE_ENDPOINT", f"https://127.0.0.1:{port}")
    monkeypatch.setenv("VMFARM_AZURE_RETRY_TOTAL", "0")
    with pytest.raises(DiscoveryError) as ei:
        azure.discover(infra())
    assert ei.value.error_class == "Connectivity"
    assert "could not reach" in str(ei.value)


def test_power_state_from_instance_view_when_the_list_has_none(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    with FakeArm(tmp_path / "certs", page_size=3, expand_instance_view=False) as fake:
        point_at(fake, monkeypatch)
        fleet(fake)
        got = azure.discover(infra())
        assert {h.name for h in got} == {
            "web-1",
            "web-2",
            "web-4",
            "web-vmss_0",
            "web-vmss_2",
            "web-vmss_3",
        }
        views = [r.path for r in fake.arm_requests() if r.path.lower().endswith("/instanceview")]
        assert len(views) == 5 + 4  # every VM and every scale-set VM of rg-web


def test_primary_nic_and_ip_config_nic_in_another_group_duplicate_names(arm: FakeArm) -> None:
    arm.add_resource_group("rg-net")
    arm.add_vm(
        "rg-web",
        "app",
        private_ip="10.0.0.4",
        nic_resource_group="rg-net",
        extra_nics=2,
        secondary_ips=["10.0.0.200", "10.0.0.201"],
    )
    arm.add_vm("rg-api", "app", private_ip="10.1.0.4")
    got = by_name(azure.discover(infra(TWO_GROUPS)))
    assert {n: h.address for n, h in got.items()} == {
        "app.rg-web": "10.0.0.4",
        "app.rg-api": "10.1.0.4",
    }
    assert arm.count(r"/resourceGroups/rg-net/providers/Microsoft.Network/networkInterfaces$")


def test_hostname_connection_type_uses_the_computer_name(arm: FakeArm) -> None:
    arm.add_vm("rg-web", "web-1", private_ip="10.0.0.4", computer_name="web1.corp.example")
    (h,) = azure.discover(infra(hostConnectionType="Hostname"))
    assert (h.name, h.address, h.private_ip) == ("web-1", "web1.corp.example", "10.0.0.4")


def test_through_the_loader_and_the_provider_registry(arm: FakeArm, tmp_path: Path) -> None:
    from app.definitions.loader import choose_pipeline, load
    from app.definitions.resolve import resolve

    fleet(arm)
    files = tmp_path / "files"
    files.mkdir()
    (files / "service.yaml").write_text(
        textwrap.dedent("""\
        apiVersion: v1
        kind: Service
        metadata: {name: web, identifier: web}
        spec:
          serviceDefinition:
            type: Ssh
            spec: {}
        """)
    )
    (files / "environment.yaml").write_text(
        textwrap.dedent(f"""\
        apiVersion: v1
        kind: Environment
        metadata: {{name: prod, identifier: prod}}
        spec:
          type: Production
          infrastructureDefinitions:
            - name: azure-web
              identifier: azure_web
              spec:
                cloudProviderType: Azure
                deploymentType: Ssh
                spec:
                  connectorRef: azure_conn
                  subscriptionId: "{SUBSCRIPTION}"
                  resourceGroup: rg-web
                  hostConnectionType: PublicIP
                  hostFilter:
                    type: AzureVMSSFilter
                    spec:
                      resourceGroups: [rg-web, rg-api]
                      tags: {{env: prod}}
                  connection:
                    user: azureuser
                    privateKeyFile: keys/id_ed25519
        ---
        connector:
          name: azure_conn
          identifier: azure_conn
          type: Azure
          spec:
            credential:
              type: InheritFromDelegate
        """)
    )
    (files / "pipeline.yaml").write_text(
        textwrap.dedent("""\
        apiVersion: v1
        kind: Pipeline
        metadata: {name: deploy, identifier: deploy}
        spec:
          stages:
            - stage:
                name: Deploy
                identifier: deploy
                type: Deployment
                spec:
                  deploymentType: Ssh
                  service: {serviceRef: web}
                  environment:
                    environmentRef: prod
                    infrastructureDefinitions:
                      - identifier: azure_web
                  execution:
                    steps:
                      - step:
                          type: Command
                          name: Hello
                          identifier: hello
                          spec:
                            commandUnits:
                              - identifier: hi
                                type: Script
                                spec:
                                  source:
                                    type: Inline
                                    spec: {script: echo hi}
        """)
    )
    bundle = load(sorted(files.glob("*.yaml")), inputs={}, require_inputs=True)
    plan = resolve(bundle, choose_pipeline(bundle, None), execution_id="EX1").to_json()
    (resolved,) = plan["stages"][0]["infrastructures"]
    assert resolved["provider"] == "azure"
    got = by_name(discover_any(resolved))
    assert {n: (h.address, h.region) for n, h in got.items()} == {
        "web-vmss_0": ("198.51.100.4", "eastus"),
        "web-vmss_2": ("198.51.100.6", "eastus"),
        "web-vmss_3": ("198.51.100.7", "eastus"),
        "api-flex_a1b2": ("203.0.113.50", "westeurope"),
    }
    h = got["web-vmss_0"]
    assert h.infrastructure == "azure_web"
    assert h.user == "azureuser"
    assert h.private_key_file == str((files / "keys" / "id_ed25519").resolve())
