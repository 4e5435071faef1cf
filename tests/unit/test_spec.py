"""Loading pipeline files and rendering their expressions, without a network or a ledger.

The good set (tests/data/good) is the base; tests that need a variation write a small file next
to it in tmp_path. What is asserted is what a user sees: the plan that would run, the values that
land in scripts, and the file:line:col and field of every refusal.
"""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest

from app.definitions.bundle import Bundle
from app.definitions.expressions import Context, ExpressionError, render
from app.definitions.inputs import apply_inputs
from app.definitions.loader import choose_pipeline, load
from app.definitions.resolve import resolve
from app.definitions.yamlload import load_documents
from app.errors import SpecError, SpecErrors, VmfarmError

DATA = Path(__file__).resolve().parents[1] / "data"
GOOD = DATA / "good"
REFERENCE = DATA / "reference"


def good_copy(tmp_path: Path, **replace: tuple[str, str]) -> Path:
    """The good set copied to tmp_path, with ``file=(old, new)`` text replacements applied."""
    dest = tmp_path / "good"
    shutil.copytree(GOOD, dest)
    for stem, (old, new) in replace.items():
        f = dest / f"{stem}.yaml"
        text = f.read_text()
        assert text.count(old) == 1, f"{old!r} must occur once in {f.name}"
        f.write_text(text.replace(old, new))
    return dest


def line_of(path: Path, needle: str) -> int:
    """The 1-based line of the only line of ``path`` that contains ``needle``."""
    (line,) = [i for i, t in enumerate(path.read_text().split("\n"), 1) if needle in t]
    return line


def plan_of(
    paths: list[Path], inputs: dict[str, str] | None = None, *, execution_id: str = "EX1"
) -> dict[str, Any]:
    bundle = load(paths, inputs=inputs or {}, require_inputs=True)
    return resolve(bundle, choose_pipeline(bundle, None), execution_id=execution_id).to_json()


def step(plan: dict[str, Any], ident: str) -> dict[str, Any]:
    found: list[dict[str, Any]] = [
        s for s in plan["stages"][0]["steps"] if s["identifier"] == ident
    ]
    assert len(found) == 1
    return found[0]


def script(plan: dict[str, Any], step_ident: str, unit: str) -> str:
    (u,) = [u for u in step(plan, step_ident)["spec"]["commandUnits"] if u["identifier"] == unit]
    return str(u["spec"]["source"]["spec"]["script"])


def env_vars(plan: dict[str, Any], step_ident: str) -> dict[str, Any]:
    return {v["name"]: v["value"] for v in step(plan, step_ident)["spec"]["environmentVariables"]}


def refusal(exc: pytest.ExceptionInfo[VmfarmError]) -> SpecError:
    """The one error of a refusal (a load reports every problem; these tests make one)."""
    errors = exc.value.errors if isinstance(exc.value, SpecErrors) else [exc.value]
    assert len(errors) == 1, "\n".join(map(str, errors))
    assert isinstance(errors[0], SpecError)
    return errors[0]


# --- the reference examples --------------------------------------------------------------------


def test_reference_examples_load() -> None:
    bundle = load([REFERENCE])
    assert sorted(bundle.services) == ["web_app_vm"]
    assert sorted(bundle.environments) == ["prod_vm_env"]
    assert sorted(bundle.pipelines) == ["vm_deployment_pipeline"]
    steps = bundle.pipelines["vm_deployment_pipeline"].model.spec.stages[0].stage.spec.execution
    assert [s.step.identifier for s in steps.steps] == [
        "stop_app",
        "deploy_artifact",
        "configure_app",
        "start_app",
    ]


