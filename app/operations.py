"""What a user does to vmfarm, one function per action, whoever asks: the CLI, a schedule, the
server. Each checks RBAC (``app.rbac.guard``) and records the audit trail (``app.audit``) here,
once, then asks the coordinator to do it.

The caller says who acts, as an ``Actor``; nothing here reads the environment to find out
(the CLI takes ``VMFARM_USER``, ``$USER`` or the OS account; schedules act as ``scheduler``)::

    action          permission (app.rbac.ACTIONS)        audit row (action, outcome)
    run             pipeline:execute  + environment:deploy   run, submitted
                    inside a freeze window: freeze:override  run, frozen | override_freeze,
                    (with override_freeze=True)              overridden | refused
    retry           pipeline:execute  + environment:deploy   retry, submitted (the new execution)
    approve         pipeline:approve                         approve, approved | refused
    reject          pipeline:approve                         reject, rejected | refused
    abort           pipeline:abort (+ pipeline:rollback)     abort, <what came of it>
    intervene       pipeline:intervene + environment:deploy  intervene, <the action chosen>
    rollback        pipeline:rollback + environment:deploy   rollback, submitted (the new one)
    rollback_plan   pipeline:view     + environment:view     (a read: no row)
    view            pipeline:view     + environment:view     (a read: no row)

A refusal raises ``PermissionRefused`` after ``guard`` has recorded it (outcome ``refused``);
nothing was done. Other errors, raised before anything is recorded: ``ConfigError`` (a wrong
RBAC, users or policy file), ``SpecError``/``SpecErrors`` (bad files or inputs),
``PolicyViolation`` (audited ``denied`` by the policy), ``FreezeActiveError`` (audited
``frozen``: a freeze window holds and the caller did not override it), ``ApprovalRefused``
(the approval's own rules: not an approver, a second vote) and ``LookupError`` (no such
execution, or it is not in a state that allows the action).

``publish=False`` records a new execution without sending its first work: the caller sends it
with ``app.coordinator.advance`` (the CLI does, once its embedded worker is up).

``rules``: the RBAC configuration to apply. The server passes its own (RBAC is then always on,
the actor's token groups and API-token roles count, approvers are the members of the
approval's groups among the actor's groups and the server's users file, and audit rows carry
the actor's kind and token id). Without it, the process's RBAC file decides (local mode).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

from app import audit, coordinator, rbac
from app.coordinator import ApprovalRefused
from app.definitions.plan import Plan
from app.rbac import PermissionRefused

if TYPE_CHECKING:
    from app.definitions.freeze import ActiveFreeze

__all__ = [
    "Actor",
    "ApprovalRefused",
    "PermissionRefused",
    "abort",
    "approve",
    "intervene",
    "reject",
    "retry",
    "rollback",
    "rollback_plan",
    "run",
    "view",
]


@dataclass(frozen=True)
class Actor:
    """Who acts: ``name`` is the user RBAC bindings, approvals and the audit trail know.

    ``groups``, ``token_id`` and ``roles`` are for identities that carry them: the server
    builds an Actor from a verified token only (``kind`` "oidc" or "token"; an API token
    holds ``roles`` of its own). They count where ``rules`` are given (see the module
    docstring); in local mode groups come from the users file."""

    name: str
    groups: tuple[str, ...] = ()
    token_id: str | None = None
    roles: tuple[str, ...] | None = None
    kind: str = "local"

    def __post_init__(self) -> None:
        if not self.name.strip():
            raise ValueError("an Actor needs a user name (an execution's creator is never blank)")

    def audit(self) -> dict[str, Any]:
        """The actor as an audit row's detail names it (no secret in it)."""
        out: dict[str, Any] = {"subject": self.name, "kind": self.kind}
        if self.token_id:
            out["ref"] = self.token_id
        if self.groups:
            out["groups"] = sorted(self.groups)
        return out


