"""Steps and their command units, step groups and failure strategies."""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import AfterValidator, Field, field_validator, model_validator

from app.definitions.base import (
    DelegateTag,
    Duration,
    Identifier,
    Model,
    Scalar,
    VariableName,
)
from app.definitions.conditions import check as check_condition
from app.definitions.models.loops import LoopStrategy, no_hosts_loop


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

    @field_validator("tail_files")
    @classmethod
    def _no_tail_files(cls, v: list[dict[str, Any]]) -> list[dict[str, Any]]:
        if v:
            raise ValueError(
                "tailFiles is not supported: wait for the line in the script itself, e.g. "
                "timeout 300 bash -c 'until grep -q PATTERN FILE; do sleep 1; done'"
            )
        return v


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


CommandUnit = Annotated[
    ScriptUnit | CopyUnit | DownloadArtifactUnit | ReleaseUnit | SetupUnit,
    Field(discriminator="type"),
]


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


ErrorType = Literal[
    "AllErrors",
    "Unknown",
    "Authentication",
    "Authorization",
    "Connectivity",
    "Timeout",
    "Verification",
    "DelegateRestart",
    "DelegateProvisioning",
    "PolicyEvaluation",
    "ApprovalRejection",
]


ActionType = Literal[
    "Retry",
    "Ignore",
    "MarkAsSuccess",
    "Abort",
    "StageRollback",
    "PipelineRollback",
    "ManualIntervention",
    "MarkAsFailure",
]


# What a person (or the post-timeout action) may choose after a ManualIntervention.
INTERVENTION_ACTIONS = (
    "Abort",
    "StageRollback",
    "PipelineRollback",
    "MarkAsSuccess",
    "Ignore",
    "MarkAsFailure",
)


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
        return (
            ManualInterventionSpec.model_validate(self.spec)
            if self.type == "ManualIntervention"
            else None
        )


class TimeoutAction(Model):
    type: Literal[
        "Abort", "StageRollback", "PipelineRollback", "MarkAsSuccess", "Ignore", "MarkAsFailure"
    ]


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


# A condition as written: checked when the file is loaded (app.definitions.conditions).
Condition = Annotated[str, AfterValidator(check_condition)]


class StepWhen(Model):
    """Harness's ``when`` of a step or step group: run it only if the host's earlier steps in
    the stage succeeded (``Success``, the default), failed (``Failure``) or either way
    (``All``), and ``condition`` is true.

    ```yaml
    - step:
        type: Command
        name: Collect diagnostics
        identifier: diagnostics
        when:
          stageStatus: Failure             # only on the hosts where an earlier step failed
          condition: <+env.type> == "Production"
    ```
    A step skipped by its ``when`` is recorded SKIPPED with the reason; it does not make the
    host fail. A step that runs after a failure does not make the host pass.
    """

    stage_status: Literal["Success", "Failure", "All"] = "Success"
    condition: Condition | None = None


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
    when: StepWhen | None = None
    # A looping strategy (app.definitions.models.loops); repeat over <+stage.output.hosts> is
    # the phase's per-host fan-out.
    strategy: LoopStrategy | None = None


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
    when: StepWhen | None = None
    strategy: LoopStrategy | None = None

    @field_validator("strategy")
    @classmethod
    def _loop(cls, v: LoopStrategy | None) -> LoopStrategy | None:
        return no_hosts_loop(v, "a HealthCheck step")


class Approvers(Model):
    user_groups: list[str] = Field(min_length=1)
    minimum_count: int = Field(default=1, ge=1)
    disallow_pipeline_executor: bool = False


