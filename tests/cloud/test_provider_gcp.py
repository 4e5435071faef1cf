"""GCP host discovery with the real google-cloud-compute clients against a fake GCE server.

The SDK (REST transport) is pointed at ``tests.fakes.gce.FakeGce`` on 127.0.0.1 through
``VMFARM_GCP_ENDPOINT``; nothing is mocked inside the SDK, so paths, query strings, pagination,
error bodies and retries go through the same code as against compute.googleapis.com.
"""

from __future__ import annotations

import json
import textwrap
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from app.errors import DiscoveryError
from app.providers import base
from app.providers.gcp import RetryPolicy, discover
from tests.fakes.gce import FakeGce

P = "shop-prod"
A, B, C = "us-central1-a", "us-central1-b", "us-central1-c"
EU = "europe-west1-b"
FAST = RetryPolicy(initial=0.001, maximum=0.01, multiplier=2.0, deadline=10.0, request_timeout=10.0)
GIVE_UP = RetryPolicy(
    initial=0.001, maximum=0.01, multiplier=2.0, deadline=0.3, request_timeout=5.0
)


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


@pytest.fixture
def gce(monkeypatch: pytest.MonkeyPatch) -> Iterator[FakeGce]:
    fake = FakeGce(page_size=2).start()
    monkeypatch.setenv("VMFARM_GCP_ENDPOINT", fake.url)
    try:
        yield fake
    finally:
        fake.stop()


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


def by_name(hosts: list[base.Host]) -> dict[str, base.Host]:
    out = {h.name: h for h in hosts}
    assert len(out) == len(hosts)
    return out


def fleet(gce: FakeGce) -> None:
    """Zone a: 5 running + 1 stopped; zone b: 3 running + 1 suspended; zone c: 1 running;
    europe: 1 running. Instance i has private 10.0.<zone>.i and public 203.0.113.<n>."""
    n = 0
    for zi, (zone, count) in enumerate(((A, 5), (B, 3), (C, 1), (EU, 1))):
        for i in range(count):
            n += 1
            gce.add_instance(
                P,
                zone,
                f"{zone[-1]}-web-{i}",
                private_ip=f"10.0.{zi}.{i + 10}",
                public_ip=f"203.0.113.{n}",
                labels={"env": "prod" if i % 2 == 0 else "stage", "app": "shop"},
                tags=["web", "ssh"] if i != 1 else ["ssh"],
                machine_type="e2-medium",
            )
    gce.add_instance(
        P,
        A,
        "a-stopped",
        status="TERMINATED",
        private_ip="10.0.0.99",
        labels={"env": "prod"},
        tags=["web", "ssh"],
    )
    gce.add_instance(
        P,
        B,
        "b-suspended",
        status="SUSPENDED",
        private_ip="10.0.1.99",
        labels={"env": "prod"},
        tags=["web", "ssh"],
    )


# --- instance filter by zones ---------------------------------------------------------------


def test_two_zones_several_pages_running_only_private_ip(gce: FakeGce) -> None:
    fleet(gce)
    hosts = discover(
        infra(
            zones=[A, B],
            hostConnectionType="PrivateIP",
            hostFilter={"type": "GcpInstanceFilter", "spec": {}},
        )
    )
    got = {h.name: h.address for h in hosts}
    assert got == {
        "a-web-0": "10.0.0.10",
        "a-web-1": "10.0.0.11",
        "a-web-2": "10.0.0.12",
        "a-web-3": "10.0.0.13",
        "a-web-4": "10.0.0.14",
        "b-web-0": "10.0.1.10",
        "b-web-1": "10.0.1.11",
        "b-web-2": "10.0.1.12",
    }
    h = by_name(hosts)["b-web-1"]
    assert h.region == "us-central1" and h.infrastructure == "gcp_prod"
    assert h.private_ip == "10.0.1.11" and h.public_ip == "203.0.113.7"
    assert h.user == "deploy" and h.private_key_file == "/keys/id" and h.port == 22
    assert h.attributes["zone"] == B and h.attributes["machineType"] == "e2-medium"
    assert h.attributes["labels"] == {"env": "stage", "app": "shop"}
    assert h.attributes["networkTags"] == ["ssh"] and h.attributes["id"].isdigit()
    # Zone a: 5 running of 6 at 2 per page -> 3 pages, each asking only for running instances.
    calls = gce.requests_to(f"/projects/{P}/zones/{A}/instances", "GET")
    assert [c.query.get("pageToken") for c in calls] == [None, "p2", "p4"]
    assert all(c.query["filter"] == "(status = RUNNING)" for c in calls)
    assert not gce.requests_to("/aggregated/")


