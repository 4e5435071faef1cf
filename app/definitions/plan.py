"""The resolved plan: what an execution runs, typed.

``resolve()`` turns pipeline files into a ``Plan``: every stage with its service, environment,
artifact, infrastructures, strategy and steps, every host-independent expression rendered. An
execution stores it as JSON (``Plan.to_json()``, the ``Execution.plan`` column) and every reader
takes it back typed (``Plan.of(data)``): the JSON is the boundary, never the working form.

Steps and failure strategies are the file schema's own models (``CommandStep``,
``HealthCheckStep``, ``FailureStrategy``), so a plan means what its file said.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import Discriminator, Field, Tag

from app.definitions.base import Model
from app.definitions.models import (
    ApprovalStep,
    CommandStep,
    FailureStrategy,
    HealthCheckStep,
    HttpStep,
    StageWhen,
    StepWhen,
    StrategySpec,
    TerraformApplyStep,
    TerraformDestroyStep,
    TerraformPlanStep,
    TerraformRollbackStep,
    WaitStep,
)
from app.definitions.models.watch import RollbackStrategySpec
from app.definitions.notifications import NotificationRule


class ServiceOf(Model):
    """The service a stage deploys."""

    identifier: str
    name: str


class EnvironmentOf(Model):
    """The environment a stage deploys to (its type decides production rules)."""

    identifier: str
    name: str
    type: Literal["Production", "PreProduction"]


class ArtifactPlan(Model):
    """The service's primary artifact, its spec rendered; ``file_name`` is what lands on hosts."""

    type: str
    spec: dict[str, Any] = Field(default_factory=dict)
    tag: str | None = None
    file_name: str | None = None


class InfrastructurePlan(Model):
    """An infrastructure a stage's hosts come from; ``source`` is its file:line."""

    identifier: str
    name: str
    provider: str
    spec: dict[str, Any] = Field(default_factory=dict)
    source: str = ""
    # False (Harness's default): a second run deploying this service to this infrastructure is
    # refused while one is under way (app.coordinator.submit.record).
    allow_simultaneous_deployments: bool = False
    # The infrastructure's connector (app.definitions.connectors.infra_connector): its type and
    # credential by secret ids; app.providers resolves them on the worker that discovers.
    connector: dict[str, Any] | None = None


class StrategyPlan(StrategySpec):
    """The stage's strategy in one form, whichever form the file used."""

    # Canary and the reference's phase forms: phase sizes are cumulative targets.
    cumulative: bool = False
    phase_names: list[str] | None = None
    # Canary in the reference's form: the phases followed by a verification gate.
    verify_after: list[int] | None = None


class _Grouped(Model):
    # A step of a stepGroup names its group and carries the group's failure strategies,
    # which apply after its own.
    group: str | None = None
    group_failure_strategies: list[FailureStrategy] = Field(default_factory=list)
    # The group's ``when``: the step runs only when both its own and its group's allow it.
    group_when: StepWhen | None = None
    # The iteration of a looping strategy this step is (``repeat 2/3: us-east-1``).
    loop: str | None = None


def step_when(step: Any) -> StepWhen | None:
    """A step's own ``when`` (Http, Wait and approval steps have none: the schema refuses it
    there, and they follow the default, run while the host has not failed)."""
    when = getattr(step, "when", None)
    return when if isinstance(when, StepWhen) else None


class CommandStepPlan(CommandStep, _Grouped):
    """A Command step as it runs: its command units, in order, on each host. A Custom stage's
    ShellScript is one too (``writtenAs: ShellScript``): one Script unit on the delegate."""

    written_as: str | None = None


class HealthCheckStepPlan(HealthCheckStep, _Grouped):
    """A HealthCheck step as it runs on each host."""


class HttpStepPlan(HttpStep, _Grouped):
    """An Http step as it runs on the delegate (Custom stages)."""


class WaitStepPlan(WaitStep, _Grouped):
    """A Wait step: the host stops there and the coordinator continues it when it is due."""


class ApprovalStepPlan(ApprovalStep, _Grouped):
    """A HarnessApproval step among a stage's steps: the hosts stop there until approved."""


class _TerraformPlanned(_Grouped):
    # The repository each Git store of the step reads (url, auth type, secret ids), by the
    # store's dotted path in the step: app.definitions.terraform.dump_step.
    repositories: dict[str, dict[str, Any]] = Field(default_factory=dict)


class TerraformPlanStepPlan(TerraformPlanStep, _TerraformPlanned):
    """A TerraformPlan step as it runs on the delegate (app.execution.terraform)."""


class TerraformApplyStepPlan(TerraformApplyStep, _TerraformPlanned):
    """A TerraformApply step as it runs on the delegate."""


class TerraformDestroyStepPlan(TerraformDestroyStep, _TerraformPlanned):
    """A TerraformDestroy step as it runs on the delegate."""


class TerraformRollbackStepPlan(TerraformRollbackStep, _TerraformPlanned):
    """A TerraformRollback step as it runs on the delegate."""


TerraformStepPlan = (
    TerraformPlanStepPlan
    | TerraformApplyStepPlan
    | TerraformDestroyStepPlan
    | TerraformRollbackStepPlan
)

StepPlan = Annotated[
    CommandStepPlan
    | HealthCheckStepPlan
    | HttpStepPlan
    | WaitStepPlan
    | ApprovalStepPlan
    | TerraformPlanStepPlan
    | TerraformApplyStepPlan
    | TerraformDestroyStepPlan
    | TerraformRollbackStepPlan,
    Field(discriminator="type"),
]

