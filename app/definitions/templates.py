"""Templates: reusable Pipeline, Stage, Step, StepGroup, Service, Environment and Infrastructure
bodies, expanded where they are referenced before anything else looks at the files.

A template is a document of its own, in vmfarm's form::

    apiVersion: v1
    kind: Template
    metadata: {name: Deploy stage, identifier: deploy_stage}
    spec:
      type: Stage            # Pipeline | Stage | Step | StepGroup | Service | Environment |
      versionLabel: v1       #   Infrastructure
      spec: {...}            # the body: a stage without name/identifier, a step, ...

or in Harness's (``template: {name, identifier, versionLabel, type, spec}``). It is used in
place of a stage, a step or a step group::

    - stage:
        name: Deploy web
        identifier: deploy_web
        template:
          templateRef: deploy_stage      # account./org. scope prefixes are accepted
          versionLabel: v1               # optional when the template has one version
          templateInputs: {...}          # the body's <+input> fields, at the same paths

or of a whole document's ``spec`` (``kind: Pipeline`` / ``Service`` / ``Environment`` /
``Infrastructure`` with ``spec: {template: {...}}``). The reference becomes the template's body
(a deep copy) with ``name`` and ``identifier`` from the referencing entry, and every ``<+input>``
of the body that ``templateInputs`` gives a value filled with it. Inputs that templateInputs
leaves out, or gives as ``<+input>``, stay runtime inputs of the pipeline (``--set``,
``--inputs``), named where they land (``pipeline.<id>.stages.<stage>...``).

templateInputs follows Harness: it has the body's shape with only the input fields; list entries
are matched by identifier (stage, step, step group, command unit), else by name (variables),
else by position; fields the template fixes may be repeated with the same value (``type``,
``identifier``) but not changed. A template that uses another template is filled first and
expanded next, so its templateInputs reach the inner reference's ``template.templateInputs``, as
in Harness.

Positions: a value that came from a template points into the template's file (and a value that
came from templateInputs at the templateInputs entry), while the field named is where the value
lands in the using document.
"""

from __future__ import annotations

import copy
import difflib
import re
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any, Literal

from pydantic import Field

from app.definitions import base
from app.definitions import models as m
from app.definitions.bundle import Collector as _Collector
from app.definitions.expressions import INPUT_RE, compile_input_regex, has_input, parse_input
from app.definitions.validation import _type_name
from app.definitions.validation import validate as _validate
from app.definitions.yamlload import Document, Path, dotted
from app.errors import SpecError

TemplateType = Literal[
    "Pipeline", "Stage", "Step", "StepGroup", "Service", "Environment", "Infrastructure"
]
# Document kinds whose whole spec may come from a template of the same type.
DOCUMENT_KINDS = ("Pipeline", "Service", "Environment", "Infrastructure")
# Keys of a pipeline's list entries that may hold a template reference, and the type they need.
ELEMENT_TYPES = {"stage": "Stage", "step": "Step", "stepGroup": "StepGroup"}
_WHAT = {"stage": "a stage", "step": "a step", "stepGroup": "a step group"}
# Fields an entry that uses a template may keep next to ``template``.
# A looping ``strategy`` (app.definitions.models.loops) may stand next to ``template``: the
# entry's loop, over whatever the template holds.
_ENTRY_FIELDS = ("name", "identifier", "description", "template", "strategy")
MAX_DEPTH = 20
Version = str | int | float


# --- schema of template documents and references -------------------------------------------------


class TemplateBody(base.Model):
    """``spec`` of a ``kind: Template`` document."""

    type: TemplateType
    version_label: Version | None = None
    description: str | None = None
    spec: dict[str, Any]


class TemplateDocument(base.Model):
    api_version: Literal["v1"] = "v1"
    kind: Literal["Template"]
    metadata: m.Metadata
    spec: TemplateBody


