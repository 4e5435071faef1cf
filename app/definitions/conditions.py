"""``when`` conditions: Harness's ``condition: <+env.type> == "Production"``, parsed and
evaluated by a small language of our own (never ``eval``).

    condition   := or
    or          := and ("||" and)*
    and         := not ("&&" not)*
    not         := "!" not | compare
    compare     := atom (("==" | "!=") atom)?
    atom        := "(" or ")" | <+expression> | "string" | 'string' | number | true | false

A ``<+...>`` value is text. ``==`` compares text with text; when one side is a number (or
``true``/``false``) literal, the other side is read as one (``<+pipeline.variables.n> == 3``).
A bare ``<+...>`` or text where a truth value is needed is true when it is ``true``.

The condition is checked when the file is loaded (a ``ConditionError`` says where in it); the
values known before the run (``<+env.type>``, variables) are bound when the plan is resolved
(``bind``), the ones a host gives (``<+instance.name>``, earlier steps' outputs) on the worker.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

from app.definitions.expressions import ExpressionError

Scalar = str | float | bool


class ConditionError(ExpressionError):
    """A condition that does not parse, or names a value nobody can give it."""


@dataclass(frozen=True)
class Ref:
    """A ``<+...>`` value (its name, without the brackets)."""

    name: str


@dataclass(frozen=True)
class Lit:
    value: Scalar


@dataclass(frozen=True)
class Not:
    operand: Node


@dataclass(frozen=True)
class BinOp:
    op: Literal["==", "!=", "&&", "||"]
    left: Node
    right: Node


Node = Ref | Lit | Not | BinOp

_TOKEN_RE = re.compile(
    r"""
    (?P<space>\s+)
  | (?P<ref><\+[^<>\n]+>)
  | (?P<string>"(?:[^"\\\n]|\\.)*"|'(?:[^'\\\n]|\\.)*')
  | (?P<number>-?\d+(?:\.\d+)?(?![\w.]))
  | (?P<op>==|!=|&&|\|\||!|\(|\))
  | (?P<word>[A-Za-z_][A-Za-z0-9_]*)
