"""Looping strategies (``repeat``, ``matrix``, ``parallelism``): how a loop expands in the
plan, the values its iterations read, and what a file gets wrong refused at load with
file:line and the field."""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner

from app.definitions.loader import load
from app.definitions.models import LoopStrategy, iterations
from app.errors import VmfarmError
from tests.unit.test_spec import DATA, line_of, plan_of, refusal

LOOPS = DATA / "loops"
STATIC = DATA / "infra_loops.yaml"  # one static host (no lab needed to plan)


def loops_copy(tmp_path: Path, old: str = "", new: str = "") -> Path:
    """tests/data/loops copied to tmp_path, ``old`` (once in pipeline.yaml) replaced by ``new``."""
    dest = tmp_path / "loops"
    shutil.copytree(LOOPS, dest)
    if old:
        f = dest / "pipeline.yaml"
        text = f.read_text()
        assert text.count(old) == 1, f"{old!r} must occur once"
        f.write_text(text.replace(old, new))
    return dest


def _script(step: dict[str, Any]) -> str:
    return str(step["spec"]["commandUnits"][0]["spec"]["source"]["spec"]["script"])


def test_a_repeated_stage_is_one_stage_per_item_named_as_harness_names_them() -> None:
    plan = plan_of([LOOPS, STATIC])
    stages = plan["stages"]
    # Then the looped stage became three stages in order, then the stage after it
    assert [s["identifier"] for s in stages] == ["deploy_0", "deploy_1", "deploy_2", "smoke"]
    assert [s["name"] for s in stages[:3]] == [
        "Deploy_us-east-1",
        "Deploy_eu-west-1",
        "Deploy_ap-south-1",
    ]
    assert [s["index"] for s in stages] == [0, 1, 2, 3]
    assert stages[1]["loop"] == "repeat 2/3: eu-west-1"
    assert "loop" not in stages[3]
    # and each iteration's steps read its own item, index and identifier
    for i, region in enumerate(["us-east-1", "eu-west-1", "ap-south-1"]):
        (region_step,) = [s for s in stages[i]["steps"] if s["identifier"] == "region"]
        assert f"region {region} {i}" in _script(region_step)
        (install,) = [s for s in stages[i]["steps"] if s["identifier"] == "install"]
        assert f"deploy_{i}" in _script(install)


def test_a_matrix_expands_every_combination_but_the_excluded_ones() -> None:
    smoke = plan_of([LOOPS, STATIC])["stages"][3]
    probes = [s for s in smoke["steps"] if s["identifier"].startswith("probe")]
    assert [(s["identifier"], s["name"]) for s in probes] == [
        ("probe_0_0", "Probe_health_8080"),
        ("probe_0_1", "Probe_health_8081"),
        ("probe_1_0", "Probe_ready_8080"),
    ]
    assert "probe ready 8080" in _script(probes[2])
    assert probes[1]["loop"] == "matrix 2/3: endpoint=health, port=8081"


def test_a_looped_step_group_repeats_its_steps_and_names_them_uniquely() -> None:
    smoke = plan_of([LOOPS, STATIC])["stages"][3]
    again = [s for s in smoke["steps"] if s.get("group", "").startswith("twice")]
    assert [(s["identifier"], s["group"]) for s in again] == [
        ("again_0", "twice_0"),
        ("again_1", "twice_1"),
    ]
    assert [_script(s).split()[2:4] for s in again] == [["0/2", '_0"'], ["1/2", '_1"']]
    assert again[0]["loop"] == "parallelism 1/2"


