"""Resolving a pipeline into the plan an execution runs: every host-independent expression
rendered, scripts placed by quoting context, the strategy in one form.
"""

from __future__ import annotations

import copy
import posixpath
import re
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pydantic import ValidationError

from app.definitions import models as m
from app.definitions.expressions import (
    EXPR_RE,
    HOST_KEYS,
    Context,
    ExpressionError,
    render,
    render_script,
)
from app.definitions.shell import unterminated
from app.definitions.stage_concurrency import mark_groups, side_by_side
from app.definitions.stage_outputs import readable
from app.errors import SpecError, SpecErrors

if TYPE_CHECKING:
    from app.definitions.plan import Plan

from app.definitions.bundle import Bundle, Collector, Loaded, get_at, provider_of
from app.definitions.connectors import artifact_spec, infra_connector
from app.definitions.loop_expansion import (
    _loop_context,
    _looped,
    _mark_loops,
    _render_stage,
    stage_iterations,
)
from app.definitions.loop_refs import iteration_target
from app.definitions.terraform import TERRAFORM_STEPS, dump_step
from app.definitions.validation import loc_to_path, position
from app.definitions.watch_plan import stage_watch


def _variables_ctx(
    ctx: Context,
    prefix: str,
    owner: Loaded,
    variables: list[m.Variable],
    base: tuple[str | int, ...],
    bundle: Bundle,
) -> None:
    for i, v in enumerate(variables):
        if v.type == "Secret":
            continue  # resolved on the worker by the secrets backend
        ext = (owner.doc.file, owner.doc.index, (*owner.base, *base, i, "value")) in bundle.external
        ctx.set(f"{prefix}.{v.name}", v.value if v.value is not None else v.default, external=ext)


def stage_context(
    bundle: Bundle,
    pipe: Loaded,
    stage: m.StageSpec | m.ApprovalStageSpec | m.CustomStageSpec | m.PipelineStageSpec,
    *,
    execution_id: str,
) -> Context:
    """The host-independent expression values for one stage."""
    ctx = Context()
    pm = pipe.model
    ctx.set("pipeline.name", pm.metadata.name)
    ctx.set("pipeline.identifier", pipe.ident)
    ctx.set("pipeline.executionId", execution_id)
    ctx.set("pipeline.sequenceId", execution_id)
    _variables_ctx(
        ctx, "pipeline.variables", pipe, pm.spec.variables, ("spec", "variables"), bundle
    )
    ctx.set("stage.name", stage.name)
    if isinstance(stage, m.ApprovalStageSpec | m.CustomStageSpec | m.PipelineStageSpec):
        ctx.set("stage.identifier", stage.identifier)
        return ctx
    ctx.set("stage.identifier", stage.identifier)
    svc = bundle.services.get(stage.spec.service.service_ref)
    if svc:
        sd = svc.model.spec.service_definition.spec
        ctx.set("service.name", svc.model.metadata.name)
        ctx.set("service.identifier", svc.ident)
        for prefix in ("serviceVariables", "service.variables"):  # Harness spells it both ways
            _variables_ctx(
                ctx,
                prefix,
                svc,
                sd.variables,
                ("spec", "serviceDefinition", "spec", "variables"),
                bundle,
            )
        art = sd.artifacts.primary
        if art:
            tag = art.spec.get("tag")
            tag_path = ("spec", "serviceDefinition", "spec", "artifacts", "primary", "spec", "tag")
            ext = (svc.doc.file, svc.doc.index, tag_path) in bundle.external
            path_of = art.spec.get("artifactPath")
            if tag is None and isinstance(path_of, str) and path_of and "<+" not in path_of:
                # A generic repository's file is chosen by its path (Harness's
                # <+artifact.artifactPath>): its name is the version vmfarm records.
                tag = posixpath.basename(path_of.rstrip("/"))
                path_ext = (*tag_path[:-1], "artifactPath")
                ext = (svc.doc.file, svc.doc.index, path_ext) in bundle.external
            if tag is not None:
                ctx.set("artifact.tag", tag, external=ext)
                ctx.set("artifacts.primary.tag", tag, external=ext)
                ctx.set(
                    "artifact.fileName", _file_name(svc.ident, art.spec, str(tag)), external=ext
                )
            ctx.set("artifact.type", art.type)
            # Where the artifact comes from: the local path, URL path or S3 key (its template;
            # <+artifact.tag> in it is rendered with the rest).
            where = next(
                (
                    art.spec.get(k)
                    for k in ("path", "filePath", "artifactPath", "key", "url")
                    if art.spec.get(k)
                ),
                None,
            )
            if where is not None:
                # (a bad expression in it is reported where the artifact's fields are checked)
                where = render(str(where), ctx, on_error=lambda _msg: None)
                ctx.set("artifact.path", where, external=ext)
            if isinstance(art.spec.get("artifactPath"), str):
                apath = render(str(art.spec["artifactPath"]), ctx, on_error=lambda _msg: None)
                ctx.set("artifact.artifactPath", apath, external=ext)
    env = bundle.environments.get(stage.spec.environment.environment_ref)
    if env:
        ctx.set("env.name", env.model.metadata.name)
        ctx.set("env.identifier", env.ident)
        ctx.set("env.type", env.model.spec.type)
        _variables_ctx(
            ctx, "env.variables", env, env.model.spec.variables, ("spec", "variables"), bundle
        )
    refs = stage.spec.environment.infrastructure_definitions
    infra = bundle.infrastructures.get(refs[0].identifier) if refs else None
    if infra:
        ctx.set("infra.name", infra.model.metadata.name)
        ctx.set("infra.identifier", infra.ident)
        ctx.set("infra.connectorRef", infra.model.spec.spec.connector_ref or "")
        ctx.set("infra.environmentRef", infra.model.spec.environment_ref)
        # infra.region is per host (a static infra may span regions): rendered on the worker.
    return ctx


