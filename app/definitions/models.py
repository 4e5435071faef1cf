"""Typed pipeline-file schema, in the shape of Harness's SSH/VM deployment YAML.

These are *file* schemas (``*Spec``); SQL rows live in ``app.models``. Every model forbids
unknown fields so that a typo is an error naming the field, not a silently ignored setting.
Field names follow the files (camelCase) through aliases.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import AfterValidator, Field, field_validator, model_validator
from pydantic.alias_generators import to_camel

from app.definitions.base import (
    REGION_RE,
    DelegateTag,
    Duration,
    Identifier,
    Model,
    Scalar,
    VariableName,
    identifier_of,
)
from app.definitions.notifications import NotificationRule


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

    ``Local`` (a file or folder next to the pipeline file, packed reproducibly by the worker),
    ``Http``/``Artifactory``/``Nexus3Registry``/``Jenkins`` (a URL template, see
    app.artifacts.sources) and ``AmazonS3`` (bucket and key); a checksum (``spec.sha256``, or
    the repository's) is verified where the file lands. ``CustomArtifact`` is refused.
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
            raise ValueError("connection type Noop is not allowed in pipeline files: it runs "
                             "nothing and records every step as succeeded. Benchmarks and "
                             "tests set VMFARM_TEST_CONNECTION=noop on the workers instead "
                             "(such a run is never recorded as a deployment)")
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


class DownloadArtifactUnitSpec(Model):
    destination_path: str


class DownloadArtifactUnit(_UnitBase):
    """The host fetches the service's artifact itself (for hosts that reach the repository):
    HTTP(S) sources with their credentials in that one command's environment, S3 through a
    short-lived presigned URL made on the worker. The checksum is verified on the host."""

    type: Literal["DownloadArtifact"]
    spec: DownloadArtifactUnitSpec


class ReleaseUnitSpec(Model):
    deployment_path: str
    keep: int = Field(default=3, ge=1, le=50)


class ReleaseUnit(_UnitBase):
    """Install the artifact as ``<deploymentPath>/releases/<version>`` and switch
    ``<deploymentPath>/current`` to it atomically; the last ``keep`` releases stay.

    The artifact is copied (fetched once per execution, pushed over SFTP, checksum verified)
    only when that release is not on the host yet: going back to a release the host still
    holds (a rollback) fetches nothing."""

    type: Literal["Release"]
    spec: ReleaseUnitSpec


class SetupUnitSpec(Model):
    paths: list[str] = Field(min_length=1)
    owner: str | None = None  # user[:group]
    mode: str | None = Field(default=None, pattern=r"^[0-7]{3,4}$")


class SetupUnit(_UnitBase):
    """Prepare the runtime paths on the host (Harness's "Setup Runtime Paths"): each path is
    created if missing, then given ``owner`` and ``mode`` when set."""

    type: Literal["Setup"]
    spec: SetupUnitSpec


CommandUnit = Annotated[ScriptUnit | CopyUnit | DownloadArtifactUnit | ReleaseUnit | SetupUnit,
                        Field(discriminator="type")]


class StepVariable(Model):
    name: VariableName
    type: Literal["String", "Number", "Secret"] = "String"
    value: Scalar | None = None


class CommandStepSpec(Model):
    on_delegate: bool = False
    environment_variables: list[StepVariable] = Field(default_factory=list)
    output_variables: list[StepVariable] = Field(default_factory=list)
    command_units: list[CommandUnit] = Field(min_length=1)
    delegate_selectors: list[DelegateTag] = Field(default_factory=list)


ErrorType = Literal["AllErrors", "Unknown", "Authentication", "Authorization", "Connectivity",
                    "Timeout", "Verification", "DelegateRestart", "DelegateProvisioning",
                    "PolicyEvaluation", "ApprovalRejection"]
ActionType = Literal["Retry", "Ignore", "MarkAsSuccess", "Abort", "StageRollback",
                     "PipelineRollback", "ManualIntervention", "MarkAsFailure"]
# What a person (or the post-timeout action) may choose after a ManualIntervention.
INTERVENTION_ACTIONS = ("Abort", "StageRollback", "PipelineRollback", "MarkAsSuccess", "Ignore",
                        "MarkAsFailure")


class FailureAction(Model):
    """What to do about a failure.

    Retry takes retryCount, retryIntervals and onRetryFailure; ManualIntervention takes timeout
    and onTimeout (the post-timeout action)."""

    type: ActionType
    spec: dict[str, Any] = Field(default_factory=dict)

    @model_validator(mode="after")
    def _spec(self) -> FailureAction:
        if self.type == "Retry":
            RetrySpec.model_validate(self.spec)
        if self.type == "ManualIntervention":
            ManualInterventionSpec.model_validate(self.spec)
        return self

    @property
    def retry(self) -> RetrySpec | None:
        """A Retry's spec, typed (None for any other action)."""
        return RetrySpec.model_validate(self.spec) if self.type == "Retry" else None

    @property
    def intervention(self) -> ManualInterventionSpec | None:
        """A ManualIntervention's spec, typed (None for any other action)."""
        return ManualInterventionSpec.model_validate(self.spec) \
            if self.type == "ManualIntervention" else None


class TimeoutAction(Model):
    type: Literal["Abort", "StageRollback", "PipelineRollback", "MarkAsSuccess", "Ignore",
                  "MarkAsFailure"]


class OnTimeout(Model):
    action: TimeoutAction


class ManualInterventionSpec(Model):
    """Harness's ManualIntervention: wait for a person for ``timeout``, then ``onTimeout``."""

    timeout: Duration = "1h"
    on_timeout: OnTimeout


class RetryOnFailure(Model):
    action: FailureAction


class RetrySpec(Model):
    retry_count: int = Field(ge=1, le=100)
    retry_intervals: list[Duration] = Field(min_length=1)
    on_retry_failure: RetryOnFailure | None = None


class OnFailure(Model):
    errors: list[ErrorType] = Field(min_length=1)
    action: FailureAction


class FailureStrategy(Model):
    """Harness's ``failureStrategies`` entry: ``- onFailure: {errors: [...], action: {...}}``.

    The first entry whose errors match wins; a step's own entries come before its stage's,
    which come before the pipeline's.
    """

    on_failure: OnFailure


class _StepBase(Model):
    name: str
    identifier: Identifier
    timeout: Duration | None = None
    description: str | None = None
    failure_strategies: list[FailureStrategy] = Field(default_factory=list)


class CommandStep(_StepBase):
    """``- step: {type: Command, name, identifier, timeout, spec: {...}}``."""

    type: Literal["Command"]
    spec: CommandStepSpec


class HealthCheckSpec(Model):
    """How a HealthCheck step decides that one host is healthy.

    ```yaml
    - step:
        type: HealthCheck
        name: Health
        identifier: health
        spec:
          type: HTTP                      # HTTP | TCP | Command
          url: http://<+instance.hostName>:8080/health
          expectStatus: [200]
          expectBody: '"status":"UP"'     # substring; JSON-aware for JSON bodies
          retries: 10
          interval: 1s
          timeout: 2s
    ```
    HTTP and TCP checks run from the region's worker to the host (as a load balancer would);
    Command runs on the host over SSH and passes on exit code 0.
    """

    type: Literal["HTTP", "TCP", "Command"]
    url: str | None = None
    host: str | None = None
    port: int | str | None = None
    command: str | None = None
    expect_status: list[int] = Field(default_factory=lambda: [200])
    expect_body: str | None = None
    retries: int = Field(default=3, ge=1, le=1000)  # attempts in all
    interval: Duration = "1s"
    timeout: Duration = "5s"

    @model_validator(mode="after")
    def _required(self) -> HealthCheckSpec:
        need = {"HTTP": "url", "TCP": "port", "Command": "command"}[self.type]
        if getattr(self, need) in (None, ""):
            raise ValueError(f"a {self.type} health check needs '{need}'")
        return self


class HealthCheckStep(_StepBase):
    """A step that waits until the host is healthy (retries, interval, timeout)."""

    type: Literal["HealthCheck"]
    spec: HealthCheckSpec


StepSpec = Annotated[CommandStep | HealthCheckStep, Field(discriminator="type")]


class StepGroupStepElement(Model):
    step: StepSpec


class StepGroup(Model):
    """Harness's ``stepGroup``: steps that share failure strategies (run in order per host).

    A group's failureStrategies come after each step's own and before the stage's."""

    name: str
    identifier: Identifier
    steps: list[StepGroupStepElement] = Field(min_length=1)
    failure_strategies: list[FailureStrategy] = Field(default_factory=list)


class StepElement(Model):
    step: StepSpec | None = None
    step_group: StepGroup | None = None

    @model_validator(mode="after")
    def _one(self) -> StepElement:
        if (self.step is None) == (self.step_group is None):
            raise ValueError("each entry holds either 'step' or 'stepGroup'")
        return self


FlatStep = tuple[tuple[str | int, ...], "CommandStep | HealthCheckStep", "StepGroup | None"]


def flat_steps(elements: list[StepElement]) -> list[FlatStep]:
    """Every step in order, with its path under the list and its step group (or None)."""
    out: list[FlatStep] = []
    for i, el in enumerate(elements):
        if el.step is not None:
            out.append(((i, "step"), el.step, None))
        elif el.step_group is not None:
            for k, inner in enumerate(el.step_group.steps):
                out.append(((i, "stepGroup", "steps", k, "step"), inner.step, el.step_group))
    return out


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


Size = int | str  # a host count (3) or a percentage of all hosts ("25%")


def parse_size(value: Size) -> tuple[float, bool]:
    """``3`` -> (3, False); ``"25%"`` -> (25.0, True). Raises ValueError when invalid."""
    if isinstance(value, bool):
        raise ValueError(f"{value!r} is not a host count or a percentage")
    if isinstance(value, int):
        if value < 1:
            raise ValueError(f"a host count must be at least 1, got {value}")
        return float(value), False
    text = str(value).strip()
    if text.endswith("%"):
        try:
            pct = float(text[:-1])
        except ValueError:
            raise ValueError(f"'{value}' is not a percentage such as 25%") from None
        if not 0 < pct <= 100:
            raise ValueError(f"a percentage must be above 0% and at most 100%, got {value}")
        return pct, True
    if text.isdigit() and int(text) >= 1:
        return float(text), False
    raise ValueError(f"'{value}' is not a host count (3) or a percentage (25%)")


def _check_sizes(v: list[Size]) -> list[Size]:
    for x in v:
        parse_size(x)
    return v


Sizes = Annotated[list[Size], AfterValidator(_check_sizes), Field(min_length=1)]


class HttpCheckSpec(Model):
    """A health endpoint every host must answer (the reference's ``"status":"UP"`` check)."""

    url: str
    expect_status: list[int] = Field(default_factory=lambda: [200])
    expect_body: str | None = None
    retries: int = Field(default=10, ge=1, le=1000)  # attempts in all
    interval: Duration = "1s"
    timeout: Duration = "5s"


class ProbeSpec(Model):
    """Traffic sent to every host for a while, to measure error rate and response time."""

    url: str
    duration: Duration = "10s"
    concurrency: int = Field(default=1, ge=1, le=64)
    timeout: Duration = "2s"


class ResponseTime(Model):
    p50: float | None = None
    p95: float | None = None
    p99: float | None = None


class PrometheusCheck(Model):
    """An instant query whose value must stay below/above a threshold."""

    query: str
    url: str | None = None  # default: VMFARM_PROMETHEUS_URL
    below: float | None = None
    above: float | None = None


class SuccessCriteria(Model):
    error_rate_below: float | str | None = None  # 0.01 or "1%"
    response_time_below: float | ResponseTime | None = None  # ms (p95), or per percentile


class FailureBudget(Model):
    """How many hosts may fail before the stage fails (Ansible: must be exceeded)."""

    max_failed_hosts: int = Field(default=0, ge=0)
    max_failed_percent: float = Field(default=0.0, ge=0, le=100)


class VerificationSpec(Model):
    """The gate after a phase: checks on every host of the phase, then a verdict."""

    health_check: HttpCheckSpec | None = None
    probe: ProbeSpec | None = None
    success_criteria: SuccessCriteria | None = None
    prometheus: PrometheusCheck | None = None


class TrafficSpec(Model):
    """Where blue-green switches traffic (see app/traffic)."""

    type: Literal["Local", "AwsElbV2"]
    port: int = Field(default=8080, ge=1, le=65535)  # the app's port on every host
    # Local (HAProxy on the control machine)
    name: str = "vmfarm"
    listen: str | None = None
    mode: Literal["http", "tcp"] = "http"
    health_check_path: str | None = None
    # AwsElbV2 (a target group of type ip)
    region: str | None = None
    target_group_arn: str | None = None
    endpoint_url: str | None = None
    timeout: float = Field(default=600, gt=0)

    @model_validator(mode="after")
    def _complete(self) -> TrafficSpec:
        need = ["listen"] if self.type == "Local" else ["region", "target_group_arn"]
        missing = [to_camel(n) for n in need if not getattr(self, n)]
        if missing:
            raise ValueError(f"traffic type {self.type} needs {', '.join(missing)}")
        return self

    def switch_spec(self) -> dict[str, Any]:
        """The keys the traffic switch itself takes (app.traffic.traffic_switch_from_spec)."""
        keys = (["type", "name", "listen", "mode", "healthCheckPath"] if self.type == "Local"
                else ["type", "region", "targetGroupArn", "endpointUrl", "timeout"])
        data = self.model_dump(mode="json", by_alias=True, exclude_none=True)
        return {k: data[k] for k in keys if k in data}


class StrategySpec(Model):
    """How a stage reaches its hosts.

    ```yaml
    strategy:
      type: Rolling                 # Basic | Rolling | Canary | BlueGreen
      phases: [1, "25%", "50%"]     # Rolling: batch sizes, the last repeats (Ansible serial)
                                    # Canary: cumulative targets; a final 100% phase follows
      maxConcurrency: 5             # hosts in flight inside a phase
      verification: {...}           # the gate after every phase but the last
      failureBudget: {maxFailedHosts: 1, maxFailedPercent: 10}
    ```
    """

    type: Literal["Basic", "Rolling", "Canary", "BlueGreen"] = "Basic"
    phases: Sizes | None = None
    max_concurrency: int | None = Field(default=None, ge=1)
    verification: VerificationSpec | None = None
    failure_budget: FailureBudget = Field(default_factory=FailureBudget)
    traffic: TrafficSpec | None = None

    @model_validator(mode="after")
    def _fits(self) -> StrategySpec:
        if self.type in ("Rolling", "Canary") and not self.phases:
            raise ValueError(f"a {self.type} strategy needs 'phases'")
        if self.type == "BlueGreen" and self.traffic is None:
            raise ValueError("a BlueGreen strategy needs 'traffic' (where to switch traffic)")
        return self


class ReferencePhaseStep(Model):
    """A step inside a reference phase; ``type: VERIFICATION`` puts a gate after the phase.

    Its ``properties`` carry vmfarm's verification keys (healthCheck, probe, successCriteria,
    prometheus); any other type or key (Harness's analysisType, ...) is refused by the loader
    (app.definitions.schemas), never ignored.
    """

    type: str
    name: str | None = None
    properties: dict[str, Any] = Field(default_factory=dict)

    @property
    def is_verification(self) -> bool:
        return self.type.upper() == "VERIFICATION"

    def verification(self) -> VerificationSpec | None:
        keys = {"healthCheck", "probe", "successCriteria", "prometheus"}
        mine = {k: v for k, v in self.properties.items() if k in keys}
        return VerificationSpec.model_validate(mine) if mine else None

    @model_validator(mode="after")
    def _valid(self) -> ReferencePhaseStep:
        self.verification()
        return self


class ReferencePhaseBody(Model):
    """A phase in the reference's ``rolloutDeployment``/``canaryDeployment`` form.

    ``instanceCount`` is cumulative (Harness: "Instances (cumulative)"): 25%, 50%, 100% deploys
    to a quarter of the hosts, then to the next quarter, then to the rest. deploymentType,
    computeProviderType, infraDefinitionId and serviceId repeat what the stage says: the loader
    checks that they agree with it (app.definitions.schemas.phase_problems).
    """

    name: str
    instance_count: int | str
    instance_unit_type: Literal["PERCENTAGE", "COUNT"] = "PERCENTAGE"
    deployment_type: str | None = None
    compute_provider_type: str | None = None
    infra_definition_id: str | None = None
    service_id: str | None = None
    steps: list[ReferencePhaseStep] = Field(default_factory=list)

    def size(self) -> Size:
        raw = str(self.instance_count).strip().rstrip("%")
        return f"{raw}%" if self.instance_unit_type == "PERCENTAGE" else int(raw)

    @model_validator(mode="after")
    def _valid(self) -> ReferencePhaseBody:
        parse_size(self.size())
        return self


class ReferencePhase(Model):
    phase: ReferencePhaseBody


class ReferencePhases(Model):
    phases: list[ReferencePhase] = Field(min_length=1)


class DeploymentStageSpec(Model):
    deployment_type: Literal["Ssh", "WinRm"] = "Ssh"
    service: ServiceRef
    environment: EnvironmentRef
    execution: Execution
    strategy: StrategySpec | None = None
    rollout_deployment: ReferencePhases | None = None
    canary_deployment: ReferencePhases | None = None

    @model_validator(mode="after")
    def _one_strategy(self) -> DeploymentStageSpec:
        given = [n for n, v in (("strategy", self.strategy),
                                ("rolloutDeployment", self.rollout_deployment),
                                ("canaryDeployment", self.canary_deployment)) if v is not None]
        if len(given) > 1:
            raise ValueError(f"give one of {', '.join(given)}, not several")
        return self


class StageSpec(Model):
    name: str
    identifier: Identifier
    type: Literal["Deployment"]
    description: str | None = None
    spec: DeploymentStageSpec
    failure_strategies: list[FailureStrategy] = Field(default_factory=list)
    # Workers (delegates) of the hosts' regions must carry these tags (with the pipeline's,
    # the infrastructure's and the step's). When none is live, delegateFallback names the tags
    # to use instead ([] = any worker of the region); without it the run is refused.
    delegate_selectors: list[DelegateTag] = Field(default_factory=list)
    delegate_fallback: list[DelegateTag] | None = None


class Approvers(Model):
    user_groups: list[str] = Field(min_length=1)
    minimum_count: int = Field(default=1, ge=1)
    disallow_pipeline_executor: bool = False


class ApprovalStepSpec(Model):
    approval_message: str = "Please review and approve"
    approvers: Approvers
    include_pipeline_execution_history: bool = True


class ApprovalStep(_StepBase):
    """Harness's manual approval: the execution waits until enough approvers say yes.

    ```yaml
    - step:
        type: HarnessApproval
        name: Approve production
        identifier: approve
        timeout: 1d
        spec:
          approvalMessage: Deploy <+artifact.tag> to production?
          approvers:
            userGroups: [release_managers]
            minimumCount: 2
            disallowPipelineExecutor: true
    ```
    """

    type: Literal["HarnessApproval"]
    spec: ApprovalStepSpec


class ApprovalStepElement(Model):
    step: ApprovalStep


class ApprovalExecution(Model):
    steps: list[ApprovalStepElement] = Field(min_length=1, max_length=1)


class ApprovalStageBody(Model):
    execution: ApprovalExecution


class ApprovalStageSpec(Model):
    """A stage that waits for people: no work is sent while it waits (the canvas has ended)."""

    name: str
    identifier: Identifier
    type: Literal["Approval"]
    description: str | None = None
    spec: ApprovalStageBody


AnyStage = Annotated[StageSpec | ApprovalStageSpec, Field(discriminator="type")]


class StageElement(Model):
    stage: AnyStage


class PipelineBody(Model):
    stages: list[StageElement] = Field(min_length=1)
    failure_strategies: list[FailureStrategy] = Field(default_factory=list)
    delegate_selectors: list[DelegateTag] = Field(default_factory=list)
    # Who hears about what (app.notify): Slack/webhook/email per event.
    notification_rules: list[NotificationRule] = Field(default_factory=list)
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