def test_repeat_over_the_stage_hosts_is_the_phase_fan_out_and_caps_hosts_in_flight(
    tmp_path: Path,
) -> None:
    # Given the same pipeline with and without Harness's per-host repeat on the Command step
    hosts_loop = (
        "                  strategy:\n"
        "                    repeat:\n"
        "                      items: <+stage.output.hosts>\n"
        "                      maxConcurrency: 1\n"
    )
    with_it = plan_of([LOOPS, STATIC])["stages"][0]
    plain = loops_copy(tmp_path, hosts_loop, "")
    text = (plain / "pipeline.yaml").read_text()
    (plain / "pipeline.yaml").write_text(
        text.replace('"<+repeat.item> <+stage', '"<+instance.hostName> <+stage').replace(
            '"install <+repeat.item>"', '"install <+instance.hostName>"'
        )
    )
    without = plan_of([plain, STATIC])["stages"][0]
    # Then it is the same one step, <+repeat.item> standing for the host's name (not the
    # stage's item)
    (a,) = [s for s in with_it["steps"] if s["identifier"] == "install"]
    (b,) = [s for s in without["steps"] if s["identifier"] == "install"]
    assert [s["identifier"] for s in with_it["steps"]] == [
        s["identifier"] for s in without["steps"]
    ]
    assert 'echo "install <+instance.hostName>"' in _script(a)
    assert {k: v for k, v in a.items() if k != "loop"} == b
    # and its maxConcurrency caps the hosts in flight of the stage's phases
    assert with_it["strategy"].get("maxConcurrency") == 1
    assert "maxConcurrency" not in without["strategy"]
    assert "at most 1 at a time" in a["loop"]


def test_without_max_concurrency_the_hosts_repeat_is_taken_out_as_written(
    tmp_path: Path,
) -> None:
    folder = loops_copy(
        tmp_path,
        "                      items: <+stage.output.hosts>\n                      maxConcurrency: 1\n",
        "                      items: <+stage.output.hosts>\n",
    )
    stage = plan_of([folder, STATIC])["stages"][0]
    (install,) = [s for s in stage["steps"] if s["identifier"] == "install"]
    assert 'echo "install <+instance.hostName>"' in _script(install)
    assert "maxConcurrency" not in stage["strategy"]


def test_a_stricter_strategy_cap_wins_over_the_hosts_repeat(tmp_path: Path) -> None:
    folder = loops_copy(
        tmp_path,
        "              - identifier: lab\n          execution:\n            steps:\n"
        "              - step:\n                  type: Command\n                  name: Install",
        "              - identifier: lab\n          strategy:\n            type: Basic\n"
        "            maxConcurrency: 1\n          execution:\n            steps:\n"
        "              - step:\n                  type: Command\n                  name: Install",
    )
    text = (folder / "pipeline.yaml").read_text()
    (folder / "pipeline.yaml").write_text(
        text.replace(
            "items: <+stage.output.hosts>\n                      maxConcurrency: 1",
            "items: <+stage.output.hosts>\n                      maxConcurrency: 5",
        )
    )
    stage = plan_of([folder, STATIC])["stages"][0]
    assert stage["strategy"]["maxConcurrency"] == 1