@pytest.mark.parametrize(
    ("file", "needle", "says"),
    [
        ("cicd_pipeline.yaml", "type: CI", "vmfarm deploys and does not build"),
        ("terraform_pipeline.yaml", "secretManagerRef", "secretManagerRef is not supported"),
    ],
)
def test_reference_pipelines_vmfarm_cannot_run_are_refused_with_the_reason(
    file: str, needle: str, says: str
) -> None:
    """The reference's CI/CD and Terraform pipelines, verbatim: refused where the unsupported
    thing is written (a CI stage; the Terraform plan's secretManagerRef), saying why (not
    'unknown type')."""
    path = DATA / "reference_refused" / file
    with pytest.raises((SpecError, SpecErrors)) as exc:
        load([path])
    errors = exc.value.errors if isinstance(exc.value, SpecErrors) else [exc.value]
    hit = [e for e in errors if says in e.message and e.line == line_of(path, needle)]
    assert hit, [(e.line, e.message) for e in errors]
    assert "unknown type" not in hit[0].message


def test_identifier_is_derived_from_the_name_when_missing() -> None:
    bundle = load([REFERENCE])
    # infrastructure.yaml has metadata.name 'aws-ec2-infrastructure' and no identifier.
    infra = bundle.infrastructures["aws_ec2_infrastructure"]
    assert infra.model.metadata.identifier is None
    assert infra.model.metadata.name == "aws-ec2-infrastructure"
    assert infra.model.spec.environment_ref == "prod_vm_env"


def test_inline_infrastructure_definitions_become_infrastructures() -> None:
    bundle = load([REFERENCE])
    inline = bundle.infrastructures["aws_prod_infra"]
    assert inline.kind == "Infrastructure"
    assert inline.doc.file.endswith("environment.yaml")
    assert inline.model.spec.environment_ref == "prod_vm_env"
    assert inline.model.spec.type == "SshWinRmAws"
    assert inline.model.spec.spec.region == "us-east-1"
    assert inline.model.spec.spec.tags == {"Environment": "production", "Team": "platform"}


def test_reference_artifact_is_fetched_from_its_connector() -> None:
    """The reference's Artifactory artifact names only a connector (reference/connectors.yaml
    defines it): the plan holds the connector's server URL and its password's secret id, never
    a secret's value."""
    bundle = load([REFERENCE], inputs={"tag": "1.0"}, require_inputs=True)
    plan = resolve(bundle, choose_pipeline(bundle, None), execution_id="EX1").to_json()
    spec = plan["stages"][0]["artifact"]["spec"]
    assert spec["baseUrl"] == "https://artifactory.example.com/artifactory"
    assert (spec["username"], spec["passwordRef"]) == ("deployer", "account.artifactory_password")
    (infra,) = plan["stages"][0]["infrastructures"]
    assert infra["connector"] == {
        "identifier": "aws_connector",
        "type": "Aws",
        "credential": {"type": "InheritFromDelegate"},
    }


# --- runtime inputs (--set) ---------------------------------------------------------------------


def test_short_set_key_fills_the_service_tag() -> None:
    bundle = load([GOOD], inputs={"tag": "2.5.0"}, require_inputs=True)
    (slot,) = bundle.inputs
    assert slot.name == "service.hello_app.artifacts.primary.spec.tag"
    art = bundle.services["hello_app"].model.spec.service_definition.spec.artifacts.primary
    assert art is not None and art.spec["tag"] == "2.5.0"


@pytest.mark.parametrize(
    "key", ["service.hello_app.artifacts.primary.spec.tag", "primary.spec.tag", "spec.tag"]
)
def test_longer_set_keys_match_the_input_name_from_its_end(key: str) -> None:
    plan = plan_of([GOOD], {key: "3.0"})
    assert plan["stages"][0]["artifact"]["tag"] == "3.0"


def test_unknown_set_key_is_refused_naming_the_known_inputs() -> None:
    with pytest.raises(SpecError) as exc:
        load([GOOD], inputs={"tga": "1.0"}, require_inputs=True)
    assert exc.value.file == "--set"
    assert "'tga'" in exc.value.message
    assert "service.hello_app.artifacts.primary.spec.tag" in exc.value.message