def _detail(actor: Actor, detail: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """An audit row's detail: the actor's identity is added for verified callers."""
    out = dict(detail or {})
    if actor.kind != "local":
        out["actor"] = actor.audit()
    return out


def _guard(actor: Actor, action: str, rules: rbac.RbacConfig | None, **where: Any) -> None:
    # A token's groups and roles count only under the server's rules (see the docstring).
    served = rules is not None
    rbac.guard(
        action,
        user=actor.name,
        rules=rules,
        groups=actor.groups if served else (),
        roles=actor.roles if served else None,
        audit_detail=_detail(actor) or None,
        **where,
    )


def _approver_groups(actor: Actor, rules: rbac.RbacConfig | None) -> frozenset[str] | None:
    """The actor's groups for an approval's ``userGroups`` (None: the users file decides)."""
    if rules is None:
        return None
    return frozenset(actor.groups) | frozenset(rules.groups_of(actor.name))


# --- new executions -------------------------------------------------------------------------------


def run(
    actor: Actor,
    files: Iterable[str],
    *,
    pipeline: str | None = None,
    inputs: Mapping[str, str] | None = None,
    publish: bool = True,
    rules: rbac.RbacConfig | None = None,
    freeze_files: Iterable[str] = (),
    override_freeze: bool = False,
    now: datetime | None = None,
) -> str:
    """Record a run of the pipeline in ``files`` by ``actor``; returns the execution id.

    The files are resolved once; RBAC is checked on that plan (the permissions depend on its
    stages' environments) before anything is recorded; then the freeze windows (the
    operator's ``VMFARM_FREEZE_DIR`` and ``freeze_files``) at ``now`` (default: the clock);
    the coordinator then checks the policy rules and the live workers, and records the
    execution."""
    execution_id = coordinator.new_execution_id()
    plan, stage_hosts = coordinator.prepare(
        list(files), pipeline=pipeline, inputs=inputs, execution_id=execution_id
    )
    if rules is not None or rbac.rbac_enabled():
        _guard(actor, "run", rules, plan=plan.to_json())
    overridden = check_freeze(
        actor,
        "run",
        plan,
        freeze_files=freeze_files,
        override=override_freeze,
        now=now,
        rules=rules,
    )
    warnings = coordinator.record(
        plan, stage_hosts, execution_id=execution_id, inputs=inputs, user=actor.name, publish=False
    )
    audit.record(
        "run",
        user=actor.name,
        execution_id=execution_id,
        detail=_detail(
            actor,
            {"inputs": sorted(inputs or {}), "policy_warnings": [f.to_dict() for f in warnings]},
        ),
        outcome="submitted",
    )
    _record_override(actor, execution_id, overridden)
    if publish:
        coordinator.advance(execution_id)
    return execution_id


def check_freeze(
    actor: Actor,
    action: str,
    plan: Plan,
    *,
    freeze_files: Iterable[str] = (),
    override: bool = False,
    now: datetime | None = None,
    rules: rbac.RbacConfig | None = None,
) -> list[ActiveFreeze]:
    """The freeze windows that hold for ``plan`` at ``now``: none, or ``override`` by a user
    with freeze:override (returned, to audit with the new execution). Otherwise refused:
    FreezeActiveError naming the window and its end (audited ``frozen``), or PermissionRefused
    naming freeze:override (audited ``refused``)."""
    from app.definitions import freeze

    freezes = freeze.load(freeze_files, directory=freeze.freeze_dir())
    holding = freeze.active(freezes, plan, now or datetime.now(UTC)) if freezes else []
    if not holding:
        return []
    detail = {"windows": [f.to_dict() for f in holding]}
    if not override:
        audit.record_quietly(
            action,
            user=actor.name,
            pipeline=plan.identifier,
            detail=_detail(actor, detail),
            outcome="frozen",
        )
        raise freeze.FreezeActiveError(
            "; ".join(f.describe() for f in holding) + f": {action} refused (a user with the "
            "permission freeze:override may pass --override-freeze)"
        )
    if rules is not None or rbac.rbac_enabled():
        _guard(actor, "override_freeze", rules, plan=plan.to_json())
    return holding


def _record_override(actor: Actor, execution_id: str, overridden: list[ActiveFreeze]) -> None:
    if overridden:
        audit.record(
            "override_freeze",
            user=actor.name,
            execution_id=execution_id,
            detail=_detail(actor, {"windows": [f.to_dict() for f in overridden]}),
            outcome="overridden",
        )


def retry(
    actor: Actor,
    execution_id: str,
    *,
    publish: bool = True,
    rules: rbac.RbacConfig | None = None,
    override_freeze: bool = False,
    now: datetime | None = None,
) -> str:
    """Re-run an ended execution on the hosts that did not succeed; returns the new id. It
    deploys again: the operator's freeze windows apply as to ``run``."""
    _guard(actor, "retry", rules, execution_id=execution_id)
    old = rbac.plan_of_execution(execution_id)
    overridden = (
        check_freeze(actor, "retry", Plan.of(old), override=override_freeze, now=now, rules=rules)
        if old
        else []
    )
    new_id = coordinator.retry_failed(execution_id, user=actor.name, publish=False)
    audit.record(
        "retry",
        user=actor.name,
        execution_id=new_id,
        detail=_detail(actor, {"retry_of": execution_id}),
        outcome="submitted",
    )
    _record_override(actor, new_id, overridden)
    if publish:
        coordinator.advance(new_id)
    return new_id


def rollback(
    actor: Actor, execution_id: str, *, publish: bool = True, rules: rbac.RbacConfig | None = None
) -> str:
    """Roll a successful execution back on every host it changed; returns the new id."""
    _guard(actor, "rollback", rules, execution_id=execution_id)
    new_id = coordinator.rollback_execution(execution_id, user=actor.name, publish=False)
    audit.record(
        "rollback",
        user=actor.name,
        execution_id=new_id,
        detail=_detail(actor, {"rollback_of": execution_id}),
        outcome="submitted",
    )
    if publish:
        coordinator.advance(new_id)
    return new_id


def view(actor: Actor, execution_id: str, *, rules: rbac.RbacConfig | None = None) -> None:
    """Return when ``actor`` may read the execution (its status, logs, events); a read: only
    a refusal is recorded. An execution that does not exist is the caller's to report."""
    _guard(actor, "view", rules, execution_id=execution_id)


def rollback_plan(
    actor: Actor, execution_id: str, *, rules: rbac.RbacConfig | None = None
) -> dict[str, Any]:
    """What ``rollback`` would do (hosts, versions, order); a read: nothing is recorded."""
    _guard(actor, "view", rules, execution_id=execution_id)
    return coordinator.rollback_plan(execution_id)


# --- decisions on a running execution -------------------------------------------------------------


def approve(
    actor: Actor, execution_id: str, *, comment: str = "", rules: rbac.RbacConfig | None = None
) -> str:
    """Approve the Approval stage the execution waits in; returns what it did."""
    return _decide(actor, execution_id, approve=True, comment=comment, rules=rules)


def reject(
    actor: Actor, execution_id: str, *, comment: str = "", rules: rbac.RbacConfig | None = None
) -> str:
    """Reject the Approval stage the execution waits in: the stage fails."""
    return _decide(actor, execution_id, approve=False, comment=comment, rules=rules)


def _decide(
    actor: Actor, execution_id: str, *, approve: bool, comment: str, rules: rbac.RbacConfig | None
) -> str:
    action = "approve" if approve else "reject"
    _guard(actor, action, rules, execution_id=execution_id)
    try:
        outcome = coordinator.decide_approval(
            execution_id,
            user=actor.name,
            approve=approve,
            comment=comment,
            groups=_approver_groups(actor, rules),
            token_id=actor.token_id,
        )
    except ApprovalRefused as exc:
        audit.record(
            action,
            user=actor.name,
            execution_id=execution_id,
            detail=_detail(actor, {"reason": str(exc)}),
            outcome="refused",
        )
        raise
    audit.record(
        action,
        user=actor.name,
        execution_id=execution_id,
        detail=_detail(actor, {"comment": comment}),
        outcome="approved" if approve else "rejected",
    )
    return outcome


def abort(
    actor: Actor, execution_id: str, *, rollback: bool = False, rules: rbac.RbacConfig | None = None
) -> str:
    """Stop an execution (then roll back its current stage with ``rollback``). Returns
    "aborted", "rolling back", or the status of an execution that had already ended."""
    _guard(actor, "abort", rules, execution_id=execution_id)
    if rollback:
        _guard(actor, "rollback", rules, execution_id=execution_id)
    result = coordinator.abort(execution_id, user=actor.name, rollback=rollback)
    if result == "missing":
        raise LookupError(f"no execution '{execution_id}'")
    audit.record(
        "abort",
        user=actor.name,
        execution_id=execution_id,
        detail=_detail(actor, {"rollback": rollback}),
        outcome=result,
    )
    return result


def intervene(
    actor: Actor,
    execution_id: str,
    action: str,
    *,
    comment: str = "",
    rules: rbac.RbacConfig | None = None,
) -> str:
    """Answer a ManualIntervention with ``action`` (Abort, Ignore, StageRollback, ...)."""
    _guard(actor, "intervene", rules, execution_id=execution_id)
    outcome = coordinator.intervene(execution_id, action=action, user=actor.name, comment=comment)
    audit.record(
        "intervene",
        user=actor.name,
        execution_id=execution_id,
        detail=_detail(actor, {"chosen": action, "comment": comment}),
        outcome=action,
    )
    return outcome
