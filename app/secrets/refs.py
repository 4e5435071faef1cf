"""Secret references in text: ``<+secrets.getValue("id")>`` and what an id means.

A reference is ``<+secrets.getValue("ID")>`` or ``<+secrets.getValue('ID')>`` (blanks allowed
around the parentheses and the quoted id). An id is read as::

    [SCOPE.][BACKEND:]NAME[#KEY]

* ``SCOPE`` is Harness's ``account.``, ``org.`` or ``project.``. vmfarm has one secret store, so
  the scope is **stripped for the lookup**: ``account.db_password``, ``org.db_password`` and
  ``db_password`` all find the secret ``db_password``. The id as written stays the key of the
  ``resolve`` result and is what error messages show.
* ``BACKEND`` (``env``, ``file``, ``aws``, ``vault``) asks that one backend only; without it the
  enabled backends are asked in order (``VMFARM_SECRETS``). ``arn:aws:...`` is a name, not a
  backend prefix.
* ``#KEY`` selects one field: of the JSON object stored as the value (env, file, AWS
  SecretString) or of the Vault KV entry.

Substitution is a single pass: a secret value that itself looks like a reference (or like any
``<+...>`` expression) is inserted as it is, never expanded. Render other expressions first
and secrets last.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass

from app.secrets.errors import SecretConfigError

SCOPES = ("account", "org", "project")
BACKEND_NAMES = ("env", "file", "aws", "vault")

REF_RE = re.compile(
    r"""<\+\s*secrets\.getValue\(\s*(?:"(?P<dq>[^"<>\n]*)"|'(?P<sq>[^'<>\n]*)')\s*\)\s*>"""
)
_BACKEND_RE = re.compile(r"^(?P<backend>[a-z]+):(?P<rest>.*)$", re.DOTALL)

Resolver = Callable[[list[str]], Mapping[str, str]]


@dataclass(frozen=True)
class SecretRef:
    """One parsed secret id."""

    id: str  # as written (stripped of surrounding blanks)
    name: str  # what backends look up (scope and backend prefix removed, no #key)
    backend: str | None = None  # an explicit backend prefix
    key: str | None = None  # a #field selector
    scope: str = ""  # account / org / project, or "" (informational)

    @property
    def cache_key(self) -> tuple[str | None, str, str | None]:
        return (self.backend, self.name, self.key)


def parse_id(secret_id: str) -> SecretRef:
    """Parse ``[scope.][backend:]name[#key]``; SecretConfigError when it names nothing."""
    raw = secret_id.strip()
    rest = raw
    scope = ""
    for sc in SCOPES:
        if rest.startswith(sc + "."):
            scope, rest = sc, rest[len(sc) + 1 :]
            break
    backend: str | None = None
    m = _BACKEND_RE.match(rest)
    if m and m.group("backend") in BACKEND_NAMES:
        backend, rest = m.group("backend"), m.group("rest")
    name, sep, key = rest.partition("#")
    name = name.strip()
    if not name:
        raise SecretConfigError(
            f"secret id {raw!r} names no secret", secret_id=raw, backend=backend or ""
        )
    if sep and not key.strip():
        raise SecretConfigError(
            f"secret id {raw!r} has an empty '#' field name", secret_id=raw, backend=backend or ""
        )
    return SecretRef(
        id=raw, name=name, backend=backend, key=key.strip() if sep else None, scope=scope
    )


def _id_of(m: re.Match[str]) -> str:
    dq = m.group("dq")
    return (dq if dq is not None else m.group("sq")).strip()


def has_refs(text: str) -> bool:
    """True when ``text`` holds at least one secret reference."""
    return "secrets.getValue" in text and REF_RE.search(text) is not None


def find_refs(text: str) -> list[str]:
    """The secret ids referenced in ``text``, in order of first appearance, without repeats."""
    if "secrets.getValue" not in text:
        return []
    seen: dict[str, None] = {}
    for m in REF_RE.finditer(text):
        seen.setdefault(_id_of(m), None)
    return list(seen)


def find_refs_in(texts: Iterable[str]) -> list[str]:
    """``find_refs`` over several strings (a step's script, env values, ...), merged."""
    seen: dict[str, None] = {}
    for text in texts:
        for ref in find_refs(text):
            seen.setdefault(ref, None)
    return list(seen)


def substitute(
    text: str, resolver: Resolver | None = None, *, bind: Callable[[str], str] | None = None
) -> tuple[str, dict[str, str]]:
    """Replace every secret reference in ``text``; return the new text and ``{id: value}``.

    ``resolver`` takes the list of ids and returns their values (default: ``resolve``, which
    also registers the values for masking); a SecretError it raises propagates. With ``bind``
    (e.g. ``app.definitions.expressions.Binder`` for a shell script) a reference is replaced by
    ``bind(value)`` (``${VMFARM_VALUE_1}``) so the value travels in the command's environment
    instead of the script text. One pass: inserted values are never scanned again.
    """
    ids = find_refs(text)
    if not ids:
        return text, {}
    if resolver is None:
        from app.secrets.store import resolve

        resolver = resolve
    got = resolver(ids)
    values = {i: got[i] for i in ids}

    def sub(m: re.Match[str]) -> str:
        value = values[_id_of(m)]
        return bind(value) if bind is not None else value

    return REF_RE.sub(sub, text), values