""",
    re.VERBOSE,
)


def _tokens(text: str) -> list[tuple[str, str, int]]:
    out: list[tuple[str, str, int]] = []
    pos = 0
    while pos < len(text):
        m = _TOKEN_RE.match(text, pos)
        if m is None:
            raise ConditionError(
                f"unexpected {text[pos : pos + 12]!r} at character {pos + 1} "
                "(a condition is made of <+...> values, quoted strings, "
                "numbers, true/false, ==, !=, &&, ||, ! and parentheses)"
            )
        kind = m.lastgroup or ""
        if kind == "word" and m.group() not in ("true", "false"):
            raise ConditionError(
                f"unexpected word {m.group()!r} at character {pos + 1}: "
                'quote text ("Production") and write values as <+...>'
            )
        if kind != "space":
            out.append((kind, m.group(), pos + 1))
        pos = m.end()
    return out


def _string(raw: str) -> str:
    body = raw[1:-1]
    return re.sub(r"\\(.)", lambda m: {"n": "\n", "t": "\t"}.get(m.group(1), m.group(1)), body)


class _Parser:
    def __init__(self, text: str) -> None:
        self.toks = _tokens(text)
        self.i = 0

    def peek(self) -> str | None:
        return self.toks[self.i][1] if self.i < len(self.toks) else None

    def take(self) -> tuple[str, str, int]:
        if self.i >= len(self.toks):
            raise ConditionError("the condition ends too early (a value or ')' is missing)")
        tok = self.toks[self.i]
        self.i += 1
        return tok

    def parse(self) -> Node:
        if not self.toks:
            raise ConditionError("the condition is empty")
        node = self.or_()
        if self.i < len(self.toks):
            _, text, at = self.toks[self.i]
            raise ConditionError(
                f"unexpected {text!r} at character {at} (join conditions with && or ||)"
            )
        return node

    def or_(self) -> Node:
        node = self.and_()
        while self.peek() == "||":
            self.take()
            node = BinOp("||", node, self.and_())
        return node

    def and_(self) -> Node:
        node = self.not_()
        while self.peek() == "&&":
            self.take()
            node = BinOp("&&", node, self.not_())
        return node

    def not_(self) -> Node:
        if self.peek() == "!":
            self.take()
            return Not(self.not_())
        return self.compare()

    def compare(self) -> Node:
        node = self.atom()
        if self.peek() in ("==", "!="):
            op = self.take()[1]
            node = BinOp("==" if op == "==" else "!=", node, self.atom())
            if self.peek() in ("==", "!="):
                raise ConditionError(
                    "chained comparisons (a == b == c) are ambiguous: use parentheses and && or ||"
                )
        return node

    def atom(self) -> Node:
        kind, text, at = self.take()
        if text == "(":
            node = self.or_()
            if self.peek() != ")":
                raise ConditionError(f"'(' at character {at} is never closed")
            self.take()
            return node
        if kind == "ref":
            return Ref(text[2:-1].strip())
        if kind == "string":
            return Lit(_string(text))
        if kind == "number":
            return Lit(float(text))
        if kind == "word":
            return Lit(text == "true")
        raise ConditionError(f"unexpected {text!r} at character {at} (a value is expected)")


def parse(text: str) -> Node:
    """The condition as a tree; ConditionError saying what and where when it does not parse."""
    return _Parser(text).parse()


def refs(node: Node) -> list[str]:
    """The ``<+...>`` names the condition reads, in order."""
    if isinstance(node, Ref):
        return [node.name]
    if isinstance(node, Not):
        return refs(node.operand)
    if isinstance(node, BinOp):
        return [*refs(node.left), *refs(node.right)]
    return []


def bind(text: str, lookup: Callable[[str], str | None]) -> str:
    """The condition with every value ``lookup`` knows written in as a quoted string (the ones
    it returns None for stay as ``<+...>``, for a later bind). Values are always quoted, so
    a value can never change the condition's shape."""
    parse(text)  # only a condition that parses is bound
    out: list[str] = []
    for kind, tok, _ in _tokens(text):
        if kind == "ref":
            value = lookup(tok[2:-1].strip())
            out.append(tok if value is None else json.dumps(value))
        else:
            out.append(tok)
    return " ".join(out)


def _truth(v: Scalar) -> bool:
    if isinstance(v, bool):
        return v
    if isinstance(v, float):
        return v != 0
    return v.strip().lower() == "true"


def _equal(a: Scalar, b: Scalar) -> bool:
    if isinstance(a, str) and isinstance(b, str):
        return a == b
    if isinstance(a, bool) or isinstance(b, bool):
        return _truth(a) == _truth(b)
    try:  # a number on one side: the other is read as one
        return float(a) == float(b)
    except ValueError:
        return False


def evaluate(node: Node, lookup: Callable[[str], str]) -> bool:
    """The condition's truth; ``lookup`` gives each ``<+...>`` value (ConditionError when it
    cannot)."""

    def value(n: Node) -> Scalar:
        if isinstance(n, Lit):
            return n.value
        if isinstance(n, Ref):
            return lookup(n.name)
        return truth(n)

    def truth(n: Node) -> bool:
        if isinstance(n, Not):
            return not truth(n.operand)
        if isinstance(n, BinOp):
            if n.op == "&&":
                return truth(n.left) and truth(n.right)
            if n.op == "||":
                return truth(n.left) or truth(n.right)
            same = _equal(value(n.left), value(n.right))
            return same if n.op == "==" else not same
        return _truth(value(n))

    return truth(node)


def check(text: str) -> str:
    """A pydantic validator: the condition parses (ValueError naming the problem)."""
    try:
        parse(text)
    except ConditionError as exc:
        raise ValueError(f"invalid condition {text!r}: {exc}") from None
    return text