def _file_name(service: str, spec: dict[str, Any], tag: str) -> str:
    """The artifact's own file name when its spec names a file (``artifactPath:
    todolist.war`` -> ``todolist.war``), else ``<service>-<tag>.tar.gz``."""
    path = spec.get("artifactPath")
    if isinstance(path, str) and "<+" not in path:
        name = posixpath.basename(path.rstrip("/"))
        if name and name not in (".", "..") and re.fullmatch(r"[A-Za-z0-9._+~-]+", name):
            return name
    return artifact_file_name(service, tag)


def artifact_file_name(service: str, tag: str) -> str:
    """The file name an artifact gets on the hosts: ``<service>-<tag>.tar.gz``."""
    safe = re.sub(r"[^A-Za-z0-9._-]", "_", tag)
    return f"{service}-{safe}.tar.gz"


def render_tree(
    data: Any, ctx: Context, doc: Loaded, path: tuple[str | int, ...], errs: Collector
) -> Any:
    if isinstance(data, dict):
        return {k: render_tree(v, ctx, doc, (*path, k), errs) for k, v in data.items()}
    if isinstance(data, list):
        return [render_tree(v, ctx, doc, (*path, i), errs) for i, v in enumerate(data)]
    if isinstance(data, str) and "<+" in data:

        def on_error(msg: str) -> None:
            named = EXPR_RE.search(msg)  # the message quotes the expression: find its line
            errs.add(
                doc.doc.error(msg, (*doc.base, *path), within=named.group(0) if named else None)
            )

        for n in unterminated(data):  # an expression ends on its own line, with '>'
            line = data.split("\n")[n - 1]
            start = line.index("<+")
            errs.add(
                doc.doc.error(
                    f"unterminated expression '{line[start : start + 60]}': an expression ends with "
                    "'>' on the line it starts",
                    (*doc.base, *path),
                    within=line[start:],
                )
            )
        if path[-2:] == ("when", "condition"):  # values bound as quoted literals
            return render_condition(data, ctx, on_error=on_error)
        if path[-1] == "script":  # values from outside the files stand intact, or are refused
            return render_script(data, ctx, on_error=on_error)
        return render(data, ctx, on_error=on_error)
    return data


def render_condition(text: str, ctx: Context, *, on_error: Callable[[str], None]) -> str:
    """A ``when`` condition with the values known now written in as quoted strings (so that no
    value can change its shape); the host's values stay for the worker."""
    from app.definitions.conditions import ConditionError, bind

    def lookup(name: str) -> str | None:
        if name == "input":
            if not ctx.allow_inputs:
                on_error("runtime input <+input> has no value: give it with --set")
            return None
        try:
            val = ctx.lookup(name)
        except ExpressionError as exc:
            on_error(str(exc))
            return None
        if val is None:
            return None
        return render(val.text, ctx, on_error=on_error) if "<+" in val.text else val.text

    try:
        return bind(text, lookup)
    except ConditionError as exc:
        on_error(f"invalid condition {text!r}: {exc}")
        return text


