"""Environments and infrastructure definitions: where the hosts are and how to reach them."""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import AfterValidator, Field, field_validator

from app.definitions.base import (
    REGION_RE,
    DelegateTag,
    Model,
    Scalar,
    identifier_of,
    ssh_only,
)
from app.definitions.models.service import Metadata, Variable


class Connection(Model):
    """How to reach static hosts. ``type: Sandbox`` = local sandbox hosts (no sshd);
    ``Local`` = commands run on the worker itself. SSH settings apply to SSH only."""

    type: Literal["SSH", "Sandbox", "Local"] = "SSH"
    user: str = "root"
    port: int = Field(default=22, ge=1, le=65535)
    private_key_file: str | None = None
    known_hosts_file: str | None = None
    host_key_policy: Literal["strict", "accept-new"] = "strict"
    connect_timeout: float = Field(default=10.0, gt=0)
    # SSH credentials kept in the secrets store (ids): resolved on the worker when it connects.
    private_key_secret: str | None = None
    passphrase_secret: str | None = None
    password_secret: str | None = None

    @field_validator("type", mode="before")
    @classmethod
    def _not_test_only(cls, v: object) -> object:
        if isinstance(v, str) and v.lower() == "noop":
            # It runs nothing and records success: a deployment that never happened.
            raise ValueError(
                "connection type Noop is not allowed in pipeline files: it runs "
                "nothing and records every step as succeeded. Benchmarks and "
                "tests set VMFARM_TEST_CONNECTION=noop on the workers instead "
                "(such a run is never recorded as a deployment)"
            )
        return v


class StaticHost(Model):
    """One host of a static (PDC) infrastructure."""

    hostname: str
    region: str | None = None
    port: int | None = Field(default=None, ge=1, le=65535)
    user: str | None = None
    private_key_file: str | None = None
    public_ip: str | None = None
    private_ip: str | None = None
    sandbox_root: str | None = None
    attributes: dict[str, Scalar] = Field(default_factory=dict)
    host_attributes: dict[str, Scalar] = Field(default_factory=dict)


class HostFilter(Model):
    type: Literal[
        "AwsInstanceFilter",
        "AzureVMSSFilter",
        "AzureVmFilter",
        "GcpInstanceFilter",
        "GcpInstanceGroupFilter",
        "HostNames",
        "HostAttributes",
        "All",
    ]
    spec: dict[str, Any] = Field(default_factory=dict)


class InfraInner(Model):
    """Union of the provider-specific fields; which apply depends on the provider."""

    connector_ref: str | None = None
    cloud_provider_ref: str | None = None
    region: str | None = None
    host_connection_type: Literal["PublicIP", "PrivateIP", "Hostname"] | None = None
    host_filter: HostFilter | None = None
    # AWS/Azure: tag -> value (a list: any of them); GCP: labels, or a list of network tags.
    tags: dict[str, Scalar | list[Scalar]] | list[str] = Field(default_factory=dict)
    # Azure / GCP
    subscription_id: str | None = None
    resource_group: str | None = None
    project: str | None = None
    zone: str | None = None
    zones: list[str] = Field(default_factory=list)
    # static (PDC)
    connection: Connection | None = None
    hosts: list[StaticHost] = Field(default_factory=list)
    delegate_selectors: list[DelegateTag] = Field(default_factory=list)

    @field_validator("region")
    @classmethod
    def _region(cls, v: str | None) -> str | None:
        if v is not None and " " in v.strip():  # an Azure display name: "East US" -> eastus
            v = v.replace(" ", "").lower()
        if v is not None and not REGION_RE.match(v):
            raise ValueError(f"region '{v}' must be lower-case letters, digits and '-'")
        return v


InfraType = Literal["Pdc", "DirectConnection", "SshWinRmAws", "SshWinRmAzure", "SshWinRmGcp"]


class InfrastructureBody(Model):
    environment_ref: str
    deployment_type: Annotated[Literal["Ssh", "WinRm"], AfterValidator(ssh_only)] = "Ssh"
    type: InfraType = "DirectConnection"
    spec: InfraInner = Field(default_factory=InfraInner)
    allow_simultaneous_deployments: bool = False


class InfrastructureSpec(Model):
    api_version: Literal["v1"] = "v1"
    kind: Literal["Infrastructure"]
    metadata: Metadata
    spec: InfrastructureBody


class InlineInfraBody(Model):
    cloud_provider_type: Literal["Aws", "Azure", "Gcp", "Physical", "Pdc"]
    deployment_type: Annotated[Literal["Ssh", "WinRm"], AfterValidator(ssh_only)] = "Ssh"
    spec: InfraInner = Field(default_factory=InfraInner)


class InlineInfra(Model):
    """An infrastructure definition written inside an Environment (the reference's form)."""

    name: str
    identifier: str | None = None
    spec: InlineInfraBody

    @property
    def ident(self) -> str:
        return self.identifier or identifier_of(self.name)


class EnvironmentBody(Model):
    type: Literal["Production", "PreProduction"]
    tags: dict[str, Scalar] = Field(default_factory=dict)
    variables: list[Variable] = Field(default_factory=list)
    infrastructure_definitions: list[InlineInfra] = Field(default_factory=list)
    description: str | None = None


class EnvironmentSpec(Model):
    api_version: Literal["v1"] = "v1"
    kind: Literal["Environment"]
    metadata: Metadata
    spec: EnvironmentBody
