"""The assertion of an Http step, as Harness writes it: a condition over the response.

```yaml
assertion: <+httpResponseCode> == 200
assertion: <+httpResponseCode> >= 200 && <+httpResponseBody>.contains("UP")
```

A condition is terms joined by ``&&`` and ``||`` (``&&`` binds tighter), each term one of:
``<+httpResponseCode> OP NUMBER`` (OP: == != >= <= > <), ``<+httpResponseBody> == "text"`` or
``!= "text"``, ``<+httpResponseBody>.contains("text")``. Anything else is refused when the file
is loaded (``check``), so an assertion is never skipped at run time.
"""

from __future__ import annotations

import operator
import re
from collections.abc import Callable

_CODE = re.compile(r"^<\+httpResponseCode>\s*(==|!=|>=|<=|>|<)\s*(\d{1,3})$")
_BODY = re.compile(r'^<\+httpResponseBody>\s*(==|!=)\s*"((?:[^"\\]|\\.)*)"$')
_CONTAINS = re.compile(r'^<\+httpResponseBody>\.contains\(\s*"((?:[^"\\]|\\.)*)"\s*\)$')
_OPS: dict[str, Callable[[int, int], bool]] = {
    "==": operator.eq,
    "!=": operator.ne,
    ">=": operator.ge,
    "<=": operator.le,
    ">": operator.gt,
    "<": operator.lt,
}


def _unquote(text: str) -> str:
    return re.sub(r"\\(.)", r"\1", text)


def _term(text: str) -> Callable[[int, str], bool]:
    t = text.strip()
    if m := _CODE.match(t):
        op, want = _OPS[m.group(1)], int(m.group(2))
        return lambda code, _body: op(code, want)
    if m := _BODY.match(t):
        same, value = m.group(1) == "==", _unquote(m.group(2))
        return lambda _code, body: (body == value) == same
    if m := _CONTAINS.match(t):
        part = _unquote(m.group(1))
        return lambda _code, body: part in body
    raise ValueError(
        f"assertion term {t!r} is not supported: write <+httpResponseCode> == 200 (or != >= <= "
        '> <), <+httpResponseBody> == "text", or <+httpResponseBody>.contains("text"), '
        "joined by && and ||"
    )


def check(assertion: str) -> Callable[[int, str], bool]:
    """The assertion as a function of (status code, body); ValueError when it cannot be
    read."""
    if not assertion.strip():
        raise ValueError("the assertion is empty")
    alternatives = [[_term(t) for t in part.split("&&")] for part in assertion.split("||")]
    return lambda code, body: any(all(t(code, body) for t in terms) for terms in alternatives)


def holds(assertion: str, code: int, body: str) -> bool:
    """Does the response (status ``code``, ``body``) satisfy ``assertion``?"""
    return check(assertion)(code, body)