class HarnessTemplate(base.Model):
    """Harness's ``template:`` document."""

    name: str
    identifier: base.Identifier | None = None
    version_label: Version | None = None
    type: TemplateType
    description: str | None = None
    tags: dict[str, base.Scalar] = Field(default_factory=dict)
    org_identifier: str | None = None
    project_identifier: str | None = None
    icon: str | None = None
    spec: dict[str, Any]

    @property
    def ident(self) -> str:
        return self.identifier or base.identifier_of(self.name)


class HarnessTemplateDocument(base.Model):
    template: HarnessTemplate


class TemplateRef(base.Model):
    """``template: {templateRef, versionLabel, templateInputs}`` where a template is used."""

    template_ref: str
    version_label: Version | None = None
    template_inputs: dict[str, Any] | None = None


def _label(v: Version | None) -> str | None:
    return None if v is None else str(v)


@dataclass
class Template:
    """One version of a template, and where its body stands."""

    ident: str
    version: str | None
    type: str
    doc: Document
    body_path: Path

    @property
    def body(self) -> Any:
        data = self.doc.data
        for p in self.body_path:
            data = data[p]
        return data

    @property
    def label(self) -> str:
        return f"'{self.ident}'" + (f" {self.version}" if self.version is not None else "")


def is_template_document(data: Any) -> bool:
    """``kind: Template``, or Harness's top-level ``template:`` form."""
    if not isinstance(data, dict):
        return False
    return data.get("kind") == "Template" or (
        "template" in data and "kind" not in data and "apiVersion" not in data
    )


# --- a document with content from templates ----------------------------------------------------


Origin = tuple[Document | None, Path]  # (None: this document's own positions, path)


@dataclass
class ExpandedDocument(Document):
    """A document whose data has template bodies expanded into it.

    ``origins`` maps a path of this document's data to where that part was written: in a
    template's document, or (``None``) in this document itself. The longest matching prefix
    wins. ``file`` stays the using document's: runtime inputs and the plan name it.
    """

    origins: dict[Path, Origin] = field(default_factory=dict)

    def origin(self, path: Path) -> Origin:
        path = tuple(path)
        for n in range(len(path), -1, -1):
            hit = self.origins.get(path[:n])
            if hit is not None:
                return hit[0], (*hit[1], *path[n:])
        return None, path

    def pos(self, path: Path, *, key: bool = False) -> tuple[int, int]:
        src, p = self.origin(path)
        return super().pos(p, key=key) if src is None else src.pos(p, key=key)

    def locate(self, path: Path, needle: str) -> tuple[int, int]:
        src, p = self.origin(path)
        return super().locate(p, needle) if src is None else src.locate(p, needle)

    def where(self, path: Path, *, key: bool = False) -> tuple[str, int, int]:
        """File, line and column of ``path`` (the loader asks this of expanded documents)."""
        src, p = self.origin(path)
        if src is None:
            return (self.file, *super().pos(p, key=key))
        return (src.file, *src.pos(p, key=key))

    def error(
        self, message: str, path: Path, *, key: bool = False, within: str | None = None
    ) -> SpecError:
        src, p = self.origin(path)
        if src is None:
            return super().error(message, path, key=key, within=within)
        line, col = src.locate(p, within) if within else src.pos(p, key=key)
        return SpecError(message, file=src.file, line=line, col=col, field=dotted(path))


# --- expansion ----------------------------------------------------------------------------------


def expand_templates(documents: list[Document]) -> tuple[list[Document], list[Document]]:
    """Set Template documents aside and expand every template reference of the others.

    Returns (the other documents, expanded where they use templates; the template documents).
    Raises SpecError / SpecErrors naming file:line:col and field.
    """
    errs = _Collector()
    templates: list[Document] = []
    others: list[Document] = []
    for doc in documents:
        (templates if is_template_document(doc.data) else others).append(doc)
    broken: set[str] = set()
    registry = _register(templates, errs, broken)
    expander = _Expander(registry, errs, broken)
    out = [expander.document(doc) for doc in others]
    for tpl in (t for versions in registry.values() for t in versions.values()):
        if (tpl.ident, tpl.version) not in expander.used:
            check_unused(tpl, expander, errs)
    errs.raise_if_any()
    return out, templates


