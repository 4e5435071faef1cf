"""``when`` conditions: the little language (parsed, never eval'd), values bound as quoted
literals, and what a file gets wrong refused at load with file:line and the field."""

from __future__ import annotations

from pathlib import Path

import pytest

from app.definitions.conditions import ConditionError, bind, evaluate, parse
from app.definitions.loader import load
from app.errors import VmfarmError
from tests.unit.test_spec import GOOD, good_copy, line_of, plan_of, refusal, step

VALUES = {
    "env.type": "PreProduction",
    "env.name": "staging",
    "pipeline.variables.n": "3",
    "pipeline.variables.flag": "true",
    "pipeline.variables.q": 'say "hi" && true',
}


def judge(text: str) -> bool:
    return evaluate(parse(text), lambda name: VALUES[name])


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ('<+env.type> == "Production"', False),
        ('<+env.type> != "Production"', True),
        ("<+env.type> == 'PreProduction'", True),
        ('<+env.type> == "Production" || <+env.name> == "staging"', True),
        ('<+env.type> == "Production" || <+env.name> == "staging" && false', False),
        ('(<+env.type> == "Production" || <+env.name> == "staging") && true', True),
        ('!(<+env.name> == "staging")', False),
        ("!!true", True),
        ("<+pipeline.variables.n> == 3", True),
        ("<+pipeline.variables.n> == 3.0", True),
        ("<+pipeline.variables.n> != 4", True),
        ("<+pipeline.variables.flag>", True),
        ("<+pipeline.variables.flag> == true", True),
        ("<+env.name>", False),
        ('<+pipeline.variables.q> == "say \\"hi\\" && true"', True),
    ],
)
def test_conditions_read_as_harness_writes_them(text: str, expected: bool) -> None:
    assert judge(text) is expected


@pytest.mark.parametrize(
    ("text", "why"),
    [
        ("", "empty"),
        ("<+env.type> == Production", "unexpected word 'Production'"),
        ('<+env.type> = "Production"', "unexpected"),
        ('(<+env.type> == "Production"', "never closed"),
        ('<+env.type> == "a" == "b"', "chained comparisons"),
        ("<+env.type> == ", "ends too early"),
        ('__import__("os")', "unexpected word '__import__'"),
        ('"a" "b"', "join conditions with && or ||"),
        ("<+env.type> > 3", "unexpected"),
    ],
)
def test_a_condition_that_does_not_parse_says_why(text: str, why: str) -> None:
    with pytest.raises(ConditionError, match=why if why != "empty" else "is empty"):
        parse(text)


def test_bound_values_are_quoted_so_a_value_never_changes_the_condition() -> None:
    # Given a value made to look like code
    hostile = '" || true || "'
    bound = bind('<+pipeline.variables.x> == "safe"', lambda n: hostile)
    # Then it stays one string literal, and the condition stays false
    assert evaluate(parse(bound), lambda n: "") is False
    # and a value the binder does not know yet (a host's) is left for the worker
    assert bind('<+instance.name> == "a"', lambda n: None) == '<+instance.name> == "a"'


def test_a_plan_carries_conditions_with_the_known_values_bound(tmp_path: Path) -> None:
    folder = good_copy(
        tmp_path,
        pipeline=(
            "                  timeout: 5m\n",
            "                  timeout: 5m\n"
            "                  when:\n"
            "                    stageStatus: All\n"
            '                    condition: <+env.type> == "Production" || '
            '<+instance.name> != "x"\n',
        ),
    )
    plan = plan_of([folder], {"tag": "1.0"})
    when = step(plan, "install")["when"]
    assert when == {
        "stageStatus": "All",
        "condition": '"PreProduction" == "Production" || <+instance.name> != "x"',
    }


@pytest.mark.parametrize(
    ("when", "field", "message"),
    [
        ("condition: <+env.type> == Production", "when.condition", "unexpected word 'Production'"),
        ('condition: <+env.typo> == "x"', "when.condition", "unknown expression <+env.typo>"),
        ("stageStatus: Sometimes", "when.stageStatus", "Sometimes"),
        ("stageStatu: Failure", "when.stageStatu", "stageStatu"),
    ],
)
def test_a_wrong_step_when_is_refused_at_load_with_its_place(
    tmp_path: Path, when: str, field: str, message: str
) -> None:
    folder = good_copy(
        tmp_path,
        pipeline=(
            "                  timeout: 5m\n",
            f"                  timeout: 5m\n                  when:\n                    {when}\n",
        ),
    )
    with pytest.raises(VmfarmError) as exc:
        load([folder], inputs={"tag": "1.0"}, require_inputs=True)
        plan_of([folder], {"tag": "1.0"})
    err = refusal(exc)
    assert message in err.message
    assert field in str(err)
    assert err.line == line_of(folder / "pipeline.yaml", when.split(":")[0] + ":")


@pytest.mark.parametrize(
    ("when", "message"),
    [
        ("pipelineStatus: Sometimes", "Sometimes"),
        ("pipelineStatus: All\n          stageStatus: All", "not both"),
        ('condition: <+instance.name> == "a"', "known only on a host"),
    ],
)
def test_a_stage_when_vmfarm_cannot_carry_out_is_refused(
    tmp_path: Path, when: str, message: str
) -> None:
    folder = good_copy(
        tmp_path,
        pipeline=(
            "        type: Deployment\n",
            f"        type: Deployment\n        when:\n          {when}\n",
        ),
    )
    with pytest.raises(VmfarmError) as exc:
        plan_of([folder], {"tag": "1.0"})
    err = refusal(exc)
    assert message in err.message
    assert err.line == line_of(folder / "pipeline.yaml", when.split(":")[0] + ":")


def test_the_good_set_has_no_when_and_every_step_runs_as_before() -> None:
    plan = plan_of([GOOD], {"tag": "1.0"})
    assert all("when" not in s for s in plan["stages"][0]["steps"])
    assert plan["stages"][0].get("when") is None
