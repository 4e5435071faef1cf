"""Role-based access control: who may run, approve, abort or roll back which pipeline, where.

Roles hold permissions; bindings give roles to users and to groups of the users file
(``VMFARM_USERS_FILE``, the ``groups: {name: [user, ...]}`` file approvals read). The RBAC file
is ``VMFARM_RBAC_FILE``, by default ``configs/rbac.yaml`` (relative to the working directory)::

    roles:
      viewer: [pipeline:view, environment:view]           # a list of permissions, or:
      deployer:
        description: runs pipelines outside production
        permissions: [pipeline:execute, pipeline:view, pipeline:abort,
                      environment:view, environment:deploy:non-production]
      platform_admin: ["pipeline:*", "environment:*", "service:*", "connector:*"]
    bindings:
      - role: deployer
        groups: [developers]        # groups of the users file
      - roles: [platform_admin]
        users: [dave]               # "*": every named user
      - role: deployer
        users: [erin]
        resources: ["web*"]         # only pipelines / environments whose identifier matches

The reference's form (Harness ``rbac.userGroups``) is accepted too: each entry is a role named
after the group and bound to it (its members still come from the users file)::

    rbac:
      userGroups:
        - name: Developers
          permissions: [pipeline:view, environment:view:non-production]

Permissions are ``resource:action[:qualifier]``. A granted permission covers a needed one when
each of its segments equals the needed one's or is ``*``; a shorter grant covers every longer
permission it is a prefix of. So ``pipeline:*`` covers ``pipeline:execute``,
``environment:deploy`` covers ``environment:deploy:production``, ``environment:*:non-production``
covers ``environment:view:non-production``, ``*`` covers everything, and
``environment:deploy:non-production`` does not cover ``environment:deploy:production``.
The environment qualifier is ``production`` for an environment of type Production and
``non-production`` for PreProduction.

What each action needs (``required_permissions``)::

    run, retry     pipeline:execute      + environment:deploy:<qualifier> per deployment stage
                   (+ the same for the child pipeline of each Pipeline stage, recursively)
    rollback       pipeline:rollback     + environment:deploy:<qualifier> per deployment stage
    intervene      pipeline:intervene    + environment:deploy:<qualifier> of the paused stage
    abort          pipeline:abort
    approve/reject pipeline:approve      (the approval's own userGroups still decide who votes)
    view           pipeline:view         + environment:view:<qualifier> per deployment stage
    override_freeze freeze:override      (run or retry inside an active freeze window)

Pipeline permissions are checked on the pipeline's identifier, environment permissions on the
environment's (what a binding's ``resources`` globs match).

The server's registry (app.server.routes.registry) needs ``registry:apply`` or
``registry:view``, and ``environment:edit:<qualifier>`` on each environment whose Environment
or Infrastructure documents an apply changes (the qualifier of its type before and after).

**Single-user mode**: when ``VMFARM_RBAC_FILE`` is not set and ``configs/rbac.yaml`` does not
exist, RBAC is off and everything is allowed (``rbac_enabled()`` says which). When
``VMFARM_RBAC_FILE`` is set, the file must exist: a missing or invalid file refuses everything
(ConfigError) rather than allowing it. An unnamed user (no ``VMFARM_USER`` nor ``USER``) holds no
permission.

``PermissionRefused`` names the user, the missing permission, the resource and the roles that
would grant it. ``guard()`` is the one call ``app.operations`` makes for every user action:
authorize every permission the action needs and record a refusal in the audit trail.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from fnmatch import fnmatchcase
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from app.errors import ConfigError, VmfarmError

DEFAULT_RBAC_FILE = Path("configs/rbac.yaml")
_SEGMENT = re.compile(r"^(\*|[A-Za-z0-9_.-]+)$")

# action -> (pipeline permission, environment permission per deployment stage or None)
ACTIONS: dict[str, tuple[str, str | None]] = {
    "run": ("pipeline:execute", "environment:deploy"),
    "retry": ("pipeline:execute", "environment:deploy"),
    "rollback": ("pipeline:rollback", "environment:deploy"),
    "intervene": ("pipeline:intervene", "environment:deploy"),
    "abort": ("pipeline:abort", None),
    "approve": ("pipeline:approve", None),
    "reject": ("pipeline:approve", None),
    "view": ("pipeline:view", "environment:view"),
    # run (or retry) inside an active freeze window (app.definitions.freeze)
    "override_freeze": ("freeze:override", None),
}


class PermissionRefused(VmfarmError):
    """``user`` lacks ``permission`` (on ``resource``); ``granted_by`` lists the roles that
    would grant it. The message says all of it and what to change."""

    def __init__(
        self,
        message: str,
        *,
        user: str = "",
        permission: str = "",
        resource: str | None = None,
        granted_by: tuple[str, ...] = (),
    ) -> None:
        super().__init__(message)
        self.message = message
        self.user = user
        self.permission = permission
        self.resource = resource
        self.granted_by = granted_by

    def __str__(self) -> str:
        return self.message

    def __reduce__(self) -> tuple[object, ...]:
        return (
            type(self),
            (self.message,),
            {
                "user": self.user,
                "permission": self.permission,
                "resource": self.resource,
                "granted_by": self.granted_by,
            },
        )


# --- permissions ----------------------------------------------------------------------------------


def check_permission(permission: str) -> str:
    """``permission`` if well formed (``resource:action[:qualifier]``, ``*`` per segment)."""
    parts = permission.split(":")
    if not permission or not all(_SEGMENT.match(p) for p in parts):
        raise ValueError(
            f"'{permission}' is not a permission (resource:action[:qualifier], "
            "letters, digits, _ . - or * per segment)"
        )
    return permission


def grants(granted: str, needed: str) -> bool:
    """Whether the granted permission covers the needed one (see the module docstring)."""
    g, n = granted.split(":"), needed.split(":")
    return len(g) <= len(n) and all(a in ("*", b) for a, b in zip(g, n, strict=False))


def qualifier(environment_type: str) -> str:
    """The permission qualifier of an environment type: Production -> production,
    PreProduction -> non-production."""
    t = environment_type.strip().lower().replace("_", "-")
    if t == "production":
        return "production"
    if t in ("preproduction", "pre-production", "non-production", "nonproduction"):
        return "non-production"
    return check_permission(t)


def qualified(permission: str, environment_type: str | None) -> str:
    """``permission`` with the environment's qualifier appended (when it has none yet)."""
    if environment_type is None or len(permission.split(":")) > 2:
        return permission
    return f"{permission}:{qualifier(environment_type)}"