def test_missing_input_is_refused_only_when_required() -> None:
    assert load([GOOD], require_inputs=False).inputs  # validate: fine, the input is listed
    with pytest.raises(SpecError) as exc:
        load([GOOD], require_inputs=True)
    assert exc.value.file.endswith("good/service.yaml")
    assert (exc.value.line, exc.value.col) == (line_of(GOOD / "service.yaml", "tag:"), 18)
    assert exc.value.field == "spec.serviceDefinition.spec.artifacts.primary.spec.tag"
    assert "--set service.hello_app.artifacts.primary.spec.tag=VALUE" in exc.value.message
    assert "--set tag=VALUE" in exc.value.message


def test_input_default_is_used_unless_set(tmp_path: Path) -> None:
    files = good_copy(tmp_path, service=("tag: <+input>", "tag: <+input>.default(1.2.3)"))
    assert plan_of([files])["stages"][0]["artifact"]["tag"] == "1.2.3"
    assert plan_of([files], {"tag": "9.9"})["stages"][0]["artifact"]["tag"] == "9.9"


def test_input_allowed_values(tmp_path: Path) -> None:
    files = good_copy(tmp_path, service=("tag: <+input>", "tag: <+input>.allowedValues(1.0, 2.0)"))
    assert plan_of([files], {"tag": "2.0"})["stages"][0]["artifact"]["tag"] == "2.0"
    with pytest.raises((SpecError, SpecErrors)) as exc:
        load([files], inputs={"tag": "3.0"}, require_inputs=True)
    err = refusal(exc)
    assert "'3.0' is not one of the allowed values ['1.0', '2.0']" in err.message
    assert err.file == str(files / "service.yaml")
    assert err.line == line_of(files / "service.yaml", "tag:")
    assert err.field.endswith("primary.spec.tag")


def test_apply_inputs_reports_which_values_came_from_outside() -> None:
    docs = load_documents("kind: Service\nmetadata: {name: s}\nspec: {tag: <+input>}\n", "s.yaml")
    slots, external = apply_inputs(docs, {"tag": "7"}, require=True)
    assert [s.name for s in slots] == ["service.s.tag"]
    assert docs[0].data["spec"]["tag"] == "7"
    assert external == {("s.yaml", 0, ("spec", "tag"))}


# --- resolve: expressions ------------------------------------------------------------------------


def test_resolve_renders_host_independent_expressions() -> None:
    plan = plan_of([GOOD], {"tag": "1.0"}, execution_id="EX42")
    assert env_vars(plan, "install") == {"INSTALL_DIR": "/opt/hello", "VERSION": "1.0"}
    assert env_vars(plan, "configure") == {"PORT": "8080"}
    prepare = script(plan, "install", "prepare")
    assert 'echo "hello-app -> test-env (PreProduction)"' in prepare
    assert "echo run EX42: first release\n" in prepare
    assert "echo version 1.0\n" in prepare
    assert "<+" not in prepare
    assert plan["stages"][0]["artifact"]["fileName"] == "hello_app-1.0.tar.gz"
    assert plan["stages"][0]["artifact"]["spec"]["path"] == str(GOOD / "app")


def test_resolve_leaves_host_expressions_for_the_worker() -> None:
    conf = script(plan_of([GOOD], {"tag": "1.0"}), "configure", "write_config")
    assert "host=<+instance.hostName>\n" in conf
    assert "ip=<+instance.host.privateIp>\n" in conf
    assert "region=<+infra.region>\n" in conf
    assert "greeting=hello there\n" in conf  # ...while the rest is rendered


def test_resolve_keeps_the_static_hosts_and_their_regions() -> None:
    (infra,) = plan_of([GOOD], {"tag": "1.0"})["stages"][0]["infrastructures"]
    assert infra["provider"] == "static"
    assert infra["spec"]["region"] == "r1"
    assert [(h["hostname"], h.get("region")) for h in infra["spec"]["hosts"]] == [
        ("127.0.1.201", None),
        ("127.0.1.202", "r2"),
    ]