def _stage_when(
    stage: m.StageSpec | m.ApprovalStageSpec | m.CustomStageSpec | m.PipelineStageSpec,
    rendered: dict[str, Any],
    pipe: Loaded,
    base: tuple[str | int, ...],
    errs: Collector,
) -> dict[str, Any] | None:
    """The stage's ``when``, its condition bound; a value only a host knows is refused."""
    if stage.when is None:
        return None
    when = dict(rendered.get("when") or {})
    # (an unknown name was reported where it was bound; secrets and hosts' values are left)
    left = [
        e
        for e in EXPR_RE.findall(str(when.get("condition") or ""))
        if e.strip() in HOST_KEYS
        or e.strip().startswith(("steps.", "secrets.", "pipeline.stages."))
    ]
    if left:
        errs.add(
            pipe.error(
                f"a stage's condition reads values known before the stage starts; <+{left[0]}> "
                "is known only on a host, when a step runs (put the condition on a step)",
                (*base, "when", "condition"),
            )
        )
    return when


def resolve_stages(
    bundle: Bundle, pipe: Loaded, *, execution_id: str, strict_inputs: bool = True
) -> list[dict[str, Any]]:
    """Every stage of the pipeline as plain data, a looped stage once per iteration (its
    ``index`` is its place in the plan, not in the file)."""
    errs = Collector()
    out: list[dict[str, Any]] = []
    for i in range(len(pipe.model.spec.stages)):
        try:
            loops = stage_iterations(
                bundle, pipe, i, execution_id=execution_id, strict_inputs=strict_inputs
            )
            first = len(out)
            for it in loops:
                out.append(
                    resolve_stage(
                        bundle,
                        pipe,
                        i,
                        execution_id=execution_id,
                        strict_inputs=strict_inputs,
                        loop=it,
                        plan_index=len(out),
                    )
                )
            mark_groups(out, first, side_by_side(pipe.model.spec.stages[i].stage))
        except (SpecError, SpecErrors) as exc:
            errs.absorb(exc)
    errs.raise_if_any()
    seen: dict[str, int] = {}
    for st in out:  # an iteration's identifier may meet a stage's own (deploy_0)
        if st["identifier"] in seen:
            errs.add(
                pipe.error(
                    f"stage identifier '{st['identifier']}' is given twice once the loops are "
                    "expanded (a looped stage's iterations are <identifier>_<index>): rename one",
                    ("spec", "stages"),
                )
            )
        seen[st["identifier"]] = st["index"]
        for key in ("steps", "rollbackSteps"):
            ids = [d.get("identifier") for d in st.get(key) or []]
            twice = sorted({i for i in ids if ids.count(i) > 1})
            if twice:
                errs.add(
                    pipe.error(
                        f"step identifier '{twice[0]}' is given twice in stage "
                        f"'{st['identifier']}' once the loops are expanded (a looped step's "
                        "iterations are <identifier>_<index>): rename one",
                        ("spec", "stages"),
                    )
                )
    errs.raise_if_any()
    return out