@dataclass(frozen=True)
class Need:
    """One permission an action needs, on one resource (a pipeline or environment id)."""

    permission: str
    resource: str | None = None
    stage: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return {"permission": self.permission, "resource": self.resource, "stage": self.stage}


def required_permissions(
    action: str, plan: Mapping[str, Any] | None, *, stage_index: int | None = None
) -> list[Need]:
    """The permissions ``action`` needs on a resolved plan (``app.definitions.resolve``): the
    pipeline permission, then one environment permission per deployment stage (only stage
    ``stage_index`` when given). With no plan, only the pipeline permission."""
    if action not in ACTIONS:
        raise ValueError(f"unknown action '{action}' (known: {', '.join(sorted(ACTIONS))})")
    pipeline_perm, env_perm = ACTIONS[action]
    pipeline_id = str(plan["identifier"]) if plan and plan.get("identifier") else None
    needs = [Need(pipeline_perm, pipeline_id)]
    if plan is None or env_perm is None:
        return needs
    for i, stage in enumerate(plan.get("stages") or []):
        if stage_index is not None and i != stage_index:
            continue
        child = stage.get("child")
        if stage.get("type") == "Pipeline" and action in ("run", "retry") and child:
            # Pipeline chaining: starting the chain runs the child too, so the child's own
            # permissions are needed as well (its pipeline, its environments, its children).
            for need in required_permissions(action, child):
                where = f"{stage['identifier']} → {child.get('identifier')}"
                need = Need(
                    need.permission, need.resource, f"{where}/{need.stage}" if need.stage else where
                )
                if not any(
                    n.permission == need.permission and n.resource == need.resource for n in needs
                ):
                    needs.append(need)
            continue
        env = stage.get("environment")
        if stage.get("type") in ("Approval", "Custom") or not isinstance(env, Mapping):
            continue
        need = Need(
            qualified(env_perm, str(env.get("type") or "Production")),
            str(env.get("identifier") or "") or None,
            str(stage.get("identifier", "")),
        )
        if not any(n.permission == need.permission and n.resource == need.resource for n in needs):
            needs.append(need)
    return needs


# --- the file -------------------------------------------------------------------------------------


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", populate_by_name=True)


class _RoleSpec(_Strict):
    permissions: list[str]
    description: str = ""