def run_as_worker(plan: dict[str, Any], step_ident: str, unit: str, tmp_path: Path) -> str:
    """Render a unit's script for one host exactly as the worker does, and run it in bash."""
    from app.connectors.base import env_prelude
    from app.definitions.expressions import Binder, render_script
    from app.definitions.plan import DeploymentStagePlan
    from app.providers.base import Host
    from app.units import host_context

    stage = DeploymentStagePlan.model_validate(plan["stages"][0])
    host = Host(name="127.0.1.201", address="127.0.1.201", region="r1", infrastructure="i")
    binder = Binder()
    text = render_script(script(plan, step_ident, unit), host_context(host, stage), bind=binder)
    assert "<+" not in text.split("\n", 3)[0]
    done = subprocess.run(
        ["bash", "-c", env_prelude(binder.env) + text],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=30,
    )
    return done.stdout


@pytest.mark.parametrize(
    "hostile",
    [
        "1.0; touch pwned",
        "$(touch pwned)",
        "`touch pwned`",
        "1.0' ; touch pwned; echo '",
        '1.0" ; touch pwned; "',
    ],
)
def test_a_runtime_input_never_runs_as_shell_code(hostile: str, tmp_path: Path) -> None:
    # Given a value given at run time that holds shell syntax (the tag may say anything: its
    # input has its own pattern)
    files = good_copy(
        tmp_path,
        pipeline=("value: first release", "value: <+input>"),
        service=("tag: <+input>", "tag: <+input>.regex(.*)"),
    )
    plan = plan_of([files], {"tag": hostile, "release_note": hostile})
    # When the worker renders and runs the script that names it
    out = run_as_worker(plan, "install", "prepare", tmp_path)
    # Then the value is printed as it was given and nothing was executed
    assert f"version {hostile}\n" in out and f"run EX1: {hostile}\n" in out
    assert not (tmp_path / "pwned").exists()
    # An environment variable is a value, not shell text: it stays as given.
    assert env_vars(plan, "install")["VERSION"] == hostile


@pytest.mark.parametrize(
    "tag", ["../../../../etc", "x /some/dir/keepme", "-rf", "1.0/evil", "1.0; touch pwned"]
)
def test_a_tag_that_is_not_a_version_is_refused_before_anything_runs(tag: str) -> None:
    with pytest.raises(SpecError) as info:
        plan_of([GOOD], {"tag": tag})
    err = info.value
    assert err.file.endswith("service.yaml") and err.line == line_of(
        GOOD / "service.yaml", "tag: <+input>"
    )
    assert f"artifact tag {tag!r} is not a version" in err.message


def test_a_safe_runtime_input_is_written_into_the_script_as_is() -> None:
    plan = plan_of([GOOD], {"tag": "1.4.2"})
    assert "echo version 1.4.2" in script(plan, "install", "prepare")


def test_runtime_input_reached_through_a_variable_is_protected_too(tmp_path: Path) -> None:
    files = good_copy(tmp_path, pipeline=("value: first release", "value: <+input>"))
    plan = plan_of([files], {"tag": "1.0", "release_note": "$(touch pwned)"})
    out = run_as_worker(plan, "install", "prepare", tmp_path)
    assert "run EX1: $(touch pwned)\n" in out
    assert not (tmp_path / "pwned").exists()


def test_values_written_in_the_files_are_inserted_as_written(tmp_path: Path) -> None:
    """The files' author writes shell on purpose: their values are not quoted."""
    files = good_copy(tmp_path, service=("value: hello there", "value: hi; echo $HOME"))
    conf = script(plan_of([files], {"tag": "1.0"}), "configure", "write_config")
    assert "greeting=hi; echo $HOME\n" in conf


