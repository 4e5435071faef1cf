"""A looped stage whose environment, infrastructure or service reads its loop (one stage per
environment or region, as Harness writes it): every iteration deploys where its values say,
checked at load like a written reference, and permissions follow each iteration's
environment."""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner

from app.definitions.loader import load
from app.errors import SpecError, SpecErrors, VmfarmError
from app.rbac import required_permissions
from tests.unit.test_spec import DATA, line_of, plan_of

TARGETS = DATA / "loop_targets"


def targets_copy(tmp_path: Path, edits: dict[str, str]) -> Path:
    """tests/data/loop_targets copied, each ``old`` (once in pipeline.yaml) replaced by ``new``."""
    dest = tmp_path / "loop_targets"
    shutil.copytree(TARGETS, dest)
    f = dest / "pipeline.yaml"
    text = f.read_text()
    for old, new in edits.items():
        assert text.count(old) == 1, f"{old!r} must occur once"
        text = text.replace(old, new)
    f.write_text(text)
    return dest


def _script(stage: dict[str, Any]) -> str:
    return str(stage["steps"][0]["spec"]["commandUnits"][0]["spec"]["source"]["spec"]["script"])


def _errors(exc: pytest.ExceptionInfo[VmfarmError]) -> list[SpecError]:
    errs = exc.value.errors if isinstance(exc.value, SpecErrors) else [exc.value]
    assert all(isinstance(e, SpecError) for e in errs)
    return [e for e in errs if isinstance(e, SpecError)]


def test_each_iteration_deploys_to_the_environment_and_hosts_its_item_names() -> None:
    stages = plan_of([TARGETS])["stages"]
    assert [s["identifier"] for s in stages] == ["deploy_0", "deploy_1"]
    qa, prod = stages
    assert (qa["environment"]["identifier"], qa["environment"]["type"]) == ("qa", "PreProduction")
    assert (prod["environment"]["identifier"], prod["environment"]["type"]) == (
        "prod",
        "Production",
    )
    assert [h["hostname"] for i in qa["infrastructures"] for h in i["spec"]["hosts"]] == [
        "127.0.0.1"
    ]
    assert [h["hostname"] for i in prod["infrastructures"] for h in i["spec"]["hosts"]] == [
        "127.0.0.2"
    ]
    # and each iteration's steps read its own environment and infrastructure
    assert _script(qa) == 'echo "qa PreProduction qa_vms"'
    assert _script(prod) == 'echo "prod Production prod_vms"'


def test_permissions_follow_each_iteration_environment() -> None:
    """Deploying to prod through a loop needs the production permission on prod, as a
    written environmentRef: prod would."""
    needs = required_permissions("run", plan_of([TARGETS]))
    envs = {(n.permission, n.resource) for n in needs if n.permission.startswith("environment:")}
    assert envs == {
        ("environment:deploy:non-production", "qa"),
        ("environment:deploy:production", "prod"),
    }


def test_an_environment_without_infrastructures_listed_takes_its_only_one(tmp_path: Path) -> None:
    folder = targets_copy(
        tmp_path,
        {
            "            infrastructureDefinitions:\n              - identifier: <+repeat.item>_vms\n": ""
        },
    )
    stages = plan_of([folder])["stages"]
    assert [[i["identifier"] for i in s["infrastructures"]] for s in stages] == [
        ["qa_vms"],
        ["prod_vms"],
    ]


def test_a_matrix_chooses_environment_and_infrastructure_apart(tmp_path: Path) -> None:
    folder = targets_copy(
        tmp_path,
        {
            "repeat:\n            items: [qa, prod]": "matrix:\n            env: [qa, prod]",
            "environmentRef: <+repeat.item>": "environmentRef: <+matrix.env>",
            "identifier: <+repeat.item>_vms": "identifier: <+matrix.env>_vms",
        },
    )
    stages = plan_of([folder])["stages"]
    assert [s["environment"]["identifier"] for s in stages] == ["qa", "prod"]


def test_an_iteration_naming_an_unknown_environment_is_refused_with_its_item(
    tmp_path: Path,
) -> None:
    folder = targets_copy(tmp_path, {"items: [qa, prod]": "items: [qa, staging]"})
    with pytest.raises(VmfarmError) as exc:
        load([folder], inputs={}, require_inputs=True)
    messages = [(e.message, e.line) for e in _errors(exc)]
    env_line = line_of(folder / "pipeline.yaml", "environmentRef:")
    assert any(
        "Environment 'staging' is not defined" in msg
        and "iteration repeat 2/2: staging" in msg
        and line == env_line
        for msg, line in messages
    ), messages
    # its infrastructure too, and nothing about the iteration that is right
    assert any("Infrastructure 'staging_vms'" in msg for msg, _ in messages), messages
    assert not any("'qa" in msg for msg, _ in messages), messages


def test_an_infrastructure_of_another_environment_is_refused(tmp_path: Path) -> None:
    folder = targets_copy(tmp_path, {"identifier: <+repeat.item>_vms": "identifier: qa_vms"})
    with pytest.raises(VmfarmError) as exc:
        load([folder], inputs={}, require_inputs=True)
    (err,) = _errors(exc)
    assert "infrastructure 'qa_vms' belongs to environment 'qa', not 'prod'" in err.message
    assert "iteration repeat 2/2: prod" in err.message


@pytest.mark.parametrize(
    ("edits", "said", "at"),
    [
        (
            {"environmentRef: <+repeat.item>": "environmentRef: <+pipeline.variables.env>"},
            "reads only its loop's values",
            "environmentRef:",
        ),
        (
            {"items: [qa, prod]": "items: [qa, <+pipeline.name>]"},
            "the loop's items are written out",
            "items:",
        ),
        (
            {"        strategy:\n          repeat:\n            items: [qa, prod]\n": ""},
            "this stage has none",
            "environmentRef:",
        ),
    ],
    ids=["another-expression", "items-are-expressions", "no-loop"],
)
def test_a_target_the_files_do_not_fix_is_refused(
    tmp_path: Path, edits: dict[str, str], said: str, at: str
) -> None:
    folder = targets_copy(tmp_path, edits)
    with pytest.raises(VmfarmError) as exc:
        load([folder], inputs={}, require_inputs=True)
    errs = _errors(exc)
    hit = [e for e in errs if said in e.message]
    assert hit, [e.message for e in errs]
    assert hit[0].file.endswith("pipeline.yaml")
    assert hit[0].line == line_of(folder / "pipeline.yaml", at)


def test_the_cli_refuses_with_exit_2_and_runs_nothing(tmp_path: Path) -> None:
    from cli.main import main

    folder = targets_copy(tmp_path, {"items: [qa, prod]": "items: [qa, staging]"})
    result = CliRunner().invoke(main, ["plan", str(folder)])
    assert result.exit_code == 2, result.output
    assert "Environment 'staging' is not defined" in result.output
    assert "pipeline.yaml:" in result.output
