"""Pipelines and their stages (Deployment, Approval, Custom, Pipeline), and the kinds a file may
hold."""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import AfterValidator, Field, field_validator, model_validator

from app.definitions.base import (
    DelegateTag,
    Identifier,
    Model,
    Scalar,
    ssh_only,
)
from app.definitions.models.connector import ConnectorSpec
from app.definitions.models.infrastructure import EnvironmentSpec, InfrastructureSpec
from app.definitions.models.loops import StageLoopStrategy, no_hosts_loop
from app.definitions.models.service import Metadata, ServiceSpec, Variable
from app.definitions.models.steps import (
    ApprovalStep,
    Condition,
    CustomExecution,
    Execution,
    FailureStrategy,
)
from app.definitions.models.strategy import ReferenceBlueGreen, ReferencePhases, StrategySpec
from app.definitions.models.watch import RollbackStrategySpec
from app.definitions.notifications import NotificationRule


def _inputs_at_run_time(where: str) -> Any:
    """Harness writes the runtime inputs of a referenced entity in the pipeline
    (``serviceInputs``, an infrastructure's ``inputs``). vmfarm takes them from --set and input
    sets (where these keys are read); in a pipeline file only ``<+input>`` (or nothing) is
    accepted, so that a value written here is never silently dropped."""

    def check(v: Any) -> Any:
        if v is None or v == {} or (isinstance(v, str) and v.strip() == "<+input>"):
            return None
        raise ValueError(
            f"{where} with values is not supported in a pipeline file: give them "
            "with --set or an input set (--inputs), or write them in the "
            "referenced file"
        )

    return check


class ServiceRef(Model):
    service_ref: str
    service_inputs: Annotated[Any, AfterValidator(_inputs_at_run_time("serviceInputs"))] = None


class InfraRef(Model):
    identifier: str
    inputs: Annotated[Any, AfterValidator(_inputs_at_run_time("inputs"))] = None


class EnvironmentRef(Model):
    """The stage's environment and the infrastructures it deploys to: those listed; with
    ``deployToAll: true`` every infrastructure of the environment; with neither, the
    environment's only infrastructure (several: an error naming them). Filled in by the
    reference check (app.definitions.references)."""

    environment_ref: str
    deploy_to_all: bool = False
    environment_inputs: Annotated[Any, AfterValidator(_inputs_at_run_time("environmentInputs"))] = (
        None
    )
    infrastructure_definitions: list[InfraRef] = Field(default_factory=list)


class DeploymentStageSpec(Model):
    deployment_type: Annotated[Literal["Ssh", "WinRm"], AfterValidator(ssh_only)] = "Ssh"
    service: ServiceRef
    environment: EnvironmentRef
    execution: Execution
    strategy: StrategySpec | None = None
    rollout_deployment: ReferencePhases | None = None
    canary_deployment: ReferencePhases | None = None
    blue_green_deployment: ReferenceBlueGreen | None = None

    @model_validator(mode="after")
    def _one_strategy(self) -> DeploymentStageSpec:
        given = [
            n
            for n, v in (
                ("strategy", self.strategy),
                ("rolloutDeployment", self.rollout_deployment),
                ("canaryDeployment", self.canary_deployment),
                ("blueGreenDeployment", self.blue_green_deployment),
            )
            if v is not None
        ]
        if len(given) > 1:
            raise ValueError(f"give one of {', '.join(given)}, not several")
        return self


class StageWhen(Model):
    """Harness's ``when`` of a stage: run it only if the pipeline so far succeeded
    (``pipelineStatus: Success``, the default), failed (``Failure``) or either way (``All``),
    and ``condition`` is true; ``stageStatus`` is read the same way. A stage skipped by its
    ``when`` is SKIPPED, with the reason. When a stage fails for good (its failure strategy:
    MarkAsFailure, or StageRollback once rolled back) and a later stage runs after a failure,
    the pipeline goes on to it, and ends FAILED after its last stage; otherwise a failed stage
    ends the pipeline (Abort, PipelineRollback and a failed rollback always do).

    ```yaml
    - stage:
        name: Smoke tests
        identifier: smoke
        when:
          pipelineStatus: Success
          condition: <+env.type> == "Production"
    ```
    """

    pipeline_status: Literal["Success", "Failure", "All"] | None = None
    stage_status: Literal["Success", "Failure", "All"] | None = None
    condition: Condition | None = None

    @model_validator(mode="after")
    def _one_status(self) -> StageWhen:
        if self.pipeline_status is not None and self.stage_status is not None:
            raise ValueError(
                "give pipelineStatus or stageStatus, not both (a stage's status "
                "is the pipeline's so far)"
            )
        return self