def test_unknown_expression_names_the_known_ones() -> None:
    ctx = Context()
    ctx.set("serviceVariables.app_port", "8080")
    with pytest.raises(
        ExpressionError,
        match=r"<\+serviceVariables\.nope> \(known: "
        r"serviceVariables\.app_port\)",
    ):
        render("<+serviceVariables.nope>", ctx)


def test_render_binds_only_unsafe_external_values_and_only_in_scripts() -> None:
    from app.definitions.expressions import Binder

    ctx = Context()
    ctx.set("artifact.tag", "a b", external=True)
    ctx.set("env.name", "c d")
    binder = Binder()
    assert render("x <+artifact.tag> <+env.name>", ctx, quote=True, bind=binder) == (
        "x ${VMFARM_VALUE_1} c d"
    )
    assert binder.env == {"VMFARM_VALUE_1": "a b"}
    # Without a binder (plan time) the unsafe value waits for the worker's render.
    assert render("x <+artifact.tag>", ctx, quote=True) == "x <+artifact.tag>"
    assert render("x <+artifact.tag> <+env.name>", ctx) == "x a b c d"
    assert render("<+instance.hostName> <+steps.a.output.x>", ctx) == (
        "<+instance.hostName> <+steps.a.output.x>"
    )


def test_unfilled_input_is_kept_only_when_allowed() -> None:
    ctx = Context(allow_inputs=True)
    assert render("v=<+input>", ctx) == "v=<+input>"
    with pytest.raises(ExpressionError, match="runtime input"):
        render("v=<+input>", Context())


# --- choose_pipeline -----------------------------------------------------------------------------


def two_pipelines(tmp_path: Path) -> Bundle:
    files = good_copy(tmp_path)
    text = (files / "pipeline.yaml").read_text()
    (files / "second.yaml").write_text(text.replace("identifier: hello\n", "identifier: bye\n"))
    return load([files])


def test_choose_pipeline_takes_the_only_one() -> None:
    assert choose_pipeline(load([GOOD]), None).ident == "hello"


def test_choose_pipeline_among_several(tmp_path: Path) -> None:
    bundle = two_pipelines(tmp_path)
    assert choose_pipeline(bundle, "bye").ident == "bye"
    with pytest.raises(
        SpecError,
        match=r"several pipelines; choose one with --pipeline "
        r"\(bye, hello\)",
    ):
        choose_pipeline(bundle, None)
    with pytest.raises(SpecError, match="did you mean 'hello'"):
        choose_pipeline(bundle, "helo")


# --- positions of errors -------------------------------------------------------------------------


def test_errors_carry_file_line_col_and_field() -> None:
    bad = DATA / "bad" / "unknown_field.yaml"
    with pytest.raises(SpecError) as exc:
        load(
            [GOOD / "service.yaml", GOOD / "environment.yaml", GOOD / "infrastructure.yaml", bad],
            inputs={"tag": "1.0"},
        )
    err = exc.value
    assert (err.file, err.line, err.col) == (str(bad), line_of(bad, "enviromentVariables:"), 21)
    assert err.field == "spec.stages[0].stage.spec.execution.steps[0].step.spec.enviromentVariables"
    assert str(err).startswith(
        f"{bad}:{err.line}:21: unknown field 'enviromentVariables'; "
        "did you mean 'environmentVariables'?"
    )
    assert str(err).endswith(f"[{err.field}]")


def test_several_errors_are_reported_together_in_file_order(tmp_path: Path) -> None:
    files = good_copy(
        tmp_path,
        pipeline=("timeout: 5m", "timeout: soon"),
        infrastructure=("port: 22", "port: abc"),
    )
    with pytest.raises(SpecErrors) as exc:
        load([files])
    assert [(Path(e.file).name, e.line, e.field.rsplit(".", 1)[-1]) for e in exc.value.errors] == [
        ("infrastructure.yaml", line_of(files / "infrastructure.yaml", "port: abc"), "port"),
        ("pipeline.yaml", line_of(files / "pipeline.yaml", "timeout: soon"), "timeout"),
    ]