# Where a template of each type stands in a document that uses it, to check a template that no
# loaded document uses: (kind of the using document, path of the entry, slot).
_USE_AT: dict[str, tuple[str, Path, str]] = {
    "Pipeline": ("Pipeline", ("spec",), "Pipeline"),
    "Service": ("Service", ("spec",), "Service"),
    "Environment": ("Environment", ("spec",), "Environment"),
    "Infrastructure": ("Infrastructure", ("spec",), "Infrastructure"),
    "Stage": ("Pipeline", ("spec", "stages", 0, "stage"), "stage"),
    "Step": (
        "Pipeline",
        ("spec", "stages", 0, "stage", "spec", "execution", "steps", 0, "step"),
        "step",
    ),
    "StepGroup": (
        "Pipeline",
        ("spec", "stages", 0, "stage", "spec", "execution", "steps", 0, "stepGroup"),
        "stepGroup",
    ),
}
_UNUSED = "template_check"


def check_unused(tpl: Template, expander: _Expander, errs: _Collector) -> None:
    """Check a template that no loaded document uses, as if a document used it with no
    templateInputs: unknown keys, unknown types and wrong values are errors in the template's
    file, like those of any other document. A value that holds ``<+input>`` is left to the user
    of the template, and so is the type check of a part whose ``type`` is an input."""
    kind, at, slot = _USE_AT[tpl.type]
    ref: dict[str, Any] = {"templateRef": tpl.ident}
    if tpl.version is not None:
        ref["versionLabel"] = tpl.version
    entry: dict[str, Any] = {"template": ref}
    if slot in ELEMENT_TYPES:
        entry = {"name": _UNUSED, "identifier": _UNUSED, **entry}
    data: dict[str, Any] = {
        "apiVersion": "v1",
        "kind": kind,
        "metadata": {"name": _UNUSED, "identifier": _UNUSED},
    }
    if slot == "stage":
        data["spec"] = {"stages": [{"stage": entry}]}
    elif slot in ("step", "stepGroup"):
        data["spec"] = {
            "stages": [
                {
                    "stage": {
                        "name": _UNUSED,
                        "identifier": _UNUSED,
                        "type": "Deployment",
                        "spec": {
                            "deploymentType": "Ssh",
                            "service": {"serviceRef": _UNUSED},
                            "environment": {
                                "environmentRef": _UNUSED,
                                "infrastructureDefinitions": [{"identifier": _UNUSED}],
                            },
                            "execution": {"steps": [{slot: entry}]},
                        },
                    }
                }
            ]
        }
    else:
        data["spec"] = entry
    out = ExpandedDocument(file=tpl.doc.file, index=tpl.doc.index, data=data, line=tpl.doc.line)
    out.origins[()] = (tpl.doc, tpl.body_path)
    mine = _Collector()
    sub = _Expander(expander.registry, mine, expander.broken)
    sub.used = expander.used
    if slot in DOCUMENT_KINDS:
        sub.expand(out, at, slot, ())
    else:
        sub.walk(out, out.data, (), ())
    if mine.errors:  # errors of the templates it uses are reported with those
        for e in mine.errors:
            errs.add(e)
        return
    model = m.KINDS[kind]
    checked = _Collector()
    _validate(out, (), model, out.data, checked)
    inside, body = dotted(at), dotted(tpl.body_path)
    for e in checked.errors:
        if _input_in(out.data, e.field):
            continue
        fld = e.field or ""
        if fld.startswith(inside) and fld[len(inside) : len(inside) + 1] in ("", ".", "["):
            fld = body + fld[len(inside) :]  # named from the template document's root
        errs.add(SpecError(e.message, file=e.file, line=e.line, col=e.col, field=fld))


