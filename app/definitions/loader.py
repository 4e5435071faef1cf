"""Load pipeline files into a validated bundle, then resolve one pipeline into a plan.

``load(paths)`` reads files or folders of multi-document YAML, checks each document against its
kind's schema and checks the references between documents. ``resolve(bundle, ...)`` fills the
runtime inputs, renders every host-independent expression and returns plain data (JSON-able) that
the coordinator stores with the execution. Every problem is a ``SpecError`` naming
``file:line:col`` and the field; all problems found are reported together.

The pieces: bundle (what a load holds), validation (schemas and their messages), inputs
(runtime inputs), references (between documents), resolve (the plan an execution runs).
"""

from __future__ import annotations

import difflib
import os
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from app.definitions import models as m
from app.definitions.schemas import check_maps
from app.definitions.yamlload import MAX_FILE_BYTES, Document, load_documents
from app.errors import SpecError, SpecErrors

if TYPE_CHECKING:
    pass

from app.definitions.bundle import YAML_SUFFIXES, Bundle, Collector, Loaded, missing, provider_of
from app.definitions.inputs import apply_inputs
from app.definitions.references import check_references
from app.definitions.resolve import resolve_stages
from app.definitions.stage_concurrency import check_stage_concurrency
from app.definitions.validation import _type_name, validate


def expand_paths(paths: Iterable[str | os.PathLike[str]]) -> list[Path]:
    """Files as given; folders expanded to their YAML files, sorted, recursively."""
    out: list[Path] = []
    for raw in paths:
        p = Path(raw)
        if p.is_dir():
            found = sorted(q for q in p.rglob("*") if q.suffix in YAML_SUFFIXES and q.is_file())
            if not found:
                raise SpecError("folder has no .yaml or .yml files", file=str(p))
            out.extend(found)
        elif p.is_file():
            out.append(p)
        else:
            raise SpecError("no such file or folder", file=str(p))
    return out


def _read(path: Path) -> str:
    try:
        with path.open("rb") as fh:  # never more than the limit into memory
            data = fh.read(MAX_FILE_BYTES + 1)
    except OSError as exc:
        raise SpecError(f"cannot read file: {exc.strerror}", file=str(path)) from None
    if len(data) > MAX_FILE_BYTES:
        raise SpecError(
            f"file is larger than {MAX_FILE_BYTES // 2**20} MiB, the most vmfarm "
            "reads in one pipeline file (MAX_FILE_BYTES): split it into several "
            "files",
            file=str(path),
            line=1,
            col=1,
        )
    if b"\x00" in data:
        raise SpecError("not a YAML file (binary content)", file=str(path), line=1, col=1)
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise SpecError(
            f"not UTF-8 text (byte {exc.start})", file=str(path), line=1, col=1
        ) from None


def load(
    paths: Iterable[str | os.PathLike[str]],
    *,
    inputs: Mapping[str, str] | None = None,
    require_inputs: bool = False,
) -> Bundle:
    """Read, validate and cross-check pipeline files. Raises SpecError / SpecErrors."""
    errs = Collector()
    bundle = Bundle()
    files = expand_paths(paths)
    if not files:
        raise SpecError("no pipeline files given")
    for f in files:
        try:
            text = _read(f)
            docs = load_documents(text, str(f))
        except SpecError as exc:
            errs.add(exc)
            continue
        if not docs:
            errs.add(
                SpecError(
                    "file is empty: expected at least one document with apiVersion, "
                    "kind, metadata and spec",
                    file=str(f),
                    line=1,
                    col=1,
                )
            )
        bundle.documents.extend(docs)
    errs.raise_if_any()
    from app.definitions.native import from_native, rename_fields

    bundle.documents = [from_native(d) for d in bundle.documents]  # Harness's own shape
    try:
        return _load_bundle(bundle, errs, inputs, require_inputs)
    except (SpecError, SpecErrors) as exc:
        raise rename_fields(exc, bundle.documents) from None


