"""The registry's pure parts: files split into entries (each its own text), what a submitted
run may not define, which stored entries a pipeline reaches, diffs, and which environments a
change touches (what RBAC is asked)."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from app import registry
from app.errors import SpecError, SpecErrors
from app.models import RegistryVersion
from app.server.routes.registry import environment_checks

ENV = """\
# the production environment
apiVersion: v1
kind: Environment
metadata:
  name: prod
spec:
  type: Production
"""
INFRA = """\
apiVersion: v1
kind: Infrastructure
metadata:
  name: prod-hosts
spec:
  environmentRef: prod
  deploymentType: Ssh
  type: Pdc
  spec:
    connectorRef: account.vault
    hosts:
      - hostname: 10.0.0.1
"""
NATIVE_SERVICE = """\
service:
  name: Shop
  identifier: shop
  serviceDefinition:
    type: Ssh
"""
TEMPLATE = """\
apiVersion: v1
kind: Template
metadata:
  name: Deploy stage
  identifier: deploy_stage
spec:
  type: Stage
  versionLabel: v2
  spec: {type: Deployment}
"""


def test_a_kind_is_named_in_any_case_and_unknown_kinds_are_none() -> None:
    assert registry.kind_of("environment") == "Environment"
    assert registry.kind_of("INFRASTRUCTURE") == "Infrastructure"
    assert registry.kind_of("trigger") == "Trigger"
    assert registry.kind_of("Freeze") is None and registry.kind_of("environments") is None
    assert set(registry.KINDS) == {
        "Environment",
        "Infrastructure",
        "Service",
        "Connector",
        "Template",
        "Pipeline",
        "Trigger",
    }


def test_each_document_becomes_an_entry_with_its_own_text_and_place() -> None:
    entries = registry.split(
        {
            "envs.yaml": ENV + "---\n" + INFRA + "...\n",
            "svc.yaml": NATIVE_SERVICE,
            "t.yml": TEMPLATE,
        }
    )
    by_key = {e.key: e for e in entries}
    assert set(by_key) == {
        ("Environment", "prod"),
        ("Infrastructure", "prod_hosts"),
        ("Service", "shop"),
        ("Template", "deploy_stage@v2"),
    }
    env = by_key[("Environment", "prod")]
    assert env.text == ENV and env.env_type == "Production" and env.where == "envs.yaml:3:7"
    infra = by_key[("Infrastructure", "prod_hosts")]
    assert infra.env_ref == "prod" and infra.file == "envs.yaml" and infra.line == 9
    assert infra.text == INFRA  # no separator, no end marker
    assert by_key[("Template", "deploy_stage@v2")].template_type == "Stage"
    # each text alone reads as the same document
    originals = [*yaml.safe_load_all(ENV + "---\n" + INFRA)]
    assert [yaml.safe_load(env.text), yaml.safe_load(infra.text)] == originals


@pytest.mark.parametrize(
    ("files", "expected"),
    [
        ({"a.yaml": "kind: [\n"}, "a.yaml:2:1: invalid YAML"),
        (
            {"a.yaml": "apiVersion: v1\nkind: InputSet\nmetadata: {name: x}\n"},
            "a.yaml:2:7: kind 'InputSet' is not kept in the registry",
        ),
        ({"a.yaml": "apiVersion: v1\nkind: Service\nspec: {}\n"}, "a Service needs metadata"),
        ({"a.yaml": ENV, "b.yaml": ENV}, "b.yaml:3:7: Environment 'prod' is given twice"),
        ({"a.yaml": "# nothing\n"}, "a.yaml:1:1: file has no document"),
    ],
)
def test_what_cannot_be_an_entry_is_refused_with_its_place(
    files: dict[str, str], expected: str
) -> None:
    with pytest.raises((SpecError, SpecErrors)) as err:
        registry.split(files)
    assert expected in str(err.value)


def test_a_submission_may_not_define_environments_infrastructures_or_connectors() -> None:
    connector = "connector:\n  name: vault\n  identifier: vault\n  type: Vault\n  spec: {}\n"
    env_template = TEMPLATE.replace("type: Stage", "type: Environment")
    found = registry.redefinitions(
        {
            "run.yaml": NATIVE_SERVICE + "---\n" + ENV,
            "c.yaml": connector,
            "i.yaml": INFRA,
            "t.yaml": env_template,
            "stage.yaml": TEMPLATE,
            "broken.yaml": "a: [\n",
        }
    )
    assert [f.split(": ")[0] for f in found] == [
        "c.yaml:1:1",
        "i.yaml:2:7",
        "run.yaml:9:7",
        "t.yaml:2:7",
    ]
    assert all("registry" in f for f in found)
    assert "Environment 'prod' comes from the registry" in found[2]


def _stored(*texts: str) -> dict[tuple[str, str], registry.Entry]:
    return {e.key: e for e in registry.split({f"{i}.yaml": t for i, t in enumerate(texts)})}


PIPELINE = """\
apiVersion: v1
kind: Pipeline
metadata: {name: p}
spec:
  stages:
    - stage:
        name: d
        identifier: d
        type: Deployment
        spec:
          service: {serviceRef: shop}
          environment: {environmentRef: prod}