def _input_in(data: Any, field_name: str | None) -> bool:
    """Whether the value at the dotted ``field_name`` (or a ``type`` beside it, which decides
    what the part may hold) is or holds a runtime input."""
    if not field_name:
        return False
    node: Any = data
    parents: list[Any] = []
    for part in re.findall(r"[^.\[\]]+|\[\d+\]", field_name):
        parents.append(node)
        if part.startswith("["):
            i = int(part[1:-1])
            node = node[i] if isinstance(node, list) and i < len(node) else None
        else:
            node = node.get(part) if isinstance(node, dict) else None
    if node is not None and has_input(repr(node)):
        return True
    return any(isinstance(p, dict) and has_input(str(p.get("type", ""))) for p in parents)


def _register(
    docs: list[Document], errs: _Collector, broken: set[str]
) -> dict[str, dict[str | None, Template]]:
    """Templates by identifier and version; ``broken`` gets the identifiers of the invalid ones
    (their errors are reported; references to them are not reported again)."""
    registry: dict[str, dict[str | None, Template]] = {}
    for doc in docs:
        if doc.data.get("kind") == "Template":
            obj = _validate(doc, (), TemplateDocument, doc.data, errs)
            if obj is None:
                broken.add(_raw_ident(doc.data.get("metadata")))
                continue
            tpl = Template(
                obj.metadata.ident,
                _label(obj.spec.version_label),
                obj.spec.type,
                doc,
                ("spec", "spec"),
            )
            where: Path = (
                ("metadata", "identifier")
                if "identifier" in doc.data["metadata"]
                else ("metadata", "name")
            )
        else:
            hobj = _validate(doc, (), HarnessTemplateDocument, doc.data, errs)
            if hobj is None:
                broken.add(_raw_ident(doc.data.get("template")))
                continue
            t = hobj.template
            tpl = Template(t.ident, _label(t.version_label), t.type, doc, ("template", "spec"))
            where = (
                ("template", "identifier")
                if "identifier" in doc.data["template"]
                else ("template", "name")
            )
        versions = registry.setdefault(tpl.ident, {})
        if tpl.version in versions:
            first = versions[tpl.version]
            errs.add(
                doc.error(
                    f"duplicate template {tpl.label} (first defined at "
                    f"{first.doc.file}:{first.doc.line})",
                    where,
                )
            )
            continue
        versions[tpl.version] = tpl
    return registry


def _raw_ident(meta: Any) -> str:
    if not isinstance(meta, dict):
        return ""
    ident = meta.get("identifier") or base.identifier_of(str(meta.get("name", "")))
    return str(ident)