def test_stopped_instances_are_excluded_even_if_the_server_does_not_filter(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    with FakeGce(page_size=3, honor_filter=False) as fake:
        monkeypatch.setenv("VMFARM_GCP_ENDPOINT", fake.url)
        for status in (
            "RUNNING",
            "TERMINATED",
            "STOPPING",
            "SUSPENDED",
            "STAGING",
            "PROVISIONING",
            "REPAIRING",
        ):
            fake.add_instance(P, A, f"vm-{status.lower()}", status=status, private_ip="10.1.1.1")
        hosts = discover(infra(zones=[A]))
        assert [h.name for h in hosts] == ["vm-running"]
        assert len(fake.requests_to("/instances")) == 3  # 7 items, 3 per page


def test_public_ip_connection_uses_the_nat_ip(gce: FakeGce) -> None:
    fleet(gce)
    hosts = by_name(discover(infra(zones=[C], hostConnectionType="PublicIP")))
    assert list(hosts) == ["c-web-0"]
    assert hosts["c-web-0"].address == "203.0.113.9"
    assert hosts["c-web-0"].private_ip == "10.0.2.10"


def test_public_ip_missing_is_an_error_naming_the_instance(gce: FakeGce) -> None:
    gce.add_instance(P, A, "has-nat", private_ip="10.0.0.1", public_ip="203.0.113.1")
    gce.add_instance(P, A, "internal-only", private_ip="10.0.0.2")
    with pytest.raises(DiscoveryError) as exc:
        discover(infra(zones=[A], hostConnectionType="PublicIP"))
    assert "internal-only" in str(exc.value) and "has-nat" not in str(exc.value)
    assert "accessConfigs" in str(exc.value) and exc.value.infrastructure == "gcp_prod"


def test_hostname_connection_and_same_name_in_two_zones(gce: FakeGce) -> None:
    gce.add_instance(P, A, "web", private_ip="10.0.0.1")
    gce.add_instance(P, B, "web", private_ip="10.0.1.1", hostname="web-b.example.internal")
    gce.add_instance(P, B, "solo", private_ip="10.0.1.2")
    hosts = by_name(discover(infra(zones=[A, B], hostConnectionType="Hostname")))
    assert {n: h.address for n, h in hosts.items()} == {
        f"web.{A}": f"web.{A}.c.{P}.internal",
        f"web.{B}": "web-b.example.internal",
        "solo": f"solo.{B}.c.{P}.internal",
    }


def test_host_names_filter_and_no_filter(gce: FakeGce) -> None:
    fleet(gce)
    hosts = discover(
        infra(
            zones=[A, B],
            hostFilter={
                "type": "HostNames",
                "spec": {"hostNames": ["a-web-1", "b-web-2", "a-stopped"]},
            },
        )
    )
    assert [h.name for h in hosts] == ["a-web-1", "b-web-2"]
    assert len(discover(infra(zones=[C], hostFilter={"type": "All"}))) == 1


# --- by region: aggregatedList ----------------------------------------------------------------


def test_region_without_zones_uses_aggregated_list(gce: FakeGce) -> None:
    fleet(gce)
    hosts = discover(infra(region="us-central1"))
    assert sorted(h.name for h in hosts) == sorted(
        [f"a-web-{i}" for i in range(5)] + [f"b-web-{i}" for i in range(3)] + ["c-web-0"]
    )
    assert {h.region for h in hosts} == {"us-central1"}
    assert {h.attributes["zone"] for h in hosts} == {A, B, C}
    agg = gce.requests_to(f"/projects/{P}/aggregated/instances", "GET")
    assert len(agg) == 5  # 10 running instances, 2 per page
    assert [c.query.get("pageToken") for c in agg][1:] == ["p2", "p4", "p6", "p8"]
    assert not gce.requests_to("/zones/")


def test_unknown_region_is_named(gce: FakeGce) -> None:
    fleet(gce)
    with pytest.raises(DiscoveryError) as exc:
        discover(infra(region="us-centrall"))
    assert "region 'us-centrall'" in str(exc.value) and exc.value.error_class == "Unknown"


def test_known_region_without_matches_is_empty_not_an_error(gce: FakeGce) -> None:
    fleet(gce)
    assert discover(infra(region="europe-west1", tags={"env": "nothing-has-this"})) == []


# --- labels and network tags -------------------------------------------------------------------


@pytest.mark.parametrize("honor_filter", [True, False], ids=["server-filters", "client-filters"])
def test_labels_filter(monkeypatch: pytest.MonkeyPatch, honor_filter: bool) -> None:
    with FakeGce(page_size=2, honor_filter=honor_filter) as fake:
        monkeypatch.setenv("VMFARM_GCP_ENDPOINT", fake.url)
        fleet(fake)
        hosts = discover(
            infra(
                zones=[A, B],
                tags={"app": "shop"},
                hostFilter={"type": "GcpInstanceFilter", "spec": {"labels": {"env": "prod"}}},
            )
        )
        assert sorted(h.name for h in hosts) == [
            "a-web-0",
            "a-web-2",
            "a-web-4",
            "b-web-0",
            "b-web-2",
        ]
        sent = fake.requests_to(f"/zones/{A}/instances")[0].query["filter"]
        assert sent == '(status = RUNNING) (labels.app = "shop") (labels.env = "prod")'


def test_region_labels_filter_goes_through_aggregated_list(gce: FakeGce) -> None:
    fleet(gce)
    hosts = discover(
        infra(
            region="us-central1",
            hostFilter={"type": "GcpInstanceFilter", "spec": {"labels": {"env": "stage"}}},
        )
    )
    assert sorted(h.name for h in hosts) == ["a-web-1", "a-web-3", "b-web-1"]
    assert 'labels.env = "stage"' in gce.requests_to("/aggregated/instances")[0].query["filter"]


def test_network_tags_filter(gce: FakeGce) -> None:
    fleet(gce)
    hosts = discover(
        infra(
            zones=[A],
            hostFilter={"type": "GcpInstanceFilter", "spec": {"networkTags": ["web", "ssh"]}},
        )
    )
    assert sorted(h.name for h in hosts) == ["a-web-0", "a-web-2", "a-web-3", "a-web-4"]
    assert all(h.attributes["networkTags"] == ["web", "ssh"] for h in hosts)


def test_reference_shape_zone_and_tag_list(gce: FakeGce) -> None:
    """The reference writes ``zone:`` and ``hostFilter.spec: {zones: [...], tags: [...]}``."""
    gce.add_instance(P, A, "ref-1", private_ip="10.0.0.1", tags=["web-app", "production"])
    gce.add_instance(P, A, "ref-2", private_ip="10.0.0.2", tags=["web-app"])
    gce.add_instance(P, B, "ref-3", private_ip="10.0.1.3", tags=["web-app", "production"])
    hosts = discover(
        infra(
            region="us-central1",
            zone=A,
            hostFilter={
                "type": "GcpInstanceFilter",
                "spec": {"zones": [A], "tags": ["web-app", "production"]},
            },
        )
    )
    assert [h.name for h in hosts] == ["ref-1"]


# --- instance groups ----------------------------------------------------------------------------


def test_managed_instance_group_members(gce: FakeGce) -> None:
    fleet(gce)
    gce.add_instance_group(
        P, "web-mig", zone=A, members=["a-web-0", "a-web-1", "a-web-2", "a-stopped"]
    )
    gce.add_instance_group(P, "other-mig", zone=A, members=["a-web-3"])
    hosts = discover(
        infra(
            zones=[A, B],
            hostConnectionType="PublicIP",
            hostFilter={"type": "GcpInstanceGroupFilter", "spec": {"instanceGroups": ["web-mig"]}},
        )
    )
    assert {h.name: h.address for h in hosts} == {
        "a-web-0": "203.0.113.1",
        "a-web-1": "203.0.113.2",
        "a-web-2": "203.0.113.3",
    }
    calls = gce.requests_to("/instanceGroups/web-mig/listInstances")
    assert [c.query.get("pageToken") for c in calls] == [None, "p2"]  # 3 running, 2 per page
    assert all(c.method == "POST" and c.body == {"instanceState": "RUNNING"} for c in calls)
    assert not gce.requests_to("/instanceGroups/other-mig/")
    gets = gce.requests_to(f"/zones/{A}/instances/", "GET")
    assert sorted(g.path.rsplit("/", 1)[-1] for g in gets) == ["a-web-0", "a-web-1", "a-web-2"]


def test_instance_group_members_pass_label_and_tag_filters(gce: FakeGce) -> None:
    fleet(gce)
    gce.add_instance_group(P, "web-mig", zone=A, members=[f"a-web-{i}" for i in range(5)])
    hosts = discover(
        infra(
            zones=[A],
            hostFilter={
                "type": "GcpInstanceGroupFilter",
                "spec": {
                    "instanceGroups": ["web-mig"],
                    "labels": {"env": "prod"},
                    "networkTags": ["web"],
                },
            },
        )
    )
    assert sorted(h.name for h in hosts) == ["a-web-0", "a-web-2", "a-web-4"]
    assert len(gce.requests_to("/listInstances")) == 3  # 5 members, 2 per page


def test_regional_instance_group_by_region(gce: FakeGce) -> None:
    fleet(gce)
    gce.add_instance_group(
        P,
        "web-rmig",
        region="us-central1",
        members=[(A, "a-web-0"), (B, "b-web-0"), (C, "c-web-0"), (B, "b-suspended")],
    )
    hosts = discover(
        infra(
            region="us-central1",
            hostFilter={"type": "GcpInstanceGroupFilter", "spec": {"instanceGroups": ["web-rmig"]}},
        )
    )
    assert sorted(h.name for h in hosts) == ["a-web-0", "b-web-0", "c-web-0"]
    calls = gce.requests_to("/regions/us-central1/instanceGroups/web-rmig/listInstances")
    assert [c.query.get("pageToken") for c in calls] == [None, "p2"]  # 3 running, 2 per page
    assert all(c.method == "POST" and c.body == {"instanceState": "RUNNING"} for c in calls)


def test_regional_group_members_outside_the_zones_are_left_out(gce: FakeGce) -> None:
    fleet(gce)
    gce.add_instance_group(
        P,
        "web-rmig",
        region="us-central1",
        members=[(A, "a-web-0"), (B, "b-web-0"), (C, "c-web-0")],
    )
    hosts = discover(
        infra(
            zones=[A, C],
            hostFilter={"type": "GcpInstanceGroupFilter", "spec": {"instanceGroups": ["web-rmig"]}},
        )
    )
    assert sorted(h.name for h in hosts) == ["a-web-0", "c-web-0"]


def test_reference_group_filter_without_names_takes_every_group_in_the_zones(gce: FakeGce) -> None:
    fleet(gce)
    gce.add_instance_group(P, "g1", zone=A, members=["a-web-0", "a-web-1"])
    gce.add_instance_group(P, "g2", zone=A, members=["a-web-2"])
    gce.add_instance_group(P, "g3", zone=B, members=["b-web-0"])
    hosts = discover(
        infra(
            region="us-central1",
            hostFilter={"type": "GcpInstanceGroupFilter", "spec": {"zones": [A], "tags": ["web"]}},
        )
    )
    assert sorted(h.name for h in hosts) == ["a-web-0", "a-web-2"]  # a-web-1 lacks tag web


def test_unknown_instance_group_is_named(gce: FakeGce) -> None:
    fleet(gce)
    gce.add_instance_group(P, "web-mig", zone=A, members=["a-web-0"])
    with pytest.raises(DiscoveryError) as exc:
        discover(
            infra(
                zones=[A],
                hostFilter={
                    "type": "GcpInstanceGroupFilter",
                    "spec": {"instanceGroups": ["web-mig", "wbe"]},
                },
            )
        )
    assert "instance group(s) wbe not found" in str(exc.value)
    assert exc.value.error_class == "Unknown"


# --- unknown project / zone, auth, retries ----------------------------------------------------


@pytest.mark.parametrize("status", [400, 404])
def test_unknown_zone_is_named(monkeypatch: pytest.MonkeyPatch, status: int) -> None:
    with FakeGce(unknown_zone_status=status) as fake:
        monkeypatch.setenv("VMFARM_GCP_ENDPOINT", fake.url)
        fleet(fake)
        with pytest.raises(DiscoveryError) as exc:
            discover(infra(zones=[A, "us-central1-z"]))
        assert "zone 'us-central1-z'" in str(exc.value)
        assert exc.value.error_class == "Unknown" and exc.value.infrastructure == "gcp_prod"


@pytest.mark.parametrize("where", [{"zones": [A]}, {"region": "us-central1"}])
def test_unknown_project_is_named(gce: FakeGce, where: dict[str, Any]) -> None:
    fleet(gce)
    with pytest.raises(DiscoveryError) as exc:
        discover({**infra(**where), "spec": {**infra(**where)["spec"], "project": "no-such"}})
    assert "project 'no-such' was not found" in str(exc.value)
    assert exc.value.error_class == "Unknown"


@pytest.mark.parametrize("status", [401, 403])
def test_auth_failures_are_authentication(gce: FakeGce, status: int) -> None:
    fleet(gce)
    gce.fail(status, times=None)
    with pytest.raises(DiscoveryError) as exc:
        discover(infra(zones=[A]), retry=FAST)
    assert exc.value.error_class == "Authentication"
    assert str(status) in str(exc.value)
    assert len(gce.requests) == 1  # not retried


@pytest.mark.parametrize("status", [503, 429])
def test_transient_failure_is_retried_and_succeeds(gce: FakeGce, status: int) -> None:
    fleet(gce)
    gce.fail(status, times=2, match=f"/zones/{B}/instances")
    hosts = discover(infra(zones=[A, B]), retry=FAST)
    assert len(hosts) == 8
    assert len(gce.requests_to(f"/zones/{B}/instances")) == 2 + 2  # 2 failures + 2 pages


def test_rate_limit_403_is_retried(gce: FakeGce) -> None:
    fleet(gce)
    gce.fail(403, times=1, reason="rateLimitExceeded", message="Rate Limit Exceeded")
    assert len(discover(infra(zones=[C]), retry=FAST)) == 1


def test_transient_failure_on_a_later_page_and_on_group_post_is_retried(gce: FakeGce) -> None:
    fleet(gce)
    gce.add_instance_group(P, "web-mig", zone=A, members=[f"a-web-{i}" for i in range(5)])
    gce.fail(503, times=1, match="/listInstances")
    gce.fail(503, times=1, match="/instances/a-web-3")
    gce.fail(429, times=1, match="/aggregated/instanceGroups")
    hosts = discover(
        infra(
            zones=[A],
            hostFilter={"type": "GcpInstanceGroupFilter", "spec": {"instanceGroups": ["web-mig"]}},
        ),
        retry=FAST,
    )
    assert len(hosts) == 5


def test_unavailable_past_the_retries_is_connectivity(gce: FakeGce) -> None:
    fleet(gce)
    gce.fail(503, times=None)
    with pytest.raises(DiscoveryError) as exc:
        discover(infra(region="us-central1"), retry=GIVE_UP)
    assert exc.value.error_class == "Connectivity"
    assert "503" in str(exc.value) and len(gce.requests) > 1


def test_unreachable_endpoint_is_connectivity(
    monkeypatch: pytest.MonkeyPatch, free_port: Callable[[], int]
) -> None:
    port = free_port()  # leased, and nothing listens there
    monkeypatch.setenv("VMFARM_GCP_ENDPOINT", f"http://127.0.0.1:{port}")
    with pytest.raises(DiscoveryError) as exc:
        discover(infra(zones=[A]), retry=GIVE_UP)
    assert exc.value.error_class == "Connectivity"


# --- credentials -------------------------------------------------------------------------------


def test_endpoint_uses_anonymous_credentials(gce: FakeGce) -> None:
    fleet(gce)
    discover(infra(zones=[C]))
    assert all("authorization" not in r.headers for r in gce.requests)


def _service_account_file(tmp_path: Path) -> Path:
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import rsa

    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    pem = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    ).decode()
    path = tmp_path / "sa.json"
    path.write_text(
        json.dumps(
            {
                "type": "service_account",
                "project_id": P,
                "private_key_id": "k1",
                "private_key": pem,
                "client_email": f"vmfarm@{P}.iam.gserviceaccount.com",
                "client_id": "1",
                "token_uri": "https://127.0.0.1:9/token",
            }
        )
    )
    return path