"""


def test_a_pipeline_reaches_what_it_names_and_what_those_name() -> None:
    vault = "apiVersion: v1\nkind: Connector\nmetadata: {name: vault}\nspec: {type: Vault}\n"
    other = ENV.replace("prod", "staging").replace("Production", "PreProduction")
    stored = _stored(ENV, INFRA, NATIVE_SERVICE, vault, other, TEMPLATE)
    data = yaml.safe_load(PIPELINE)
    reached = registry.reach([data], stored, skip=set())
    # the environment brings its hosts, the hosts their connector; staging and the template
    # are named by nothing
    assert [e.key for e in reached] == [
        ("Environment", "prod"),
        ("Infrastructure", "prod_hosts"),
        ("Service", "shop"),
        ("Connector", "vault"),
    ]
    # what the submitted files define themselves is not taken from the registry
    skipped = registry.reach([data], stored, skip={("Service", "shop")})
    assert ("Service", "shop") not in {e.key for e in skipped}
    # a reference decided at run time may name any of them
    dynamic = yaml.safe_load(PIPELINE.replace("environmentRef: prod", "environmentRef: <+input>"))
    assert ("Environment", "staging") in {
        e.key for e in registry.reach([dynamic], stored, skip=set())
    }


def test_a_version_is_a_change_of_text_and_its_diff_says_what_changed() -> None:
    assert registry.normalise("a: 1  \n\n\n") == registry.normalise("a: 1\n")
    text = registry.diff("Environment", "prod", "type: A\n", "type: B\n", 2)
    assert text.splitlines() == [
        "--- Environment/prod version 1",
        "+++ Environment/prod version 2",
        "@@ -1 +1 @@",
        "-type: A",
        "+type: B",
    ]
    assert registry.diff("Environment", "prod", None, "type: A\n", 1).startswith("--- /dev/null")


def _row(kind: str, ident: str, **kw: str) -> RegistryVersion:
    return RegistryVersion(kind=kind, ident=ident, version=1, text="", **kw)


def test_a_change_is_checked_on_every_environment_it_touches_before_and_after() -> None:
    current = {
        ("Environment", "prod"): _row("Environment", "prod", env_type="Production"),
        ("Environment", "dev"): _row("Environment", "dev", env_type="PreProduction"),
        ("Infrastructure", "hosts"): _row("Infrastructure", "hosts", env_ref="prod"),
    }
    relabel = registry.split({"e.yaml": ENV.replace("Production", "PreProduction")})
    assert environment_checks(relabel, relabel, current) == [
        ("prod", "PreProduction"),
        ("prod", "Production"),
    ]
    moved = registry.split(
        {"i.yaml": INFRA.replace("prod-hosts", "hosts").replace("prod\n", "dev\n")}
    )
    assert environment_checks(moved, moved, current) == [
        ("dev", "PreProduction"),
        ("prod", "Production"),
    ]
    new_env = registry.split({"n.yaml": ENV.replace("prod", "fresh")})
    assert environment_checks(new_env, new_env, current) == [("fresh", "Production")]
    assert environment_checks([], new_env, current) == []


def test_every_example_document_reads_the_same_from_its_own_text() -> None:
    from pathlib import Path

    from app.definitions.native import from_native
    from app.definitions.yamlload import load_documents

    root = Path(__file__).resolve().parents[2]
    checked = 0
    for path in sorted([*root.glob("configs/**/*.yaml"), *root.glob("tests/data/**/*.yaml")]):
        try:
            text = path.read_text()
        except UnicodeDecodeError:  # the hostile-input samples
            continue
        try:
            docs = load_documents(text, path.name)
            entries = list(registry.documents(path.name, text))
        except SpecError:
            continue
        for doc, entry in zip(docs, entries, strict=True):
            (alone,) = load_documents(entry.text, "alone.yaml")
            assert from_native(alone).data == from_native(doc).data, (path, entry.line)
            checked += 1
    assert checked > 50


def test_a_connector_change_is_checked_on_the_environments_whose_hosts_use_it() -> None:
    infra = registry.split({"i.yaml": INFRA})[0]
    current = {
        ("Environment", "prod"): RegistryVersion(
            kind="Environment", ident="prod", version=1, text=ENV, env_type="Production"
        ),
        ("Infrastructure", "prod_hosts"): RegistryVersion(
            kind="Infrastructure", ident="prod_hosts", version=1, text=infra.text, env_ref="prod"
        ),
    }
    vault = "apiVersion: v1\nkind: Connector\nmetadata: {name: vault}\nspec: {type: Vault}\n"
    changed = registry.split({"c.yaml": vault})
    assert environment_checks(changed, changed, current) == [("prod", "Production")]
    other = registry.split({"c.yaml": vault.replace("vault", "other")})
    assert environment_checks(other, other, current) == []


def test_a_trigger_is_an_entry_and_is_checked_apart_from_the_pipeline_files() -> None:
    trigger = (
        Path(__file__).resolve().parents[1] / "data" / "triggers" / "on_publish.yaml"
    ).read_text()
    files = {"mixed.yaml": "# the service\n" + NATIVE_SERVICE + "---\n" + trigger}
    kinds = [(e.kind, e.ident) for e in registry.split(files)]
    assert ("Trigger", "on_publish") in kinds
    # the trigger's pipeline must be stored or applied with it: the error names its line
    with pytest.raises(SpecError) as info:
        registry.check_triggers(registry.split(files), [], files)
    err = info.value
    assert err.file == "mixed.yaml" and "webhook_deploy" in err.message
    assert files["mixed.yaml"].splitlines()[err.line - 1].strip().startswith("pipelineIdentifier:")
    registry.check_triggers(registry.split(files), ["webhook_deploy"], files)
    # the pipeline loader sees the service only, on its own lines
    blanked = registry._without_triggers(files["mixed.yaml"])
    assert blanked.count("\n") == files["mixed.yaml"].count("\n")
    assert "trigger:" not in blanked and "service:" in blanked