class _Expander:
    def __init__(
        self, registry: dict[str, dict[str | None, Template]], errs: _Collector, broken: set[str]
    ) -> None:
        self.registry = registry
        self.errs = errs
        self.broken = broken
        self.used: set[tuple[str, str | None]] = set()

    def document(self, doc: Document) -> Document:
        data = doc.data
        if (
            not isinstance(data, dict)
            or data.get("kind") not in DOCUMENT_KINDS
            or not _uses_templates(data)
        ):
            return doc
        out = ExpandedDocument(
            file=doc.file,
            index=doc.index,
            data=copy.deepcopy(data),
            values=doc.values,
            keys=doc.keys,
            line=doc.line,
            sources=doc.sources,
        )
        spec = out.data.get("spec")
        if isinstance(spec, dict) and "template" in spec:
            self.expand(out, ("spec",), str(data["kind"]), ())
        elif data.get("kind") == "Pipeline":
            self.walk(out, out.data, (), ())
        return out

    def walk(
        self,
        out: ExpandedDocument,
        data: Any,
        path: Path,
        stack: tuple[tuple[str, str | None], ...],
    ) -> None:
        """Expand every stage/step/stepGroup entry of ``data`` that names a template."""
        if isinstance(data, dict):
            for k in list(data):
                v = data[k]
                if k in ELEMENT_TYPES and isinstance(v, dict) and "template" in v:
                    self.expand(out, (*path, k), k, stack)
                else:
                    self.walk(out, v, (*path, k), stack)
        elif isinstance(data, list):
            for i, v in enumerate(data):
                self.walk(out, v, (*path, i), stack)

    def expand(
        self,
        out: ExpandedDocument,
        path: Path,
        slot: str,
        stack: tuple[tuple[str, str | None], ...],
    ) -> None:
        """Replace the entry at ``path`` (``slot``: stage/step/stepGroup or a document kind)."""
        entry = _get(out.data, path)
        document_level = slot in DOCUMENT_KINDS
        what = f"a {slot}" if document_level else _WHAT[slot]
        want = slot if document_level else ELEMENT_TYPES[slot]
        ok = True
        allowed = ("template",) if document_level else _ENTRY_FIELDS
        for k in entry:
            if k not in allowed:
                self.errs.add(
                    out.error(
                        f"'{k}' cannot stand next to 'template': {what} that uses a template takes "
                        f"only {', '.join(allowed)} (put '{k}' in the template, or give it through "
                        "templateInputs)",
                        (*path, k),
                        key=True,
                    )
                )
                ok = False
        if not document_level:
            for k in ("name", "identifier"):
                if k not in entry:
                    self.errs.add(
                        out.error(f"{what} that uses a template needs '{k}'", path, key=True)
                    )
                    ok = False
        ref = self.reference(out, (*path, "template"), entry["template"])
        if ref is None or not ok:
            return
        tpl = self.find(out, path, ref)
        if tpl is None:
            return
        ref_at: Path = (*path, "template", "templateRef")
        self.used.add((tpl.ident, tpl.version))
        if tpl.type != want:
            self.errs.add(
                out.error(
                    f"template {tpl.label} is a {tpl.type} template; {what} needs a {want} template",
                    ref_at,
                )
            )
            return
        key = (tpl.ident, tpl.version)
        if key in stack or len(stack) >= MAX_DEPTH:
            chain = " -> ".join([*(f"'{i}'" for i, _ in stack), f"'{tpl.ident}'"])
            self.errs.add(out.error(f"template {tpl.label} uses itself ({chain})", ref_at))
            return
        body = copy.deepcopy(tpl.body)
        if want == "StepGroup":
            body.pop("stageType", None)  # Harness's step group templates name their stage type
        inputs_at: Path = (*path, "template", "templateInputs")
        filled: dict[Path, Path] = {}
        if ref.template_inputs:
            body = _Filler(out, tpl, inputs_at, filled, self.errs).fill(
                body, entry["template"]["templateInputs"], (), ()
            )
        # Where each part was written, worked out before the entry is replaced.
        kept = {
            k: out.origin((*path, k))
            for k in ("name", "identifier", "description", "strategy")
            if k in entry
        }
        from_inputs = {s: out.origin((*inputs_at, *ip)) for s, ip in filled.items()}
        if document_level:
            new: dict[str, Any] = body
        else:
            new = {k: entry[k] for k in ("name", "identifier")}
            new.update((k, v) for k, v in body.items() if k not in ("name", "identifier"))
            for k in ("description", "strategy"):
                if k in entry:
                    new[k] = entry[k]
        _set(out.data, path, new)
        for p in [p for p in out.origins if len(p) > len(path) and p[: len(path)] == path]:
            del out.origins[p]
        for k in body:
            out.origins[(*path, k)] = (tpl.doc, (*tpl.body_path, k))
        for k, o in kept.items():
            out.origins[(*path, k)] = o
        for s, o in from_inputs.items():
            out.origins[(*path, *s)] = o
        self.walk(out, new, path, (*stack, key))

    def reference(self, out: ExpandedDocument, at: Path, data: Any) -> TemplateRef | None:
        """``template: {templateRef, versionLabel, templateInputs}``, validated; its errors
        name the field from the document's root (as every other error does)."""
        mine = _Collector()
        ref: TemplateRef | None = _validate(out, at, TemplateRef, data, mine)
        for e in mine.errors:
            fld = dotted(at) + (f".{e.field}" if e.field else "")
            self.errs.add(SpecError(e.message, file=e.file, line=e.line, col=e.col, field=fld))
        return ref

    def find(self, out: ExpandedDocument, path: Path, ref: TemplateRef) -> Template | None:
        name = re.sub(r"^(account|org|project)\.", "", ref.template_ref.strip())
        ref_at: Path = (*path, "template", "templateRef")
        versions = self.registry.get(name)
        if versions is None and name in self.broken:
            return None  # the template itself is invalid: reported there
        if versions is None:
            close = difflib.get_close_matches(name, list(self.registry), n=1)
            hint = f"; did you mean '{close[0]}'?" if close else ""
            known = ", ".join(sorted(self.registry)) or "none loaded"
            self.errs.add(
                out.error(
                    f"template '{name}' is not defined in the given files{hint} "
                    f"(templates: {known})",
                    ref_at,
                )
            )
            return None
        wanted = _label(ref.version_label)
        shown = ", ".join(sorted(str(v) for v in versions if v is not None)) or "no versionLabel"
        if wanted is None:
            if len(versions) == 1 and name not in self.broken:
                return next(iter(versions.values()))
            if name in self.broken:
                return None
            self.errs.add(
                out.error(
                    f"template '{name}' has several versions ({shown}): choose "
                    "one with versionLabel",
                    ref_at,
                )
            )
            return None
        if wanted not in versions:
            if name in self.broken:
                return None  # perhaps the invalid one: reported there
            self.errs.add(
                out.error(
                    f"template '{name}' has no version '{wanted}' (versions: {shown})",
                    (*path, "template", "versionLabel"),
                )
            )
            return None
        return versions[wanted]