def test_adc_with_custom_endpoint_sends_a_bearer_token(
    gce: FakeGce, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    fleet(gce)
    monkeypatch.setenv("VMFARM_GCP_AUTH", "adc")
    monkeypatch.setenv("GOOGLE_APPLICATION_CREDENTIALS", str(_service_account_file(tmp_path)))
    assert [h.name for h in discover(infra(zones=[C]))] == ["c-web-0"]
    assert gce.requests[0].headers["authorization"].startswith("Bearer ey")


def test_missing_adc_is_authentication(
    gce: FakeGce, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("VMFARM_GCP_AUTH", "adc")
    monkeypatch.setenv("GOOGLE_APPLICATION_CREDENTIALS", str(tmp_path / "missing.json"))
    with pytest.raises(DiscoveryError) as exc:
        discover(infra(zones=[A]))
    assert exc.value.error_class == "Authentication"
    assert "Application Default Credentials" in str(exc.value)
    assert not gce.requests


# --- settings ----------------------------------------------------------------------------------


# --- through the real loader ---------------------------------------------------------------------


def test_environment_file_through_loader_and_provider_registry(
    gce: FakeGce, tmp_path: Path
) -> None:
    from app.definitions import choose_pipeline, load, resolve

    fleet(gce)
    gce.add_instance(
        P, A, "blue-1", private_ip="10.0.0.201", labels={"env": "prod", "slot": "blue"}
    )
    (tmp_path / "all.yaml").write_text(
        textwrap.dedent(f"""\
        apiVersion: v1
        kind: Service
        metadata: {{name: shop, identifier: shop}}
        spec:
          serviceDefinition:
            type: Ssh
        ---
        apiVersion: v1
        kind: Environment
        metadata: {{name: prod, identifier: prod}}
        spec:
          type: Production
          infrastructureDefinitions:
            - name: gcp-prod
              identifier: gcp_prod
              spec:
                cloudProviderType: Gcp
                spec:
                  connectorRef: gcp_conn
                  project: {P}
                  region: us-central1
                  zones: [{A}, {B}]
                  hostConnectionType: PrivateIP
                  connection: {{user: deploy, port: 2222}}
                  hostFilter:
                    type: GcpInstanceFilter
                    spec:
                      labels: {{env: prod}}
                      networkTags: [web]
        ---
        connector:
          name: gcp_conn
          identifier: gcp_conn
          type: Gcp
          spec:
            credential:
              type: InheritFromDelegate
        ---
        apiVersion: v1
        kind: Pipeline
        metadata: {{name: deploy, identifier: deploy}}
        spec:
          stages:
            - stage:
                name: Deploy
                identifier: deploy
                type: Deployment
                spec:
                  service: {{serviceRef: shop}}
                  environment:
                    environmentRef: prod
                    infrastructureDefinitions: [{{identifier: gcp_prod}}]
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
                                  source: {{spec: {{script: echo hi}}}}
        """)
    )
    bundle = load([tmp_path / "all.yaml"])
    plan = resolve(bundle, choose_pipeline(bundle, None), execution_id="EX1").to_json()
    (resolved,) = plan["stages"][0]["infrastructures"]
    assert resolved["provider"] == "gcp" and resolved["identifier"] == "gcp_prod"
    hosts = by_name(base.discover(resolved))
    assert {n: h.address for n, h in hosts.items()} == {
        "a-web-0": "10.0.0.10",
        "a-web-2": "10.0.0.12",
        "a-web-4": "10.0.0.14",
        "b-web-0": "10.0.1.10",
        "b-web-2": "10.0.1.12",
    }
    assert all(h.port == 2222 and h.user == "deploy" for h in hosts.values())
    assert "blue-1" not in hosts  # no network tag web
    gce.set_status(P, A, "blue-1", "RUNNING")
    gce.instances[(P, A, "blue-1")]["tags"]["items"] = ["web"]
    assert base.discover(resolved)[0].attributes.get("slot") is None
    assert by_name(base.discover(resolved))["blue-1"].attributes["slot"] == "blue"
