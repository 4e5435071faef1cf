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