def _load_bundle(
    bundle: Bundle, errs: Collector, inputs: Mapping[str, str] | None, require_inputs: bool
) -> Bundle:
    # Hook (templates): Template documents are set aside and every template reference is
    # expanded in place, before runtime inputs are named and filled.
    from app.definitions.templates import expand_templates

    bundle.documents, bundle.templates = expand_templates(bundle.documents)
    # Harness's SSH vocabulary (Phase groups, sources, credentialsRef, PDC connectors) in
    # vmfarm's, before runtime inputs are named.
    from app.definitions.harness_vocab import map_vocabulary

    bundle.documents, problems = map_vocabulary(bundle.documents)
    for problem in problems:
        errs.add(problem)
    errs.raise_if_any()

    # Hook (chaining): a child pipeline's <+input> variables that a Pipeline stage gives.
    from app.definitions.chaining import chain_filled, check_chains, declared_inputs

    bundle.chain_inputs = declared_inputs(bundle.documents)
    bundle.inputs, bundle.external = apply_inputs(
        bundle.documents,
        inputs or {},
        require=require_inputs,
        optional=chain_filled(bundle.documents),
    )

    for doc in bundle.documents:
        _load_document(doc, bundle, errs)
    errs.raise_if_any()
    check_references(bundle, errs)
    check_stage_concurrency(bundle, errs)  # what iterations side by side cannot carry out
    check_chains(bundle, errs)
    for err in check_maps(bundle, provider_of):  # every free-form map is a schema too
        errs.add(err)
    errs.raise_if_any()
    for pipe in bundle.pipelines.values():
        try:  # every iteration of a loop, each with its own values
            resolve_stages(bundle, pipe, execution_id="<validate>", strict_inputs=False)
        except (SpecError, SpecErrors) as exc:
            errs.absorb(exc)
    errs.raise_if_any()
    return bundle


# Blocks of the Harness reference (and of Harness docs) that are not pipeline documents, and
# where their vmfarm counterpart lives.
_STRATEGY_HINT = (
    "a strategy block goes inside a Deployment stage's spec, next to execution (README: Strategies)"
)
NOT_A_DOCUMENT = {
    "rolloutDeployment": _STRATEGY_HINT,
    "canaryDeployment": _STRATEGY_HINT,
    "blueGreenDeployment": _STRATEGY_HINT,
    "healthCheck": "write it as a `- step:` (type HealthCheck or Command) in a stage's "
    "execution.steps",
    "secrets": "secrets live in a backend (`vmfarm secrets set`, VMFARM_SECRET_* variables, "
    "Vault, AWS Secrets Manager) and pipelines read them with "
    '<+secrets.getValue("id")> (README: Secrets)',
    "rbac": "roles and bindings are the operator's configuration (VMFARM_RBAC_FILE, "
    "configs/rbac.yaml; README: Governance)",
    "monitoring": "vmfarm's own metrics and alert rules are in configs/prometheus/ (README: "
    "Operating vmfarm); an application's checks are verification gates",
    "monitoring_alerts": "alert rules are in configs/prometheus/alerts.yaml (README: Operating "
    "vmfarm)",
    "rollbackStrategy": "a rollbackStrategy with its triggers goes in a Deployment stage, next "
    "to failureStrategies: the watch after deployment (README: A watch after deployment)",
    "trigger": "a trigger is kept by the server: store it with `vmfarm apply -f FILE` "
    "(README: Webhook triggers); `vmfarm schedules` runs pipelines on a cron",
    "autoScaling": "vmfarm does not scale your instances; `vmfarm autoscale` scales its workers",
    "predictiveScaling": "vmfarm does not scale your instances; `vmfarm autoscale` scales its "
    "workers",
}


# The top keys of Harness's own shape that vmfarm reads (app.definitions.native, templates,
# inputsets, harness_vocab).
HARNESS_TOP_KEYS = (
    "pipeline",
    "service",
    "environment",
    "infrastructureDefinition",
    "connector",
    "template",
    "inputSet",
    "secret",
)


