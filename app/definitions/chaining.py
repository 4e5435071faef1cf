"""Pipeline chaining: a stage of ``type: Pipeline`` runs another pipeline (the child) and waits
for it (app.coordinator.chaining runs it).

The child is found the way a run finds its pipeline: among the files given (local mode), or,
in server mode, among the submitted files and the registry's pipelines (app.registry.reach
brings every pipeline a stage chains). At load:

- the child must be a pipeline of the load (a typo gets the nearest identifier), ``org`` and
  ``project`` must match the child's own ``orgIdentifier``/``projectIdentifier`` when it has
  them, ``inputs.identifier`` must name the child;
- ``inputs.variables`` may give only variables the child declares ``<+input>`` (its other
  runtime inputs are the run's: ``--set`` or an input set);
- a chain that comes back to a pipeline already in it (a → b → a) is refused;
- each of ``outputs`` names one step output of the child (checked as a later stage of the
  child would read it); later stages of the parent read it as
  ``<+pipeline.stages.ID.output.NAME>``, taken from the child when it SUCCEEDED;
- failure strategies that would need the child rolled back or run again are refused: a
  PipelineRollback at or after a Pipeline stage, and a StageRollback, Retry or
  ManualIntervention that applies to the Pipeline stage.

``resolve_pipeline_stage`` puts the child's whole plan, resolved with the chain's values, in
the parent's plan: RBAC, policies and freeze windows read it when the parent is submitted.
"""

from __future__ import annotations

import dataclasses
import re
import uuid
from collections.abc import Iterator
from typing import Any

from app.definitions import base as b
from app.definitions import models as m
from app.definitions.bundle import Bundle, Collector, Loaded, missing
from app.definitions.expressions import has_input
from app.definitions.yamlload import Document

Where = tuple[str | int, ...]

# What a failed child does to its Pipeline stage cannot be a rollback or a second run of it.
_REFUSED_ACTIONS = {
    "StageRollback": "a Pipeline stage has nothing of its own to roll back (roll the child "
    "back with `vmfarm rollback CHILD`)",
    "Retry": "a failed child is not run again by the parent (retry the parent: `vmfarm retry` "
    "runs the child stage again)",
    "ManualIntervention": "a Pipeline stage does not wait for a person when its child fails "
    "(put the intervention in the child's stages)",
}


def _child_ident(doc_data: Any) -> str | None:
    meta = doc_data.get("metadata") if isinstance(doc_data, dict) else None
    if not isinstance(meta, dict):
        return None
    ident = meta.get("identifier") or b.identifier_of(str(meta.get("name", "")))
    return str(ident)


def _pipeline_docs(documents: list[Document]) -> dict[str, Document]:
    return {
        ident: d
        for d in documents
        if isinstance(d.data, dict)
        and d.data.get("kind") == "Pipeline"
        and (ident := _child_ident(d.data)) is not None
    }


def _chain_stages(data: Any) -> Iterator[tuple[int, dict[str, Any]]]:
    """(index, stage data) of every Pipeline stage of a pipeline document's data."""
    spec = data.get("spec") if isinstance(data, dict) else None
    stages = spec.get("stages") if isinstance(spec, dict) else None
    for i, el in enumerate(stages if isinstance(stages, list) else []):
        st = el.get("stage") if isinstance(el, dict) else None
        if isinstance(st, dict) and st.get("type") == "Pipeline":
            yield i, st


def declared_inputs(documents: list[Document]) -> dict[str, set[str]]:
    """Pipeline identifier -> its variables written ``<+input>`` (read before runtime inputs
    are filled: a --set value would hide that the child asks for it)."""
    out: dict[str, set[str]] = {}
    for ident, doc in _pipeline_docs(documents).items():
        spec = doc.data.get("spec")
        variables = spec.get("variables") if isinstance(spec, dict) else None
        out[ident] = {
            str(v.get("name"))
            for v in (variables if isinstance(variables, list) else [])
            if isinstance(v, dict) and isinstance(v.get("value"), str) and has_input(v["value"])
        }
    return out


def chain_filled(documents: list[Document]) -> set[str]:
    """The runtime input names (``pipeline.CHILD.variables.X``) a Pipeline stage of the files
    fills: they need no --set when the files are loaded (the chain gives them)."""
    declared = declared_inputs(documents)
    out: set[str] = set()
    for doc in _pipeline_docs(documents).values():
        for _, st in _chain_stages(doc.data):
            spec: dict[str, Any] = st["spec"] if isinstance(st.get("spec"), dict) else {}
            child = spec.get("pipeline")
            inputs: dict[str, Any] = spec["inputs"] if isinstance(spec.get("inputs"), dict) else {}
            variables = inputs.get("variables")
            for v in variables if isinstance(variables, list) else []:
                name = v.get("name") if isinstance(v, dict) else None
                if (
                    isinstance(child, str)
                    and isinstance(name, str)
                    and name in declared.get(child, set())
                ):
                    out.add(f"pipeline.{child}.variables.{name}")
    return out