class _BindingSpec(_Strict):
    role: str | None = None
    roles: list[str] = Field(default_factory=list)
    users: list[str] = Field(default_factory=list)
    groups: list[str] = Field(default_factory=list)
    resources: list[str] = Field(default_factory=list)


class _UserGroupSpec(_Strict):
    name: str
    permissions: list[str]
    description: str = ""


class _FileSpec(_Strict):
    roles: dict[str, _RoleSpec | list[str]] = Field(default_factory=dict)
    bindings: list[_BindingSpec] = Field(default_factory=list)
    user_groups: list[_UserGroupSpec] = Field(default_factory=list, alias="userGroups")


@dataclass(frozen=True)
class Role:
    name: str
    permissions: tuple[str, ...]
    description: str = ""


@dataclass(frozen=True)
class Binding:
    """Roles given to users and groups, on every resource or on ``resources`` (globs)."""

    roles: tuple[str, ...]
    users: frozenset[str] = frozenset()
    groups: frozenset[str] = frozenset()
    resources: tuple[str, ...] = ()

    def covers(self, resource: str | None) -> bool:
        """Whether this binding applies to ``resource`` (a scoped one never to None)."""
        if not self.resources:
            return True
        return resource is not None and any(fnmatchcase(resource, p) for p in self.resources)


@dataclass(frozen=True)
class Grant:
    """A permission a user holds: from which role, through which binding subject."""

    permission: str
    role: str
    via: str  # "user <name>", "all users" or "group <name>"
    resources: tuple[str, ...] = ()


@dataclass
class RbacConfig:
    """A loaded RBAC file with the groups of the users file."""

    path: Path
    roles: dict[str, Role]
    bindings: list[Binding]
    groups: dict[str, frozenset[str]] = field(default_factory=dict)

    def groups_of(self, user: str) -> list[str]:
        return sorted(g for g, members in self.groups.items() if user and user in members)

    def grants_of(self, user: str) -> list[Grant]:
        """Every permission ``user`` holds, with where it comes from."""
        if not user:
            return []
        mine = set(self.groups_of(user))
        out: list[Grant] = []
        for b in self.bindings:
            vias = (
                [f"user {user}"] if user in b.users else ["all users"] if "*" in b.users else []
            ) + [f"group {g}" for g in sorted(b.groups & mine)]
            for via in vias[:1]:
                for r in b.roles:
                    out += [Grant(p, r, via, b.resources) for p in self.roles[r].permissions]
        return out

    def allows(
        self,
        user: str,
        permission: str,
        *,
        resource: str | None = None,
        environment_type: str | None = None,
        groups: Iterable[str] = (),
        roles: Iterable[str] | None = None,
    ) -> bool:
        """Whether ``user`` holds ``permission`` on ``resource``. ``groups`` adds to those
        of the users file (a verified token's groups claim); ``roles`` (an API token's) are
        held directly instead of through bindings."""
        needed = qualified(check_permission(permission), environment_type)
        if roles is not None:
            return any(
                grants(p, needed)
                for r in roles
                if r in self.roles
                for p in self.roles[r].permissions
            )
        if not user:
            return False
        mine = set(self.groups_of(user)) | set(groups)
        for b in self.bindings:
            if not (user in b.users or "*" in b.users or b.groups & mine) or not b.covers(resource):
                continue
            if any(grants(p, needed) for r in b.roles for p in self.roles[r].permissions):
                return True
        return False

    def roles_granting(self, permission: str) -> list[str]:
        return sorted(
            r.name for r in self.roles.values() if any(grants(p, permission) for p in r.permissions)
        )

    def authorize(
        self,
        user: str,
        permission: str,
        *,
        resource: str | None = None,
        environment_type: str | None = None,
        action: str | None = None,
        stage: str | None = None,
        groups: Iterable[str] = (),
        roles: Iterable[str] | None = None,
    ) -> None:
        """Return when ``user`` holds ``permission``; raise PermissionRefused otherwise."""
        needed = qualified(check_permission(permission), environment_type)
        if self.allows(user, needed, resource=resource, groups=groups, roles=roles):
            return
        raise PermissionRefused(
            self._refusal(user, needed, resource, action, stage),
            user=user,
            permission=needed,
            resource=resource,
            granted_by=tuple(self.roles_granting(needed)),
        )

    def _refusal(
        self, user: str, needed: str, resource: str | None, action: str | None, stage: str | None
    ) -> str:
        who = user or "an unnamed user (set VMFARM_USER)"
        kind = needed.split(":", 1)[0]
        on = f" on {kind} '{resource}'" if resource else ""
        where = f" (stage '{stage}')" if stage else ""
        parts = [
            (f"{who} may not {action}: " if action else f"{who}: ")
            + f"missing permission {needed}{on}{where}"
        ]
        mine = self.grants_of(user)
        elsewhere = sorted(
            {p for g in mine if g.resources and grants(g.permission, needed) for p in g.resources}
        )
        if elsewhere:
            parts.append(f"{user} holds it only on {', '.join(elsewhere)}")
        granting = self.roles_granting(needed)
        parts.append(
            f"role(s) granting it in {self.path}: {', '.join(granting)}"
            if granting
            else f"no role in {self.path} grants it (add it to a role)"
        )
        held = sorted(
            {
                g.role + f" ({g.via}" + (f", on {', '.join(g.resources)})" if g.resources else ")")
                for g in mine
            }
        )
        if user:
            parts.append(f"{user} has role(s) {', '.join(held)}" if held else f"{user} has no role")
        groups = self.groups_of(user)
        if granting and user:
            parts.append(
                f"bind {user} or one of their groups ({', '.join(groups)}) to one of those roles"
                if groups
                else f"bind {user} to one of those roles"
            )
        return "; ".join(parts)


