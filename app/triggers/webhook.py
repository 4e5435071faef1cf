"""A delivery to a webhook trigger: its signature, its conditions, the inputs it fills.

Pure functions of the trigger, the raw body and the headers; the server's route
(``app.server.routes.webhooks``) reads the trigger and its secret, records the delivery and
starts the run. Nothing here runs a pipeline.

* **Signature**: ``X-Hub-Signature-256: sha256=<hex>``, the HMAC-SHA256 of the raw body with
  the trigger's secret (GitHub's header; any CI system can compute it), compared in constant
  time. A delivery without it, or with another, is refused.
* **Delivery id**: ``X-GitHub-Delivery`` or ``X-Delivery-Id``; without one, the body's SHA-256
  (so a replayed delivery is the same delivery). One id starts at most one execution.
* **Conditions**: every payload and header condition must hold; a condition on a value the
  payload does not have does not hold. ``Regex`` is RE2 (linear in the value).
* **Inputs**: ``inputYaml``'s values with ``<+trigger.payload.PATH>`` and
  ``<+trigger.header['NAME']>`` replaced by the delivery's values, then read as an input set:
  the values reach the pipeline as runtime inputs do (``--set``), with the same checks
  (``allowedValues``, ``regex``) and the same quoting where they land in a script.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import re
from collections.abc import Mapping
from typing import Any

from app.errors import VmfarmError

SIGNATURE_HEADER = "x-hub-signature-256"
DELIVERY_HEADERS = ("x-github-delivery", "x-delivery-id")
MAX_BODY = 1024 * 1024
MAX_VALUE = 4096

# <+trigger.payload.a.b[0].c>, <+trigger.header['X-Name']> (or ["X-Name"])
_EXPR = re.compile(r"<\+trigger\.([^<>\n]*)>")
_PAYLOAD = re.compile(r"payload((?:\.[A-Za-z_][A-Za-z0-9_-]*|\[\d+\])+)")
_PART = re.compile(r"\.([A-Za-z_][A-Za-z0-9_-]*)|\[(\d+)\]")
_HEADER = re.compile(r"""header\[(['"])([A-Za-z0-9!#$%&*+.^_`|~-]{1,128})\1\]""")


class DeliveryError(VmfarmError):
    """A delivery that cannot start its pipeline (the message says why; no secret in it)."""


def parse_key(text: str) -> tuple[str, tuple[str | int, ...] | str]:
    """``<+trigger.payload.a.b[0]>`` -> ("payload", ("a", "b", 0)); ``<+trigger.header['X']>``
    -> ("header", "x"). ValueError saying how to write it otherwise."""
    t = text.strip()
    m = re.fullmatch(r"<\+trigger\.(.*)>", t)
    if not m:
        raise ValueError(
            f"'{t}' is not a trigger value: write <+trigger.payload.PATH> (PATH as "
            "a.b[0].c) or <+trigger.header['NAME']>"
        )
    return _parse_inner(m.group(1), t)


def _parse_inner(inner: str, shown: str) -> tuple[str, tuple[str | int, ...] | str]:
    inner = inner.strip()
    if inner in ("artifact.build", "artifact.tag"):  # an artifact trigger's new build
        return "artifact", "build"
    m = _PAYLOAD.fullmatch(inner)
    if m:
        path = tuple((name if name else int(index)) for name, index in _PART.findall(m.group(1)))
        return "payload", path
    h = _HEADER.fullmatch(inner)
    if h:
        return "header", h.group(2).lower()
    raise ValueError(
        f"'{shown}' is not a trigger value vmfarm reads: write <+trigger.payload.PATH> "
        "(PATH as a.b[0].c) or <+trigger.header['NAME']> (a webhook trigger), or "
        "<+trigger.artifact.build> (an artifact trigger)"
    )


def signature(secret: str, body: bytes) -> str:
    """The ``X-Hub-Signature-256`` value of ``body`` under ``secret``."""
    return "sha256=" + hmac.new(secret.encode(), body, hashlib.sha256).hexdigest()


def signed(secret: str, body: bytes, header: str | None) -> bool:
    """True when ``header`` is the body's signature under ``secret`` (constant time)."""
    if not header or not secret:
        return False
    return hmac.compare_digest(signature(secret, body).encode(), header.strip().encode())


def delivery_id(headers: Mapping[str, str], body: bytes) -> str:
    """The delivery's id: its header, else the SHA-256 of the body."""
    for name in DELIVERY_HEADERS:
        value = headers.get(name, "").strip()
        if value:
            return value[:128]
    return "sha256:" + hashlib.sha256(body).hexdigest()


def parse_payload(body: bytes) -> Any:
    if len(body) > MAX_BODY:
        raise DeliveryError(f"the payload is over {MAX_BODY // 1024} KiB")
    try:
        return json.loads(body or b"null")
    except (ValueError, UnicodeDecodeError) as exc:
        raise DeliveryError(f"the payload is not JSON: {exc}") from None


def value_of(key: str, payload: Any, headers: Mapping[str, str]) -> str | None:
    """The delivery's value for a condition key or an expression (None when absent)."""
    where, path = parse_key(key)
    return _value(where, path, payload, headers, key)


def _value(
    where: str,
    path: tuple[str | int, ...] | str,
    payload: Any,
    headers: Mapping[str, str],
    shown: str,
) -> str | None:
    if where == "artifact":
        value = headers.get("\0artifact.build")
        if value is None:
            raise DeliveryError(f"{shown} is an artifact trigger's value; a delivery has none")
        return value
    if where == "header":
        assert isinstance(path, str)
        return headers.get(path)
    node = payload
    for part in path:
        if isinstance(part, int):
            if not isinstance(node, list) or part >= len(node):
                return None
        elif not isinstance(node, dict) or part not in node:
            return None
        node = node[part]
    if node is None:
        return None
    if isinstance(node, dict | list):
        raise DeliveryError(f"{shown} is a JSON {type(node).__name__}, not a value")
    if isinstance(node, bool):
        return "true" if node else "false"
    return str(node)


def holds(op: str, actual: str | None, expected: str) -> bool:
    if actual is None:
        return False
    if op == "Equals":
        return actual == expected
    if op == "NotEquals":
        return actual != expected
    items = [i.strip() for i in expected.split(",")]
    if op == "In":
        return actual in items
    if op == "NotIn":
        return actual not in items
    if op == "StartsWith":
        return actual.startswith(expected)
    if op == "EndsWith":
        return actual.endswith(expected)
    if op == "Contains":
        return expected in actual
    if op == "DoesNotContain":
        return expected not in actual
    if op == "Regex":
        from app.definitions.expressions import compile_input_regex

        return compile_input_regex(expected).search(actual) is not None
    raise ValueError(f"unknown operator {op}")  # the model allows only the above


def unmet(trigger: Any, payload: Any, headers: Mapping[str, str]) -> str | None:
    """Why the delivery does not match the trigger's conditions (None when every one holds)."""
    for _, cond in trigger.conditions:
        actual = value_of(cond.key, payload, headers)
        if not holds(cond.operator, actual, cond.value):
            got = "absent" if actual is None else repr(actual[:200])
            return f"condition {cond.key} {cond.operator} {cond.value!r} does not hold ({got})"
    return None


def _substitute(text: str, payload: Any, headers: Mapping[str, str]) -> str:
    def one(m: re.Match[str]) -> str:
        where, path = _parse_inner(m.group(1), m.group(0))
        value = _value(where, path, payload, headers, m.group(0))
        if value is None:
            raise DeliveryError(f"the delivery has no value for {m.group(0)}")
        if len(value) > MAX_VALUE:
            raise DeliveryError(f"{m.group(0)} is over {MAX_VALUE} characters")
        return value

    return _EXPR.sub(one, text)


def _walk(data: Any, fn: Any) -> Any:
    if isinstance(data, dict):
        return {k: _walk(v, fn) for k, v in data.items()}
    if isinstance(data, list):
        return [_walk(v, fn) for v in data]
    if isinstance(data, str):
        return fn(data)
    return data


def inputs_of(
    input_yaml: str | None,
    payload: Any,
    headers: Mapping[str, str],
    *,
    source: str,
    build: str | None = None,
) -> dict[str, str]:
    """The runtime inputs a delivery (or an artifact trigger's new ``build``) fills:
    ``input_yaml`` with its trigger values replaced (each value is a YAML scalar: nothing in
    the payload changes the input set's shape), read as an input set. DeliveryError when a
    value is missing; SpecError(s) from the input set."""
    if not input_yaml or not input_yaml.strip():
        return {}
    if build is not None:  # <+trigger.artifact.build>: a key no HTTP header can have
        headers = {**headers, "\0artifact.build": build}
    import yaml

    try:
        data = yaml.safe_load(input_yaml)
    except yaml.YAMLError as exc:
        raise DeliveryError(f"{source}: inputYaml is not YAML: {exc}") from None
    filled = _walk(data, lambda s: _substitute(s, payload, headers))
    return dict(_read_input_set(yaml.safe_dump(filled, sort_keys=False), source))


def _read_input_set(text: str, source: str) -> Mapping[str, str]:
    import tempfile
    from pathlib import Path

    from app.definitions.inputsets import read_input_sets

    with tempfile.TemporaryDirectory(prefix="vmfarm-trigger-") as tmp:
        path = Path(tmp) / "inputYaml.yaml"
        path.write_text(text)
        return read_input_sets([path])


def check_input_yaml(
    text: str, file: str, line: int, *, allowed: tuple[str, ...] = ("payload", "header")
) -> None:
    """Check a trigger's ``inputYaml`` at load: its trigger values are written as this module
    reads them, are ``allowed`` for the trigger's kind (a webhook's payload and headers, an
    artifact trigger's build), and it is an input set. Errors name ``file`` and the line in it
    (``line`` is the line of the ``inputYaml`` key; a block's first line follows it)."""
    from app.errors import SpecError, SpecErrors

    for n, raw in enumerate(text.splitlines(), start=1):
        for m in _EXPR.finditer(raw):
            try:
                where, _ = _parse_inner(m.group(1), m.group(0))
            except ValueError as exc:
                raise SpecError(
                    str(exc), file=file, line=line + n, col=1, field="trigger.inputYaml"
                ) from None
            if where not in allowed:
                why = (
                    "an artifact trigger has no payload or headers: it reads "
                    "<+trigger.artifact.build>"
                    if where != "artifact"
                    else "a webhook trigger has no artifact build: it reads "
                    "<+trigger.payload.PATH> and <+trigger.header['NAME']>"
                )
                raise SpecError(
                    f"{m.group(0)}: {why}",
                    file=file,
                    line=line + n,
                    col=m.start() + 1,
                    field="trigger.inputYaml",
                )
        if "<+trigger." in raw and not _EXPR.search(raw[raw.index("<+trigger.") :]):
            raise SpecError(
                "unterminated <+trigger. expression (no closing > on its line)",
                file=file,
                line=line + n,
                col=raw.index("<+trigger.") + 1,
                field="trigger.inputYaml",
            )
    placeholder = _EXPR.sub("x", text)
    try:
        _read_input_set(placeholder, file)
    except (SpecError, SpecErrors) as exc:
        errs = exc.errors if isinstance(exc, SpecErrors) else [exc]
        raise SpecErrors(
            [
                SpecError(
                    e.message,
                    file=file,
                    line=line + e.line,
                    col=e.col,
                    field="trigger.inputYaml" + (f".{e.field}" if e.field else ""),
                )
                for e in errs
            ]
        ) from None