def resolve_stage(
    bundle: Bundle,
    pipe: Loaded,
    index: int,
    *,
    execution_id: str,
    strict_inputs: bool = True,
    loop: m.Iteration | None = None,
    plan_index: int | None = None,
) -> dict[str, Any]:
    """One stage as plain data, every host-independent expression rendered: with ``loop``,
    one iteration of its looping strategy, at ``plan_index`` in the plan."""
    errs = Collector()
    stage = pipe.model.spec.stages[index].stage
    if loop is not None:  # an iteration deploying where its loop says (app.definitions.loop_refs)
        stage = iteration_target(bundle, pipe, index, loop) or stage
    ctx = stage_context(bundle, pipe, stage, execution_id=execution_id)
    ctx.allow_inputs = not strict_inputs
    ctx.later = readable([el.stage for el in pipe.model.spec.stages], index)
    if loop is not None:
        ctx = _loop_context(ctx, loop)
        ctx.set("stage.identifier", f"{stage.identifier}_{loop.suffix}")
        ctx.set("stage.name", f"{stage.name}_{loop.label}")
    base: tuple[str | int, ...] = ("spec", "stages", index, "stage")
    raw = get_at(pipe.doc.data, base)
    if isinstance(stage, m.CustomStageSpec):
        out = _resolve_custom(bundle, pipe, stage, index, raw, ctx, base, errs)
        return _looped(out, loop, plan_index)
    if isinstance(stage, m.PipelineStageSpec):
        # Its outputs read the child's steps, in the child's context: not rendered here.
        own = copy.deepcopy(raw)
        if isinstance(own.get("spec"), dict):
            own["spec"].pop("outputs", None)
        rendered, _ = _render_stage(own, ctx, pipe, base, errs)
        when = _stage_when(stage, rendered, pipe, base, errs)
        errs.raise_if_any()
        from app.definitions.chaining import resolve_pipeline_stage

        return resolve_pipeline_stage(
            bundle,
            pipe,
            index,
            stage,
            rendered,
            when,
            plan_index=index if plan_index is None else plan_index,
            strict_inputs=strict_inputs,
        )
    rendered, marks = _render_stage(raw, ctx, pipe, base, errs)
    when = _stage_when(stage, rendered, pipe, base, errs)
    if isinstance(stage, m.ApprovalStageSpec):
        errs.raise_if_any()
        step = m.ApprovalStageSpec.model_validate(rendered).spec.execution.steps[0].step
        return {
            "type": "Approval",
            "index": index if plan_index is None else plan_index,
            "identifier": stage.identifier,
            "name": stage.name,
            **({"tags": dict(stage.tags)} if stage.tags else {}),
            "steps": [],
            "rollbackSteps": [],
            "infrastructures": [],
            "strategy": {"type": "Basic"},
            "when": when,
            "approval": step.model_dump(mode="json", by_alias=True, exclude_none=True),
        }
    # Variables of service and environment may hold expressions too.
    svc = bundle.services.get(stage.spec.service.service_ref)
    env = bundle.environments.get(stage.spec.environment.environment_ref)
    for owner in (svc, env):
        if owner is not None:
            render_tree(copy.deepcopy(owner.raw), ctx, owner, owner.base, errs)
    errs.raise_if_any()
    try:
        out_stage = m.StageSpec.model_validate(rendered)
    except ValidationError as exc:
        # A value that became invalid once rendered (an empty variable where a URL must be).
        for e in exc.errors():
            where = loc_to_path(pipe.doc, base, tuple(e["loc"]))
            msg = str(e["msg"]).removeprefix("Value error, ")
            errs.add(pipe.error(f"{msg} (once its expressions are rendered)", where))
        errs.raise_if_any()
        raise
    assert svc is not None and env is not None
    art = svc.model.spec.service_definition.spec.artifacts.primary
    artifact: dict[str, Any] | None = None
    if art is not None:
        tag = ctx.values.get("artifact.tag")
        if (
            tag is not None
            and "<+" not in tag.text
            and not _own_regex(bundle, svc)
            and not TAG_RE.fullmatch(tag.text)
        ):
            errs.add(
                svc.error(
                    f"artifact tag {tag.text!r} is not a version: a tag names a file and a release "
                    "directory on every host, so it starts with a letter or digit and holds only "
                    "letters, digits and . _ + ~ - (no '/', no '..', no spaces); give the input "
                    "its own pattern with <+input>.regex(...) to allow others",
                    ("spec", "serviceDefinition", "spec", "artifacts", "primary", "spec", "tag"),
                )
            )
        art_spec = render_tree(
            copy.deepcopy(art.spec),
            ctx,
            svc,
            ("spec", "serviceDefinition", "spec", "artifacts", "primary", "spec"),
            errs,
        )
        art_spec = artifact_spec(bundle, svc, art.type, art_spec, errs)
        artifact = {
            "type": art.type,
            "spec": art_spec,
            "tag": tag.text if tag else None,
            "fileName": _file_name(svc.ident, art_spec, tag.text) if tag else None,
        }
        if tag is None:
            errs.add(
                svc.error(
                    "the artifact has no tag: give spec.tag (a version, or <+input> to give it "
                    "with --set), or for a generic repository the file's spec.artifactPath",
                    ("spec", "serviceDefinition", "spec", "artifacts", "primary", "spec"),
                )
            )
    infras = []
    for ref in stage.spec.environment.infrastructure_definitions:
        infra = bundle.infrastructures[ref.identifier]
        src_file, src_line, _ = position(infra.doc, infra.base or ("metadata",))  # hook (templates)
        infras.append(
            {
                "identifier": infra.ident,
                "name": infra.model.metadata.name,
                "provider": provider_of(infra.model),
                "spec": infra.model.spec.spec.model_dump(
                    mode="json", by_alias=True, exclude_none=True
                ),
                "source": f"{src_file}:{src_line}",
                "allowSimultaneousDeployments": infra.model.spec.allow_simultaneous_deployments,
            }
        )
        connector = infra_connector(bundle, infra)
        if connector is not None:  # secret ids only: the region's worker resolves them
            infras[-1]["connector"] = connector
    uses_copy = any(
        isinstance(u, m.CopyUnit | m.DownloadArtifactUnit | m.ReleaseUnit)
        for _, st, _ in m.flat_steps(
            [*out_stage.spec.execution.steps, *out_stage.spec.execution.rollback_steps]
        )
        for u in getattr(st.spec, "command_units", [])
    )
    downloads = any(
        isinstance(u, m.DownloadArtifactUnit)
        for _, st, _ in m.flat_steps(
            [*out_stage.spec.execution.steps, *out_stage.spec.execution.rollback_steps]
        )
        for u in getattr(st.spec, "command_units", [])
    )
    if (
        downloads
        and art is not None
        and artifact is not None
        and art.type != "Local"
        and not any(artifact["spec"].get(k) for k in ("sha256", "checksum"))
        and artifact["spec"].get("allowUnverified") is not True
    ):
        # The host checks what it downloads against the spec's checksum only: the worker
        # never sees the bytes, so the repository's checksum cannot stand in for it.
        errs.add(
            svc.error(
                "a DownloadArtifact unit fetches this artifact on the host, which can verify it "
                "only against spec.sha256, and the spec gives none: set spec.sha256 (or "
                "spec.checksum: sha256:<hex>), or write spec.allowUnverified: true to deploy it "
                "unverified",
                ("spec", "serviceDefinition", "spec", "artifacts", "primary", "spec"),
            )
        )
    checked = artifact
    if not strict_inputs and artifact is not None:
        # At validate a tag given at run time stands in as "1.0" (validate and plan agree); an
        # artifact with other runtime inputs is checked at plan time only.
        rest = {k: v for k, v in artifact["spec"].items() if k != "tag"}
        given = artifact["tag"]
        stand_in = given if given and "<+" not in given else "1.0"
        inputs = re.sub(r"<\+secrets\.getValue\([^)]*\)>", "", repr(rest))  # worker's
        checked = (
            None
            if "<+" in inputs
            else {**artifact, "tag": stand_in, "spec": {**rest, "tag": stand_in}}
        )
    if uses_copy and art is not None and checked is not None and art.type != "Local":
        from app.artifacts import check as check_artifact

        for problem in check_artifact(checked):
            errs.add(
                svc.error(
                    problem, ("spec", "serviceDefinition", "spec", "artifacts", "primary", "spec")
                )
            )
    if strict_inputs and art is not None and art.type == "Local" and uses_copy:
        p = art.spec.get("path")
        if not isinstance(p, str) or not Path(p).exists():
            errs.add(
                svc.error(
                    f"local artifact path {p!r} does not exist",
                    ("spec", "serviceDefinition", "spec", "artifacts", "primary", "spec", "path"),
                )
            )
        if not (artifact and artifact.get("tag")):
            errs.add(
                svc.error(
                    "the artifact needs a tag (spec.tag)",
                    ("spec", "serviceDefinition", "spec", "artifacts", "primary", "spec"),
                )
            )
    errs.raise_if_any()
    out = {
        "strategy": strategy_of(
            out_stage,
            regions=[
                r
                for i in infras
                if i["provider"] == "aws"
                for r in (
                    (i["spec"].get("hostFilter") or {}).get("spec", {}).get("regions")
                    or [i["spec"].get("region")]
                )
                if r
            ],
        ),
        "index": index,
        "identifier": stage.identifier,
        "name": stage.name,
        **({"tags": dict(stage.tags)} if stage.tags else {}),
        "service": {"identifier": svc.ident, "name": svc.model.metadata.name},
        "environment": {
            "identifier": env.ident,
            "name": env.model.metadata.name,
            "type": env.model.spec.type,
        },
        "artifact": artifact,
        "infrastructures": infras,
        "steps": _dump_steps(out_stage.spec.execution.steps),
        # Worker tags for every host of the stage (the pipeline's, then the stage's); the
        # infrastructure's and each step's are added per host and step.
        "delegateSelectors": sorted(
            {*pipe.model.spec.delegate_selectors, *out_stage.delegate_selectors}
        ),
        "delegateFallback": out_stage.delegate_fallback,
        # The failure strategies that apply after the step's own, by precedence.
        "failureStrategies": [
            *[f.model_dump(mode="json", by_alias=True) for f in out_stage.failure_strategies],
            *[f.model_dump(mode="json", by_alias=True) for f in pipe.model.spec.failure_strategies],
        ],
        # Values from outside the files (runtime inputs): the worker binds the unsafe ones into
        # the environment of the scripts that name them (see expressions.render).
        "externalValues": {k: v.text for k, v in ctx.values.items() if v.external},
        "rollbackSteps": _dump_steps(out_stage.spec.execution.rollback_steps),
        "when": when,
        "watch": stage_watch(out_stage, pipe, base, errs),
    }
    _mark_loops(out, marks)
    return _looped(out, loop, plan_index)


