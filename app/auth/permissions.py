"""What a verified identity may do, from the server's RBAC configuration (app.rbac's model).

A person (OIDC) holds the roles of every binding that names their subject (or ``*``: every
signed-in person) or one of their groups: the groups of their token's groups claim, and those
the server's users file gives them. An API token holds the roles it was made with, looked up
in the server's configuration at each request (a role changed there changes the token). The
caller's environment, files and headers play no part.
"""

from __future__ import annotations

from app.auth.identity import Identity
from app.rbac import PermissionRefused, RbacConfig, check_permission, qualified


def allows(
    cfg: RbacConfig,
    who: Identity,
    permission: str,
    *,
    resource: str | None = None,
    environment_type: str | None = None,
) -> bool:
    return cfg.allows(
        who.subject,
        permission,
        resource=resource,
        environment_type=environment_type,
        groups=who.groups,
        roles=who.roles if who.kind == "token" else None,
    )


def authorize(
    cfg: RbacConfig,
    who: Identity,
    permission: str,
    *,
    resource: str | None = None,
    environment_type: str | None = None,
) -> None:
    """Return when ``who`` holds ``permission`` (on ``resource``); PermissionRefused naming
    what is missing and which roles would grant it otherwise."""
    needed = qualified(check_permission(permission), environment_type)
    if allows(cfg, who, needed, resource=resource):
        return
    on = f" on '{resource}'" if resource else ""
    granting = cfg.roles_granting(needed)
    hint = (
        f"role(s) granting it: {', '.join(granting)}"
        if granting
        else "no role of the server's RBAC configuration grants it"
    )
    raise PermissionRefused(
        f"{who.subject} lacks permission {needed}{on}; {hint}",
        user=who.subject,
        permission=needed,
        resource=resource,
        granted_by=tuple(granting),
    )


def may_grant_roles(cfg: RbacConfig, who: Identity, roles: list[str]) -> list[str]:
    """The permissions of ``roles`` that ``who`` does not hold (empty: ``who`` may give them
    to a token; nobody makes a token stronger than themselves). Unknown roles are a
    ValueError."""
    unknown = [r for r in roles if r not in cfg.roles]
    if unknown:
        raise ValueError(
            f"unknown role(s) {', '.join(unknown)} (the server's roles: "
            f"{', '.join(sorted(cfg.roles)) or 'none'})"
        )
    return sorted({p for r in roles for p in cfg.roles[r].permissions if not allows(cfg, who, p)})


__all__ = ["allows", "authorize", "may_grant_roles"]