@pytest.mark.parametrize(
    ("old", "new", "field", "message", "at"),
    [
        (
            "items: [us-east-1, eu-west-1, ap-south-1]",
            "items: us-east-1",
            "repeat.items",
            "items must be a list, got str 'us-east-1'",
            "items: us-east-1",
        ),
        (
            "items: [us-east-1, eu-west-1, ap-south-1]",
            "items: {a: 1}",
            "repeat.items",
            "items must be a list, got dict",
            "items: {a: 1}",
        ),
        (
            "items: [us-east-1, eu-west-1, ap-south-1]",
            "items: []",
            "repeat.items",
            "a loop needs at least one item",
            "items: []",
        ),
        (
            "items: [us-east-1, eu-west-1, ap-south-1]",
            "items: <+pipeline.variables.regions>",
            "repeat.items",
            "from an expression is not supported",
            "items: <+pipeline",
        ),
        (
            "            maxConcurrency: 1\n        spec:",
            "            maxConcurrency: 0\n        spec:",
            "repeat.maxConcurrency",
            "maxConcurrency must be at least 1, got 0",
            "maxConcurrency: 0",
        ),
        (
            "                    parallelism: 2",
            "                    parallelism: 2\n                    maxConcurrency: 2",
            "stepGroup.strategy",
            "maxConcurrency 2: vmfarm runs a step's (or step group's) iterations one after another",
            "parallelism: 2\n",
        ),
        (
            "                        - endpoint: ready",
            "                        - endpnt: ready",
            "strategy.matrix",
            "exclude[0] names 'endpnt', which is not a key of the matrix (keys: endpoint, port)",
            "endpnt: ready",
        ),
        (
            "                      port: [8080, 8081]",
            "                      port: 8080",
            "strategy.matrix",
            "matrix key 'port' must be a list",
            "endpoint: [health, ready]",
        ),
        (
            "                    parallelism: 2",
            "                    parallelism: 2\n                    matrix: {a: [1]}",
            "stepGroup.strategy",
            "holds one of repeat, matrix or parallelism, not matrix and parallelism",
            "parallelism: 2\n",
        ),
        (
            "                    parallelism: 2",
            "                    repeat: {items: <+stage.output.hosts>}",
            "stepGroup.strategy",
            "on a step group (put it on each Command step) it is not supported",
            "repeat: {items: <+stage.output.hosts>}",
        ),
        (
            "            items: [us-east-1, eu-west-1, ap-south-1]",
            "            items: [us-east-1, eu-west-1, ap-south-1]\n            count: 0",
            "repeat.count",
            "unknown field 'count'",
            "count: 0",
        ),
        (
            "            items: [us-east-1, eu-west-1, ap-south-1]",
            "            items: [us-east-1, eu-west-1, ap-south-1]\n            partitionSize: 2",
            "stage.strategy.repeat",
            "repeat's partitionSize is not supported: hosts in batches are a Deployment stage's "
            "strategy",
            "items: [us-east-1, eu-west-1, ap-south-1]",
        ),
        (
            "items: <+stage.output.hosts>",
            "items: <+repeat.partition>",
            "repeat.items",
            "items <+repeat.partition> (Harness's batches of hosts) is not supported",
            "items: <+repeat.partition>",
        ),
        (
            "                    parallelism: 2",
            "                    matrix: {a: [1], nodeName: x}",
            "stepGroup.strategy",
            "nodeName is not supported",
            "matrix: {a: [1], nodeName: x}",
        ),
    ],
)
def test_a_wrong_loop_is_refused_at_load_with_its_place(
    tmp_path: Path, old: str, new: str, field: str, message: str, at: str
) -> None:
    folder = loops_copy(tmp_path, old, new)
    with pytest.raises(VmfarmError) as exc:
        load([folder, STATIC], inputs={}, require_inputs=True)
    err = refusal(exc)
    assert message in err.message
    assert field in str(err)
    assert err.file.endswith("pipeline.yaml")
    assert err.line == _line(folder / "pipeline.yaml", at)


def _line(path: Path, needle: str) -> int:
    """The 1-based line where the only occurrence of ``needle`` (maybe several lines) starts."""
    text = path.read_text()
    assert text.count(needle) == 1, needle
    return text[: text.index(needle)].count("\n") + 1 + (len(needle) - len(needle.lstrip("\n")))


def test_an_unterminated_expression_in_an_item_is_refused_with_its_place(tmp_path: Path) -> None:
    folder = loops_copy(
        tmp_path, "items: [us-east-1, eu-west-1, ap-south-1]", "items: [us-east-1, <+stage.name]"
    )
    with pytest.raises(VmfarmError) as exc:
        load([folder, STATIC], inputs={}, require_inputs=True)
    err = refusal(exc)
    assert "unterminated expression '<+stage.name'" in err.message
    assert err.line == line_of(folder / "pipeline.yaml", "<+stage.name]")
    assert "items" in str(err)