class ApprovalStepSpec(Model):
    """Approvers, and (as the reference writes them) ``minimumCount`` and
    ``disallowPipelineExecutor`` next to ``approvers`` rather than inside it: either place
    means the same."""

    approval_message: str = "Please review and approve"
    approvers: Approvers
    include_pipeline_execution_history: bool = True
    minimum_count: int | None = Field(default=None, ge=1)
    disallow_pipeline_executor: bool | None = None

    @model_validator(mode="after")
    def _fold(self) -> ApprovalStepSpec:
        given = self.approvers.model_fields_set
        for name in ("minimum_count", "disallow_pipeline_executor"):
            outer = getattr(self, name)
            if outer is None:
                continue
            if name in given and getattr(self.approvers, name) != outer:
                raise ValueError(
                    f"{name} is given twice with different values (in approvers "
                    "and next to it): give it once"
                )
            setattr(self.approvers, name, outer)
            setattr(self, name, None)
        return self


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

    In an Approval stage it is the stage. In a Deployment stage's steps every host of the
    phase stops at it (a barrier) and the execution waits for the approvers once per phase;
    rejected, the hosts fail with ApprovalRejection and the failure strategies apply. In a
    Custom stage the stage waits at it. Past its ``timeout`` (default 1d) it fails (Timeout).
    """

    type: Literal["HarnessApproval"]
    spec: ApprovalStepSpec


class WaitStepSpec(Model):
    duration: Duration


class WaitStep(_StepBase):
    """Wait ``duration`` before the next step: a timer in the coordinator, no worker sleeps.

    ```yaml
    - step: {type: Wait, name: Soak, identifier: soak, spec: {duration: 10m}}
    ```
    """

    type: Literal["Wait"]
    spec: WaitStepSpec

    @field_validator("timeout")
    @classmethod
    def _no_timeout(cls, v: str | None) -> str | None:
        if v is not None:
            raise ValueError("a Wait step has no timeout: spec.duration is how long it waits")
        return v


StepSpec = Annotated[
    CommandStep | HealthCheckStep | ApprovalStep | WaitStep, Field(discriminator="type")
]


class StepGroupStepElement(Model):
    step: StepSpec


class StepGroup(Model):
    """Harness's ``stepGroup``: steps that share failure strategies (run in order per host).

    A group's failureStrategies come after each step's own and before the stage's."""

    name: str
    identifier: Identifier
    steps: list[StepGroupStepElement] = Field(min_length=1)
    failure_strategies: list[FailureStrategy] = Field(default_factory=list)
    # Applies to each of its steps, with the step's own (both must let it run).
    when: StepWhen | None = None
    # The group's steps run once per iteration (app.definitions.models.loops).
    strategy: LoopStrategy | None = None

    @field_validator("strategy")
    @classmethod
    def _loop(cls, v: LoopStrategy | None) -> LoopStrategy | None:
        return no_hosts_loop(v, "a step group (put it on each Command step)")


class StepElement(Model):
    step: StepSpec | None = None
    step_group: StepGroup | None = None

    @model_validator(mode="after")
    def _one(self) -> StepElement:
        if (self.step is None) == (self.step_group is None):
            raise ValueError("each entry holds either 'step' or 'stepGroup'")
        return self


FlatStep = tuple[
    tuple[str | int, ...],
    "CommandStep | HealthCheckStep | ApprovalStep | WaitStep",
    "StepGroup | None",
]


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

    @field_validator("rollback_steps")
    @classmethod
    def _no_approval_in_rollback(cls, v: list[StepElement]) -> list[StepElement]:
        for _, step, _ in flat_steps(v):
            if isinstance(step, ApprovalStep | WaitStep):
                raise ValueError(
                    f"{step.type} step '{step.identifier}' in rollbackSteps is not "
                    "supported: a rollback does not wait (put it in the stage's steps; a person "
                    "answers a ManualIntervention failure strategy)"
                )
        return v


# --- steps of a Custom stage: they run on a delegate (a worker), not on hosts ----------------


class ExecutionTarget(Model):
    host: str | None = None
    connector_ref: str | None = None
    working_directory: str | None = None


