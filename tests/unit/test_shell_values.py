"""Values from outside the files reach a real bash byte-identical in every quoting context, as one
word, and are never executed; where no form can carry one intact, it is refused.

Every case renders a script the way a worker does (``render_script`` with a Binder), runs it with
a real ``bash`` and compares the bytes bash saw with the value."""

from __future__ import annotations

import os
import subprocess
from collections.abc import Callable
from pathlib import Path

import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from app.definitions.expressions import Binder, Context, ExpressionError, render_script
from app.definitions.shell import Where, places, unterminated

# (script with <+v>, what bash must write to $OUT for value v); None: refusal allowed.
CONTEXTS: dict[str, tuple[str, Callable[[str], str]]] = {
    "bare word": ('printf %s <+v> >"$OUT"', lambda v: v),
    "part of a word": ('printf %s /opt/work/<+v>.d >"$OUT"', lambda v: f"/opt/work/{v}.d"),
    "double quotes": ('printf %s "a <+v> b" >"$OUT"', lambda v: f"a {v} b"),
    "single quotes": ("printf %s 'a <+v> b' >\"$OUT\"", lambda v: f"a {v} b"),
    "$'...' quotes": ("printf %s $'a\\t<+v>' >\"$OUT\"", lambda v: f"a\t{v}"),
    "here-document": ('cat >"$OUT" <<EOF\nline <+v>\nEOF\n', lambda v: f"line {v}\n"),
    "quoted here-document": ("cat >\"$OUT\" <<'EOF'\n<+v>\nEOF\n", lambda v: f"{v}\n"),
    "command substitution": ('true "$(printf %s <+v> >"$OUT")"', lambda v: v),
    "backticks": ('true `printf %s <+v> >"$OUT"`', lambda v: v),
    "assignment": ('x=<+v>\nprintf %s "$x" >"$OUT"', lambda v: v),
    "array": ('a=(<+v> two)\nprintf %s "${#a[@]}:${a[0]}" >"$OUT"', lambda v: f"2:{v}"),
    "parameter default": ('printf %s ${NOT_SET_:-<+v>} >"$OUT"', lambda v: v),
    "case pattern": (
        'case "$V" in <+v>) printf match >"$OUT";; *) printf no >"$OUT";; esac',
        lambda v: "match",
    ),
    "[[ pattern ]]": (
        '[[ "$V" == <+v> ]] && printf match >"$OUT" || printf no >"$OUT"',
        lambda v: "match",
    ),
    "arithmetic": ('printf %s $(( <+v> + 1 )) >"$OUT"', lambda v: str(int(v) + 1)),
}
REFUSABLE = {"quoted here-document", "arithmetic"}

NASTY = [
    "$(touch pwned)",
    "`touch pwned`",
    "'; touch pwned; '",
    '"; touch pwned; "',
    "*",
    "-rf",
    "x /some/dir/keepme",
    "a\nb",
    "EOF",
    "${HOME}",
    "\\",
    '"',
    "'",
    "!!",
    "~",
    "{a,b}",
    "$'\\x41'",
    ")",
    "esac",
    "\n",
    "",
    " ",
    "\t",
    "a\\",
    "$((1+1))",
    "-1",
    "007",
    "12",
    "a[$(touch pwned)]",
]

values = st.one_of(
    st.sampled_from(NASTY),
    st.text(st.characters(blacklist_categories=("Cs",), blacklist_characters="\x00"), max_size=30),
    st.text(alphabet="$`'\"\\ \n\t*?[]{}()<>|&;!#~-=EOF", max_size=20),
)


def _run(template: str, value: str, tmp: Path) -> tuple[str | None, str | None]:
    """(what bash wrote, None), or (None, the refusal)."""
    ctx = Context()
    ctx.set("v", value, external=True)
    binder = Binder()
    try:
        script = render_script(template, ctx, bind=binder)
    except ExpressionError as exc:
        return None, str(exc)
    work = tmp / "work"
    work.mkdir()
    out = tmp / "out"
    env = {"PATH": os.environ["PATH"], "OUT": str(out), "V": value, **binder.env}
    res = subprocess.run(
        ["bash", "--noprofile", "--norc", "-c", script],
        cwd=work,
        env=env,
        capture_output=True,
        timeout=10,
    )
    assert res.returncode == 0, (script, res.stderr)
    assert list(work.iterdir()) == [], f"the value ran something: {script!r}"
    return out.read_bytes().decode("utf-8"), None


@pytest.mark.parametrize("name", list(CONTEXTS))
@settings(
    max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(value=values)
@example(value="x /some/dir/keepme")
@example(value="$(touch pwned)")
def test_a_value_reaches_bash_intact_or_is_refused(
    name: str, value: str, tmp_path_factory: pytest.TempPathFactory
) -> None:
    template, expected = CONTEXTS[name]
    got, refused = _run(template, value, tmp_path_factory.mktemp("bash"))
    if refused is not None:
        # Only where no form can carry the value, and the message says why
        assert name in REFUSABLE, refused
        assert "cannot be passed to bash intact" in refused
        return
    assert got == expected(value)


def test_refusals_name_why() -> None:
    ctx = Context()
    ctx.set("v", "1+1", external=True)
    with pytest.raises(ExpressionError, match=r"arithmetic expression.*only an integer"):
        render_script("echo $(( <+v> ))", ctx, bind=Binder())
    ctx.set("v", "ok\nEOF\nrm -rf /", external=True)
    with pytest.raises(ExpressionError, match=r"would end the quoted here-document <<.EOF."):
        render_script("cat <<'EOF'\n<+v>\nEOF\n", ctx, bind=Binder())


def test_values_from_the_files_are_pasted_and_safe_external_values_stay_readable() -> None:
    ctx = Context()
    ctx.set("env.name", "prod")
    ctx.set("artifact.tag", "1.4.2", external=True)
    ctx.set("input.note", "it's", external=True)
    binder = Binder()
    out = render_script("deploy <+env.name> <+artifact.tag> '<+input.note>'", ctx, bind=binder)
    assert out == "deploy prod 1.4.2 ''\"${VMFARM_VALUE_1}\"''"
    assert binder.env == {"VMFARM_VALUE_1": "it's"}


def test_without_a_binder_unsafe_values_are_left_for_the_worker() -> None:
    ctx = Context()
    ctx.set("v", "a b", external=True)
    assert render_script("echo <+v>", ctx) == "echo <+v>"


def test_places_know_the_context_of_each_expression() -> None:
    script = (
        "echo <+a> \"<+b>\" '<+c>' $'<+d>' # <+e>\n"
        "cat <<EOF\n<+f>\nEOF\ncat <<-'X'\n\t<+g>\n\tX\necho $(( <+h> )) $(echo <+i>)\n"
    )
    got = {p.expression: p.where for p in places(script)}
    assert got == {
        "a": Where.WORD,
        "b": Where.DOUBLE,
        "c": Where.SINGLE,
        "d": Where.ANSI,
        "e": Where.COMMENT,
        "f": Where.HEREDOC,
        "g": Where.HEREDOC_QUOTED,
        "h": Where.ARITHMETIC,
        "i": Where.WORD,
    }


def test_an_unterminated_expression_is_found_by_line() -> None:
    assert unterminated("a=1\nserver.port=<+serviceVariables.app_port\nb=<+x>\n") == [2]
    assert unterminated("echo <+a> > out") == []