def chained(data: Any) -> set[str]:
    """The pipelines a pipeline document's data chains (for app.registry.reach)."""
    out = set()
    for _, st in _chain_stages(data):
        spec = st.get("spec")
        if isinstance(spec, dict) and isinstance(spec.get("pipeline"), str):
            out.add(spec["pipeline"])
    return out


def children(pipe: Loaded) -> list[tuple[int, m.PipelineStageSpec]]:
    return [
        (i, el.stage)
        for i, el in enumerate(pipe.model.spec.stages)
        if isinstance(el.stage, m.PipelineStageSpec)
    ]


def roots(bundle: Bundle) -> list[str]:
    """The pipelines of a load that no other pipeline of it chains (the one to run)."""
    named = {st.spec.pipeline for p in bundle.pipelines.values() for _, st in children(p)}
    return sorted(p for p in bundle.pipelines if p not in named)


def check_chains(bundle: Bundle, errs: Collector) -> None:
    """Every Pipeline stage of the load: its child, its inputs, its outputs, the failure
    strategies around it, and no cycle."""
    for pipe in bundle.pipelines.values():
        stages = children(pipe)
        for si, st in stages:
            _check_stage(bundle, pipe, si, st, errs)
        if stages:
            _check_rollbacks(pipe, stages[0][0], errs)
    _check_cycles(bundle, errs)


def _check_stage(
    bundle: Bundle, pipe: Loaded, si: int, st: m.PipelineStageSpec, errs: Collector
) -> None:
    sp: Where = ("spec", "stages", si, "stage", "spec")
    child = bundle.pipelines.get(st.spec.pipeline)
    if st.spec.pipeline == pipe.ident:
        errs.add(
            pipe.error(
                f"stage '{st.identifier}' chains pipeline '{pipe.ident}' itself: a pipeline "
                "cannot run itself",
                (*sp, "pipeline"),
            )
        )
        return
    if child is None:
        errs.add(
            pipe.error(missing("Pipeline", st.spec.pipeline, bundle.pipelines), (*sp, "pipeline"))
        )
        return
    _check_outputs(pipe, st, child, sp, errs)
    meta = child.model.metadata
    for key, mine, theirs in (
        ("org", st.spec.org, meta.org_identifier),
        ("project", st.spec.project, meta.project_identifier),
    ):
        if mine is not None and theirs is not None and mine != theirs:
            errs.add(
                pipe.error(
                    f"{key} '{mine}' does not match pipeline '{child.ident}', which is in "
                    f"{key} '{theirs}'",
                    (*sp, key),
                )
            )
    if st.spec.inputs is None:
        return
    given = st.spec.inputs.identifier
    if given is not None and given != child.ident:
        errs.add(
            pipe.error(
                f"inputs.identifier '{given}' is not the chained pipeline '{child.ident}'",
                (*sp, "inputs", "identifier"),
            )
        )
    declared = bundle.chain_inputs.get(child.ident, set())
    known = {v.name: v for v in child.model.spec.variables}
    seen: set[str] = set()
    for vi, var in enumerate(st.spec.inputs.variables):
        at: Where = (*sp, "inputs", "variables", vi, "name")
        if var.name in seen:
            errs.add(pipe.error(f"variable '{var.name}' is given twice", at))
        seen.add(var.name)
        if var.name not in known:
            errs.add(
                pipe.error(
                    f"pipeline '{child.ident}' has no variable '{var.name}' (its variables: "
                    + (", ".join(sorted(known)) or "none")
                    + ")",
                    at,
                )
            )
        elif known[var.name].type == "Secret":
            errs.add(
                pipe.error(
                    f"variable '{var.name}' of pipeline '{child.ident}' is a Secret: the child "
                    'reads its secret itself (<+secrets.getValue("id")>), it is not passed',
                    at,
                )
            )
        elif var.type != known[var.name].type:
            errs.add(
                pipe.error(
                    f"variable '{var.name}' of pipeline '{child.ident}' is a "
                    f"{known[var.name].type}, not a {var.type}",
                    (*sp, "inputs", "variables", vi, "type"),
                )
            )
        elif var.name not in declared:
            errs.add(
                pipe.error(
                    f"variable '{var.name}' of pipeline '{child.ident}' is not a runtime input: "
                    "a Pipeline stage gives only the variables its child declares <+input> ("
                    + (", ".join(sorted(declared)) or "it declares none")
                    + ")",
                    at,
                )
            )


