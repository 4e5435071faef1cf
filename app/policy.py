"""Policies as code: rules a resolved plan must pass before anything runs.

The file is ``VMFARM_POLICY_FILE`` (which must then exist), else ``configs/policies.yaml`` when
it exists; without one there are no rules. Each rule has a ``name``, a ``severity`` (``error``
refuses the run, ``warn`` is reported only; default ``error``), optionally ``enabled: false``,
and exactly one kind::

    policies:
      - name: Require Approval for Production
        requireApprovalBefore:
          environmentType: Production        # default Production; Any: every deployment stage
          approverGroups: [release_managers] # optional: the approval must ask one of them
      - name: Security Scan Required
        severity: error
        requiredSteps:
          environmentType: Production        # default Any
          steps: [security_scan]             # step identifiers (globs) the stage must have
      - name: No bare-metal instances
        severity: warn
        forbiddenInstanceTypes:
          types: ["*.metal", m5.24xlarge, Standard_M128s]   # globs
          environmentType: Any               # default Any
      - name: No static hosts in production
        deny:
          match:                             # every path matches (globs; a list: any of them)
            environment.type: Production
            infrastructure.provider: static
          message: production runs on cloud hosts only

``requireApprovalBefore``: a deployment stage of that environment type needs an Approval stage
somewhere before it in the pipeline (naming one of ``approverGroups`` when given).
``forbiddenInstanceTypes`` reads the hosts' ``instanceType`` (AWS), ``machineType`` (GCP),
``size``/``vmSize`` (Azure) attributes. It checks the hosts passed in ``hosts_by_stage``;
without them, the hosts of the plan's static infrastructures (their ``attributes``/
``hostAttributes``), so cloud hosts are checked only once discovered and passed in.
``deny`` paths: ``pipeline.*`` (identifier, name), ``stage.*``, ``environment.*``,
``service.*``, ``strategy.*``, ``artifact.*``, and per item ``step.*`` (identifier, type,
name) and ``infrastructure.*`` (identifier, provider): a rule naming ``step.`` paths is checked
on each step of the stage. Values are compared as strings; a missing path never matches.

``evaluate(plan, hosts_by_stage)`` returns findings; ``enforce`` also raises PolicyViolation
(and records an audit event ``denied``) when a finding has severity ``error``.
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass
from fnmatch import fnmatchcase
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from app.definitions.plan import Plan
from app.errors import ConfigError, VmfarmError

DEFAULT_POLICY_FILE = Path("configs/policies.yaml")
SIZE_ATTRIBUTES = ("instanceType", "machineType", "vmSize", "size", "instance_type")
EnvType = Literal["Production", "PreProduction", "Any"]


@dataclass(frozen=True)
class Finding:
    """One rule broken by one stage (``stage`` None: the pipeline as a whole)."""

    rule: str
    severity: str
    stage: str | None
    message: str

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def __str__(self) -> str:
        where = f"stage '{self.stage}': " if self.stage else ""
        return f"{self.severity}: policy '{self.rule}': {where}{self.message}"


class PolicyViolation(VmfarmError):
    """A plan broke error-severity rules; nothing was run. ``findings`` has every finding
    (warnings included)."""

    def __init__(self, findings: Sequence[Finding]) -> None:
        self.findings = list(findings)
        errors = [f for f in self.findings if f.severity == "error"]
        super().__init__(
            "refused by policy: "
            + "; ".join(
                f"'{f.rule}': " + (f"stage '{f.stage}': " if f.stage else "") + f.message
                for f in errors
            )
        )

    def __reduce__(self) -> tuple[object, ...]:
        return (type(self), (self.findings,))


# --- the file -------------------------------------------------------------------------------------


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", populate_by_name=True)


class RequireApprovalBefore(_Strict):
    environment_type: EnvType = Field("Production", alias="environmentType")
    approver_groups: list[str] = Field(default_factory=list, alias="approverGroups")


class RequiredSteps(_Strict):
    environment_type: EnvType = Field("Any", alias="environmentType")
    steps: list[str] = Field(min_length=1)


class ForbiddenInstanceTypes(_Strict):
    environment_type: EnvType = Field("Any", alias="environmentType")
    types: list[str] = Field(min_length=1)


class Deny(_Strict):
    match: dict[str, str | list[str]] = Field(min_length=1)
    message: str = ""


class Rule(_Strict):
    name: str = Field(min_length=1)
    severity: Literal["error", "warn"] = "error"
    enabled: bool = True
    description: str = ""
    require_approval_before: RequireApprovalBefore | None = Field(
        None, alias="requireApprovalBefore"
    )
    required_steps: RequiredSteps | None = Field(None, alias="requiredSteps")
    forbidden_instance_types: ForbiddenInstanceTypes | None = Field(
        None, alias="forbiddenInstanceTypes"
    )
    deny: Deny | None = None

    @model_validator(mode="after")
    def _one_kind(self) -> Rule:
        kinds = [
            k
            for k in (
                "require_approval_before",
                "required_steps",
                "forbidden_instance_types",
                "deny",
            )
            if getattr(self, k) is not None
        ]
        if len(kinds) != 1:
            raise ValueError(
                "a rule has exactly one of requireApprovalBefore, requiredSteps, "
                f"forbiddenInstanceTypes, deny (got {len(kinds)})"
            )
        return self


class _FileSpec(_Strict):
    policies: list[Rule] = Field(default_factory=list)


def policy_file() -> Path | None:
    """``VMFARM_POLICY_FILE`` (which must then exist), else ``configs/policies.yaml`` when it
    exists, else None (no rules)."""
    explicit = os.environ.get("VMFARM_POLICY_FILE", "").strip()
    if explicit:
        return Path(explicit)
    return DEFAULT_POLICY_FILE if DEFAULT_POLICY_FILE.is_file() else None


def load_policies(path: Path | str | None = None) -> list[Rule]:
    """The enabled rules of the policy file (default ``policy_file()``); [] without one.
    Raises ConfigError naming the file and the problem."""
    import yaml

    p = Path(path) if path is not None else policy_file()
    if p is None:
        return []
    try:
        data = yaml.safe_load(p.read_text()) or {}
    except OSError as exc:
        raise ConfigError(
            f"cannot read the policy file {p} ({exc.strerror}); fix VMFARM_POLICY_FILE or unset it"
        ) from None
    except yaml.YAMLError as exc:
        raise ConfigError(f"{p}: not valid YAML: {exc}") from None
    if isinstance(data, list):
        data = {"policies": data}
    try:
        spec = _FileSpec.model_validate(data)
    except ValidationError as exc:
        problems = "; ".join(
            f"{'.'.join(str(x) for x in e['loc']) or 'file'}: {e['msg']}" for e in exc.errors()
        )
        raise ConfigError(f"{p}: {problems}") from None
    names = [r.name for r in spec.policies]
    dupes = sorted({n for n in names if names.count(n) > 1})
    if dupes:
        raise ConfigError(f"{p}: rule names must be unique ({', '.join(dupes)})")
    return [r for r in spec.policies if r.enabled]


# --- evaluation -----------------------------------------------------------------------------------

HostsByStage = Mapping[str, Sequence[Any]] | Sequence[Sequence[Any]]


def _deployments(plan: Mapping[str, Any]) -> Iterator[tuple[int, Mapping[str, Any]]]:
    for i, st in enumerate(plan.get("stages") or []):
        if st.get("type") not in ("Approval", "Custom"):
            yield i, st


def _env_matches(stage: Mapping[str, Any], env_type: str) -> bool:
    return env_type == "Any" or (stage.get("environment") or {}).get("type") == env_type


def _host_view(h: Any) -> tuple[str, Mapping[str, Any]]:
    if isinstance(h, Mapping):
        return str(h.get("name") or h.get("address") or "?"), h.get("attributes") or {}
    return str(getattr(h, "name", "?")), getattr(h, "attributes", None) or {}


def _stage_hosts(
    plan: Mapping[str, Any],
    index: int,
    stage: Mapping[str, Any],
    hosts_by_stage: HostsByStage | None,
) -> list[tuple[str, Mapping[str, Any]]]:
    given: Sequence[Any] | None = None
    if isinstance(hosts_by_stage, Mapping):
        given = hosts_by_stage.get(str(stage.get("identifier")))
    elif hosts_by_stage is not None and index < len(hosts_by_stage):
        given = hosts_by_stage[index]
    if given:
        return [_host_view(h) for h in given]
    from app.providers.static import discover_static

    out: list[tuple[str, Mapping[str, Any]]] = []
    for infra in stage.get("infrastructures") or []:
        if infra.get("provider") == "static":
            out += [(h.name, h.attributes) for h in discover_static(dict(infra))]
    return out


def _approval_before(rule: RequireApprovalBefore, plan: Mapping[str, Any], index: int) -> bool:
    stages = list(plan.get("stages") or [])
    asked: list[Mapping[str, Any]] = []
    for st in stages[:index]:
        if st.get("type") == "Approval":
            asked.append(st.get("approval") or {})
        elif st.get("type") == "Custom":  # an approval step of a Custom stage before it
            asked += [s for s in st.get("steps") or [] if s.get("type") == "HarnessApproval"]
    # The stage's own HarnessApproval steps before its first step that touches a host.
    for step in (stages[index].get("steps") or []) if index < len(stages) else []:
        if step.get("type") != "HarnessApproval":
            break
        asked.append(step)
    for approval in asked:
        if not rule.approver_groups:
            return True
        approvers = (approval.get("spec") or {}).get("approvers") or {}
        if set(approvers.get("userGroups") or []) & set(rule.approver_groups):
            return True
    return False


def _any_glob(value: Any, patterns: str | Sequence[str]) -> bool:
    pats = [patterns] if isinstance(patterns, str) else list(patterns)
    return value is not None and any(fnmatchcase(str(value), p) for p in pats)


def _lookup(ctx: Mapping[str, Any], path: str) -> Any:
    cur: Any = ctx
    for part in path.split("."):
        if not isinstance(cur, Mapping) or part not in cur:
            return None
        cur = cur[part]
    return cur


def _deny(rule: Deny, plan: Mapping[str, Any], stage: Mapping[str, Any]) -> list[str]:
    """What in ``stage`` matches every path of the rule (descriptions, for the message)."""
    base = {
        "pipeline": {"identifier": plan.get("identifier"), "name": plan.get("name")},
        "stage": stage,
        "environment": stage.get("environment"),
        "service": stage.get("service"),
        "strategy": stage.get("strategy"),
        "artifact": stage.get("artifact"),
    }
    roots = {p.split(".", 1)[0] for p in rule.match}
    steps: list[Any] = list(stage.get("steps") or []) if "step" in roots else [None]
    infras: list[Any] = (
        list(stage.get("infrastructures") or []) if "infrastructure" in roots else [None]
    )
    hits = []
    for step in steps:
        for infra in infras:
            ctx = {**base, "step": step, "infrastructure": infra}
            if all(_any_glob(_lookup(ctx, path), pats) for path, pats in rule.match.items()):
                what = [
                    f"step '{step['identifier']}'" if step else "",
                    f"infrastructure '{infra['identifier']}'" if infra else "",
                ]
                hits.append(" ".join(w for w in what if w))
    return hits


def _check(
    rule: Rule,
    plan: Mapping[str, Any],
    index: int,
    stage: Mapping[str, Any],
    hosts_by_stage: HostsByStage | None,
) -> str | None:
    """The message when ``stage`` breaks ``rule``, else None."""
    env = stage.get("environment") or {}
    env_desc = f"{env.get('type', '?')} environment '{env.get('identifier', '?')}'"
    if (r := rule.require_approval_before) is not None:
        if _env_matches(stage, r.environment_type) and not _approval_before(r, plan, index):
            groups = f" asking {' or '.join(r.approver_groups)}" if r.approver_groups else ""
            return (
                f"deploys to {env_desc} with no Approval stage{groups} before it (add an "
                "Approval stage earlier in the pipeline)"
            )
    elif (s := rule.required_steps) is not None:
        if _env_matches(stage, s.environment_type):
            have = [str(st.get("identifier")) for st in stage.get("steps") or []]
            missing = [p for p in s.steps if not any(fnmatchcase(h, p) for h in have)]
            if missing:
                return (
                    f"deploys to {env_desc} without the required step(s) "
                    f"{', '.join(missing)} (steps: {', '.join(have) or 'none'})"
                )
    elif (f := rule.forbidden_instance_types) is not None:
        if _env_matches(stage, f.environment_type):
            bad = []
            for name, attrs in _stage_hosts(plan, index, stage, hosts_by_stage):
                for key in SIZE_ATTRIBUTES:
                    if _any_glob(attrs.get(key), f.types):
                        bad.append(f"{name} ({key} {attrs[key]})")
                        break
            if bad:
                shown = ", ".join(bad[:10]) + (
                    f" and {len(bad) - 10} more" if len(bad) > 10 else ""
                )
                return f"targets host(s) of a forbidden instance type: {shown}"
    elif (d := rule.deny) is not None:
        hits = _deny(d, plan, stage)
        if hits:
            where = ", ".join(h for h in hits if h)
            because = d.message or "matches " + ", ".join(
                f"{k}={v if isinstance(v, str) else '|'.join(v)}" for k, v in d.match.items()
            )
            return because + (f" ({where})" if where else "")
    return None


def evaluate(
    plan: Plan | Mapping[str, Any],
    hosts_by_stage: HostsByStage | None = None,
    *,
    rules: Sequence[Rule] | None = None,
) -> list[Finding]:
    """Every finding of ``rules`` (default: the policy file's) on a resolved plan, in stage
    then rule order. ``hosts_by_stage``: hosts (``Host`` or its dict) per stage, as a list
    aligned with the plan's stages or a mapping by stage identifier. Rules read the plan as
    the document the ledger stores (``Plan.to_json()``): their paths are its fields."""
    plan = _document(plan)
    rules = load_policies() if rules is None else rules
    findings: list[Finding] = []
    for index, stage in _deployments(plan):
        for rule in rules:
            message = _check(rule, plan, index, stage, hosts_by_stage)
            if message is not None:
                findings.append(
                    Finding(rule.name, rule.severity, str(stage.get("identifier")), message)
                )
    return findings


def _document(plan: Plan | Mapping[str, Any]) -> Mapping[str, Any]:
    return plan if isinstance(plan, Mapping) else plan.to_json()


def enforce(
    plan: Plan | Mapping[str, Any],
    hosts_by_stage: HostsByStage | None = None,
    *,
    user: str = "",
    execution_id: str | None = None,
    action: str = "run",
    rules: Sequence[Rule] | None = None,
) -> list[Finding]:
    """``evaluate``, then raise PolicyViolation (recording an audit event ``denied``) when a
    finding is an error; returns the findings (warnings only) otherwise."""
    plan = _document(plan)
    findings = evaluate(plan, hosts_by_stage, rules=rules)
    if any(f.severity == "error" for f in findings):
        from app import audit

        audit.record_quietly(
            action,
            user=user,
            execution_id=execution_id,
            pipeline=str(plan.get("identifier") or "") or None,
            detail={"findings": [f.to_dict() for f in findings]},
            outcome="denied",
        )
        raise PolicyViolation(findings)
    return findings