def _load_document(doc: Document, bundle: Bundle, errs: Collector) -> None:
    data = doc.data
    if not isinstance(data, dict):
        errs.add(
            doc.error(
                f"a document must be a mapping with apiVersion, kind, metadata and "
                f"spec, got {_type_name(data)}",
                (),
            )
        )
        return
    kind = data.get("kind")
    if kind == "Trigger":
        errs.add(
            doc.error(
                "a trigger does not go with the pipeline files: the server keeps it "
                "(`vmfarm apply -f FILE`; README: Webhook triggers)",
                ("kind",),
            )
        )
        return
    if kind == "Freeze" or (kind is None and "freeze" in data):
        errs.add(
            doc.error(
                "a freeze does not go with the pipeline files (they could lift it): "
                "give it with vmfarm run --freeze FILE, or an operator puts it in "
                "VMFARM_FREEZE_DIR",
                ("kind",) if kind else ("freeze",),
                key=True,
            )
        )
        return
    if kind is None and not {"apiVersion", "metadata", "spec"} & set(data) and data:
        first = next(iter(data))
        hint = NOT_A_DOCUMENT.get(str(first), "")
        errs.add(
            doc.error(
                f"'{first}' at the top of a document is not something vmfarm reads: a pipeline "
                "file holds documents with apiVersion, kind ("
                + ", ".join([*m.KINDS, "Template"])
                + "), "
                "metadata and spec, or in Harness's own shape one of "
                + ", ".join(f"{k}:" for k in HARNESS_TOP_KEYS)
                + " at the top"
                + (f"; {hint}" if hint else ""),
                (first,),
                key=True,
            )
        )
        return
    if kind is None:
        errs.add(
            doc.error(
                "missing required field 'kind' (one of: "
                + ", ".join(m.KINDS)
                + "); a file in Harness's own shape has no kind: its top key says it ("
                + ", ".join(f"{k}:" for k in HARNESS_TOP_KEYS)
                + ")",
                (),
            )
        )
        return
    model = m.KINDS.get(kind) if isinstance(kind, str) else None
    if model is None:
        close = difflib.get_close_matches(str(kind), list(m.KINDS), n=1)
        hint = f"; did you mean '{close[0]}'?" if close else ""
        errs.add(
            doc.error(
                f"unknown kind '{kind}'{hint} (expected one of: " + ", ".join(m.KINDS) + ")",
                ("kind",),
            )
        )
        return
    obj = validate(doc, (), model, data, errs)
    if obj is None:
        return
    ident = obj.metadata.ident
    table = bundle.by_kind(kind)
    if ident in table:
        first = table[ident]
        errs.add(
            doc.error(
                f"duplicate {kind} identifier '{ident}' (first defined at "
                f"{first.doc.file}:{first.doc.pos(('metadata', 'identifier'))[0]})",
                ("metadata", "identifier")
                if "identifier" in data.get("metadata", {})
                else ("metadata", "name"),
            )
        )
        return
    table[ident] = Loaded(kind, ident, obj, doc)
    _resolve_relative_paths(doc, obj)
    if kind == "Environment":
        for i, inline in enumerate(obj.spec.infrastructure_definitions):
            iid = inline.ident
            if iid in bundle.infrastructures:
                errs.add(
                    doc.error(
                        f"duplicate Infrastructure identifier '{iid}'",
                        ("spec", "infrastructureDefinitions", i),
                    )
                )
                continue
            bundle.infrastructures[iid] = Loaded(
                "Infrastructure",
                iid,
                _inline_to_infra(inline, ident),
                doc,
                ("spec", "infrastructureDefinitions", i),
            )


def _inline_to_infra(inline: m.InlineInfra, env_ident: str) -> m.InfrastructureSpec:
    kind = inline.spec.cloud_provider_type
    itype = {
        "Aws": "SshWinRmAws",
        "Azure": "SshWinRmAzure",
        "Gcp": "SshWinRmGcp",
        "Physical": "Pdc",
        "Pdc": "Pdc",
    }[kind]
    return m.InfrastructureSpec(
        kind="Infrastructure",
        metadata=m.Metadata(name=inline.name, identifier=inline.ident),
        spec=m.InfrastructureBody(
            environment_ref=env_ident,
            deployment_type=inline.spec.deployment_type,
            type=itype,  # type: ignore[arg-type]
            spec=inline.spec.spec,
        ),
    )


def _resolve_relative_paths(doc: Document, obj: Any) -> None:
    """Key files and local artifacts are relative to the file that names them."""
    here = Path(doc.file).resolve().parent

    def absolute(p: str | None) -> str | None:
        if not p or "<+" in p:
            return p
        q = Path(os.path.expanduser(p))
        return str(q if q.is_absolute() else (here / q).resolve())

    if isinstance(obj, m.InfrastructureSpec | m.EnvironmentSpec):
        inners = (
            [obj.spec.spec]
            if isinstance(obj, m.InfrastructureSpec)
            else [i.spec.spec for i in obj.spec.infrastructure_definitions]
        )
        for inner in inners:
            if inner.connection:
                inner.connection.private_key_file = absolute(inner.connection.private_key_file)
                inner.connection.known_hosts_file = absolute(inner.connection.known_hosts_file)
            for h in inner.hosts:
                h.private_key_file = absolute(h.private_key_file)
                h.sandbox_root = absolute(h.sandbox_root)
    if isinstance(obj, m.ServiceSpec):
        art = obj.spec.service_definition.spec.artifacts.primary
        if art and art.type == "Local" and isinstance(art.spec.get("path"), str):
            art.spec["path"] = absolute(art.spec["path"])


def choose_pipeline(bundle: Bundle, pipeline: str | None) -> Loaded:
    """The pipeline to run: the one named, or the only one in the files."""
    if pipeline:
        if pipeline not in bundle.pipelines:
            raise SpecError(missing("Pipeline", pipeline, bundle.pipelines), file="--pipeline")
        return bundle.pipelines[pipeline]
    if len(bundle.pipelines) == 1:
        return next(iter(bundle.pipelines.values()))
    from app.definitions.chaining import roots

    top = roots(bundle)
    if len(top) == 1 and bundle.pipelines:  # the others are its children
        return bundle.pipelines[top[0]]
    if not bundle.pipelines:
        raise SpecError(
            "the given files define no Pipeline",
            file=", ".join(sorted({d.file for d in bundle.documents})),
        )
    raise SpecError(
        "the given files define several pipelines; choose one with --pipeline ("
        + ", ".join(sorted(bundle.pipelines))
        + ")",
        file="--pipeline",
    )