OUTPUT_RE = re.compile(
    r"pipeline\.stages\.([A-Za-z_]\w*)\.spec\.execution\.steps\.([A-Za-z_]\w*)"
    r"\.output\.(?:outputVariables\.)?([A-Za-z_][\w.-]*?)(\.list)?"
)


def _check_outputs(
    pipe: Loaded, st: m.PipelineStageSpec, child: Loaded, sp: Where, errs: Collector
) -> None:
    """Each output names one step output of the child, as a later stage of the child would
    read it: ``<+pipeline.stages.S.spec.execution.steps.T.output.outputVariables.X>`` (or
    ``.list``); its value is taken when the child has SUCCEEDED."""
    from app.definitions.expressions import EXPR_RE, ExpressionError
    from app.definitions.stage_outputs import check, readable

    known = readable([el.stage for el in child.model.spec.stages], len(child.model.spec.stages))
    names: set[str] = set()
    for i, out in enumerate(st.spec.outputs):
        at: Where = (*sp, "outputs", i)
        if not b.IDENT_RE.match(out.name):
            errs.add(
                pipe.error(f"output name '{out.name}' must be letters, digits and _", (*at, "name"))
            )
        if out.name in names:
            errs.add(pipe.error(f"output '{out.name}' is given twice", (*at, "name")))
        names.add(out.name)
        whole = EXPR_RE.fullmatch(out.value.strip())
        key = whole.group(1).strip() if whole else ""
        if not whole or not OUTPUT_RE.fullmatch(key):
            errs.add(
                pipe.error(
                    f"output '{out.name}' reads one step output of pipeline '{child.ident}', "
                    "written <+pipeline.stages.STAGE.spec.execution.steps.STEP.output."
                    "outputVariables.NAME> (or .list); got " + repr(out.value),
                    (*at, "value"),
                )
            )
            continue
        try:
            check(key, known)
        except ExpressionError as exc:
            errs.add(
                pipe.error(
                    f"output '{out.name}' of pipeline '{child.ident}': {exc}", (*at, "value")
                )
            )


def _strategies(pipe: Loaded, si: int) -> Iterator[tuple[Where, str]]:
    """(where, action type) of every failure strategy written in stage ``si`` (its own, its
    steps' and step groups', at any depth)."""

    def walk(data: Any, path: Where) -> Iterator[tuple[Where, str]]:
        if isinstance(data, dict):
            for k, v in data.items():
                if k == "failureStrategies" and isinstance(v, list):
                    for i, fs in enumerate(v):
                        on = fs.get("onFailure") if isinstance(fs, dict) else None
                        act = on.get("action") if isinstance(on, dict) else None
                        kind = act.get("type") if isinstance(act, dict) else None
                        if isinstance(kind, str):
                            yield (*path, k, i, "onFailure", "action", "type"), kind
                else:
                    yield from walk(v, (*path, k))
        elif isinstance(data, list):
            for i, v in enumerate(data):
                yield from walk(v, (*path, i))

    base: Where = ("spec", "stages", si)
    yield from walk(pipe.doc.data["spec"]["stages"][si], base)


def _check_rollbacks(pipe: Loaded, first: int, errs: Collector) -> None:
    """PipelineRollback at or after the first Pipeline stage would have to roll the child back;
    the actions that would roll back or run again a Pipeline stage are refused where they
    apply to it (its own, and the pipeline's for the errors a failed child has)."""
    for i, fs in enumerate(pipe.model.spec.failure_strategies):
        kind = fs.on_failure.action.type
        at: Where = ("spec", "failureStrategies", i, "onFailure", "action", "type")
        if kind == "PipelineRollback":
            errs.add(
                pipe.error(
                    "PipelineRollback cannot apply to a pipeline with a Pipeline stage: vmfarm "
                    "does not roll a child pipeline back (use StageRollback or MarkAsFailure; "
                    "roll a child back with `vmfarm rollback CHILD`)",
                    at,
                )
            )
        elif (
            kind in _REFUSED_ACTIONS
            and kind != "StageRollback"  # a Pipeline stage then fails, as a Custom stage does
            and set(fs.on_failure.errors) & {"AllErrors", "Unknown"}
        ):
            errs.add(
                pipe.error(
                    f"{kind} here applies to the Pipeline stages too (a failed child is an "
                    f"Unknown error): {_REFUSED_ACTIONS[kind]}; give the Pipeline stages "
                    "failureStrategies of their own (MarkAsFailure, Abort, Ignore, "
                    "MarkAsSuccess), or name narrower errors here",
                    at,
                )
            )
    for si in range(first, len(pipe.model.spec.stages)):
        st = pipe.model.spec.stages[si].stage
        for at, kind in _strategies(pipe, si):
            if kind == "PipelineRollback":
                errs.add(
                    pipe.error(
                        "PipelineRollback at or after a Pipeline stage is not supported: vmfarm "
                        "does not roll a child pipeline back (use StageRollback, or roll the "
                        "child back with `vmfarm rollback CHILD`)",
                        at,
                    )
                )
            elif isinstance(st, m.PipelineStageSpec) and kind in _REFUSED_ACTIONS:
                errs.add(pipe.error(f"{kind} on a Pipeline stage: {_REFUSED_ACTIONS[kind]}", at))