class _Filler:
    """Fill a template body's <+input> fields from templateInputs, recording where each filled
    value came from (body path -> templateInputs path)."""

    def __init__(
        self,
        out: ExpandedDocument,
        tpl: Template,
        inputs_at: Path,
        filled: dict[Path, Path],
        errs: _Collector,
    ) -> None:
        self.out = out
        self.tpl = tpl
        self.inputs_at = inputs_at
        self.filled = filled
        self.errs = errs

    def error(self, message: str, ipath: Path, *, key: bool = False) -> None:
        self.errs.add(self.out.error(message, (*self.inputs_at, *ipath), key=key))

    def fill(self, t: Any, i: Any, tpath: Path, ipath: Path) -> Any:
        """The template value ``t`` (at ``tpath`` in the body) with ``i`` applied."""
        if isinstance(t, str) and has_input(t):
            return self._input(t, i, tpath, ipath)
        shown = dotted(tpath) or "templateInputs"
        if isinstance(t, dict):
            if not isinstance(i, dict):
                self.error(
                    f"'{shown}' must be a mapping (as in template {self.tpl.label}), got "
                    f"{_type_name(i)}",
                    ipath,
                )
                return t
            for k, v in i.items():
                if k not in t:
                    close = difflib.get_close_matches(k, list(t), n=1)
                    hint = f"; did you mean '{close[0]}'?" if close else ""
                    self.error(
                        f"templateInputs names '{dotted((*tpath, k))}', which template "
                        f"{self.tpl.label} does not have{hint}",
                        (*ipath, k),
                        key=True,
                    )
                    continue
                t[k] = self.fill(t[k], v, (*tpath, k), (*ipath, k))
            return t
        if isinstance(t, list):
            if not isinstance(i, list):
                self.error(
                    f"'{shown}' must be a list (as in template {self.tpl.label}), got "
                    f"{_type_name(i)}",
                    ipath,
                )
                return t
            used: set[int] = set()
            for j, v in enumerate(i):
                k = _match(t, v, j, used)
                if k is None:
                    key = _entry_key(v)
                    which = f"with {key[0]} '{key[1]}'" if key else f"number {j + 1}"
                    self.error(
                        f"templateInputs names an entry of '{shown}' {which}, which "
                        f"template {self.tpl.label} does not have",
                        (*ipath, j),
                    )
                    continue
                used.add(k)
                t[k] = self.fill(t[k], v, (*tpath, k), (*ipath, j))
            return t
        if i == t or (_is_scalar(i) and _is_scalar(t) and str(i) == str(t)):
            return t  # repeats what the template says (type, identifier): fine
        self.error(
            f"'{shown}' is fixed to {t!r} by template {self.tpl.label}; templateInputs can "
            "only give its <+input> fields",
            ipath,
        )
        return t

    def _input(self, t: str, i: Any, tpath: Path, ipath: Path) -> Any:
        if i is None or (isinstance(i, str) and i.strip() == "<+input>"):
            return t  # left for run time (with the template's default and allowed values)
        value: Any = i
        if _is_scalar(i) and not (isinstance(i, str) and has_input(i)):
            opts = parse_input(t)
            allowed = opts.get("allowed")
            text = str(i).lower() if isinstance(i, bool) else str(i)
            if isinstance(allowed, list) and allowed and text not in allowed:
                self.error(
                    f"'{dotted(tpath)}' = {i!r} is not one of the values template "
                    f"{self.tpl.label} allows {allowed}",
                    ipath,
                )
                return t
            regex = opts.get("regex")
            try:  # RE2: linear in the value, whatever the pattern
                fits = (
                    not isinstance(regex, str)
                    or compile_input_regex(regex).fullmatch(text) is not None
                )
            except ValueError as exc:
                self.error(
                    f"'{dotted(tpath)}': <+input>.regex({regex}) of template "
                    f"{self.tpl.label} cannot be used: {exc}",
                    ipath,
                )
                return t
            if not fits:
                self.error(
                    f"'{dotted(tpath)}' = {i!r} does not match {regex} (template {self.tpl.label})",
                    ipath,
                )
                return t
            if INPUT_RE.fullmatch(t.strip()) is None:
                value = INPUT_RE.sub(lambda _: text, t)  # <+input> inside a longer string
        self.filled[tpath] = ipath
        return value


