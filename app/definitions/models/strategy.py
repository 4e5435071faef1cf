"""How a stage reaches its hosts: strategies, phase sizes, verification gates, traffic,
and the reference's phase forms.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import AfterValidator, Field, model_validator
from pydantic.alias_generators import to_camel

from app.definitions.base import (
    Duration,
    Model,
    parse_duration,
)

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


#: The longest canary analysis: its checks wait that long in the broker (a countdown).
MAX_ANALYSIS_SECONDS = 3600


def analysis_seconds(value: int | str) -> float:
    """``timeDuration`` in seconds: a bare number is minutes, as in Harness (``"10"`` is ten
    minutes); with a unit it is what it says (``30s``, ``2m``). Raises ValueError."""
    text = str(value).strip()
    if isinstance(value, bool) or not text:
        raise ValueError(f"timeDuration {value!r} is not a number of minutes or a duration")
    seconds = float(text) * 60 if text.replace(".", "", 1).isdigit() else parse_duration(text)
    if not 0 < seconds <= MAX_ANALYSIS_SECONDS:
        raise ValueError(f"timeDuration {value!r} must be above 0 and at most 60 minutes")
    return seconds


def _window(v: int | str) -> int | str:
    analysis_seconds(v)
    return v


def _analysis_type(v: str) -> str:
    # Harness's other verification providers (Datadog, AppDynamics, NewRelic, ...) are refused
    # by name: a safety check the user wrote must never be skipped in silence.
    if v != "Prometheus":
        raise ValueError(
            f"analysisType {v} is not supported: vmfarm's canary analysis reads "
            "Prometheus (analysisType: Prometheus)"
        )
    return v


def _comparison(v: str) -> str:
    if v != "COMPARE_WITH_CURRENT":
        raise ValueError(
            f"comparisonStrategy {v} is not supported: vmfarm compares the canary "
            "with the hosts still on the current version "
            "(comparisonStrategy: COMPARE_WITH_CURRENT)"
        )
    return v


class CanaryMetric(Model):
    """One metric of a canary analysis: a PromQL template run once per side, and how much
    worse the canary may be. ``$instances`` becomes a regular expression matching the side's
    ``instance`` labels, ``$window`` the analysis window (``600s``). Higher is worse; the canary
    fails the metric when it exceeds the baseline by more than ``maxIncrease`` (absolute) *and*
    more than ``maxRatio`` times (either alone when only one is given)."""

    name: str = Field(min_length=1)
    query: str = Field(min_length=1)
    max_increase: float | None = Field(default=None, ge=0)
    max_ratio: float | None = Field(default=None, ge=1)
    unit: Literal["fraction", "seconds", "number"] = "number"

    @model_validator(mode="after")
    def _margin(self) -> CanaryMetric:
        if self.max_increase is None and self.max_ratio is None:
            raise ValueError(
                f"metric '{self.name}' needs maxIncrease and/or maxRatio (how "
                "much worse than the baseline the canary may be)"
            )
        if "$instances" not in self.query:
            raise ValueError(
                f"metric '{self.name}': the query must select the side's hosts "
                'with $instances, e.g. {instance=~"$instances"}'
            )
        return self


class CanaryAnalysisSpec(Model):
    """Harness CV's canary analysis (the reference's ``VERIFICATION`` step): the canary hosts'
    metrics compared with those of the hosts still on the current version, over ``timeDuration``.
    Only ``analysisType: Prometheus`` and ``comparisonStrategy: COMPARE_WITH_CURRENT`` exist;
    ``metrics`` default to the error rate and p95 latency of app.verify.canary.DEFAULT_METRICS.
    """

    analysis_type: Annotated[str, AfterValidator(_analysis_type)]
    comparison_strategy: Annotated[str, AfterValidator(_comparison)]
    time_duration: Annotated[int | str, AfterValidator(_window)]
    prometheus_url: str | None = None  # default: VMFARM_PROMETHEUS_URL
    instance: str = "<+instance.hostName>:8080"  # a host's `instance` label in Prometheus
    metrics: list[CanaryMetric] | None = Field(default=None, min_length=1)

    def window_seconds(self) -> float:
        return analysis_seconds(self.time_duration)


#: The reference step's keys that make a canary analysis (vmfarm's additions after the first 3).
ANALYSIS_KEYS = (
    "analysisType",
    "comparisonStrategy",
    "timeDuration",
    "prometheusUrl",
    "instance",
    "metrics",
)


class VerificationSpec(Model):
    """The gate after a phase: checks on every host of the phase, then a verdict."""

    health_check: HttpCheckSpec | None = None
    probe: ProbeSpec | None = None
    success_criteria: SuccessCriteria | None = None
    prometheus: PrometheusCheck | None = None
    canary_analysis: CanaryAnalysisSpec | None = None


class TrafficSpec(Model):
    """Where blue-green switches traffic (see app/traffic)."""

    type: Literal["Local", "AwsElbV2", "AwsLoadBalancers"]
    # Defaults are applied where a field is read (None: not written), so that a field the type
    # does not read can be refused: the app's port on every host (8080).
    port: int | None = Field(default=None, ge=1, le=65535)
    # Local (HAProxy on the control machine): name "vmfarm", mode http
    name: str | None = None
    listen: str | None = None
    mode: Literal["http", "tcp"] | None = None
    health_check_path: str | None = None
    # AwsElbV2 (a target group of type ip); timeout 600 s
    region: str | None = None
    target_group_arn: str | None = None
    endpoint_url: str | None = None
    timeout: float | None = Field(default=None, gt=0)
    # AwsLoadBalancers (the reference's AWS_AMI_SWITCH_ROUTES): any number of ELBv2 target
    # groups and classic load balancers, switched together.
    target_group_arns: list[str] = Field(default_factory=list)
    classic_load_balancers: list[str] = Field(default_factory=list)

    @model_validator(mode="after")
    def _complete(self) -> TrafficSpec:
        # A field another type reads would be ignored here: say so instead.
        takes = {
            "Local": {"port", "name", "listen", "mode", "health_check_path"},
            "AwsElbV2": {"port", "region", "target_group_arn", "endpoint_url", "timeout"},
            "AwsLoadBalancers": {
                "region",
                "target_group_arns",
                "classic_load_balancers",
                "endpoint_url",
                "timeout",
            },
        }[self.type]
        # Plans stored before these defaults became None hold them for every type.
        stored = {"port": 8080, "name": "vmfarm", "mode": "http", "timeout": 600}
        extra = sorted(
            to_camel(n)
            for n in self.model_fields_set - takes - {"type"}
            if getattr(self, n) not in (None, [])
            and not (self.type != "AwsLoadBalancers" and stored.get(n) == getattr(self, n))
        )
        if extra:
            why = (
                " (the target groups' ports apply)"
                if self.type == "AwsLoadBalancers" and "port" in extra
                else ""
            )
            raise ValueError(
                f"traffic type {self.type} does not take {', '.join(extra)}{why}; "
                f"it takes {', '.join(sorted(to_camel(n) for n in takes))}"
            )
        need = {
            "Local": ["listen"],
            "AwsElbV2": ["region", "target_group_arn"],
            "AwsLoadBalancers": ["region"],
        }[self.type]
        missing = [to_camel(n) for n in need if not getattr(self, n)]
        if missing:
            raise ValueError(f"traffic type {self.type} needs {', '.join(missing)}")
        if self.type == "AwsLoadBalancers" and not (
            self.target_group_arns or self.classic_load_balancers
        ):
            raise ValueError(
                "traffic type AwsLoadBalancers needs targetGroupArns or "
                "classicLoadBalancers (where the live hosts are registered)"
            )
        return self

    def describe(self) -> str:
        """Where traffic switches, in words (``plan`` prints it)."""
        if self.type == "Local":
            return f"HAProxy {self.name or 'vmfarm'} on {self.listen}"
        if self.type == "AwsElbV2":
            return f"target group {self.target_group_arn} ({self.region})"
        parts = [f"target group {a}" for a in self.target_group_arns]
        parts += [f"classic load balancer {n}" for n in self.classic_load_balancers]
        return f"{', '.join(parts)} ({self.region})"

    def switch_spec(self) -> dict[str, Any]:
        """The keys the traffic switch itself takes (app.traffic.traffic_switch_from_spec)."""
        keys = {
            "Local": ["type", "name", "listen", "mode", "healthCheckPath"],
            "AwsElbV2": ["type", "region", "targetGroupArn", "endpointUrl", "timeout"],
            "AwsLoadBalancers": [
                "type",
                "region",
                "targetGroupArns",
                "classicLoadBalancers",
                "endpointUrl",
                "timeout",
            ],
        }[self.type]
        data = self.model_dump(mode="json", by_alias=True, exclude_none=True)
        if self.type == "Local":
            data.setdefault("name", "vmfarm")
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
    # BlueGreen: the switch phase's name (the reference's switch step name).
    switch_name: str | None = None
    max_concurrency: int | None = Field(default=None, ge=1)
    verification: VerificationSpec | None = None
    failure_budget: FailureBudget = Field(default_factory=FailureBudget)
    traffic: TrafficSpec | None = None

    @model_validator(mode="after")
    def _fits(self) -> StrategySpec:
        if self.switch_name is not None and self.type != "BlueGreen":
            raise ValueError(
                f"switchName names a BlueGreen switch; a {self.type} strategy has none"
            )
        if self.type in ("Rolling", "Canary") and not self.phases:
            raise ValueError(f"a {self.type} strategy needs 'phases'")
        if self.type == "BlueGreen" and self.traffic is None:
            raise ValueError("a BlueGreen strategy needs 'traffic' (where to switch traffic)")
        if (
            self.type in ("Basic", "BlueGreen")
            and self.verification is not None
            and self.verification.canary_analysis is not None
        ):
            raise ValueError(
                f"canaryAnalysis is not supported with a {self.type} strategy: it "
                "compares the hosts of a phase with those not yet deployed; use "
                "Canary or Rolling"
            )
        return self


class ReferencePhaseStep(Model):
    """A step inside a reference phase; ``type: VERIFICATION`` puts a gate after the phase.

    Its ``properties`` carry vmfarm's verification keys (healthCheck, probe, successCriteria,
    prometheus) and Harness's canary analysis (analysisType, comparisonStrategy, timeDuration,
    plus vmfarm's prometheusUrl, instance, metrics: CanaryAnalysisSpec); any other type, key or
    analysis vmfarm does not run is refused by the loader (app.definitions.schemas), with its
    position, never ignored.
    """

    type: str
    name: str | None = None
    properties: dict[str, Any] = Field(default_factory=dict)

    @property
    def is_verification(self) -> bool:
        return self.type.upper() == "VERIFICATION"

    def verification(self) -> VerificationSpec | None:
        keys = {"healthCheck", "probe", "successCriteria", "prometheus"}
        mine: dict[str, Any] = {k: v for k, v in self.properties.items() if k in keys}
        analysis = {k: v for k, v in self.properties.items() if k in ANALYSIS_KEYS}
        if analysis:
            mine["canaryAnalysis"] = analysis
        return VerificationSpec.model_validate(mine) if mine else None

    @model_validator(mode="after")
    def _valid(self) -> ReferencePhaseStep:
        # The analysis keys are checked by the loader with their positions
        # (app.definitions.reference_schemas.phase_step_problems); the rest here.
        keys = {"healthCheck", "probe", "successCriteria", "prometheus"}
        mine = {k: v for k, v in self.properties.items() if k in keys}
        if mine:
            VerificationSpec.model_validate(mine)
        return self


class ReferencePhaseBody(Model):
    """A phase in the reference's ``rolloutDeployment``/``canaryDeployment`` form.

    ``instanceCount`` is cumulative (Harness: "Instances (cumulative)"): 25%, 50%, 100% deploys
    to a quarter of the hosts, then to the next quarter, then to the rest. deploymentType,
    computeProviderType, infraDefinitionId and serviceId repeat what the stage says: the loader
    checks that they agree with it (app.definitions.reference_schemas.phase_problems).
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