def _resolve_custom(
    bundle: Bundle,
    pipe: Loaded,
    stage: m.CustomStageSpec,
    index: int,
    raw: Any,
    ctx: Context,
    base: tuple[str | int, ...],
    errs: Collector,
) -> dict[str, Any]:
    """A Custom stage as plain data: a stage whose one host is the delegate. A ShellScript
    becomes a Command step on the delegate (onDelegate: true, one Script unit): the same
    clean environment, output variables and masking as any onDelegate step."""
    data = copy.deepcopy(raw)
    # An Http assertion names the response (<+httpResponseCode>), known only on the worker:
    # those expressions stand as written while the others are rendered.
    held = {f"<+{name}>": f"__vmfarm_{name}__" for name in ("httpResponseCode", "httpResponseBody")}
    for el in ((data.get("spec") or {}).get("execution") or {}).get("steps") or []:
        spec = ((el or {}).get("step") or {}).get("spec") if isinstance(el, dict) else None
        if isinstance(spec, dict) and isinstance(spec.get("assertion"), str):
            for expr, token in held.items():
                spec["assertion"] = spec["assertion"].replace(expr, token)
    rendered, marks = _render_stage(data, ctx, pipe, base, errs)
    when = _stage_when(stage, rendered, pipe, base, errs)
    errs.raise_if_any()
    for el in rendered["spec"]["execution"]["steps"]:
        spec = el["step"].get("spec")
        if isinstance(spec, dict) and isinstance(spec.get("assertion"), str):
            for expr, token in held.items():
                spec["assertion"] = spec["assertion"].replace(token, expr)
    out_stage = m.CustomStageSpec.model_validate(rendered)
    steps: list[dict[str, Any]] = []
    for el in out_stage.spec.execution.steps:
        step = el.step
        if isinstance(step, m.ShellScriptStep):
            d = step.model_dump(mode="json", by_alias=True, exclude_none=True)
            sp = d.pop("spec")
            d["type"], d["writtenAs"] = "Command", "ShellScript"
            d["spec"] = {
                "onDelegate": True,
                "environmentVariables": sp.get("environmentVariables", []),
                "outputVariables": sp.get("outputVariables", []),
                "delegateSelectors": sp.get("delegateSelectors", []),
                "commandUnits": [
                    {
                        "identifier": step.identifier,
                        "name": step.name,
                        "type": "Script",
                        "spec": {"shell": sp["shell"], "source": sp["source"]},
                    }
                ],
            }
            steps.append(d)
        elif isinstance(step, TERRAFORM_STEPS):
            steps.append(dump_step(bundle, step))
        else:
            steps.append(step.model_dump(mode="json", by_alias=True, exclude_none=True))
    out = {
        "type": "Custom",
        "strategy": {"type": "Basic"},
        "index": index,
        "identifier": stage.identifier,
        "name": stage.name,
        **({"tags": dict(stage.tags)} if stage.tags else {}),
        "service": {"identifier": "", "name": ""},
        "environment": {"identifier": "", "name": "", "type": "PreProduction"},
        "artifact": None,
        "infrastructures": [],
        "steps": steps,
        "delegateSelectors": sorted(
            {*pipe.model.spec.delegate_selectors, *out_stage.delegate_selectors}
        ),
        "delegateFallback": out_stage.delegate_fallback,
        "failureStrategies": [
            *[f.model_dump(mode="json", by_alias=True) for f in out_stage.failure_strategies],
            *[f.model_dump(mode="json", by_alias=True) for f in pipe.model.spec.failure_strategies],
        ],
        "externalValues": {k: v.text for k, v in ctx.values.items() if v.external},
        "rollbackSteps": [],
        "when": when,
    }
    _mark_loops(out, marks)
    return out


