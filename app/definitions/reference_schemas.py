"""The reference's own blocks as maps: phase fields (``rolloutDeployment`` and
``canaryDeployment`` phases, their VERIFICATION steps and canary analysis) and the
``blueGreenDeployment`` block with its switch step. Each must agree with the stage; unknown keys
are errors with a suggestion, keys vmfarm does not carry out are refused by name. The rest of the
free-form maps are app.definitions.schemas'.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from typing import Any

from pydantic import ValidationError

from app.definitions import models as m
from app.definitions.schemas import Problem, Where, unknown

# --- the reference's phases ----------------------------------------------------------------------

# computeProviderType (Harness FirstGen) -> the provider vmfarm finds for the infrastructure.
COMPUTE_PROVIDERS = {
    "AWS": "aws",
    "AZURE": "azure",
    "GCP": "gcp",
    "PHYSICAL_DATA_CENTER": "static",
    "PDC": "static",
}
_PROVIDER_WORD = {"aws": "AWS", "azure": "AZURE", "gcp": "GCP", "static": "PHYSICAL_DATA_CENTER"}


def phase_problems(
    phase: Mapping[str, Any],
    *,
    service: str,
    deployment_type: str,
    infrastructures: Mapping[str, str],
) -> list[Problem]:
    """The reference phase's own copy of what the stage already says (serviceId,
    infraDefinitionId, computeProviderType, deploymentType) must agree with the stage;
    ``infrastructures`` maps each of the stage's infrastructures to its provider (paths
    below ``phase``)."""
    out: list[Problem] = []
    dtype = phase.get("deploymentType")
    if dtype is not None and str(dtype).lower() != deployment_type.lower():
        out.append(
            Problem(
                f"deploymentType {dtype} contradicts the stage's deploymentType "
                f"{deployment_type}; remove it from the phase",
                ("deploymentType",),
                key=False,
            )
        )
    sid = phase.get("serviceId")
    if sid is not None and str(sid) != service:
        out.append(
            Problem(
                f"serviceId '{sid}' is not the stage's service '{service}': every "
                "phase deploys the stage's service; remove it or write "
                f"serviceId: {service}",
                ("serviceId",),
                key=False,
            )
        )
    iid = phase.get("infraDefinitionId")
    if iid is not None:
        names = ", ".join(sorted(infrastructures))
        if str(iid) not in infrastructures:
            out.append(
                Problem(
                    f"infraDefinitionId '{iid}' is not an infrastructure of this stage ({names})",
                    ("infraDefinitionId",),
                    key=False,
                )
            )
        elif len(infrastructures) > 1:
            out.append(
                Problem(
                    "infraDefinitionId is not supported when the stage has several infrastructures "
                    f"({names}): each phase deploys to hosts of all of them; remove it",
                    ("infraDefinitionId",),
                    key=False,
                )
            )
    cpt = phase.get("computeProviderType")
    if cpt is not None:
        want = COMPUTE_PROVIDERS.get(str(cpt).upper())
        chosen = (
            {infrastructures[str(iid)]}
            if iid is not None and str(iid) in infrastructures
            else set(infrastructures.values())
        )
        if want is None:
            out.append(
                Problem(
                    f"unknown computeProviderType '{cpt}' (expected one of "
                    f"{', '.join(_PROVIDER_WORD.values())})",
                    ("computeProviderType",),
                    key=False,
                )
            )
        elif chosen and want not in chosen:
            real = " and ".join(sorted(_PROVIDER_WORD[p] for p in chosen))
            out.append(
                Problem(
                    f"computeProviderType {cpt} contradicts the stage's "
                    f"infrastructure, which is {real}: write computeProviderType: "
                    f"{real} or remove it",
                    ("computeProviderType",),
                    key=False,
                )
            )
    return out


VERIFICATION_KEYS = ("healthCheck", "probe", "successCriteria", "prometheus")


def phase_step_problems(step: Mapping[str, Any]) -> list[Problem]:
    """A reference phase step: only ``type: VERIFICATION`` with vmfarm's verification keys
    and a canary analysis vmfarm runs (paths below the step)."""
    stype = step.get("type")
    if isinstance(stype, str) and stype.upper() != "VERIFICATION":
        return [
            Problem(
                f"phase step type {stype} is not supported: a reference phase's steps "
                "are VERIFICATION gates; write deployment steps under "
                "execution.steps",
                ("type",),
                key=False,
            )
        ]
    props = step.get("properties")
    if not isinstance(props, Mapping):
        return []
    known = (*VERIFICATION_KEYS, *m.ANALYSIS_KEYS)
    out = [
        Problem(
            f"'{k}' is not supported: vmfarm verifies a phase with "
            f"{', '.join(known)} (see StrategySpec.verification)",
            ("properties", k),
        )
        for k in props
        if k not in known
    ]
    analysis = {k: props[k] for k in m.ANALYSIS_KEYS if k in props}
    return out + (analysis_problems(analysis, ("properties",)) if analysis else [])


def analysis_problems(analysis: Mapping[str, Any], base: Where) -> list[Problem]:
    """A canary analysis (m.CanaryAnalysisSpec), field by field: an analysisType or
    comparisonStrategy vmfarm does not run is refused by name (paths below ``base``)."""
    out: list[Problem] = []
    try:
        m.CanaryAnalysisSpec.model_validate(dict(analysis))
    except ValidationError as exc:
        for err in exc.errors():
            where = tuple(p for p in err["loc"] if p not in ("int", "str"))
            message = str(err["msg"]).removeprefix("Value error, ")
            if err["type"] == "missing":
                message = (
                    f"a canary analysis needs {where[-1]} (analysisType: Prometheus, "
                    "comparisonStrategy: COMPARE_WITH_CURRENT, timeDuration: minutes)"
                )
                where = where[:-1]
            elif err["type"] == "extra_forbidden":
                message = f"unknown field '{where[-1]}' in a canary analysis metric"
            out.append(Problem(message, (*base, *where), key=err["type"] == "extra_forbidden"))
    return out


# --- the reference's blue-green ------------------------------------------------------------------

# The switch step's properties vmfarm carries out (app.traffic.aws), and those of Harness's AMI
# deployments it knows but does not: an Auto Scaling group is created and swapped there, while
# vmfarm deploys to running instances and registers them.
SWITCH_FIELDS = ("targetGroupArns", "classicLoadBalancers")
_ASG = (
    "vmfarm deploys to running instances over SSH and switches traffic by registering them "
    "in the load balancers; it does not create, swap or resize Auto Scaling groups (Harness's "
    "AMI deployments)"
)
SWITCH_REFUSED: dict[str, str] = {
    "useAppAutoScaling": f"{_ASG}; remove useAppAutoScaling (or write false)",
    "autoScalingGroupName": f"{_ASG}; remove autoScalingGroupName",
    "downsizeOldAsg": f"{_ASG}; remove downsizeOldAsg (or write false)",
}
_TG_ARN = re.compile(
    r"arn:aws[a-z-]*:elasticloadbalancing:([a-z0-9-]+):\d{12}:"
    r"targetgroup/[A-Za-z0-9-]{1,32}/[0-9a-f]{16}"
)
_CLB_NAME = re.compile(r"[A-Za-z0-9](?:[A-Za-z0-9-]{0,30}[A-Za-z0-9])?")


def _names(
    value: Any, what: str, key: str, pattern: re.Pattern[str], form: str
) -> tuple[list[Problem], list[str]]:
    """A list of names or ARNs (expressions allowed); problems, and the regex groups found."""
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        return [Problem(f"{key} must be a list of {what}", (key,), key=False)], []
    out: list[Problem] = []
    groups: list[str] = []
    for i, v in enumerate(value):
        if "<+" in v:
            continue
        found = pattern.fullmatch(v.strip())
        if found is None:
            out.append(Problem(f"{v!r} is not {form}", (key, i), key=False))
        elif found.groups():
            groups.append(found.group(1))
    return out, groups


def blue_green_problems(
    block: Mapping[str, Any],
    *,
    infrastructures: Mapping[str, str],
    regions: Sequence[str] = (),
    without_ids: Mapping[str, Sequence[str]] | None = None,
) -> list[Problem]:
    """The reference's ``blueGreenDeployment``: one production and one staging slot, one
    AWS_AMI_SWITCH_ROUTES step whose properties vmfarm carries out. ``infrastructures`` maps
    the stage's infrastructures to their providers, ``regions`` are the AWS regions their
    files name, ``without_ids`` the static hosts with no EC2 instance id, per infrastructure
    (paths below the block)."""
    out: list[Problem] = []
    for key in ("productionSlots", "stagingSlots"):
        n = block.get(key, 1)
        if isinstance(n, int) and not isinstance(n, bool) and n != 1:
            out.append(
                Problem(
                    f"{key}: {n} is not supported: vmfarm's blue-green has one production set and "
                    "one staging set (hosts split by their slot attribute or tag, else in halves); "
                    f"write {key}: 1",
                    (key,),
                    key=False,
                )
            )
    steps = block.get("steps")
    steps = steps if isinstance(steps, list) else []
    switches: list[int] = []
    for k, step in enumerate(steps):
        if not isinstance(step, Mapping):
            continue
        stype = step.get("stepType")
        if stype != m.SWITCH_STEP_TYPE:
            out.append(
                Problem(
                    f"stepType {stype} is not supported in blueGreenDeployment: its one step is the "
                    f"load balancer switch, {m.SWITCH_STEP_TYPE}; write deployment steps under "
                    "execution.steps",
                    ("steps", k, "stepType"),
                    key=False,
                )
            )
            continue
        if switches:
            out.append(
                Problem(
                    f"a second {m.SWITCH_STEP_TYPE} step is not supported: one switch moves every "
                    "load balancer; list them all in the first one",
                    ("steps", k),
                    key=False,
                )
            )
            continue
        switches.append(k)
        props = step.get("properties")
        props = props if isinstance(props, Mapping) else {}
        known = (*SWITCH_FIELDS, *SWITCH_REFUSED)
        for key, value in props.items():
            if key in SWITCH_REFUSED:
                if value is False:  # asks for nothing vmfarm would have to do
                    continue
                out.append(
                    Problem(
                        f"'{key}' is not supported: {SWITCH_REFUSED[key]}",
                        ("steps", k, "properties", key),
                    )
                )
            elif key not in known:
                out.append(
                    Problem(
                        unknown(key, known, f"the {m.SWITCH_STEP_TYPE} step's properties"),
                        ("steps", k, "properties", key),
                    )
                )
        where: Where = ("steps", k, "properties")
        arn_regions: list[str] = []
        if "targetGroupArns" in props:
            found, arn_regions = _names(
                props["targetGroupArns"],
                "ELBv2 target group ARNs",
                "targetGroupArns",
                _TG_ARN,
                "an ELBv2 target group ARN (arn:aws:elasticloadbalancing:REGION:ACCOUNT:"
                "targetgroup/NAME/ID)",
            )
            out += [Problem(p.message, (*where, *p.path), p.key) for p in found]
            if len(set(arn_regions)) > 1:
                several = ", ".join(sorted(set(arn_regions)))
                out.append(
                    Problem(
                        f"the target groups are in several regions ({several}): one switch works "
                        "in one region; deploy each region in its own stage",
                        (*where, "targetGroupArns"),
                        key=False,
                    )
                )
        clbs = props.get("classicLoadBalancers")
        if clbs is not None:
            found, _ = _names(
                clbs,
                "classic load balancer names",
                "classicLoadBalancers",
                _CLB_NAME,
                "a classic load balancer name (letters, digits and '-', at most 32)",
            )
            out += [Problem(p.message, (*where, *p.path), p.key) for p in found]
        if not props.get("targetGroupArns") and not clbs:
            out.append(
                Problem(
                    f"the {m.SWITCH_STEP_TYPE} step needs targetGroupArns or classicLoadBalancers: "
                    "they are where vmfarm switches traffic",
                    (*where[:-1],),
                    key=False,
                )
            )
        missing = {i: list(h) for i, h in (without_ids or {}).items() if h}
        if clbs and missing:
            listed = "; ".join(f"{i}: {', '.join(h)}" for i, h in sorted(missing.items()))
            out.append(
                Problem(
                    "classic load balancers register EC2 instance ids, and these static hosts have "
                    f"none ({listed}): give each host attributes.instanceId, or use an AWS "
                    "infrastructure (SshWinRmAws), whose discovered hosts carry their ids",
                    (*where, "classicLoadBalancers"),
                    key=False,
                )
            )
        other = sorted({p for p in infrastructures.values() if p not in ("aws", "static")})
        if other:
            names = ", ".join(
                sorted(i for i, p in infrastructures.items() if p not in ("aws", "static"))
            )
            out.append(
                Problem(
                    "the load balancer switch registers EC2 instances and their addresses, but "
                    f"infrastructure {names} is not AWS ({', '.join(other)}): use an AWS "
                    "infrastructure (SshWinRmAws), or vmfarm's own strategy with traffic type "
                    "Local",
                    ("steps", k, "stepType"),
                    key=False,
                )
            )
        elif (
            not arn_regions
            and not any("<+" in str(a) for a in props.get("targetGroupArns") or [])
            and len(set(regions)) != 1
        ):
            out.append(
                Problem(
                    "the classic load balancers' region is not known: give the AWS "
                    "infrastructure one region (spec.region), or list a target group ARN, which "
                    "names it",
                    (*where, "classicLoadBalancers"),
                    key=False,
                )
            )
    if not switches and not any(isinstance(step, Mapping) for step in steps):
        out.append(
            Problem(
                f"blueGreenDeployment needs a {m.SWITCH_STEP_TYPE} step with targetGroupArns or "
                "classicLoadBalancers: vmfarm's blue-green switches traffic to the staging set",
                ("steps",) if "steps" in block else (),
                key=False,
            )
        )
    return out