def test_a_loop_value_outside_its_loop_is_an_unknown_expression(tmp_path: Path) -> None:
    folder = loops_copy(tmp_path, "probe <+matrix.endpoint>", "probe <+repeat.item>")
    with pytest.raises(VmfarmError) as exc:
        load([folder, STATIC], inputs={}, require_inputs=True)
    err = refusal(exc)
    assert "unknown expression <+repeat.item>" in err.message
    assert err.line == line_of(folder / "pipeline.yaml", "probe <+repeat.item>")


def test_items_may_name_values_known_before_the_stage(tmp_path: Path) -> None:
    folder = loops_copy(
        tmp_path,
        "items: [us-east-1, eu-west-1, ap-south-1]",
        "items: [<+env.name>-a, <+env.type>]",
    )
    stages = plan_of([folder, STATIC])["stages"]
    assert [s["name"] for s in stages[:2]] == ["Deploy_lab-a", "Deploy_PreProduction"]


def test_an_expanded_identifier_that_meets_another_stage_is_refused(tmp_path: Path) -> None:
    folder = loops_copy(tmp_path, "        identifier: smoke\n", "        identifier: deploy_1\n")
    with pytest.raises(VmfarmError) as exc:
        load([folder, STATIC], inputs={}, require_inputs=True)
    assert "stage identifier 'deploy_1' is given twice once the loops are expanded" in str(
        exc.value
    )


@pytest.mark.parametrize(
    ("data", "names"),
    [
        ({"repeat": {"items": ["a", 2, True]}}, ["a", "2", "true"]),
        ({"matrix": {"x": [1, 2], "y": ["p"]}}, ["1_p", "2_p"]),
        ({"matrix": {"x": [1, 2], "y": ["p", "q"], "exclude": [{"x": 1}]}}, ["2_p", "2_q"]),
        ({"parallelism": 3}, ["0", "1", "2"]),
    ],
)
def test_iterations_in_order(data: dict[str, Any], names: list[str]) -> None:
    its = iterations(LoopStrategy.model_validate(data))
    assert [i.label for i in its] == names
    assert [i.index for i in its] == list(range(len(names)))
    assert all(i.count == len(names) for i in its)


def test_an_exclude_that_leaves_nothing_is_refused() -> None:
    with pytest.raises(ValueError, match="exclude leaves no combination"):
        LoopStrategy.model_validate({"matrix": {"x": [1], "exclude": [{"x": 1}]}})


def test_vmfarm_plan_shows_how_the_loops_expand(tmp_path: Path) -> None:
    from cli.main import main

    res = CliRunner().invoke(
        main, ["plan", str(LOOPS), str(STATIC)], env={"VMFARM_HOME": str(tmp_path / "home")}
    )
    assert res.exit_code == 0, res.output
    assert "stage deploy_1:" in res.output
    assert "repeat 2/3: eu-west-1 (stage Deploy_eu-west-1)" in res.output
    assert "- probe_1_0 (Command)" in res.output
    assert "loop: matrix 3/3: endpoint=ready, port=8080" in res.output
    assert "probe_1_1" not in res.output  # excluded
    assert "at most 1 host(s) in flight in a phase" in res.output


def test_a_bad_loop_exits_2_from_the_command_line(tmp_path: Path) -> None:
    from cli.main import main

    folder = loops_copy(
        tmp_path,
        "            maxConcurrency: 1\n        spec:",
        "            maxConcurrency: -1\n        spec:",
    )
    res = CliRunner().invoke(
        main, ["plan", str(folder), str(STATIC)], env={"VMFARM_HOME": str(tmp_path / "home")}
    )
    assert res.exit_code == 2
    line = line_of(folder / "pipeline.yaml", "maxConcurrency: -1")
    assert f"pipeline.yaml:{line}:" in res.output
    assert "maxConcurrency must be at least 1" in res.output


