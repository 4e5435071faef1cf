"""Typed pipeline-file schema, in the shape of Harness's SSH/VM deployment YAML.

These are *file* schemas (``*Spec``); SQL rows live in ``app.models``. Every model forbids
unknown fields so that a typo is an error naming the field, not a silently ignored setting.
Field names follow the files (camelCase) through aliases.
"""

from __future__ import annotations

import re
from typing import Annotated, Any, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, field_validator
from pydantic.alias_generators import to_camel

IDENT_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
REGION_RE = re.compile(r"^[a-z0-9][a-z0-9-]{0,62}$")
Scalar = str | int | float | bool


def _check_identifier(v: str) -> str:
    if not IDENT_RE.match(v):
        raise ValueError(f"identifier '{v}' must start with a letter or _ and contain only "
                         "letters, digits and _")
    return v


def _check_variable_name(v: str) -> str:
    if not IDENT_RE.match(v):
        raise ValueError(f"variable name '{v}' must be letters, digits and _")
    return v


# Identifiers name things other files and expressions refer to; variable names become shell
# variables. Both are checked the same way wherever they appear.
Identifier = Annotated[str, AfterValidator(_check_identifier)]
VariableName = Annotated[str, AfterValidator(_check_variable_name)]


class Model(BaseModel):
    model_config = ConfigDict(
        extra="forbid", populate_by_name=True, alias_generator=to_camel, frozen=False
    )


def identifier_of(name: str) -> str:
    """Harness-style identifier derived from a display name (``web-app vm`` -> ``web_app_vm``)."""
    ident = re.sub(r"[^A-Za-z0-9_]", "_", name.strip())
    return ident if ident and not ident[0].isdigit() else f"_{ident}"


class Metadata(Model):
    name: str
    identifier: Identifier | None = None
    description: str | None = None
    tags: dict[str, Scalar] = Field(default_factory=dict)
    org_identifier: str | None = None
    project_identifier: str | None = None

    @property
    def ident(self) -> str:
        return self.identifier or identifier_of(self.name)


class Variable(Model):
    """``- name: app_port / type: String / value: "8080"``."""

    name: VariableName
    type: Literal["String", "Number", "Secret"] = "String"
    value: Scalar | None = None
    description: str | None = None
    required: bool = False
    default: Scalar | None = None


# --- Service ---------------------------------------------------------------------------------


class ArtifactSource(Model):
    """``primary: {type: Local, spec: {path: ./app, tag: <+input>}}``.

    ``Local`` (a file or folder next to the pipeline file, packed reproducibly by the worker)
    runs today; the repository types load so that Harness files validate, and are refused at
    run time with a clear message until their fetchers exist.
    """

    type: Literal["Local", "Artifactory", "Nexus3Registry", "AmazonS3", "Jenkins", "CustomArtifact",
                  "Http"]
    spec: dict[str, Any] = Field(default_factory=dict)
    identifier: str | None = None


class Artifacts(Model):
    primary: ArtifactSource | None = None
    sidecars: list[dict[str, Any]] = Field(default_factory=list)


class ServiceInner(Model):
    artifacts: Artifacts = Field(default_factory=Artifacts)
    variables: list[Variable] = Field(default_factory=list)
    config_files: list[dict[str, Any]] = Field(default_factory=list)


class ServiceDefinition(Model):
    type: Literal["SSH", "Ssh", "WinRm"]
    spec: ServiceInner = Field(default_factory=ServiceInner)


class ServiceBody(Model):
    service_definition: ServiceDefinition


class ServiceSpec(Model):
    api_version: Literal["v1"] = "v1"
    kind: Literal["Service"]
    metadata: Metadata
    spec: ServiceBody


# --- Infrastructure ----------------------------------------------------------------------------


class Connection(Model):
    """How to reach static hosts. ``type: Sandbox`` = local sandbox hosts (no sshd)."""

    type: Literal["SSH", "Sandbox", "Local"] = "SSH"
    user: str = "root"
    port: int = Field(default=22, ge=1, le=65535)
    private_key_file: str | None = None
    known_hosts_file: str | None = None
    host_key_policy: Literal["strict", "accept-new"] = "strict"
    connect_timeout: float = Field(default=10.0, gt=0)


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
    type: Literal["AwsInstanceFilter", "AzureVMSSFilter", "AzureVmFilter", "GcpInstanceFilter",
                  "GcpInstanceGroupFilter", "HostNames", "HostAttributes", "All"]
    spec: dict[str, Any] = Field(default_factory=dict)


class InfraInner(Model):
    """Union of the provider-specific fields; which apply depends on the provider."""

    connector_ref: str | None = None
    cloud_provider_ref: str | None = None
    credentials_ref: str | None = None
    region: str | None = None
    host_connection_type: Literal["PublicIP", "PrivateIP", "Hostname"] | None = None
    host_filter: HostFilter | None = None
    tags: dict[str, Scalar] = Field(default_factory=dict)
    # Azure / GCP
    subscription_id: str | None = None
    resource_group: str | None = None
    project: str | None = None
    zones: list[str] = Field(default_factory=list)
    # static (PDC)
    connection: Connection | None = None
    hosts: list[StaticHost] = Field(default_factory=list)
    delegate_selectors: list[str] = Field(default_factory=list)

    @field_validator("region")
    @classmethod
    def _region(cls, v: str | None) -> str | None:
        if v is not None and not REGION_RE.match(v):
            raise ValueError(f"region '{v}' must be lower-case letters, digits and '-'")
        return v