# What an artifact tag may be unless its runtime input says otherwise with .regex(): it names
# a file and a release directory on every host (a leading '-' would read as an option).
TAG_RE = re.compile(r"(?!.*\.\.)[A-Za-z0-9][A-Za-z0-9._+~-]{0,127}")


def _own_regex(bundle: Bundle, svc: Loaded) -> bool:
    """Does the service's artifact tag come from a runtime input with its own .regex()?"""
    return any(
        slot.doc is svc.doc and slot.path[-1:] == ("tag",) and "regex" in slot.options
        for slot in bundle.inputs
    )


def _dump_steps(elements: list[m.StepElement]) -> list[dict[str, Any]]:
    """Steps as plain data, step groups flattened: a grouped step names its group and carries
    the group's failure strategies (which apply after its own)."""
    out = []
    for _, step, group in m.flat_steps(elements):
        d = step.model_dump(mode="json", by_alias=True, exclude_none=True)
        if group is not None:
            d["group"] = group.identifier
            d["groupFailureStrategies"] = [
                f.model_dump(mode="json", by_alias=True) for f in group.failure_strategies
            ]
            if group.when is not None:
                d["groupWhen"] = group.when.to_json()
        out.append(d)
    return out


def strategy_of(stage: m.StageSpec, *, regions: list[str] | None = None) -> dict[str, Any]:
    """The stage's strategy as plain data, whichever form the file used; ``regions`` are the
    AWS regions of the stage's infrastructures (the reference's blue-green switches there
    when no target group ARN names a region)."""
    sp = stage.spec
    budget = m.FailureBudget()
    if sp.blue_green_deployment is not None:
        bg = sp.blue_green_deployment
        step = bg.switch_step()
        props = step.properties if step else {}
        region = bg.region() or next(iter(sorted(set(regions or []))), None)
        return {
            "type": "BlueGreen",
            "switchName": step.name if step else None,
            "traffic": {
                "type": "AwsLoadBalancers",
                "region": region,
                "targetGroupArns": list(props.get("targetGroupArns") or []),
                "classicLoadBalancers": list(props.get("classicLoadBalancers") or []),
            },
            "failureBudget": budget.model_dump(by_alias=True),
        }
    for kind, form in (("Rolling", sp.rollout_deployment), ("Canary", sp.canary_deployment)):
        if form is None:
            continue
        phases = form.phases
        checks = [s for p in phases for s in p.phase.steps if s.is_verification]
        verification = next((v for v in (s.verification() for s in checks) if v), None)
        return {
            "type": kind,
            "cumulative": True,
            "phases": [p.phase.size() for p in phases],
            "phaseNames": [p.phase.name for p in phases],
            "verifyAfter": [
                i for i, p in enumerate(phases) if any(s.is_verification for s in p.phase.steps)
            ],
            "verification": verification.model_dump(mode="json", by_alias=True, exclude_none=True)
            if verification
            else None,
            "failureBudget": budget.model_dump(by_alias=True),
        }
    strategy = sp.strategy or m.StrategySpec()
    out = strategy.model_dump(mode="json", by_alias=True, exclude_none=True)
    out["cumulative"] = strategy.type == "Canary"
    return out


def resolve(
    bundle: Bundle, pipeline: Loaded, *, execution_id: str, strict_inputs: bool = True
) -> Plan:
    """The whole pipeline as an execution runs it (stored with ``Plan.to_json()``)."""
    from app.definitions.chaining import check_unfilled
    from app.definitions.plan import Plan

    if strict_inputs:  # a child's variables a chain would give: given by --set when run alone
        check_unfilled(pipeline)
    stages = resolve_stages(
        bundle, pipeline, execution_id=execution_id, strict_inputs=strict_inputs
    )
    return Plan.model_validate(
        {
            "identifier": pipeline.ident,
            "name": pipeline.model.metadata.name,
            "files": sorted(
                {d.file for d in [*bundle.documents, *bundle.templates]}
            ),  # + templates
            "stages": stages,
            "notificationRules": [
                r.model_dump(mode="json", by_alias=True, exclude_none=True)
                for r in pipeline.model.spec.notification_rules
            ],
        }
    )