SWITCH_STEP_TYPE = "AWS_AMI_SWITCH_ROUTES"


class ReferenceSwitchStep(Model):
    """A step of the reference's ``blueGreenDeployment``: the load balancer switch.

    Its ``properties`` are checked key by key by the loader (app.definitions.schemas
    .blue_green_problems): targetGroupArns and classicLoadBalancers are carried out, the
    Auto Scaling group settings of Harness's AMI deployments are refused by name.
    """

    step_type: str
    name: str | None = None
    properties: dict[str, Any] = Field(default_factory=dict)


class ReferenceBlueGreen(Model):
    """The reference's ``blueGreenDeployment``: vmfarm's BlueGreen strategy with the switch
    step's load balancers as its traffic (``type: AwsLoadBalancers``).

    ```yaml
    blueGreenDeployment:
      productionSlots: 1          # the set that has traffic (blue)
      stagingSlots: 1             # the set deployed to, then switched to (green)
      steps:
        - stepType: AWS_AMI_SWITCH_ROUTES
          name: Switch Load Balancer
          properties:
            classicLoadBalancers: [web-app-clb]
            targetGroupArns:
              - arn:aws:elasticloadbalancing:us-east-1:123456789012:targetgroup/web-app-tg/0123
    ```

    One production and one staging slot are what vmfarm's blue-green is: the hosts split in
    two sets (their ``slot`` attribute or tag, else halves of the inventory). Other counts are
    refused by the loader, as is any step but the one switch.
    """

    production_slots: int = 1
    staging_slots: int = 1
    steps: list[ReferenceSwitchStep] = Field(default_factory=list)

    def switch_step(self) -> ReferenceSwitchStep | None:
        """The switch step (the loader refuses any other, and a second one)."""
        return next((s for s in self.steps if s.step_type == SWITCH_STEP_TYPE), None)

    def region(self) -> str | None:
        """The AWS region the target groups' ARNs name (the loader checks they agree)."""
        step = self.switch_step()
        arns = (step.properties.get("targetGroupArns") if step else None) or []
        return next((region_of_arn(str(a)) for a in arns if region_of_arn(str(a))), None)


def region_of_arn(arn: str) -> str | None:
    """``arn:aws:elasticloadbalancing:us-east-1:...`` -> ``us-east-1``; None if not an ARN."""
    parts = arn.split(":")
    return parts[3] if len(parts) >= 6 and parts[0] == "arn" and parts[3] else None