def rbac_file() -> Path | None:
    """The RBAC file in force: ``VMFARM_RBAC_FILE`` (which must then exist), else
    ``configs/rbac.yaml`` when it exists, else None (single-user mode)."""
    explicit = os.environ.get("VMFARM_RBAC_FILE", "").strip()
    if explicit:
        return Path(explicit)
    return DEFAULT_RBAC_FILE if DEFAULT_RBAC_FILE.is_file() else None


def rbac_enabled() -> bool:
    """False in single-user mode (no RBAC file): every action is allowed."""
    return rbac_file() is not None


def _users_groups(referenced: set[str], rbac_path: Path) -> dict[str, frozenset[str]]:
    import yaml

    from app.settings import get_settings

    path = get_settings().users_file
    try:
        data = yaml.safe_load(Path(path).read_text()) or {}
    except FileNotFoundError:
        data = {}
        if referenced:
            raise ConfigError(
                f"{rbac_path} binds group(s) {', '.join(sorted(referenced))} but "
                f"the users file {path} does not exist (set VMFARM_USERS_FILE)"
            ) from None
    except (OSError, yaml.YAMLError) as exc:
        raise ConfigError(f"cannot read the users file {path}: {exc}") from None
    raw = data.get("groups") if isinstance(data, dict) else None
    if raw is not None and not isinstance(raw, dict):
        raise ConfigError(f"{path}: 'groups' must map group names to lists of users")
    groups = {
        str(g): frozenset(str(u) for u in (members or [])) for g, members in (raw or {}).items()
    }
    missing = sorted(referenced - set(groups))
    if missing:
        raise ConfigError(
            f"{rbac_path} binds group(s) {', '.join(missing)} that are not in "
            f"the users file {path} (groups there: "
            f"{', '.join(sorted(groups)) or 'none'})"
        )
    return groups


