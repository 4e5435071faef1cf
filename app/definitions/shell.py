"""Where each ``<+...>`` expression stands in a bash script, and how a value gets there intact.

A value from outside the pipeline files (a runtime input, a host name, a cloud tag, an earlier
step's output) must reach bash byte-identical wherever the script names it, as one word, and
never be executed. Pasting it into the script text cannot do that (quotes, ``$(...)``, spaces,
globs, newlines), so it travels in the command's environment as ``VMFARM_VALUE_n`` and the
script names the variable, written for the quoting context the expression stands in:

    context                         the expression becomes        e.g. ``<+v>`` in
    word (unquoted)                 ``"${VMFARM_VALUE_1}"``        ``rm -rf /opt/<+v>``
    inside double quotes            ``${VMFARM_VALUE_1}``          ``echo "v=<+v>"``
    inside single quotes            ``'"${VMFARM_VALUE_1}"'``      ``echo 'v=<+v>'``
    inside $'...'                   ``'"${VMFARM_VALUE_1}"$'``     ``echo $'v=<+v>\\n'``
    unquoted here-document          ``${VMFARM_VALUE_1}``          ``cat <<EOF``
    quoted here-document            the value itself, when no line of it ends the document
    arithmetic (``$((..))``, ``((..))``, ``$[..]``)   the value itself, when it is an integer
    comment                         ``${VMFARM_VALUE_1}`` (inert)

Word splitting and globbing never apply to a quoted expansion, and bash never expands the
*result* of an expansion again, so the value is one word with its exact bytes. Where no form is
safe (a non-integer in arithmetic, a value that would end a quoted here-document early) the run
is refused: ``place.refusal(value)`` says why.

Beyond these contexts bash may evaluate a value a second time because the script asks it to:
``eval``, ``bash -c "..."``, ``ssh host "..."``, ``let``, ``declare -i`` and the arithmetic
comparisons of ``[[ ]]`` (``-eq``...). No quoting can protect a value from a script that runs it
as code; write such scripts to read the variable instead (``eval`` nothing).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from enum import StrEnum

EXPR_START = "<+"


class Where(StrEnum):
    """The quoting context an expression stands in."""

    WORD = "word"
    DOUBLE = "double quotes"
    SINGLE = "single quotes"
    ANSI = "$'...' quotes"
    HEREDOC = "here-document"
    HEREDOC_QUOTED = "quoted here-document"
    ARITHMETIC = "arithmetic"
    COMMENT = "comment"


@dataclass(frozen=True)
class Place:
    """One ``<+...>`` in a script: its span, its line (1-based) and its context."""

    start: int
    end: int
    line: int
    where: Where
    # A quoted here-document: its delimiter, and whether leading tabs are stripped (<<-).
    delimiter: str = ""
    strip_tabs: bool = False

    @property
    def expression(self) -> str:
        """Set by ``places``: the text between ``<+`` and ``>``."""
        return self._expr  # type: ignore[attr-defined, no-any-return]

    def refusal(self, value: str) -> str | None:
        """Why ``value`` cannot stand here intact, or None when it can."""
        if self.where == Where.ARITHMETIC and not _INTEGER.fullmatch(value):
            return (
                f"it stands in an arithmetic expression (line {self.line}), where bash would "
                "evaluate it: only an integer may stand there"
            )
        if self.where == Where.HEREDOC_QUOTED:
            for piece in value.split("\n"):
                if (piece.lstrip("\t") if self.strip_tabs else piece) == self.delimiter:
                    return (
                        f"a line of the value would end the quoted here-document "
                        f"<<'{self.delimiter}' (line {self.line}) early and run the rest"
                    )
            if self.strip_tabs and any(p.startswith("\t") for p in value.split("\n")):
                return (
                    f"bash strips leading tabs from the lines of a <<-'{self.delimiter}' "
                    f"here-document (line {self.line}), and some lines of the value have "
                    "them"
                )
        return None

    def form(self, value: str, name: str) -> str:
        """What replaces the expression: the environment variable ``name`` (holding ``value``)
        written for this context, or the value itself where bash reads it literally. Call
        ``refusal`` first."""
        ref = "${" + name + "}"
        match self.where:
            case Where.WORD:
                return f'"{ref}"'
            case Where.SINGLE:
                return f"'\"{ref}\"'"
            case Where.ANSI:
                return f"'\"{ref}\"$'"
            case Where.HEREDOC_QUOTED | Where.ARITHMETIC:
                return value
            case _:
                return ref


# A decimal integer bash reads as itself (a leading 0 means octal; 18 digits fit in 64 bits).
_INTEGER = re.compile(r"-?(0|[1-9][0-9]{0,17})")
_HEREDOC = re.compile(r"<<(-?)[ \t]*")
_WORD_END = set(" \t\n;&|()<>")


class ShellSyntaxError(ValueError):
    """The script cannot be read far enough to place its expressions (an unclosed quote)."""


def places(script: str) -> list[Place]:
    """Every ``<+...>`` of ``script`` with its context. An expression ends at the first ``>``
    on its line; one that does not end on its line is not an expression (``unterminated``
    finds those)."""
    out: list[Place] = []
    _Scanner(script, out).run()
    return out


def unterminated(script: str) -> list[int]:
    """Line numbers (1-based) of ``<+`` that has no ``>`` before the end of its line."""
    bad = []
    for n, line in enumerate(script.split("\n"), 1):
        i = line.find(EXPR_START)
        while i >= 0:
            end = line.find(">", i + 2)
            if end < 0:
                bad.append(n)
                break
            i = line.find(EXPR_START, end + 1)
    return bad


class _Scanner:
    """A small bash lexer: just enough to know the quoting context at every position."""

    def __init__(self, text: str, out: list[Place]) -> None:
        self.s = text
        self.i = 0
        self.out = out
        # Here-documents announced on the current line: (delimiter, quoted, strip tabs).
        self.pending: list[tuple[str, bool, bool]] = []

    # -- helpers ---------------------------------------------------------------------------------

    def line(self, at: int | None = None) -> int:
        return self.s.count("\n", 0, self.i if at is None else at) + 1

    def expr(self, where: Where, **extra: object) -> bool:
        """Record an expression at the cursor (if any) and skip it."""
        if not self.s.startswith(EXPR_START, self.i):
            return False
        eol = self.s.find("\n", self.i)
        end = self.s.find(">", self.i + 2, len(self.s) if eol < 0 else eol)
        if end < 0:
            return False
        place = Place(self.i, end + 1, self.line(), where, **extra)  # type: ignore[arg-type]
        object.__setattr__(place, "_expr", self.s[self.i + 2 : end])
        self.out.append(place)
        self.i = end + 1
        return True

    # -- contexts --------------------------------------------------------------------------------

    def run(self) -> None:
        self.words(closer=None)
        if self.i < len(self.s):
            raise ShellSyntaxError(f"unexpected {self.s[self.i]!r} on line {self.line()}")

    def words(self, closer: str | None, *, in_backticks: bool = False) -> None:
        """Unquoted shell text until ``closer`` (``)`` of ``$(``, a backtick) or the end."""
        s = self.s
        depth = 0
        at_word_start = True
        while self.i < len(s):
            c = s[self.i]
            if self.expr(Where.WORD):
                at_word_start = False
                continue
            if closer == ")" and c == ")" and depth == 0:
                return
            if closer == "`" and c == "`":
                return
            if c == "\\":
                self.i += 2
                at_word_start = False
                continue
            if c == "#" and at_word_start:
                self.comment()
                continue
            if c == "\n":
                self.i += 1
                self.heredoc_bodies()
                at_word_start = True
                continue
            if c == "'":
                self.i += 1
                self.single()
            elif s.startswith("$'", self.i):
                self.i += 2
                self.ansi()
            elif c == '"' or s.startswith('$"', self.i):
                self.i += 1 if c == '"' else 2
                self.double()
            elif s.startswith("$((", self.i) or (s.startswith("((", self.i) and at_word_start):
                self.i += 3 if c == "$" else 2
                self.arithmetic("))")
            elif s.startswith("$[", self.i):
                self.i += 2
                self.arithmetic("]")
            elif s.startswith("$(", self.i):
                self.i += 2
                self.words(closer=")")
                self.i += 1
            elif s.startswith("${", self.i):
                self.i += 2
                self.braces(Where.WORD)
            elif c == "`" and not in_backticks:
                self.i += 1
                self.words(closer="`", in_backticks=True)
                self.i += 1
            elif s.startswith("<<<", self.i):
                self.i += 3
            elif s.startswith("<<", self.i):
                self.announce_heredoc()
            else:
                if c == "(":
                    depth += 1
                elif c == ")":
                    depth -= 1
                self.i += 1
                at_word_start = c in _WORD_END
                continue
            at_word_start = False
        if closer is not None:
            raise ShellSyntaxError(f"unclosed {'$(' if closer == ')' else closer!r}")

    def comment(self) -> None:
        while self.i < len(self.s) and self.s[self.i] != "\n":
            if not self.expr(Where.COMMENT):
                self.i += 1

    def single(self) -> None:
        start = self.line()
        while self.i < len(self.s):
            if self.s[self.i] == "'":
                self.i += 1
                return
            if not self.expr(Where.SINGLE):
                self.i += 1
        raise ShellSyntaxError(f"unclosed single quote from line {start}")

    def ansi(self) -> None:
        start = self.line()
        while self.i < len(self.s):
            c = self.s[self.i]
            if c == "\\":
                self.i += 2
                continue
            if c == "'":
                self.i += 1
                return
            if not self.expr(Where.ANSI):
                self.i += 1
        raise ShellSyntaxError(f"unclosed $'...' quote from line {start}")

    def double(self, *, where: Where = Where.DOUBLE, until: str = '"') -> None:
        """Double-quoted text (or an unquoted here-document's body line: ``until`` '\\n')."""
        start = self.line()
        s = self.s
        while self.i < len(s):
            c = s[self.i]
            if self.expr(where):
                continue
            if c == until and until == '"':
                self.i += 1
                return
            if c == "\n" and until == "\n":
                return
            if c == "\\":
                self.i += 2
            elif s.startswith("$((", self.i):
                self.i += 3
                self.arithmetic("))")
            elif s.startswith("$(", self.i):
                self.i += 2
                self.words(closer=")")
                self.i += 1
            elif s.startswith("${", self.i):
                self.i += 2
                self.braces(where)
            elif c == "`":
                self.i += 1
                self.words(closer="`", in_backticks=True)
                self.i += 1
            else:
                self.i += 1
        if until == '"':
            raise ShellSyntaxError(f"unclosed double quote from line {start}")

    def braces(self, where: Where) -> None:
        """``${...}``: its operands are in the surrounding context."""
        s = self.s
        while self.i < len(s):
            c = s[self.i]
            if self.expr(where):
                continue
            if c == "}":
                self.i += 1
                return
            if c == "\\":
                self.i += 2
            elif c == "'" and where == Where.WORD:
                self.i += 1
                self.single()
            elif c == '"':
                self.i += 1
                self.double()
            elif s.startswith("${", self.i):
                self.i += 2
                self.braces(where)
            elif s.startswith("$(", self.i):
                self.i += 2
                self.words(closer=")")
                self.i += 1
            else:
                self.i += 1
        raise ShellSyntaxError("unclosed ${")

    def arithmetic(self, closer: str) -> None:
        s = self.s
        depth = 0
        while self.i < len(s):
            if self.expr(Where.ARITHMETIC):
                continue
            if depth == 0 and s.startswith(closer, self.i):
                self.i += len(closer)
                return
            c = s[self.i]
            if c == "(":
                depth += 1
            elif c == ")":
                depth -= 1
            elif s.startswith("$(", self.i) and not s.startswith("$((", self.i):
                self.i += 2
                self.words(closer=")")
            elif s.startswith("${", self.i):
                self.i += 2
                self.braces(Where.ARITHMETIC)
                continue
            self.i += 1
        raise ShellSyntaxError(f"unclosed arithmetic expression (missing {closer!r})")

    # -- here-documents --------------------------------------------------------------------------

    def announce_heredoc(self) -> None:
        m = _HEREDOC.match(self.s, self.i)
        assert m is not None
        self.i = m.end()
        strip = m.group(1) == "-"
        word = []
        quoted = False
        s = self.s
        while self.i < len(s) and s[self.i] not in _WORD_END:
            c = s[self.i]
            if c in "'\"":
                quoted = True
                end = s.find(c, self.i + 1)
                if end < 0:
                    raise ShellSyntaxError(
                        f"unclosed quote in a here-document delimiter on line {self.line()}"
                    )
                word.append(s[self.i + 1 : end])
                self.i = end + 1
            elif c == "\\":
                quoted = True
                word.append(s[self.i + 1 : self.i + 2])
                self.i += 2
            else:
                word.append(c)
                self.i += 1
        if not word:
            raise ShellSyntaxError(f"a here-document without a delimiter on line {self.line()}")
        self.pending.append(("".join(word), quoted, strip))

    def heredoc_bodies(self) -> None:
        """After a newline: the bodies of the here-documents announced on the line before."""
        pending, self.pending = self.pending, []
        s = self.s
        for delimiter, quoted, strip in pending:
            start = self.line()
            while True:
                if self.i >= len(s):
                    raise ShellSyntaxError(
                        f"here-document <<{delimiter} from line {start} "
                        f"never ends (no line '{delimiter}')"
                    )
                eol = s.find("\n", self.i)
                eol = len(s) if eol < 0 else eol
                text = s[self.i : eol]
                if (text.lstrip("\t") if strip else text) == delimiter:
                    self.i = min(eol + 1, len(s))
                    break
                if quoted:
                    while self.i < eol:
                        if not self.expr(
                            Where.HEREDOC_QUOTED, delimiter=delimiter, strip_tabs=strip
                        ):
                            self.i += 1
                else:  # expansions work here: $(...) may even run over several lines
                    self.double(where=Where.HEREDOC, until="\n")
                self.i = min(self.i + 1, len(s))