def _is_scalar(v: Any) -> bool:
    return isinstance(v, str | int | float | bool)


def _entry_key(v: Any) -> tuple[str, str] | None:
    """How a list entry names itself: its (inner) identifier, else its name."""
    if not isinstance(v, dict):
        return None
    for inner in ELEMENT_TYPES:
        body = v.get(inner)
        if isinstance(body, dict) and _is_scalar(body.get("identifier")):
            return ("identifier", str(body["identifier"]))
    for k in ("identifier", "name"):
        if _is_scalar(v.get(k)):
            return (k, str(v[k]))
    return None


def _match(t: list[Any], v: Any, j: int, used: set[int]) -> int | None:
    """Which entry of the template list ``t`` the templateInputs entry ``v`` (number ``j``)
    fills: the one with the same identifier or name, else the one at the same position when
    that one does not name itself otherwise (its name is an input, or it has none)."""
    key = _entry_key(v)
    if key is not None:
        for k, e in enumerate(t):
            if k not in used and _entry_key(e) == key:
                return k
    if j < len(t) and j not in used:
        own = _entry_key(t[j])
        if own is None or has_input(own[1]) or key is None:
            return j
    return None


def _uses_templates(data: Any) -> bool:
    if isinstance(data, dict):
        return "template" in data or any(_uses_templates(v) for v in data.values())
    if isinstance(data, list):
        return any(_uses_templates(v) for v in data)
    return False


def _get(data: Any, path: Path) -> Any:
    for p in path:
        data = data[p]
    return data


def _set(data: Any, path: Path, value: Any) -> None:
    for p in path[:-1]:
        data = data[p]
    data[path[-1]] = value


def templates_of(documents: list[Document]) -> Iterator[tuple[str, str | None, str]]:
    """(identifier, version, type) of every template among ``documents`` (for listings)."""
    for doc in documents:
        data = doc.data
        if not is_template_document(data):
            continue
        if data.get("kind") == "Template":
            spec = data.get("spec") if isinstance(data.get("spec"), dict) else {}
            yield (
                _raw_ident(data.get("metadata")),
                _label(spec.get("versionLabel")),
                str(spec.get("type")),
            )
        else:
            t = data.get("template") if isinstance(data.get("template"), dict) else {}
            yield _raw_ident(t), _label(t.get("versionLabel")), str(t.get("type"))