def test_an_expanded_step_identifier_that_meets_another_step_is_refused(tmp_path: Path) -> None:
    folder = loops_copy(
        tmp_path,
        "                  strategy:\n                    parallelism: 2\n",
        "",
    )
    text = (folder / "pipeline.yaml").read_text()
    (folder / "pipeline.yaml").write_text(
        text.replace("identifier: again\n", "identifier: probe_0_1\n").replace(
            "<+strategy.iteration>/<+strategy.iterations> <+strategy.identifierPostFix>", "x"
        )
    )
    with pytest.raises(VmfarmError) as exc:
        load([folder, STATIC], inputs={}, require_inputs=True)
    assert "step identifier 'probe_0_1' is given twice in stage 'smoke'" in str(exc.value)


def test_a_stage_iteration_can_be_left_out_by_its_when(tmp_path: Path) -> None:
    from app.coordinator.machine import stage_skip
    from app.definitions.plan import Plan

    folder = loops_copy(
        tmp_path,
        "            maxConcurrency: 1\n        spec:",
        "            maxConcurrency: 1\n        when:\n          pipelineStatus: Success\n"
        '          condition: <+repeat.item> != "eu-west-1"\n        spec:',
    )
    plan = Plan.of(plan_of([folder, STATIC]))
    # Then only the eu-west-1 iteration is skipped, saying why
    why = [stage_skip(st, failed=False) for st in plan.stages]
    assert [bool(w) for w in why] == [False, True, False, False]
    assert 'condition "eu-west-1" != "eu-west-1" is false' in why[1]


def test_a_loop_next_to_a_stage_template_repeats_the_templated_stage(tmp_path: Path) -> None:
    from tests.unit.test_templates import SETS, plan, templated, tpl_copy

    # Given the templated pipeline with a repeat next to its stage's template reference
    root = tpl_copy(
        tmp_path,
        {
            "templated/pipeline.yaml": (
                "        identifier: deploy\n",
                "        identifier: deploy\n"
                "        strategy:\n"
                "          repeat:\n"
                "            items: [blue, <+pipeline.variables.release_note>]\n",
            )
        },
    )
    stages = plan(templated(root, SETS))["stages"]
    # Then the templated stage runs once per item, each one the template's stage
    assert [(s["identifier"], s["name"]) for s in stages] == [
        ("deploy_0", "Deploy hello_blue"),
        ("deploy_1", "Deploy hello_second release"),
    ]
    assert [s["identifier"] for s in stages[1]["steps"]] == ["install", "configure"]
    # and a bad loop there is refused where the pipeline wrote it
    bad = tpl_copy(
        tmp_path / "bad",
        {
            "templated/pipeline.yaml": (
                "        identifier: deploy\n",
                "        identifier: deploy\n        strategy:\n          parallelism: 0\n",
            )
        },
    )
    with pytest.raises(VmfarmError) as exc:
        templated(bad, SETS)
    err = refusal(exc)
    assert err.file.endswith("templated/pipeline.yaml")
    assert err.line == line_of(bad / "templated" / "pipeline.yaml", "parallelism: 0")


def test_harness_spec_host_of_the_hosts_repeat_is_dropped_with_or_without_a_cap(
    tmp_path: Path,
) -> None:
    # Given Harness's `spec.host: <+repeat.item>` on the step repeated over the hosts, with
    # its maxConcurrency (left to the looping strategies) and without
    for cap in ("                      maxConcurrency: 1\n", ""):
        folder = loops_copy(
            tmp_path / str(bool(cap)),
            "                      maxConcurrency: 1\n                  spec:\n",
            f"{cap}                  spec:\n                    host: <+repeat.item>\n",
        )
        stage = plan_of([folder, STATIC])["stages"][0]
        (install,) = [s for s in stage["steps"] if s["identifier"] == "install"]
        assert "host" not in install["spec"]
        assert 'echo "install <+instance.hostName>"' in _script(install)
        assert stage["strategy"].get("maxConcurrency") == (1 if cap else None)