class StageSpec(Model):
    name: str
    identifier: Identifier
    type: Literal["Deployment"]
    description: str | None = None
    tags: dict[str, Scalar] = Field(default_factory=dict)  # labels, shown by plan
    spec: DeploymentStageSpec
    failure_strategies: list[FailureStrategy] = Field(default_factory=list)
    # Workers (delegates) of the hosts' regions must carry these tags (with the pipeline's,
    # the infrastructure's and the step's). When none is live, delegateFallback names the tags
    # to use instead ([] = any worker of the region); without it the run is refused.
    delegate_selectors: list[DelegateTag] = Field(default_factory=list)
    delegate_fallback: list[DelegateTag] | None = None
    when: StageWhen | None = None
    # The watch after deployment (app.definitions.models.watch): triggers that roll the stage
    # back when its hosts go bad within a window after the last phase.
    rollback_strategy: RollbackStrategySpec | None = None
    # A looping strategy: one stage per iteration (app.definitions.models.loops), with
    # maxConcurrency above 1 side by side (app.definitions.stage_concurrency). The deployment
    # strategy is spec.strategy.
    strategy: StageLoopStrategy | None = None

    @field_validator("strategy")
    @classmethod
    def _loop(cls, v: StageLoopStrategy | None) -> StageLoopStrategy | None:
        return no_hosts_loop(v, "a stage")


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
    tags: dict[str, Scalar] = Field(default_factory=dict)
    spec: ApprovalStageBody
    when: StageWhen | None = None


class CustomStageBody(Model):
    execution: CustomExecution


class CustomStageSpec(Model):
    """A stage of steps on a delegate (a worker), not on hosts: ShellScript, Http, Wait and
    HarnessApproval. It runs on the control worker, or with delegateSelectors on a live worker
    that has those tags (any region).

    ```yaml
    - stage:
        name: Checks
        identifier: checks
        type: Custom
        spec:
          execution:
            steps:
              - step: {type: ShellScript, ...}
              - step: {type: Http, ...}
              - step: {type: Wait, name: Soak, identifier: soak, spec: {duration: 2m}}
    ```
    """

    name: str
    identifier: Identifier
    type: Literal["Custom"]
    description: str | None = None
    tags: dict[str, Scalar] = Field(default_factory=dict)
    spec: CustomStageBody
    failure_strategies: list[FailureStrategy] = Field(default_factory=list)
    delegate_selectors: list[DelegateTag] = Field(default_factory=list)
    delegate_fallback: list[DelegateTag] | None = None
    # As a Deployment stage's: e.g. a TerraformRollback stage with pipelineStatus: Failure.
    when: StageWhen | None = None
    strategy: StageLoopStrategy | None = None

    @field_validator("strategy")
    @classmethod
    def _loop(cls, v: StageLoopStrategy | None) -> StageLoopStrategy | None:
        return no_hosts_loop(v, "a stage")


class ChildVariable(Model):
    """A value for one of the child pipeline's variables (``name``, ``type``, ``value``)."""

    name: str
    type: Literal["String", "Number"] = "String"
    value: Scalar


class ChildInputs(Model):
    """The child's runtime inputs as Harness writes them: ``identifier`` (the child's) and
    ``variables``, only for variables the child declares ``<+input>``. Other runtime inputs
    of the child (an artifact tag, a service's) are the run's: ``--set`` or an input set.
    Checked by app.definitions.chaining."""

    identifier: str | None = None
    variables: list[ChildVariable] = Field(default_factory=list)


class ChildOutput(Model):
    """``- name: build`` / ``value: <+pipeline.stages.S.spec.execution.steps.T.output
    .outputVariables.X>``: one step output of the child (``.list``: every host's)."""

    name: str
    value: str


class PipelineChainSpec(Model):
    """Which pipeline the stage runs, and with which inputs. ``org`` and ``project`` are read
    as Harness writes them (vmfarm has one namespace: when the child records its own
    orgIdentifier or projectIdentifier they must match)."""

    org: str | None = None
    project: str | None = None
    pipeline: str
    inputs: ChildInputs | None = None
    # Step outputs of the child, taken when it SUCCEEDED; later stages read them as
    # <+pipeline.stages.ID.output.NAME> (app.definitions.chaining, app.coordinator.chaining).
    outputs: list[ChildOutput] = Field(default_factory=list)


class PipelineStageSpec(Model):
    """Pipeline chaining: a stage that runs another pipeline (the child) as an execution of
    its own and waits for it; the stage succeeds when the child SUCCEEDED and fails, naming
    the child's execution and its error, otherwise (app.definitions.chaining,
    app.coordinator.chaining).

    ```yaml
    - stage:
        name: Deploy backend
        identifier: backend
        type: Pipeline
        spec:
          org: default
          project: shop
          pipeline: backend_deploy
          inputs:
            identifier: backend_deploy
            variables:
              - {name: release, type: String, value: "1.4.2"}
    ```
    """

    name: str
    identifier: Identifier
    type: Literal["Pipeline"]
    description: str | None = None
    tags: dict[str, Scalar] = Field(default_factory=dict)
    spec: PipelineChainSpec
    failure_strategies: list[FailureStrategy] = Field(default_factory=list)
    when: StageWhen | None = None


AnyStage = Annotated[
    StageSpec | ApprovalStageSpec | CustomStageSpec | PipelineStageSpec,
    Field(discriminator="type"),
]


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
    "Connector": ConnectorSpec,
}