# Steps the coordinator carries out between a host's other steps (no worker waits for them).
BarrierStep = WaitStepPlan | ApprovalStepPlan


class StageConcurrency(Model):
    """The iterations of a looped stage that run side by side: plan indexes ``first`` to
    ``last`` (this stage among them), at most ``cap`` at a time (the loop's maxConcurrency).
    A stage without one runs after the stage before it has ended."""

    first: int
    last: int
    cap: int

    def describe(self, ids: list[str]) -> str:
        """One line for ``vmfarm plan`` (``ids``: the plan's stage identifiers)."""
        group = f"{ids[self.first]} to {ids[self.last]}"
        n = self.last - self.first + 1
        if self.cap >= n:
            return f"side by side: {group}, all {n} at once"
        return f"side by side: {group}, {self.cap} at a time (the next one starts when one ends)"


class DeploymentStagePlan(Model):
    """A Deployment stage: hosts, phases from its strategy, steps on every host.

    A Custom stage is one too (``type: Custom``): its one host is the delegate that runs its
    steps (``app.coordinator.discovery.delegate_host``); it has no service, environment,
    artifact or infrastructure (their fields stay empty) and records no instances."""

    type: Literal["Deployment", "Custom"] = "Deployment"
    index: int
    identifier: str
    name: str
    tags: dict[str, Any] | None = None  # the stage's labels (Harness's stage tags)
    service: ServiceOf
    environment: EnvironmentOf
    artifact: ArtifactPlan | None = None
    infrastructures: list[InfrastructurePlan]
    steps: list[StepPlan]
    rollback_steps: list[StepPlan] = Field(default_factory=list)
    strategy: StrategyPlan
    # Worker tags for every host (the pipeline's, then the stage's); the infrastructure's and
    # each step's are added per host and step.
    delegate_selectors: list[str] = Field(default_factory=list)
    delegate_fallback: list[str] | None = None
    # The failure strategies that apply after a step's own: the stage's, then the pipeline's.
    failure_strategies: list[FailureStrategy] = Field(default_factory=list)
    # Values from outside the files (runtime inputs): workers bind them into scripts.
    external_values: dict[str, str] = Field(default_factory=dict)
    # Its condition holds only literals once resolved: the coordinator judges it at the start.
    when: StageWhen | None = None
    # The watch after the last phase (its rollbackStrategy; healthCheck filled in from the
    # stage's HTTP HealthCheck step when a trigger needs one).
    watch: RollbackStrategySpec | None = None
    # The iteration of a looping strategy this stage is (``repeat 2/3: us-east-1``).
    loop: str | None = None
    # Its loop's iterations run side by side (maxConcurrency above 1).
    concurrency: StageConcurrency | None = None


class ApprovalStagePlan(Model):
    """An Approval stage: no hosts; the execution waits for people."""

    type: Literal["Approval"]
    index: int
    identifier: str
    name: str
    tags: dict[str, Any] | None = None
    approval: ApprovalStep
    steps: list[StepPlan] = Field(default_factory=list)
    rollback_steps: list[StepPlan] = Field(default_factory=list)
    infrastructures: list[InfrastructurePlan] = Field(default_factory=list)
    strategy: StrategyPlan = Field(default_factory=StrategyPlan)
    when: StageWhen | None = None


class PipelineStagePlan(Model):
    """A Pipeline stage (pipeline chaining): the coordinator records the child's plan as an
    execution of its own and the stage waits for it (app.coordinator.chaining). ``child`` is
    the child's whole plan, resolved under ``child_execution_id``, which the coordinator
    replaces with the new execution's id."""

    type: Literal["Pipeline"]
    index: int
    identifier: str
    name: str
    tags: dict[str, Any] | None = None
    pipeline: str
    child_inputs: dict[str, str] = Field(default_factory=dict)
    child_execution_id: str
    child: dict[str, Any]
    # name -> the child's step output it reads (taken when the child SUCCEEDED).
    outputs: list[dict[str, str]] = Field(default_factory=list)
    steps: list[StepPlan] = Field(default_factory=list)
    rollback_steps: list[StepPlan] = Field(default_factory=list)
    infrastructures: list[InfrastructurePlan] = Field(default_factory=list)
    strategy: StrategyPlan = Field(default_factory=StrategyPlan)
    when: StageWhen | None = None
    # The stage's, then the pipeline's (app.definitions.chaining refuses the actions that
    # would roll the child back or run it again).
    failure_strategies: list[FailureStrategy] = Field(default_factory=list)

    def child_plan(self) -> Plan:
        """The child's plan."""
        return Plan.of(self.child)


# Any stage of a plan, typed.
AnyStagePlan = DeploymentStagePlan | ApprovalStagePlan | PipelineStagePlan


def _stage_kind(value: Any) -> str:
    kind = str(
        (value.get("type") if isinstance(value, dict) else getattr(value, "type", None))
        or "Deployment"
    )
    return "Deployment" if kind == "Custom" else kind


StagePlan = Annotated[
    Annotated[DeploymentStagePlan, Tag("Deployment")]
    | Annotated[ApprovalStagePlan, Tag("Approval")]
    | Annotated[PipelineStagePlan, Tag("Pipeline")],
    Discriminator(_stage_kind),
]


class Plan(Model):
    """A whole pipeline as an execution runs it."""

    identifier: str
    name: str
    files: list[str] = Field(default_factory=list)
    stages: list[StagePlan]
    notification_rules: list[NotificationRule] = Field(default_factory=list)

    @classmethod
    def of(cls, data: dict[str, Any]) -> Plan:
        """The plan an execution stored (``Execution.plan``, written with ``to_json()``)."""
        return cls.model_validate(data)
