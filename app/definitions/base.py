"""The building blocks every file schema shares: the base model, identifiers, durations.

File schemas (``*Spec``) forbid unknown fields so that a typo is an error naming the field,
not a silently ignored setting; field names follow the files (camelCase) through aliases.
"""

from __future__ import annotations

import re
from typing import Annotated, Any

from pydantic import AfterValidator, BaseModel, ConfigDict, StringConstraints
from pydantic.alias_generators import to_camel

IDENT_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
REGION_RE = re.compile(r"^[a-z0-9][a-z0-9-]{0,62}$")
Scalar = str | int | float | bool


def _check_identifier(v: str) -> str:
    if not IDENT_RE.match(v):
        raise ValueError(
            f"identifier '{v}' must start with a letter or _ and contain only letters, digits and _"
        )
    return v


def _check_variable_name(v: str) -> str:
    if not IDENT_RE.match(v):
        raise ValueError(f"variable name '{v}' must be letters, digits and _")
    return v


def _check_duration(v: str) -> str:
    parse_duration(v)
    return v


# A duration written as 500ms, 0.5s, 30s, 10m, 1h30m (parse_duration reads it).
Duration = Annotated[str, AfterValidator(_check_duration)]

# Identifiers name things other files and expressions refer to; variable names become shell
# variables. Both are checked the same way wherever they appear.
Identifier = Annotated[str, AfterValidator(_check_identifier)]
VariableName = Annotated[str, AfterValidator(_check_variable_name)]


# A worker (delegate) tag, as `vmfarm worker --tags` takes it.
DelegateTag = Annotated[str, StringConstraints(pattern=r"^[a-z0-9][a-z0-9_-]{0,62}$")]


class Model(BaseModel):
    model_config = ConfigDict(
        extra="forbid", populate_by_name=True, alias_generator=to_camel, frozen=False
    )

    def to_json(self) -> dict[str, Any]:
        """Plain JSON, camelCase as the files write it (for rows, messages and output)."""
        return self.model_dump(mode="json", by_alias=True, exclude_none=True)


def identifier_of(name: str) -> str:
    """Harness-style identifier derived from a display name (``web-app vm`` -> ``web_app_vm``)."""
    ident = re.sub(r"[^A-Za-z0-9_]", "_", name.strip())
    return ident if ident and not ident[0].isdigit() else f"_{ident}"


_N = r"(\d+(?:\.\d+)?)"
_DURATION_RE = re.compile(
    rf"^\s*(?:{_N}d)?\s*(?:{_N}h)?\s*(?:{_N}m(?!s))?\s*(?:{_N}s)?\s*"
    rf"(?:{_N}ms)?\s*$"
)


def parse_duration(text: str) -> float:
    """``"10m"``, ``"1h30m"``, ``"45s"``, ``"90"`` (seconds) -> seconds."""
    t = str(text).strip()
    if re.fullmatch(r"\d+(?:\.\d+)?", t):
        return float(t)
    m = _DURATION_RE.match(t)
    if not t or not m or not any(m.groups()):
        raise ValueError(f"'{text}' is not a duration (use e.g. 500ms, 0.5s, 30s, 10m, 1h30m)")
    d, h, mi, sec, ms = (float(g or 0) for g in m.groups())
    return ((d * 24 + h) * 60 + mi) * 60 + sec + ms / 1000


def ssh_only(v: str) -> str:
    """WinRM is refused by name: vmfarm deploys over SSH, never runs a WinRM deployment as SSH."""
    if v == "WinRm":
        raise ValueError(
            "deploymentType WinRm is not supported: vmfarm deploys over SSH to "
            "Linux hosts (bash); write Ssh"
        )
    return v