def _check_cycles(bundle: Bundle, errs: Collector) -> None:
    graph = {ident: [(si, st) for si, st in children(p)] for ident, p in bundle.pipelines.items()}
    reported: set[frozenset[str]] = set()

    def visit(ident: str, path: list[str]) -> None:
        for si, st in graph.get(ident, []):
            nxt = st.spec.pipeline
            if nxt not in graph or nxt == ident:
                continue  # missing, or itself: reported by _check_stage
            if nxt in path:
                cycle = [*path[path.index(nxt) :], nxt]
                key = frozenset(cycle)
                if key not in reported:
                    reported.add(key)
                    errs.add(
                        bundle.pipelines[ident].error(
                            "pipeline chain " + " → ".join(cycle) + " is a cycle: a pipeline "
                            "cannot run itself through its children",
                            ("spec", "stages", si, "stage", "spec", "pipeline"),
                        )
                    )
                continue
            visit(nxt, [*path, nxt])

    for ident in sorted(graph):
        visit(ident, [ident])


def check_unfilled(pipe: Loaded) -> None:
    """A pipeline run on its own needs its ``<+input>`` variables from --set, even when another
    pipeline of the files would give them by chaining it."""
    for i, v in enumerate(pipe.model.spec.variables):
        if isinstance(v.value, str) and has_input(v.value):
            raise pipe.error(
                f"runtime input <+input> has no value: give it with --set "
                f"pipeline.{pipe.ident}.variables.{v.name}=VALUE (or --set {v.name}=VALUE)",
                ("spec", "variables", i, "value"),
            )


def resolve_pipeline_stage(
    bundle: Bundle,
    pipe: Loaded,
    index: int,
    stage: m.PipelineStageSpec,
    rendered: dict[str, Any],
    when: dict[str, Any] | None,
    *,
    plan_index: int,
    strict_inputs: bool,
) -> dict[str, Any]:
    """A Pipeline stage as plain data: the child's whole plan, resolved with the variables the
    stage gives (rendered in the parent's context), under an id of its own that the
    coordinator replaces with the child execution's when it starts it."""
    from app.definitions.resolve import resolve

    child = bundle.pipelines.get(stage.spec.pipeline)
    if child is None:  # reported by check_chains
        raise pipe.error(
            missing("Pipeline", stage.spec.pipeline, bundle.pipelines),
            ("spec", "stages", index, "stage", "spec", "pipeline"),
        )
    spec = rendered.get("spec") or {}
    given = {
        str(v["name"]): str(v["value"])
        for v in ((spec.get("inputs") or {}).get("variables") or [])
        if isinstance(v, dict)
    }
    model = child.model.model_copy(deep=True)
    external = set(bundle.external)
    for i, v in enumerate(model.spec.variables):
        if v.name in given:
            v.value = given[v.name]
            external.add(
                (child.doc.file, child.doc.index, (*child.base, "spec", "variables", i, "value"))
            )
    patched = dataclasses.replace(child, model=model)
    bundle2 = dataclasses.replace(bundle, external=external)
    if strict_inputs:
        check_unfilled(patched)
    placeholder = uuid.uuid4().hex[:12]
    plan = resolve(bundle2, patched, execution_id=placeholder, strict_inputs=strict_inputs)
    return {
        "type": "Pipeline",
        "index": plan_index,
        "identifier": stage.identifier,
        "name": stage.name,
        **({"tags": dict(stage.tags)} if stage.tags else {}),
        "steps": [],
        "rollbackSteps": [],
        "infrastructures": [],
        "strategy": {"type": "Basic"},
        "when": when,
        "pipeline": child.ident,
        "childInputs": given,
        "childExecutionId": placeholder,
        "outputs": [{"name": o.name, "value": o.value.strip()} for o in stage.spec.outputs],
        "child": plan.to_json(),
        "failureStrategies": [
            *[f.model_dump(mode="json", by_alias=True) for f in stage.failure_strategies],
            *[f.model_dump(mode="json", by_alias=True) for f in pipe.model.spec.failure_strategies],
        ],
    }


__all__ = [
    "chain_filled",
    "chained",
    "check_chains",
    "check_unfilled",
    "declared_inputs",
    "resolve_pipeline_stage",
    "roots",
]