InfraType = Literal["Pdc", "DirectConnection", "SshWinRmAws", "SshWinRmAzure", "SshWinRmGcp"]


class InfrastructureBody(Model):
    environment_ref: str
    deployment_type: Literal["Ssh", "WinRm"] = "Ssh"
    type: InfraType = "DirectConnection"
    spec: InfraInner = Field(default_factory=InfraInner)
    allow_simultaneous_deployments: bool = False


class InfrastructureSpec(Model):
    api_version: Literal["v1"] = "v1"
    kind: Literal["Infrastructure"]
    metadata: Metadata
    spec: InfrastructureBody


# --- Environment -------------------------------------------------------------------------------


class InlineInfraBody(Model):
    cloud_provider_type: Literal["Aws", "Azure", "Gcp", "Physical", "Pdc"]
    deployment_type: Literal["Ssh", "WinRm"] = "Ssh"
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


# --- Pipeline ----------------------------------------------------------------------------------


class InlineSource(Model):
    script: str


class ScriptSource(Model):
    type: Literal["Inline"] = "Inline"
    spec: InlineSource


class ScriptUnitSpec(Model):
    shell: Literal["Bash"] = "Bash"
    source: ScriptSource
    working_directory: str | None = None
    tail_files: list[dict[str, Any]] = Field(default_factory=list)


class CopyUnitSpec(Model):
    source_type: Literal["Artifact", "Config"] = "Artifact"
    destination_path: str


class _UnitBase(Model):
    identifier: str
    name: str | None = None


class ScriptUnit(_UnitBase):
    """Runs a bash script on the host (one remote command)."""

    type: Literal["Script"]
    spec: ScriptUnitSpec


class CopyUnit(_UnitBase):
    """Pushes the service's artifact to ``destinationPath`` on the host over SFTP."""

    type: Literal["Copy"]
    spec: CopyUnitSpec


CommandUnit = Annotated[ScriptUnit | CopyUnit, Field(discriminator="type")]


class StepVariable(Model):
    name: VariableName
    type: Literal["String", "Number", "Secret"] = "String"
    value: Scalar | None = None


class CommandStepSpec(Model):
    on_delegate: bool = False
    environment_variables: list[StepVariable] = Field(default_factory=list)
    output_variables: list[StepVariable] = Field(default_factory=list)
    command_units: list[CommandUnit] = Field(min_length=1)
    delegate_selectors: list[str] = Field(default_factory=list)


class StepSpec(Model):
    """``- step: {type: Command, name, identifier, timeout, spec: {...}}``."""

    type: Literal["Command"]
    name: str
    identifier: Identifier
    timeout: str | None = None
    description: str | None = None
    spec: CommandStepSpec

    @field_validator("timeout")
    @classmethod
    def _timeout(cls, v: str | None) -> str | None:
        if v is not None:
            parse_duration(v)
        return v


class StepElement(Model):
    step: StepSpec


class Execution(Model):
    steps: list[StepElement] = Field(min_length=1)
    rollback_steps: list[StepElement] = Field(default_factory=list)


class ServiceRef(Model):
    service_ref: str
    service_inputs: dict[str, Any] | None = None


class InfraRef(Model):
    identifier: str
    inputs: dict[str, Any] | None = None


class EnvironmentRef(Model):
    environment_ref: str
    deploy_to_all: bool = False
    infrastructure_definitions: list[InfraRef] = Field(min_length=1)


class DeploymentStageSpec(Model):
    deployment_type: Literal["Ssh", "WinRm"] = "Ssh"
    service: ServiceRef
    environment: EnvironmentRef
    execution: Execution


class StageSpec(Model):
    name: str
    identifier: Identifier
    type: Literal["Deployment"]
    description: str | None = None
    spec: DeploymentStageSpec


class StageElement(Model):
    stage: StageSpec


class PipelineBody(Model):
    stages: list[StageElement] = Field(min_length=1)
    variables: list[Variable] = Field(default_factory=list)
    description: str | None = None
    tags: dict[str, Scalar] = Field(default_factory=dict)


class PipelineSpec(Model):
    api_version: Literal["v1"] = "v1"
    kind: Literal["Pipeline"]
    metadata: Metadata
    spec: PipelineBody


KINDS: dict[str, type[Model]] = {
    "Service": ServiceSpec,
    "Environment": EnvironmentSpec,
    "Infrastructure": InfrastructureSpec,
    "Pipeline": PipelineSpec,
}

_DURATION_RE = re.compile(r"^\s*(?:(\d+)d)?\s*(?:(\d+)h)?\s*(?:(\d+)m)?\s*(?:(\d+)s)?\s*$")


def parse_duration(text: str) -> float:
    """``"10m"``, ``"1h30m"``, ``"45s"``, ``"90"`` (seconds) -> seconds."""
    t = str(text).strip()
    if t.isdigit():
        return float(t)
    m = _DURATION_RE.match(t)
    if not t or not m or not any(m.groups()):
        raise ValueError(f"'{text}' is not a duration (use e.g. 30s, 10m, 1h30m)")
    d, h, mi, s = (int(g or 0) for g in m.groups())
    return float(((d * 24 + h) * 60 + mi) * 60 + s)
