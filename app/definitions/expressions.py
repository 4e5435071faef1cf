"""Harness-style expressions: ``<+service.name>``, ``<+env.variables.x>``, ``<+input>``...

Rendering happens twice. At submit time the coordinator resolves everything that does not depend
on a host; ``<+instance.*>`` (and later ``<+secrets.*>``) are left in place and rendered by the
worker for each host. A reference to something that does not exist is an error before anything
runs. Values that come from outside the pipeline file (runtime inputs, host names, cloud tags)
are shell-quoted when they land in a script; values written in the files are inserted as they are.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from app.errors import VmfarmError

# <+input>, optionally followed by .default(x) / .allowedValues(a,b) / .regex(r). An option's
# argument may hold parentheses, balanced and nested up to three deep (a regex's groups:
# ``.regex(^v(\d+)(\.\d+)*$)``). Each alternative starts with its own character, so matching
# never backtracks into an argument (linear time, whatever the file holds).
_ARG = r"[^()]*"
for _ in range(3):
    _ARG = rf"(?:[^()]|\({_ARG}\))*"
_OPTS = "default|allowedValues|regex|executionInput"
INPUT_RE = re.compile(rf"<\+input>((?:\.(?:{_OPTS})\({_ARG}\))*)")
# An expression never spans lines: `<+a` on one line and a `>` on a later one are text.
EXPR_RE = re.compile(r"<\+([^<>\n]+)>")
_INPUT_OPT_RE = re.compile(rf"\.({_OPTS})\(({_ARG})\)")

# Expressions the worker renders for each host (their values depend on the host).
HOST_KEYS = frozenset(
    {
        "instance.name",
        "instance.hostName",
        "instance.host.hostName",
        "instance.host.privateIp",
        "instance.host.publicIp",
        "instance.host.port",
        "instance.host.region",
        "infra.region",
        # The version the host returns to on rollback (from the Instance ledger).
        "rollbackArtifact.tag",
        # The artifact's SHA-256, known once the worker has fetched (and verified) it.
        "artifact.checksum",
    }
)
# <+secrets.getValue("id")>: left in place by every render; the worker that runs the step
# resolves it (app.secrets) and passes the value in the command's environment.
SECRET_RE = re.compile(r"""secrets\.getValue\(\s*(["'])([A-Za-z0-9_./#:@-]+)\1\s*\)""")
# Outputs of earlier steps on the same host, read by the worker.
# Outputs of earlier stages' steps (<+pipeline.stages.S.spec.execution.steps.ID.output.X>),
# read from the ledger when the stage that names them starts or runs.
DEFERRED_PREFIXES = ("steps.", "pipeline.stages.")


# Characters that mean nothing to the shell in any quoting context.
SAFE_VALUE_RE = re.compile(r"[A-Za-z0-9._:/@%+=,-]*")


class Binder:
    """Collects unsafe external values as environment variables for one script."""

    def __init__(self, prefix: str = "VMFARM_VALUE_") -> None:
        self.prefix = prefix
        self.env: dict[str, str] = {}
        self._names: dict[str, str] = {}

    def __call__(self, value: str) -> str:
        return "${" + self.name(value) + "}"

    def name(self, value: str) -> str:
        """The variable that carries ``value`` (one per distinct value)."""
        name = self._names.get(value)
        if name is None:
            name = f"{self.prefix}{len(self._names) + 1}"
            self._names[value] = name
            self.env[name] = value
        return name


@dataclass(frozen=True)
class Value:
    """A resolved value and whether it came from outside the pipeline files."""

    text: str
    external: bool = False


class ExpressionError(VmfarmError):
    """An expression that cannot be resolved; the loader turns it into a SpecError."""


@dataclass
class Context:
    """Everything an expression may name, as flat dotted keys (``env.variables.region``)."""

    values: dict[str, Value] = field(default_factory=dict)
    # Which prefixes are known but resolved later (on the worker).
    deferred: tuple[str, ...] = DEFERRED_PREFIXES
    # validate without --set: an unfilled <+input> is fine (run will ask for it).
    allow_inputs: bool = False
    # Earlier stages' step outputs this stage may read (app.definitions.stage_outputs), known
    # on the worker: the expression (or, ending in '.', a prefix) -> '' (read later), or why
    # it cannot be read. None: not checked here (any pipeline.stages. expression is deferred).
    later: dict[str, str] | None = None

    def set(self, key: str, value: object, *, external: bool = False) -> None:
        self.values[key] = Value("" if value is None else _scalar(value), external)

    def lookup(self, expr: str) -> Value | None:
        """The value of ``expr``, None when it is deferred, or ExpressionError when unknown."""
        key = expr.strip()
        if key in self.values:
            return self.values[key]
        if self.later is not None and key.startswith("pipeline.stages."):
            from app.definitions.stage_outputs import check

            check(key, self.later)
            return None
        if key in HOST_KEYS or key.startswith(self.deferred):
            return None
        if key.startswith("secrets."):
            if SECRET_RE.fullmatch(key):
                return None  # resolved on the worker that runs the step, never before
            raise ExpressionError(
                f'malformed secret reference <+{key}>: write <+secrets.getValue("id")>'
            )
        raise ExpressionError(_unknown_message(key, self.values))


def _scalar(value: object) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    return str(value)


def _unknown_message(key: str, known: Mapping[str, Value]) -> str:
    head = key.split(".", 1)[0]
    close = sorted(k for k in known if k.split(".", 1)[0] == head)
    hint = ""
    if close:
        shown = ", ".join(close[:8]) + (", ..." if len(close) > 8 else "")
        hint = f" (known: {shown})"
    return f"unknown expression <+{key}>{hint}"


def has_input(text: str) -> bool:
    """True when the string is (or contains) a runtime input ``<+input>``."""
    return "<+input>" in text


def parse_input(text: str) -> dict[str, object]:
    """Options of a ``<+input>...`` field: default and allowed values."""
    m = INPUT_RE.search(text)
    opts: dict[str, object] = {}
    if not m:
        return opts
    for name, arg in _INPUT_OPT_RE.findall(m.group(1)):
        if name == "default":
            opts["default"] = arg.strip().strip("'\"")
        elif name == "allowedValues":
            opts["allowed"] = [a.strip().strip("'\"") for a in arg.split(",") if a.strip()]
        elif name == "regex":
            opts["regex"] = arg.strip().strip("'\"")
    return opts


# RE2 (google-re2) matches in time linear in the value: Python's backtracking `re` took 11 s
# for a 40-character value against a pattern like (a+)+$, and did not end for 60.
_RE2_SYNTAX = "https://github.com/google/re2/wiki/Syntax"


def compile_input_regex(pattern: str) -> Any:
    """A ``.regex()`` pattern compiled by RE2 (its ``fullmatch`` is linear in the value);
    ValueError saying why when RE2 cannot take it (backreferences, look-around, ``\\Z``)."""
    import re2

    options = re2.Options()
    options.log_errors = False  # the reason is in our message, not on stderr
    try:
        return re2.compile(pattern, options)
    except re2.error as exc:
        why = (
            exc.args[0].decode(errors="replace")
            if exc.args and isinstance(exc.args[0], bytes)
            else str(exc)
        )
        hint = "; write \\z for the end of the value" if "\\Z" in pattern else ""
        raise ValueError(
            f"{why}{hint} (vmfarm matches .regex() with RE2, in linear time: no "
            f"backreferences or look-around; see {_RE2_SYNTAX})"
        ) from None


def render(
    text: str,
    ctx: Context,
    *,
    quote: bool = False,
    bind: Callable[[str], str] | None = None,
    on_error: Callable[[str], None] | None = None,
) -> str:
    """Substitute every resolvable ``<+...>`` in ``text``; deferred ones stay as they are.

    With ``quote`` (the text is a shell script), a value from outside the files is pasted only
    when it is made of characters the shell treats literally everywhere (``1.4.2``,
    ``127.0.1.5``). Any other external value is never pasted into the script: ``bind(value)``
    turns it into a variable reference (``${VMFARM_VALUE_1}``) whose value travels in the
    command's environment, so ``$(...)``, quotes or backticks in it are never executed, whether
    the expression stands bare, inside double quotes or in a here-document. Without ``bind``
    the expression is left for a later render (the worker's).
    """

    def sub(m: re.Match[str]) -> str:
        expr = m.group(1)
        if expr.strip() == "input":
            if ctx.allow_inputs:
                return m.group(0)
            msg = "runtime input <+input> has no value: give it with --set"
            if on_error:
                on_error(msg)
                return m.group(0)
            raise ExpressionError(msg)
        try:
            val = ctx.lookup(expr)
        except ExpressionError as exc:
            if on_error:
                on_error(str(exc))
                return m.group(0)
            raise
        if val is None:
            return m.group(0)
        if quote and val.external and not SAFE_VALUE_RE.fullmatch(val.text):
            return bind(val.text) if bind is not None else m.group(0)
        return val.text

    # Up to 5 rounds: a variable's value may itself hold an expression.
    out = text
    for _ in range(5):
        new = EXPR_RE.sub(sub, out)
        if new == out:
            break
        out = new
    return out


def expressions_in(text: str) -> list[str]:
    """The expressions named in ``text`` (without ``<+`` and ``>``)."""
    return [m.group(1).strip() for m in EXPR_RE.finditer(text)]


def render_script(
    text: str,
    ctx: Context,
    *,
    bind: Binder | None = None,
    on_error: Callable[[str], None] | None = None,
    secrets: Callable[[str], str] | None = None,
) -> str:
    """``render`` for a bash script: every value from outside the files stands in the form its
    quoting context needs (app.definitions.shell), so it reaches bash byte-identical, as one
    word, never executed; with ``bind`` it travels in the command's environment, without it
    (at submit) the expression is left for the worker. A value made only of characters the
    shell reads literally everywhere is pasted, so the plan stays readable. A value that no
    form can carry intact (a non-integer in arithmetic, a line that would end a quoted
    here-document) is an error naming the expression and why.

    With ``secrets`` (on the worker that runs the step) ``<+secrets.getValue("id")>`` is
    resolved by it and always travels in the environment, in any context where a variable can
    stand; never pasted, so a secret is never part of the script's text.
    """
    from app.definitions.shell import ShellSyntaxError, Where, places

    def fail(msg: str) -> None:
        if on_error is None:
            raise ExpressionError(msg)
        on_error(msg)

    out = text
    for _ in range(5):  # a value written in the files may itself hold an expression
        try:
            spots = places(out)
        except ShellSyntaxError as exc:
            if any(v is not None and v.external for v in _values(out, ctx)):
                fail(
                    f"vmfarm cannot tell where the values of this script stand ({exc}), so it "
                    "cannot pass them to bash intact"
                )
                return out
            return render(out, ctx, on_error=on_error)
        pieces: list[str] = []
        last = 0
        for p in spots:
            expr = p.expression
            if "<" in expr:
                continue
            if expr.strip() == "input":
                if not ctx.allow_inputs:
                    fail("runtime input <+input> has no value: give it with --set")
                continue
            secret = SECRET_RE.fullmatch(expr.strip())
            if secret is not None:
                if secrets is None or bind is None:
                    continue  # resolved by the worker that runs the step
                if p.where in (Where.ARITHMETIC, Where.HEREDOC_QUOTED):
                    fail(
                        f"<+{expr.strip()}> stands in a {p.where} (line {p.line}), where its "
                        "value would be written into the script: assign it to a variable "
                        "outside and use the variable there"
                    )
                    continue
                value = secrets(secret.group(2))
                pieces += [out[last : p.start], p.form(value, bind.name(value))]
                last = p.end
                continue
            try:
                val = ctx.lookup(expr)
            except ExpressionError as exc:
                fail(str(exc))
                continue
            if val is None:
                continue
            if not val.external:
                new = val.text
            else:
                why = p.refusal(val.text)
                if why:
                    fail(f"the value of <+{expr.strip()}> cannot be passed to bash intact: {why}")
                    continue
                if p.where in (Where.ARITHMETIC, Where.HEREDOC_QUOTED) or _readable(
                    val.text, p.where
                ):
                    new = val.text
                elif bind is not None:
                    new = p.form(val.text, bind.name(val.text))
                else:
                    continue  # the worker binds it
            pieces += [out[last : p.start], new]
            last = p.end
        new_out = "".join(pieces) + out[last:]
        if new_out == out:
            break
        out = new_out
    return out


# Words bash reads as syntax where a command may start, and so never pasted as bare words.
_RESERVED = frozenset(
    {
        "if",
        "then",
        "else",
        "elif",
        "fi",
        "case",
        "esac",
        "for",
        "select",
        "while",
        "until",
        "do",
        "done",
        "in",
        "function",
        "time",
        "coproc",
    }
)


def _readable(value: str, where: object) -> bool:
    """May this external value be pasted as it is (so the plan shows it)? Only a non-empty value
    of characters the shell reads literally everywhere; as a bare word, not a reserved word nor
    an assignment."""
    from app.definitions.shell import Where

    if not value or not SAFE_VALUE_RE.fullmatch(value):
        return False
    return where != Where.WORD or ("=" not in value and value not in _RESERVED)


def _values(text: str, ctx: Context) -> list[Value | None]:
    found: list[Value | None] = []
    for expr in expressions_in(text):
        try:
            found.append(ctx.lookup(expr))
        except ExpressionError:
            found.append(None)
    return found
