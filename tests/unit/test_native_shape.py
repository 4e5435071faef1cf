"""Harness's own document shape (``pipeline:``, ``service:``, ``environment:``,
``infrastructureDefinition:`` at the top) loads as written, errors name the fields as the file
does, and ``vmfarm convert`` moves files between the two shapes without changing their plan."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner

from app.definitions.loader import choose_pipeline, load
from app.definitions.native import convert_text
from app.definitions.resolve import resolve
from app.errors import SpecError, SpecErrors
from cli.main import main
from tests.unit.test_spec import GOOD, line_of

REPO = Path(__file__).resolve().parents[2]
DEMO = REPO / "configs" / "demo"
NATIVE_PIPELINE = """\
# deploy hello, as Harness writes it
pipeline:
  name: Deploy hello
  identifier: deploy_hello
  projectIdentifier: web
  orgIdentifier: default
  stages:
    - stage:
        name: deploy
        identifier: deploy
        type: Deployment
        spec:
          deploymentType: Ssh
          service:
            serviceRef: hello_app
          environment:
            environmentRef: test_env
            infrastructureDefinitions:
              - identifier: test_hosts
          execution:
            steps:
              - step:
                  type: Command
                  name: Say
                  identifier: say
                  spec:
                    commandUnits:
                      - identifier: hi
                        name: Hi
                        type: Script
                        spec:
                          shell: Bash
                          source:
                            type: Inline
                            spec:
                              script: echo hi <+service.name>
"""


def plan_json(paths: list[Path], inputs: dict[str, str]) -> dict[str, Any]:
    bundle = load(paths, inputs=inputs, require_inputs=True)
    return resolve(bundle, choose_pipeline(bundle, None), execution_id="EX1").to_json()


def comparable(plan: dict[str, Any], *roots: Path) -> Any:
    """The plan without where each part was written (files and lines differ by shape)."""
    text = json.dumps(plan, sort_keys=True)
    for root in roots:
        text = text.replace(str(root), "ROOT")
    text = re.sub(r'"(ROOT/[^":]*):\d+"', r'"\1:N"', text)
    data = json.loads(text)
    data.pop("files", None)
    return data


def good_with(tmp_path: Path, **replace: str) -> list[Path]:
    files = []
    for name in ("service", "environment", "infrastructure"):
        text = replace.get(name) or (GOOD / f"{name}.yaml").read_text()
        path = tmp_path / f"{name}.yaml"
        path.write_text(text)
        files.append(path)
    shutil.copytree(GOOD / "app", tmp_path / "app", dirs_exist_ok=True)
    return files


def test_a_native_pipeline_loads_and_plans_like_its_vmfarm_form(tmp_path: Path) -> None:
    files = good_with(tmp_path)
    native = tmp_path / "native.yaml"
    native.write_text(NATIVE_PIPELINE)
    converted = tmp_path / "converted" / "pipeline.yaml"
    converted.parent.mkdir()
    converted.write_text(convert_text(NATIVE_PIPELINE, "vmfarm"))
    assert converted.read_text().startswith(
        "# deploy hello, as Harness writes it\napiVersion: v1\nkind: Pipeline\nmetadata:\n"
    )
    a = plan_json([*files, native], {"tag": "1"})
    b = plan_json([*files, converted], {"tag": "1"})
    assert comparable(a, tmp_path) == comparable(b, tmp_path)


def test_every_kind_in_harness_shape_loads(tmp_path: Path) -> None:
    native = [tmp_path / f"{n}.yaml" for n in ("service", "environment", "infrastructure")]
    for n, path in zip(("service", "environment", "infrastructure"), native, strict=True):
        path.write_text(convert_text((GOOD / f"{n}.yaml").read_text(), "harness"))
    assert native[0].read_text().count("\nservice:\n") == 1
    assert "infrastructureDefinition:\n" in native[2].read_text()
    pipe = tmp_path / "pipeline.yaml"
    pipe.write_text(NATIVE_PIPELINE)
    (tmp_path / "app").mkdir()
    bundle = load([*native, pipe])
    assert sorted(bundle.services) == ["hello_app"]
    assert sorted(bundle.environments) == ["test_env"]
    assert sorted(bundle.infrastructures) == ["test_hosts"]
    assert sorted(bundle.pipelines) == ["deploy_hello"]


def test_an_error_in_a_native_file_names_the_field_as_the_file_does(tmp_path: Path) -> None:
    files = good_with(tmp_path)
    bad = tmp_path / "native.yaml"
    bad.write_text(NATIVE_PIPELINE.replace("type: Script", "type: Scriptx"))
    with pytest.raises((SpecError, SpecErrors)) as exc:
        load([*files, bad])
    errors = exc.value.errors if isinstance(exc.value, SpecErrors) else [exc.value]
    (err,) = errors
    assert err.file == str(bad)
    assert err.line == line_of(bad, "type: Scriptx")
    assert err.field == (
        "pipeline.stages[0].stage.spec.execution.steps[0].step.spec.commandUnits[0].type"
    )
    assert "unknown type 'Scriptx'" in err.message


def test_runtime_inputs_of_a_native_file_have_their_usual_names(tmp_path: Path) -> None:
    service = convert_text((GOOD / "service.yaml").read_text(), "harness")
    files = good_with(tmp_path, service=service)
    native = tmp_path / "native.yaml"
    native.write_text(NATIVE_PIPELINE)
    bundle = load([*files, native])
    assert [s.name for s in bundle.inputs] == ["service.hello_app.artifacts.primary.spec.tag"]


def test_convert_round_trip_of_the_demo_keeps_its_plan(tmp_path: Path) -> None:
    """`vmfarm convert --to harness` then `--to vmfarm` of configs/demo: the same plan at
    every step, and the text back where it started."""
    infra = (
        (GOOD / "infrastructure.yaml")
        .read_text()
        .replace("environmentRef: test_env", "environmentRef: lab")
        .replace("identifier: test_hosts", "identifier: lab")
    )
    roots = {}
    for name in ("original", "harness", "back"):
        root = tmp_path / name
        shutil.copytree(DEMO, root / "demo")
        (root / "infrastructure.yaml").write_text(infra)
        roots[name] = root
    runner = CliRunner()
    for name, to in (("harness", "harness"), ("back", "harness")):
        result = runner.invoke(main, ["convert", "--to", to, "--write", str(roots[name] / "demo")])
        assert result.exit_code == 0, result.output
    result = runner.invoke(
        main, ["convert", "--to", "vmfarm", "--write", str(roots["back"] / "demo")]
    )
    assert result.exit_code == 0, result.output
    assert "\npipeline:\n" in (roots["harness"] / "demo" / "pipeline.yaml").read_text()
    for f in ("pipeline.yaml", "service.yaml", "environment.yaml"):
        assert (roots["back"] / "demo" / f).read_text() == (DEMO / f).read_text(), f
    plans = {
        name: comparable(
            plan_json([root / "demo", root / "infrastructure.yaml"], {"tag": "1.0"}), root
        )
        for name, root in roots.items()
    }
    assert plans["harness"] == plans["original"]
    assert plans["back"] == plans["original"]


def test_convert_prints_and_leaves_templates_alone(tmp_path: Path) -> None:
    tpl = REPO / "tests" / "data" / "templates" / "reference" / "service_template.yaml"
    result = CliRunner().invoke(main, ["convert", "--to", "harness", str(tpl)])
    assert result.exit_code == 0
    assert result.output.rstrip("\n") == tpl.read_text().rstrip("\n")