class ShellScriptSpec(Model):
    shell: Literal["Bash"] = "Bash"
    on_delegate: bool = True
    source: ScriptSource
    environment_variables: list[StepVariable] = Field(default_factory=list)
    output_variables: list[StepVariable] = Field(default_factory=list)
    execution_target: ExecutionTarget | None = None
    delegate_selectors: list[DelegateTag] = Field(default_factory=list)

    @model_validator(mode="after")
    def _on_delegate(self) -> ShellScriptSpec:
        target = self.execution_target
        if not self.on_delegate or (target is not None and target.to_json()):
            raise ValueError(
                "a ShellScript step in a Custom stage runs on the delegate (onDelegate: true, "
                "executionTarget: {}); running it on a host (executionTarget) is not supported: "
                "use a Command step in a Deployment stage to run on hosts"
            )
        return self


class ShellScriptStep(_StepBase):
    """A bash script on the delegate (a worker), in the clean delegate environment: script over
    stdin, only its environmentVariables and a minimal PATH; outputVariables as in Command
    steps (``- {name: X, type: String, value: SHELL_VAR}``).

    ```yaml
    - step:
        type: ShellScript
        name: Prepare
        identifier: prepare
        spec:
          shell: Bash
          onDelegate: true
          source: {type: Inline, spec: {script: "export BUILD=42"}}
          environmentVariables: [{name: TARGET, type: String, value: <+pipeline.name>}]
          outputVariables: [{name: build, type: String, value: BUILD}]
    ```
    """

    type: Literal["ShellScript"]
    spec: ShellScriptSpec
    strategy: LoopStrategy | None = None

    @field_validator("strategy")
    @classmethod
    def _loop(cls, v: LoopStrategy | None) -> LoopStrategy | None:
        return no_hosts_loop(v, "a step of a Custom stage (it has no hosts)")


class HttpHeader(Model):
    key: str
    value: str


class HttpStepSpec(Model):
    """An HTTP request from the delegate; ``assertion`` (app.definitions.httpassert) decides
    success (without one, any status below 400)."""

    url: str
    method: Literal["GET", "POST", "PUT", "DELETE", "HEAD", "PATCH", "OPTIONS"] = "GET"
    headers: list[HttpHeader] = Field(default_factory=list)
    request_body: str | None = None
    assertion: str | None = None
    delegate_selectors: list[DelegateTag] = Field(default_factory=list)

    @field_validator("assertion")
    @classmethod
    def _readable(cls, v: str | None) -> str | None:
        from app.definitions.httpassert import check

        if v is not None:
            check(v)
        return v

    @field_validator("url")
    @classmethod
    def _http(cls, v: str) -> str:
        if not v.startswith(("http://", "https://", "<+")):
            raise ValueError(f"url {v!r} must start with http:// or https://")
        return v


class HttpStep(_StepBase):
    """An HTTP request from the delegate.

    ```yaml
    - step:
        type: Http
        name: Smoke
        identifier: smoke
        timeout: 10s
        spec:
          url: https://status.example.com/health
          method: GET
          headers: [{key: Accept, value: application/json}]
          assertion: <+httpResponseCode> == 200
    ```
    """

    type: Literal["Http"]
    spec: HttpStepSpec
    strategy: LoopStrategy | None = None

    @field_validator("strategy")
    @classmethod
    def _loop(cls, v: LoopStrategy | None) -> LoopStrategy | None:
        return no_hosts_loop(v, "a step of a Custom stage (it has no hosts)")


# Terraform steps (app.definitions.models.terraform) build on _StepBase above.
from app.definitions.models.terraform import (  # noqa: E402
    TerraformApplyStep,
    TerraformDestroyStep,
    TerraformPlanStep,
    TerraformRollbackStep,
)

CustomStepSpec = Annotated[
    ShellScriptStep
    | HttpStep
    | WaitStep
    | ApprovalStep
    | TerraformPlanStep
    | TerraformApplyStep
    | TerraformDestroyStep
    | TerraformRollbackStep,
    Field(discriminator="type"),
]


class CustomStepElement(Model):
    step: CustomStepSpec


class CustomExecution(Model):
    steps: list[CustomStepElement] = Field(min_length=1)