def test_unknown_expression_in_a_script_points_at_its_line(tmp_path: Path) -> None:
    files = good_copy(
        tmp_path,
        pipeline=("greeting=<+serviceVariables.greeting>", "greeting=<+serviceVariables.greting>"),
    )
    with pytest.raises(SpecError) as exc:
        load([files])
    line = line_of(files / "pipeline.yaml", "<+serviceVariables.greting>")
    assert (exc.value.line, exc.value.col) == (line, 42)  # the script line, not 'script: |'
    assert exc.value.field.endswith("commandUnits[0].spec.source.spec.script")
    assert "unknown expression <+serviceVariables.greting>" in exc.value.message
    assert "serviceVariables.greeting" in exc.value.message  # among the known ones


def test_yaml_syntax_error_points_at_the_line_and_quotes_it() -> None:
    text = "kind: Service\nmetadata:\n  name: s\n   identifier: s\n"
    with pytest.raises(SpecError) as exc:
        load_documents(text, "s.yaml")
    assert (exc.value.file, exc.value.line) == ("s.yaml", 4)
    assert "check the indentation" in exc.value.message
    assert "'identifier: s'" in exc.value.message


def test_recursive_alias_is_an_error_not_a_crash() -> None:
    with pytest.raises(SpecError, match="recursive YAML alias") as exc:
        load_documents("kind: Service\nloop: &a [1, *a]\n", "r.yaml")
    assert exc.value.line == 2


def test_step_groups_flatten_with_their_failure_strategies(tmp_path: Path) -> None:
    """A stepGroup's steps run in order like any steps; a group's failure strategies apply
    after each step's own and before the stage's (Harness's precedence)."""
    from app.coordinator.precedence import failure_action
    from app.definitions.models import FailureAction
    from app.definitions.plan import DeploymentStagePlan

    group = """- stepGroup:
                  name: Checks
                  identifier: checks
                  failureStrategies:
                    - onFailure:
                        errors: [Timeout]
                        action:
                          type: Ignore
                  steps:
                    - step:
                        type: Command
                        name: Probe
                        identifier: probe
                        failureStrategies:
                          - onFailure:
                              errors: [Unknown]
                              action:
                                type: MarkAsSuccess
                        spec:
                          commandUnits:
                            - identifier: probe
                              type: Script
                              spec:
                                source:
                                  type: Inline
                                  spec:
                                    script: echo probe
              - step:"""
    folder = good_copy(
        tmp_path,
        pipeline=(
            "- step:\n                  type: Command\n                  name: Install",
            group + "\n                  type: Command\n                  name: Install",
        ),
    )
    plan = plan_of([folder], {"tag": "1.0"})
    stage = plan["stages"][0]
    probe = stage["steps"][0]
    assert probe["identifier"] == "probe" and probe["group"] == "checks"
    assert stage["steps"][1]["identifier"] == "install" and "group" not in stage["steps"][1]
    typed = DeploymentStagePlan.model_validate(stage)
    (step,) = [s for s in typed.steps if s.identifier == "probe"]
    assert failure_action(step, typed, "Unknown") == FailureAction(type="MarkAsSuccess")
    assert failure_action(step, typed, "Timeout") == FailureAction(type="Ignore")


def test_a_step_entry_holds_a_step_or_a_step_group(tmp_path: Path) -> None:
    folder = good_copy(
        tmp_path,
        pipeline=(
            "- step:\n                  type: Command\n                  name: Install",
            "- {}\n              - step:\n"
            "                  type: Command\n"
            "                  name: Install",
        ),
    )
    with pytest.raises((SpecError, SpecErrors)) as info:
        plan_of([folder], {"tag": "1.0"})
    assert "either 'step' or 'stepGroup'" in str(info.value)