def load_rbac(
    path: Path | str | None = None, *, groups: Mapping[str, frozenset[str]] | None = None
) -> RbacConfig | None:
    """The RBAC file (default ``rbac_file()``) with its groups; None in single-user mode.

    With ``groups`` (the server: its own users file, and groups that tokens carry) the group
    members are those, and a bound group need not be listed in any file.
    Raises ConfigError naming the file and the problem (unreadable, bad YAML, an unknown key,
    role or group, a malformed permission)."""
    import yaml

    p = Path(path) if path is not None else rbac_file()
    if p is None:
        return None
    try:
        data = yaml.safe_load(p.read_text())
    except OSError as exc:
        raise ConfigError(
            f"cannot read the RBAC file {p} ({exc.strerror}); fix "
            "VMFARM_RBAC_FILE or unset it for single-user mode"
        ) from None
    except yaml.YAMLError as exc:
        raise ConfigError(f"{p}: not valid YAML: {exc}") from None
    data = data or {}
    if isinstance(data, dict) and set(data) == {"rbac"}:
        data = data["rbac"] or {}
    try:
        spec = _FileSpec.model_validate(data)
    except ValidationError as exc:
        problems = "; ".join(
            f"{'.'.join(str(x) for x in e['loc'])}: {e['msg']}" for e in exc.errors()
        )
        raise ConfigError(f"{p}: {problems}") from None
    roles: dict[str, Role] = {}
    bindings: list[Binding] = []
    for name, r in spec.roles.items():
        perms, desc = (r, "") if isinstance(r, list) else (r.permissions, r.description)
        roles[name] = Role(name, tuple(perms), desc)
    for ug in spec.user_groups:
        if ug.name in roles:
            raise ConfigError(f"{p}: userGroups '{ug.name}' has the name of a role")
        roles[ug.name] = Role(ug.name, tuple(ug.permissions), ug.description)
        bindings.append(Binding((ug.name,), groups=frozenset({ug.name})))
    for role in roles.values():
        for perm in role.permissions:
            try:
                check_permission(perm)
            except ValueError as exc:
                raise ConfigError(f"{p}: role '{role.name}': {exc}") from None
    for i, b in enumerate(spec.bindings):
        names = ([b.role] if b.role else []) + b.roles
        if not names:
            raise ConfigError(f"{p}: bindings[{i}] names no role (role: or roles:)")
        unknown = [n for n in names if n not in roles]
        if unknown:
            raise ConfigError(
                f"{p}: bindings[{i}] names unknown role(s) {', '.join(unknown)} "
                f"(roles: {', '.join(sorted(roles)) or 'none'})"
            )
        if not b.users and not b.groups:
            raise ConfigError(
                f"{p}: bindings[{i}] binds role(s) {', '.join(names)} to no user or group"
            )
        bindings.append(
            Binding(tuple(names), frozenset(b.users), frozenset(b.groups), tuple(b.resources))
        )
    if groups is not None:
        return RbacConfig(p, roles, bindings, dict(groups))
    referenced = {g for b in bindings for g in b.groups}
    return RbacConfig(p, roles, bindings, _users_groups(referenced, p))


# --- the calls commands make ----------------------------------------------------------------------


def authorize(
    user: str, permission: str, *, resource: str | None = None, environment_type: str | None = None
) -> None:
    """Return when ``user`` holds ``permission`` (qualified by ``environment_type`` when given)
    on ``resource``, or RBAC is off; raise PermissionRefused otherwise."""
    cfg = load_rbac()
    if cfg is not None:
        cfg.authorize(user, permission, resource=resource, environment_type=environment_type)


def _from_ledger(execution_id: str) -> tuple[dict[str, Any], int] | None:
    from app.db import session_scope
    from app.models import Execution

    with session_scope() as s:
        ex = s.get(Execution, execution_id)
        return None if ex is None else (dict(ex.plan or {}), ex.current_stage)


def plan_of_execution(execution_id: str) -> dict[str, Any] | None:
    """The plan an execution recorded (None when there is no such execution)."""
    found = _from_ledger(execution_id)
    return found[0] if found else None


def guard(
    action: str,
    *,
    user: str,
    plan: Mapping[str, Any] | None = None,
    execution_id: str | None = None,
    stage_index: int | None = None,
    rules: RbacConfig | None = None,
    groups: Iterable[str] = (),
    roles: Iterable[str] | None = None,
    audit_detail: Mapping[str, Any] | None = None,
) -> None:
    """Authorize ``user`` for ``action`` (see ``required_permissions``); on refusal record an
    audit event (outcome ``refused``, with ``audit_detail``) and raise PermissionRefused. A
    no-op in single-user mode.

    ``rules`` is the configuration to apply (the server's own); without it the RBAC file of
    this process (``load_rbac()``). ``groups`` and ``roles`` are a verified token's (see
    ``RbacConfig.allows``). Without ``plan`` the execution's plan is read from the ledger
    (``intervene`` then checks the stage it is paused in); an execution that does not exist
    is left to the command to report. Raises ConfigError when the RBAC or users file is
    wrong."""
    cfg = rules if rules is not None else load_rbac()
    if cfg is None:
        return
    roles = tuple(roles) if roles is not None else None
    if plan is None and execution_id:
        found = _from_ledger(execution_id)
        if found is None:
            return
        plan = found[0]
        if action == "intervene" and stage_index is None:
            stage_index = found[1]
    for need in required_permissions(action, plan, stage_index=stage_index):
        try:
            cfg.authorize(
                user,
                need.permission,
                resource=need.resource,
                action=action,
                stage=need.stage,
                groups=groups,
                roles=roles,
            )
        except PermissionRefused as exc:
            from app import audit

            audit.record_quietly(
                action,
                user=user,
                execution_id=execution_id,
                pipeline=str(plan["identifier"]) if plan else None,
                detail={**need.to_dict(), "reason": str(exc), **(audit_detail or {})},
                outcome="refused",
            )
            raise