# --- which infrastructures a stage deploys to -----------------------------------------------------

INFRA_LIST = "            infrastructureDefinitions:\n              - identifier: test_hosts\n"


def _good_copy(tmp_path: Path, old: str, new: str, *, second_infra: bool = False) -> list[Path]:
    """tests/data/good with ``old`` replaced by ``new`` in the pipeline (and a second
    infrastructure of test_env)."""
    for f in ("service.yaml", "environment.yaml", "infrastructure.yaml"):
        (tmp_path / f).write_text((GOOD / f).read_text())
    (tmp_path / "app").mkdir(exist_ok=True)
    text = (GOOD / "pipeline.yaml").read_text()
    assert text.count(old) == 1
    (tmp_path / "pipeline.yaml").write_text(text.replace(old, new))
    if second_infra:
        (tmp_path / "infra2.yaml").write_text(
            (GOOD / "infrastructure.yaml")
            .read_text()
            .replace("identifier: test_hosts", "identifier: more_hosts")
            .replace("127.0.1.201", "127.0.1.203")
            .replace("127.0.1.202", "127.0.1.204")
        )
    return sorted(tmp_path.glob("*.yaml"))


def _infras(plan: dict[str, Any]) -> list[str]:
    return [i["identifier"] for i in plan["stages"][0]["infrastructures"]]


def test_a_stage_without_infrastructure_definitions_uses_the_environments_only_one(
    tmp_path: Path,
) -> None:
    """As the reference's configuration-management pipeline writes it."""
    assert _infras(plan_of(_good_copy(tmp_path, INFRA_LIST, ""), {"tag": "1"})) == ["test_hosts"]


def test_deploy_to_all_deploys_to_every_infrastructure_of_the_environment(tmp_path: Path) -> None:
    files = _good_copy(tmp_path, INFRA_LIST, "            deployToAll: true\n", second_infra=True)
    assert _infras(plan_of(files, {"tag": "1"})) == ["more_hosts", "test_hosts"]


@pytest.mark.parametrize(
    ("new", "says"),
    [
        ("", "it has 2: more_hosts, test_hosts"),
        ("            deployToAll: true\n" + INFRA_LIST, "leave infrastructureDefinitions out"),
    ],
)
def test_an_ambiguous_or_contradictory_choice_of_infrastructures_is_refused(
    tmp_path: Path, new: str, says: str
) -> None:
    files = _good_copy(tmp_path, INFRA_LIST, new, second_infra=True)
    with pytest.raises((SpecError, SpecErrors)) as exc:
        load(files, inputs={"tag": "1"})
    err = refusal(exc)
    assert says in err.message
    assert err.file.endswith("pipeline.yaml")
    assert err.field.startswith("spec.stages[0].stage.spec.environment")


@pytest.mark.parametrize(
    ("old", "new", "ok"),
    [
        (
            "              - identifier: test_hosts\n",
            "              - identifier: test_hosts\n                inputs: {region: r9}\n",
            False,
        ),
        (
            "            environmentRef: test_env\n",
            "            environmentRef: test_env\n            environmentInputs: {type: Production}\n",
            False,
        ),
        (
            "            environmentRef: test_env\n",
            "            environmentRef: test_env\n            environmentInputs: <+input>\n",
            True,
        ),
    ],
)
def test_inputs_written_in_a_pipeline_are_refused_never_dropped(
    tmp_path: Path, old: str, new: str, ok: bool
) -> None:
    files = _good_copy(tmp_path, old, new)
    if ok:
        load(files, inputs={"tag": "1"})
        return
    with pytest.raises((SpecError, SpecErrors)) as exc:
        load(files, inputs={"tag": "1"})
    err = refusal(exc)
    assert "not supported in a pipeline file" in err.message
    assert err.line == line_of(tmp_path / "pipeline.yaml", new.strip().split("\n")[-1].strip())
