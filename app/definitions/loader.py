"""Load pipeline files into a validated bundle, then resolve one pipeline into a plan.

``load(paths)`` reads files or folders of multi-document YAML, checks each document against its
kind's schema and checks the references between documents. ``resolve(bundle, ...)`` fills the
runtime inputs, renders every host-independent expression and returns plain data (JSON-able) that
the coordinator stores with the execution. Every problem is a ``SpecError`` naming
``file:line:col`` and the field; all problems found are reported together.
"""

from __future__ import annotations

import copy
import difflib
import os
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pydantic import ValidationError

from app.definitions import base
from app.definitions import models as m
from app.definitions.expressions import (
    EXPR_RE,
    INPUT_RE,
    Context,
    compile_input_regex,
    has_input,
    parse_input,
    render,
    render_script,
)
from app.definitions.schemas import check_maps
from app.definitions.shell import unterminated
from app.definitions.yamlload import MAX_FILE_BYTES, Document, dotted, load_documents
from app.errors import SpecError, SpecErrors

if TYPE_CHECKING:
    from app.definitions.plan import Plan

YAML_SUFFIXES = (".yaml", ".yml")
MAX_ERRORS = 50


@dataclass
class Loaded:
    """A validated document: its model, the raw data, and where it came from."""

    kind: str
    ident: str
    model: Any
    doc: Document
    base: tuple[str | int, ...] = ()  # where this object's data sits inside doc.data

    @property
    def raw(self) -> Any:
        data = self.doc.data
        for p in self.base:
            data = data[p]
        return data

    def error(self, message: str, path: Sequence[str | int] = ()) -> SpecError:
        return self.doc.error(message, (*self.base, *path))


@dataclass
class InputSlot:
    """A ``<+input>`` in the files: where it is and how ``--set`` names it."""

    name: str  # e.g. service.web_app_vm.artifacts.primary.spec.tag
    doc: Document
    path: tuple[str | int, ...]
    options: dict[str, object]


@dataclass
class Bundle:
    """Every document of a load, by kind and identifier."""

    documents: list[Document] = field(default_factory=list)
    services: dict[str, Loaded] = field(default_factory=dict)
    environments: dict[str, Loaded] = field(default_factory=dict)
    infrastructures: dict[str, Loaded] = field(default_factory=dict)
    pipelines: dict[str, Loaded] = field(default_factory=dict)
    inputs: list[InputSlot] = field(default_factory=list)
    # Hook (templates): the Template documents of the load, set aside by
    # app.definitions.templates.expand_templates (their bodies are expanded where they are used).
    templates: list[Document] = field(default_factory=list)
    # (file, path) of every value that came from a runtime input: quoted in scripts.
    external: set[tuple[str, int, tuple[str | int, ...]]] = field(default_factory=set)

    def by_kind(self, kind: str) -> dict[str, Loaded]:
        return {
            "Service": self.services,
            "Environment": self.environments,
            "Infrastructure": self.infrastructures,
            "Pipeline": self.pipelines,
        }[kind]


class _Collector:
    def __init__(self) -> None:
        self.errors: list[SpecError] = []

    def add(self, err: SpecError) -> None:
        if len(self.errors) < MAX_ERRORS and str(err) not in {str(e) for e in self.errors}:
            self.errors.append(err)

    def absorb(self, exc: SpecError | SpecErrors) -> None:
        """Keep every error of ``exc`` (one, or several)."""
        for e in exc.errors if isinstance(exc, SpecErrors) else [exc]:
            self.add(e)

    def raise_if_any(self) -> None:
        if self.errors:
            self.errors.sort(key=lambda e: (e.file, e.line, e.col))
            raise SpecErrors(self.errors) if len(self.errors) > 1 else self.errors[0]


# --- reading files -------------------------------------------------------------------------------


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
        raise SpecError(f"file is larger than {MAX_FILE_BYTES // 2**20} MiB, the most vmfarm "
                        "reads in one pipeline file (MAX_FILE_BYTES): split it into several "
                        "files", file=str(path), line=1, col=1)
    if b"\x00" in data:
        raise SpecError("not a YAML file (binary content)", file=str(path), line=1, col=1)
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise SpecError(f"not UTF-8 text (byte {exc.start})", file=str(path), line=1, col=1) \
            from None


# --- pydantic errors -> positioned errors --------------------------------------------------------


def _loc_to_path(doc: Document, base: tuple[str | int, ...], loc: tuple[Any, ...]) -> tuple[
    str | int, ...
]:
    """Map pydantic's loc (which includes union tags) onto the data path in the document."""
    path = list(base)
    data: Any = doc.data
    for p in base:
        data = data[p]
    for part in loc:
        present = isinstance(data, dict) and isinstance(part, str) and part in data
        present = present or (isinstance(data, list) and isinstance(part, int)
                              and 0 <= part < len(data))
        if present:
            path.append(part)
            data = data[part]
        elif isinstance(data, dict) and isinstance(part, str) and part not in data:
            # Either a union tag (skip it) or a missing field (the error names it).
            continue
    return tuple(path)


def _friendly(err: Mapping[str, Any], model: type[Any], loc_path: tuple[Any, ...]) -> str:
    etype = err["type"]
    loc = err["loc"]
    name = str(loc[-1]) if loc else ""
    if len(loc) > 1 and isinstance(loc[-1], int):
        name = f"{loc[-2]}[{loc[-1]}]"
    inp = err.get("input")
    if etype == "extra_forbidden":
        allowed = _allowed_fields(model, loc[:-1])
        close = difflib.get_close_matches(name, allowed, n=1)
        hint = f"; did you mean '{close[0]}'?" if close else ""
        shown = ", ".join(allowed) if allowed else ""
        return f"unknown field '{name}'{hint}" + (f" (allowed: {shown})" if shown else "")
    if etype == "missing":
        return f"missing required field '{name}'"
    if etype in ("literal_error", "union_tag_invalid"):
        expected = err.get("ctx", {}).get("expected") or err.get("ctx", {}).get("expected_tags")
        if isinstance(inp, dict) and etype == "union_tag_invalid":
            tag = err.get("ctx", {}).get("tag")
            return f"unknown type '{tag}' (expected one of {expected})"
        return f"invalid value {inp!r} for '{name}' (expected one of {expected})"
    if etype == "union_tag_not_found":
        return f"missing required field '{err.get('ctx', {}).get('discriminator', 'type')}'"
    if etype in ("dict_type", "model_type", "model_attributes_type"):
        return f"'{name}' must be a mapping, got {_type_name(inp)}"
    if etype == "list_type":
        return f"'{name}' must be a list, got {_type_name(inp)}"
    if etype.startswith(("int_", "float_", "bool_", "string_")) or etype in (
        "string_type", "int_type", "bool_type", "float_type"
    ):
        want = etype.split("_")[0]
        want = {"int": "an integer", "float": "a number", "bool": "true or false",
                "string": "a string"}.get(want, want)
        shown = f" {inp!r}" if isinstance(inp, str | int | float) else ""
        return f"'{name}' must be {want}, got {_type_name(inp)}{shown}"
    if etype == "too_short":
        return f"'{name}' must not be empty"
    msg = str(err.get("msg", "invalid value"))
    msg = msg.removeprefix("Value error, ")
    if not name or isinstance(loc[-1], int) or msg.startswith((name, f"'{name}")):
        return msg  # the message already names the field ("identifier 'my-step' must ...")
    return f"'{name}': {msg}"


def _type_name(v: Any) -> str:
    return {dict: "a mapping", list: "a list", str: "a string", int: "an integer",
            float: "a number", bool: "a boolean", type(None): "nothing (null)"}.get(
        type(v), type(v).__name__)


def _allowed_fields(model: type[Any], loc: tuple[Any, ...]) -> list[str]:
    """Field aliases allowed at ``loc`` in ``model``, walking nested models and unions."""
    cur: Any = model
    for part in loc:
        if isinstance(part, int):
            continue
        nxt = None
        for cand in _models_of(cur):
            for fname, finfo in cand.model_fields.items():
                if part in (fname, finfo.alias):
                    nxt = finfo.annotation
                    break
            if nxt is None:
                # union tag such as 'Script'
                for sub in _models_of(cur):
                    tag = sub.model_fields.get("type")
                    if tag is not None and part in getattr(tag.annotation, "__args__", ()):
                        nxt = sub
                        break
            if nxt is not None:
                break
        if nxt is None:
            return []
        cur = nxt
    fields: list[str] = []
    for cand in _models_of(cur):
        fields.extend(f.alias or n for n, f in cand.model_fields.items())
    return sorted(set(fields))


def _models_of(tp: Any) -> list[type[Any]]:
    out: list[type[Any]] = []
    stack = [tp]
    while stack:
        t = stack.pop()
        if isinstance(t, type) and issubclass(t, base.Model):
            out.append(t)
        for a in getattr(t, "__args__", ()) or ():
            stack.append(a)
        meta = getattr(t, "__metadata__", None)
        origin = getattr(t, "__origin__", None)
        if meta is not None and origin is not None:
            stack.append(origin)
    return out


_SCALAR_TAGS = {"str", "int", "float", "bool"}


def _where(doc: Document, path: tuple[str | int, ...], *, key: bool = False) -> tuple[
    str, int, int
]:
    """File, line and column of ``path`` in ``doc``.

    Hook (templates): a document expanded from templates
    (app.definitions.templates.ExpandedDocument) knows which file each part came from; any
    other document is its own file.
    """
    where = getattr(doc, "where", None)
    if callable(where):
        file, line, col = where(path, key=key)
        return str(file), int(line), int(col)
    line, col = doc.pos(path, key=key)
    return doc.file, line, col


def _validate(doc: Document, base: tuple[str | int, ...], model: type[base.Model], data: Any,
              errs: _Collector) -> Any:
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        seen_union: set[tuple[Any, ...]] = set()
        for err in exc.errors():
            loc = tuple(err["loc"])
            if loc and loc[-1] in _SCALAR_TAGS:
                # One error for a scalar union (str | int | float | bool), not one per member.
                if loc[:-1] in seen_union:
                    continue
                seen_union.add(loc[:-1])
                path = _loc_to_path(doc, base, loc[:-1])
                file, line, col = _where(doc, path)  # hook (templates)
                errs.add(SpecError(
                    f"'{loc[-2]}' must be a string, number or boolean, got "
                    f"{_type_name(err.get('input'))}", file=file, line=line, col=col,
                    field=dotted(path[len(base):])))
                continue
            path = _loc_to_path(doc, base, loc)
            if err["type"] == "union_tag_invalid" and isinstance(_get_at(doc.data, path), dict) \
                    and "type" in _get_at(doc.data, path):
                path = (*path, "type")
            key = err["type"] == "extra_forbidden"
            file, line, col = _where(doc, path, key=key)  # hook (templates)
            fld = dotted(path[len(base):]) if path[len(base):] else dotted(loc)
            if err["type"] == "missing":
                fld = dotted((*path[len(base):], loc[-1]))
            errs.add(SpecError(_friendly(err, model, loc), file=file, line=line, col=col,
                               field=fld))
        return None


# --- runtime inputs -------------------------------------------------------------------------------


def _input_name(kind: str, ident: str, path: tuple[str | int, ...], data: Any) -> str:
    parts: list[str] = [kind.lower(), ident]
    cur = data
    skip = {("spec",), ("spec", "serviceDefinition"), ("spec", "serviceDefinition", "spec")}
    walked: tuple[str | int, ...] = ()
    i = 0
    while i < len(path):
        p = path[i]
        walked = (*walked, p)
        nxt = cur[p]
        if (isinstance(p, int) and isinstance(nxt, dict) and "name" in nxt
                and i + 1 < len(path) and path[i + 1] == "value"):
            parts.append(str(nxt["name"]))
            break
        if isinstance(p, int):
            # Use the element's identifier when it has one (stage/step lists). Hook (input
            # sets): a step group is named by its identifier too, not by its position, so that
            # an --inputs file (which lists only the entries with inputs) can name its inputs.
            inner = (nxt.get("stage") or nxt.get("step") or nxt.get("stepGroup")) \
                if isinstance(nxt, dict) else None
            ident_v = inner.get("identifier") if isinstance(inner, dict) else None
            if ident_v is None and isinstance(nxt, dict):
                ident_v = nxt.get("identifier")
            parts.append(str(ident_v) if ident_v else str(p))
        elif walked not in skip and p not in ("stage", "step"):
            parts.append(str(p))
        cur = nxt
        i += 1
    return ".".join(parts)


def _find_inputs(doc: Document, data: Any, path: tuple[str | int, ...] = ()) -> Iterable[
    tuple[tuple[str | int, ...], str]
]:
    if isinstance(data, dict):
        for k, v in data.items():
            yield from _find_inputs(doc, v, (*path, k))
    elif isinstance(data, list):
        for i, v in enumerate(data):
            yield from _find_inputs(doc, v, (*path, i))
    elif isinstance(data, str) and has_input(data):
        yield path, data


def _set_at(data: Any, path: tuple[str | int, ...], value: Any) -> None:
    for p in path[:-1]:
        data = data[p]
    data[path[-1]] = value


def apply_inputs(bundle_docs: list[Document], inputs: Mapping[str, str], *,
                 require: bool) -> tuple[list[InputSlot], set[tuple[str, int, tuple[Any, ...]]]]:
    """Fill every ``<+input>`` from ``inputs`` (``--set`` keys match a name's trailing parts)."""
    errs = _Collector()
    slots: list[InputSlot] = []
    for doc in bundle_docs:
        if not isinstance(doc.data, dict):
            continue
        kind = str(doc.data.get("kind", "doc"))
        meta = doc.data.get("metadata")
        if not isinstance(meta, dict):
            meta = {}
        ident = str(meta.get("identifier") or base.identifier_of(str(meta.get("name", doc.index))))
        for path, text in _find_inputs(doc, doc.data):
            slots.append(InputSlot(_input_name(kind, ident, path, doc.data), doc, path,
                                   parse_input(text)))
    used: set[str] = set()
    external: set[tuple[str, int, tuple[Any, ...]]] = set()
    patterns: dict[int, Any] = {}  # slot -> its compiled .regex(), checked with or without a value
    for i, slot in enumerate(slots):
        regex = slot.options.get("regex")
        if isinstance(regex, str):
            try:
                patterns[i] = compile_input_regex(regex)
            except ValueError as exc:
                errs.add(slot.doc.error(f"<+input>.regex({regex}) cannot be used: {exc}",
                                        slot.path, within=".regex("))
    for i, slot in enumerate(slots):
        names = slot.name.split(".")
        matches = [k for k in inputs if names[-len(k.split(".")):] == k.split(".")]
        # Hook (input sets): a name that a longer one overrides for this input still names an
        # input (layered --inputs files and --set give both); it is not reported as unknown.
        used.update(matches)
        if len(matches) > 1:
            longest = max(len(k.split(".")) for k in matches)
            matches = [k for k in matches if len(k.split(".")) == longest]
        text = _get_at(slot.doc.data, slot.path)
        if matches:
            key = matches[0]
            used.add(key)
            value: object = inputs[key]
            allowed = slot.options.get("allowed")
            if isinstance(allowed, list) and allowed and value not in allowed:
                errs.add(slot.doc.error(
                    f"input '{key}' = {value!r} is not one of the allowed values {allowed}",
                    slot.path))
                continue
            regex = slot.options.get("regex")
            if isinstance(regex, str) and i not in patterns:
                continue  # an unusable pattern, reported above
            if i in patterns and patterns[i].fullmatch(str(value)) is None:
                errs.add(slot.doc.error(f"input '{key}' = {value!r} does not match {regex}",
                                        slot.path))
                continue
        elif "default" in slot.options:
            value = slot.options["default"]
        elif require:
            errs.add(slot.doc.error(
                f"runtime input <+input> has no value: give it with --set {slot.name}=VALUE "
                f"(or --set {slot.name.rsplit('.', 1)[-1]}=VALUE)", slot.path,
                within="<+input>"))
            continue
        else:
            continue
        if isinstance(text, str) and text.strip() != INPUT_RE.sub("", text).strip() and \
                INPUT_RE.fullmatch(text.strip()) is None:
            # <+input> inside a longer string: substitute in place.
            value = INPUT_RE.sub(str(value), text)
        _set_at(slot.doc.data, slot.path, _coerce(value))
        external.add((slot.doc.file, slot.doc.index, slot.path))
    unknown = sorted(set(inputs) - used)
    if unknown:
        known = ", ".join(s.name for s in slots) or "none"
        # Hook (input sets): a name read from an --inputs file points at its place there
        # (app.definitions.inputsets.InputValues.origins); a --set name is reported as --set.
        origin = (getattr(inputs, "origins", None) or {}).get(unknown[0])
        file, line, col = origin if origin else ("--set", 0, 0)
        raise SpecError(f"no runtime input <+input> is named '{unknown[0]}' "
                        f"(inputs in these files: {known})", file=file, line=line, col=col,
                        field=unknown[0])
    errs.raise_if_any()
    return slots, external


def _coerce(value: object) -> object:
    if isinstance(value, str) and re.fullmatch(r"-?\d+", value) and len(value) < 10:
        return value  # keep strings: fields that want numbers coerce them
    return value


def _get_at(data: Any, path: tuple[str | int, ...]) -> Any:
    for p in path:
        data = data[p]
    return data


# --- load -----------------------------------------------------------------------------------------


def load(paths: Iterable[str | os.PathLike[str]], *, inputs: Mapping[str, str] | None = None,
         require_inputs: bool = False) -> Bundle:
    """Read, validate and cross-check pipeline files. Raises SpecError / SpecErrors."""
    errs = _Collector()
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
            errs.add(SpecError("file is empty: expected at least one document with apiVersion, "
                               "kind, metadata and spec", file=str(f), line=1, col=1))
        bundle.documents.extend(docs)
    errs.raise_if_any()

    # Hook (templates): Template documents are set aside and every template reference is
    # expanded in place, before runtime inputs are named and filled.
    from app.definitions.templates import expand_templates

    bundle.documents, bundle.templates = expand_templates(bundle.documents)

    bundle.inputs, bundle.external = apply_inputs(bundle.documents, inputs or {},
                                                  require=require_inputs)

    for doc in bundle.documents:
        _load_document(doc, bundle, errs)
    errs.raise_if_any()
    _check_references(bundle, errs)
    for err in check_maps(bundle, provider_of):  # every free-form map is a schema too
        errs.add(err)
    errs.raise_if_any()
    for pipe in bundle.pipelines.values():
        for i, _ in enumerate(pipe.model.spec.stages):
            try:
                resolve_stage(bundle, pipe, i, execution_id="<validate>", strict_inputs=False)
            except (SpecError, SpecErrors) as exc:
                errs.absorb(exc)
    errs.raise_if_any()
    return bundle


def _load_document(doc: Document, bundle: Bundle, errs: _Collector) -> None:
    data = doc.data
    if not isinstance(data, dict):
        errs.add(doc.error(f"a document must be a mapping with apiVersion, kind, metadata and "
                           f"spec, got {_type_name(data)}", ()))
        return
    kind = data.get("kind")
    if kind is None:
        errs.add(doc.error("missing required field 'kind' (one of: "
                           + ", ".join(m.KINDS) + ")", ()))
        return
    model = m.KINDS.get(kind) if isinstance(kind, str) else None
    if model is None:
        close = difflib.get_close_matches(str(kind), list(m.KINDS), n=1)
        hint = f"; did you mean '{close[0]}'?" if close else ""
        errs.add(doc.error(f"unknown kind '{kind}'{hint} (expected one of: "
                           + ", ".join(m.KINDS) + ")", ("kind",)))
        return
    obj = _validate(doc, (), model, data, errs)
    if obj is None:
        return
    ident = obj.metadata.ident
    table = bundle.by_kind(kind)
    if ident in table:
        first = table[ident]
        errs.add(doc.error(
            f"duplicate {kind} identifier '{ident}' (first defined at "
            f"{first.doc.file}:{first.doc.pos(('metadata', 'identifier'))[0]})",
            ("metadata", "identifier")
            if "identifier" in data.get("metadata", {}) else ("metadata", "name")))
        return
    table[ident] = Loaded(kind, ident, obj, doc)
    _resolve_relative_paths(doc, obj)
    if kind == "Environment":
        for i, inline in enumerate(obj.spec.infrastructure_definitions):
            iid = inline.ident
            if iid in bundle.infrastructures:
                errs.add(doc.error(f"duplicate Infrastructure identifier '{iid}'",
                                   ("spec", "infrastructureDefinitions", i)))
                continue
            bundle.infrastructures[iid] = Loaded(
                "Infrastructure", iid, _inline_to_infra(inline, ident), doc,
                ("spec", "infrastructureDefinitions", i))


def _inline_to_infra(inline: m.InlineInfra, env_ident: str) -> m.InfrastructureSpec:
    kind = inline.spec.cloud_provider_type
    itype = {"Aws": "SshWinRmAws", "Azure": "SshWinRmAzure", "Gcp": "SshWinRmGcp",
             "Physical": "Pdc", "Pdc": "Pdc"}[kind]
    return m.InfrastructureSpec(
        kind="Infrastructure",
        metadata=m.Metadata(name=inline.name, identifier=inline.ident),
        spec=m.InfrastructureBody(environment_ref=env_ident,
                                  deployment_type=inline.spec.deployment_type,
                                  type=itype,  # type: ignore[arg-type]
                                  spec=inline.spec.spec),
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
        inners = ([obj.spec.spec] if isinstance(obj, m.InfrastructureSpec)
                  else [i.spec.spec for i in obj.spec.infrastructure_definitions])
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


def provider_of(infra: m.InfrastructureSpec) -> str:
    """``static``, ``aws``, ``azure`` or ``gcp``."""
    t = infra.spec.type
    hf = infra.spec.spec.host_filter.type if infra.spec.spec.host_filter else ""
    if t == "Pdc":
        return "static"
    if t == "SshWinRmAws" or hf == "AwsInstanceFilter":
        return "aws"
    if t == "SshWinRmAzure" or hf.startswith("Azure"):
        return "azure"
    if t == "SshWinRmGcp" or hf.startswith("Gcp"):
        return "gcp"
    if infra.spec.spec.hosts:
        return "static"
    return "aws" if infra.spec.spec.region and infra.spec.spec.connector_ref else "static"


def _check_references(bundle: Bundle, errs: _Collector) -> None:
    for infra in bundle.infrastructures.values():
        env_ref = infra.model.spec.environment_ref
        if env_ref not in bundle.environments:
            errs.add(infra.error(_missing("Environment", env_ref, bundle.environments),
                                 ("spec", "environmentRef")))
        inner = infra.model.spec.spec
        if provider_of(infra.model) == "static":
            if infra.kind == "Infrastructure" and not inner.hosts and infra.base == ():
                where: tuple[str, ...] = ("spec", "spec", "hosts")
                if where not in infra.doc.values:
                    where = ("spec", "spec")
                errs.add(infra.error("a static (Pdc) infrastructure needs at least one host in "
                                     "'hosts'", where))
            seen: dict[tuple[str, int], int] = {}
            for i, h in enumerate(inner.hosts):
                port = h.port or (inner.connection.port if inner.connection else 22)
                if (h.hostname, port) in seen:
                    errs.add(infra.error(f"duplicate host '{h.hostname}:{port}'",
                                         ("spec", "spec", "hosts", i, "hostname")))
                seen[(h.hostname, port)] = i
                if h.region is not None and not base.REGION_RE.match(h.region):
                    errs.add(infra.error(f"region '{h.region}' must be lower-case letters, digits "
                                         "and '-'", ("spec", "spec", "hosts", i, "region")))
    for pipe in bundle.pipelines.values():
        stage_ids: dict[str, int] = {}
        for si, el in enumerate(pipe.model.spec.stages):
            st = el.stage
            sp: tuple[str | int, ...] = ("spec", "stages", si, "stage")
            if st.identifier in stage_ids:
                errs.add(pipe.error(f"duplicate stage identifier '{st.identifier}'",
                                    (*sp, "identifier")))
            stage_ids[st.identifier] = si
            if isinstance(st, m.ApprovalStageSpec):
                continue  # approvers' groups are checked when someone approves
            svc = st.spec.service.service_ref
            if svc not in bundle.services:
                errs.add(pipe.error(_missing("Service", svc, bundle.services),
                                    (*sp, "spec", "service", "serviceRef")))
            env = st.spec.environment.environment_ref
            if env not in bundle.environments:
                errs.add(pipe.error(_missing("Environment", env, bundle.environments),
                                    (*sp, "spec", "environment", "environmentRef")))
            for ii, ref in enumerate(st.spec.environment.infrastructure_definitions):
                ip = (*sp, "spec", "environment", "infrastructureDefinitions", ii, "identifier")
                target = bundle.infrastructures.get(ref.identifier)
                if target is None:
                    errs.add(pipe.error(_missing("Infrastructure", ref.identifier,
                                                 bundle.infrastructures), ip))
                elif (env in bundle.environments
                      and target.model.spec.environment_ref in bundle.environments
                      and target.model.spec.environment_ref != env):
                    # (an infrastructure naming an unknown environment is reported above)
                    errs.add(pipe.error(
                        f"infrastructure '{ref.identifier}' belongs to environment "
                        f"'{target.model.spec.environment_ref}', not '{env}'", ip))
            for section in ("steps", "rollbackSteps"):
                steps = getattr(st.spec.execution,
                                "steps" if section == "steps" else "rollback_steps")
                step_ids: set[str] = set()
                for at, step, _group in m.flat_steps(steps):
                    tp = (*sp, "spec", "execution", section, *at)
                    if step.identifier in step_ids:
                        errs.add(pipe.error(f"duplicate step identifier '{step.identifier}' in "
                                            f"stage '{st.identifier}'", (*tp, "identifier")))
                    step_ids.add(step.identifier)
                    if not isinstance(step, m.CommandStep):
                        continue
                    unit_ids: set[str] = set()
                    for ui, unit in enumerate(step.spec.command_units):
                        up = (*tp, "spec", "commandUnits", ui)
                        if unit.identifier in unit_ids:
                            errs.add(pipe.error(f"duplicate command unit identifier "
                                                f"'{unit.identifier}' in step '{step.identifier}'",
                                                (*up, "identifier")))
                        unit_ids.add(unit.identifier)
                        if isinstance(unit, m.CopyUnit) and svc in bundle.services:
                            art = bundle.services[svc].model.spec.service_definition.spec
                            if unit.spec.source_type == "Artifact" and not art.artifacts.primary:
                                errs.add(pipe.error(
                                    f"Copy with sourceType Artifact, but service '{svc}' has no "
                                    "artifacts.primary", (*up, "spec", "sourceType")))
                            if unit.spec.source_type == "Config":
                                errs.add(pipe.error(
                                    "Copy with sourceType Config is not supported yet: use "
                                    "sourceType Artifact", (*up, "spec", "sourceType")))
                        if isinstance(unit, m.DownloadArtifactUnit | m.ReleaseUnit) and \
                                svc in bundle.services and not bundle.services[
                                    svc].model.spec.service_definition.spec.artifacts.primary:
                            errs.add(pipe.error(
                                f"{unit.type} needs an artifact, but service '{svc}' has no "
                                "artifacts.primary", (*up, "type")))
                    for vname in ("environmentVariables", "outputVariables"):
                        attr = "environment_variables" if vname.startswith("env") else \
                            "output_variables"
                        names: set[str] = set()
                        for vi, var in enumerate(getattr(step.spec, attr)):
                            if var.name in names:
                                errs.add(pipe.error(f"duplicate variable '{var.name}'",
                                                    (*tp, "spec", vname, vi, "name")))
                            names.add(var.name)
        for vars_owner in [pipe, *bundle.services.values(), *bundle.environments.values()]:
            _check_variables(vars_owner, errs)


def _check_variables(owner: Loaded, errs: _Collector) -> None:
    base: tuple[str, ...]
    if owner.kind == "Pipeline":
        variables, base = owner.model.spec.variables, ("spec", "variables")
    elif owner.kind == "Service":
        variables = owner.model.spec.service_definition.spec.variables
        base = ("spec", "serviceDefinition", "spec", "variables")
    else:
        variables, base = owner.model.spec.variables, ("spec", "variables")
    seen: set[str] = set()
    for i, v in enumerate(variables):
        if v.name in seen:
            errs.add(owner.error(f"duplicate variable '{v.name}'", (*base, i, "name")))
        seen.add(v.name)


def _missing(kind: str, ref: str, table: Mapping[str, Loaded]) -> str:
    close = difflib.get_close_matches(ref, list(table), n=1)
    hint = f"; did you mean '{close[0]}'?" if close else ""
    known = ", ".join(sorted(table)) or "none loaded"
    return f"{kind} '{ref}' is not defined in the given files{hint} (defined: {known})"


# --- resolve --------------------------------------------------------------------------------------


def _variables_ctx(ctx: Context, prefix: str, owner: Loaded, variables: list[m.Variable],
                   base: tuple[str | int, ...], bundle: Bundle) -> None:
    for i, v in enumerate(variables):
        if v.type == "Secret":
            continue  # resolved on the worker by the secrets backend
        ext = (owner.doc.file, owner.doc.index, (*owner.base, *base, i, "value")) in \
            bundle.external
        ctx.set(f"{prefix}.{v.name}", v.value if v.value is not None else v.default,
                external=ext)


def stage_context(bundle: Bundle, pipe: Loaded, stage: m.StageSpec | m.ApprovalStageSpec, *,
                  execution_id: str) -> Context:
    """The host-independent expression values for one stage."""
    ctx = Context()
    pm = pipe.model
    ctx.set("pipeline.name", pm.metadata.name)
    ctx.set("pipeline.identifier", pipe.ident)
    ctx.set("pipeline.executionId", execution_id)
    ctx.set("pipeline.sequenceId", execution_id)
    _variables_ctx(ctx, "pipeline.variables", pipe, pm.spec.variables, ("spec", "variables"),
                   bundle)
    ctx.set("stage.name", stage.name)
    if isinstance(stage, m.ApprovalStageSpec):
        ctx.set("stage.identifier", stage.identifier)
        return ctx
    ctx.set("stage.identifier", stage.identifier)
    svc = bundle.services.get(stage.spec.service.service_ref)
    if svc:
        sd = svc.model.spec.service_definition.spec
        ctx.set("service.name", svc.model.metadata.name)
        ctx.set("service.identifier", svc.ident)
        _variables_ctx(ctx, "serviceVariables", svc, sd.variables,
                       ("spec", "serviceDefinition", "spec", "variables"), bundle)
        art = sd.artifacts.primary
        if art:
            tag = art.spec.get("tag")
            tag_path = ("spec", "serviceDefinition", "spec", "artifacts", "primary", "spec", "tag")
            ext = (svc.doc.file, svc.doc.index, tag_path) in bundle.external
            if tag is not None:
                ctx.set("artifact.tag", tag, external=ext)
                ctx.set("artifacts.primary.tag", tag, external=ext)
                ctx.set("artifact.fileName", artifact_file_name(svc.ident, str(tag)),
                        external=ext)
            ctx.set("artifact.type", art.type)
            # Where the artifact comes from: the local path, URL path or S3 key (its template;
            # <+artifact.tag> in it is rendered with the rest).
            where = next((art.spec.get(k) for k in ("path", "filePath", "artifactPath", "key",
                                                    "url") if art.spec.get(k)), None)
            if where is not None:
                # (a bad expression in it is reported where the artifact's fields are checked)
                where = render(str(where), ctx, on_error=lambda _msg: None)
                ctx.set("artifact.path", where, external=ext)
    env = bundle.environments.get(stage.spec.environment.environment_ref)
    if env:
        ctx.set("env.name", env.model.metadata.name)
        ctx.set("env.identifier", env.ident)
        ctx.set("env.type", env.model.spec.type)
        _variables_ctx(ctx, "env.variables", env, env.model.spec.variables,
                       ("spec", "variables"), bundle)
    refs = stage.spec.environment.infrastructure_definitions
    infra = bundle.infrastructures.get(refs[0].identifier) if refs else None
    if infra:
        ctx.set("infra.name", infra.model.metadata.name)
        ctx.set("infra.identifier", infra.ident)
        ctx.set("infra.connectorRef", infra.model.spec.spec.connector_ref or "")
        ctx.set("infra.environmentRef", infra.model.spec.environment_ref)
        # infra.region is per host (a static infra may span regions): rendered on the worker.
    return ctx


def artifact_file_name(service: str, tag: str) -> str:
    """The file name an artifact gets on the hosts: ``<service>-<tag>.tar.gz``."""
    safe = re.sub(r"[^A-Za-z0-9._-]", "_", tag)
    return f"{service}-{safe}.tar.gz"


def _render_tree(data: Any, ctx: Context, doc: Loaded, path: tuple[str | int, ...],
                 errs: _Collector) -> Any:
    if isinstance(data, dict):
        return {k: _render_tree(v, ctx, doc, (*path, k), errs) for k, v in data.items()}
    if isinstance(data, list):
        return [_render_tree(v, ctx, doc, (*path, i), errs) for i, v in enumerate(data)]
    if isinstance(data, str) and "<+" in data:

        def on_error(msg: str) -> None:
            named = EXPR_RE.search(msg)  # the message quotes the expression: find its line
            errs.add(doc.doc.error(msg, (*doc.base, *path),
                                   within=named.group(0) if named else None))

        for n in unterminated(data):  # an expression ends on its own line, with '>'
            line = data.split("\n")[n - 1]
            start = line.index("<+")
            errs.add(doc.doc.error(
                f"unterminated expression '{line[start:start + 60]}': an expression ends with "
                "'>' on the line it starts", (*doc.base, *path), within=line[start:]))
        if path[-1] == "script":  # values from outside the files stand intact, or are refused
            return render_script(data, ctx, on_error=on_error)
        return render(data, ctx, on_error=on_error)
    return data


def resolve_stage(bundle: Bundle, pipe: Loaded, index: int, *, execution_id: str,
                  strict_inputs: bool = True) -> dict[str, Any]:
    """One stage as plain data, every host-independent expression rendered."""
    errs = _Collector()
    stage = pipe.model.spec.stages[index].stage
    ctx = stage_context(bundle, pipe, stage, execution_id=execution_id)
    ctx.allow_inputs = not strict_inputs
    base: tuple[str | int, ...] = ("spec", "stages", index, "stage")
    raw = _get_at(pipe.doc.data, base)
    rendered = _render_tree(copy.deepcopy(raw), ctx, pipe, base, errs)
    if isinstance(stage, m.ApprovalStageSpec):
        errs.raise_if_any()
        step = m.ApprovalStageSpec.model_validate(rendered).spec.execution.steps[0].step
        return {"type": "Approval", "index": index, "identifier": stage.identifier,
                "name": stage.name, "steps": [], "rollbackSteps": [], "infrastructures": [],
                "strategy": {"type": "Basic"},
                "approval": step.model_dump(mode="json", by_alias=True, exclude_none=True)}
    # Variables of service and environment may hold expressions too.
    svc = bundle.services.get(stage.spec.service.service_ref)
    env = bundle.environments.get(stage.spec.environment.environment_ref)
    for owner in (svc, env):
        if owner is not None:
            _render_tree(copy.deepcopy(owner.raw), ctx, owner, owner.base, errs)
    errs.raise_if_any()
    try:
        out_stage = m.StageSpec.model_validate(rendered)
    except ValidationError as exc:
        # A value that became invalid once rendered (an empty variable where a URL must be).
        for e in exc.errors():
            where = _loc_to_path(pipe.doc, base, tuple(e["loc"]))
            msg = str(e["msg"]).removeprefix("Value error, ")
            errs.add(pipe.error(f"{msg} (once its expressions are rendered)", where))
        errs.raise_if_any()
        raise
    assert svc is not None and env is not None
    art = svc.model.spec.service_definition.spec.artifacts.primary
    artifact: dict[str, Any] | None = None
    if art is not None:
        tag = ctx.values.get("artifact.tag")
        if tag is not None and "<+" not in tag.text and not _own_regex(bundle, svc) \
                and not TAG_RE.fullmatch(tag.text):
            errs.add(svc.error(
                f"artifact tag {tag.text!r} is not a version: a tag names a file and a release "
                "directory on every host, so it starts with a letter or digit and holds only "
                "letters, digits and . _ + ~ - (no '/', no '..', no spaces); give the input "
                "its own pattern with <+input>.regex(...) to allow others",
                ("spec", "serviceDefinition", "spec", "artifacts", "primary", "spec", "tag")))
        art_spec = _render_tree(copy.deepcopy(art.spec), ctx, svc,
                                ("spec", "serviceDefinition", "spec", "artifacts", "primary",
                                 "spec"), errs)
        artifact = {"type": art.type, "spec": art_spec, "tag": tag.text if tag else None,
                    "fileName": artifact_file_name(svc.ident, tag.text) if tag else None}
    infras = []
    for ref in stage.spec.environment.infrastructure_definitions:
        infra = bundle.infrastructures[ref.identifier]
        src_file, src_line, _ = _where(infra.doc, infra.base or ("metadata",))  # hook (templates)
        infras.append({
            "identifier": infra.ident,
            "name": infra.model.metadata.name,
            "provider": provider_of(infra.model),
            "spec": infra.model.spec.spec.model_dump(mode="json", by_alias=True,
                                                     exclude_none=True),
            "source": f"{src_file}:{src_line}",
        })
    uses_copy = any(isinstance(u, m.CopyUnit | m.DownloadArtifactUnit | m.ReleaseUnit)
                    for _, st, _ in m.flat_steps([*out_stage.spec.execution.steps,
                                                  *out_stage.spec.execution.rollback_steps])
                    for u in getattr(st.spec, "command_units", []))
    if strict_inputs and uses_copy and art is not None and artifact is not None \
            and art.type != "Local":
        from app.artifacts import check as check_artifact

        for problem in check_artifact(artifact):
            errs.add(svc.error(problem, ("spec", "serviceDefinition", "spec", "artifacts",
                                         "primary", "spec")))
    if strict_inputs and art is not None and art.type == "Local" and uses_copy:
        p = art.spec.get("path")
        if not isinstance(p, str) or not Path(p).exists():
            errs.add(svc.error(f"local artifact path {p!r} does not exist",
                               ("spec", "serviceDefinition", "spec", "artifacts", "primary",
                                "spec", "path")))
        if not (artifact and artifact.get("tag")):
            errs.add(svc.error("the artifact needs a tag (spec.tag)",
                               ("spec", "serviceDefinition", "spec", "artifacts", "primary",
                                "spec")))
    errs.raise_if_any()
    return {
        "strategy": strategy_of(out_stage),
        "index": index,
        "identifier": stage.identifier,
        "name": stage.name,
        "service": {"identifier": svc.ident, "name": svc.model.metadata.name},
        "environment": {"identifier": env.ident, "name": env.model.metadata.name,
                        "type": env.model.spec.type},
        "artifact": artifact,
        "infrastructures": infras,
        "steps": _dump_steps(out_stage.spec.execution.steps),
        # Worker tags for every host of the stage (the pipeline's, then the stage's); the
        # infrastructure's and each step's are added per host and step.
        "delegateSelectors": sorted({*pipe.model.spec.delegate_selectors,
                                     *out_stage.delegate_selectors}),
        "delegateFallback": out_stage.delegate_fallback,
        # The failure strategies that apply after the step's own, by precedence.
        "failureStrategies": [
            *[f.model_dump(mode="json", by_alias=True) for f in out_stage.failure_strategies],
            *[f.model_dump(mode="json", by_alias=True)
              for f in pipe.model.spec.failure_strategies]],
        # Values from outside the files (runtime inputs): the worker binds the unsafe ones into
        # the environment of the scripts that name them (see expressions.render).
        "externalValues": {k: v.text for k, v in ctx.values.items() if v.external},
        "rollbackSteps": _dump_steps(out_stage.spec.execution.rollback_steps),
    }


# What an artifact tag may be unless its runtime input says otherwise with .regex(): it names
# a file and a release directory on every host (a leading '-' would read as an option).
TAG_RE = re.compile(r"(?!.*\.\.)[A-Za-z0-9][A-Za-z0-9._+~-]{0,127}")


def _own_regex(bundle: Bundle, svc: Loaded) -> bool:
    """Does the service's artifact tag come from a runtime input with its own .regex()?"""
    return any(slot.doc is svc.doc and slot.path[-1:] == ("tag",) and "regex" in slot.options
               for slot in bundle.inputs)


def _dump_steps(elements: list[m.StepElement]) -> list[dict[str, Any]]:
    """Steps as plain data, step groups flattened: a grouped step names its group and carries
    the group's failure strategies (which apply after its own)."""
    out = []
    for _, step, group in m.flat_steps(elements):
        d = step.model_dump(mode="json", by_alias=True, exclude_none=True)
        if group is not None:
            d["group"] = group.identifier
            d["groupFailureStrategies"] = [f.model_dump(mode="json", by_alias=True)
                                           for f in group.failure_strategies]
        out.append(d)
    return out


def strategy_of(stage: m.StageSpec) -> dict[str, Any]:
    """The stage's strategy as plain data, whichever form the file used."""
    sp = stage.spec
    budget = m.FailureBudget()
    if sp.rollout_deployment is not None:
        return {"type": "Rolling", "cumulative": True,
                "phases": [p.phase.size() for p in sp.rollout_deployment.phases],
                "phaseNames": [p.phase.name for p in sp.rollout_deployment.phases],
                "failureBudget": budget.model_dump(by_alias=True)}
    if sp.canary_deployment is not None:
        phases = sp.canary_deployment.phases
        checks = [s for p in phases for s in p.phase.steps if s.is_verification]
        verification = next((v for v in (s.verification() for s in checks) if v), None)
        return {"type": "Canary", "cumulative": True,
                "phases": [p.phase.size() for p in phases],
                "phaseNames": [p.phase.name for p in phases],
                "verifyAfter": [i for i, p in enumerate(phases)
                                if any(s.is_verification for s in p.phase.steps)],
                "verification": verification.model_dump(mode="json", by_alias=True,
                                                        exclude_none=True)
                if verification else None,
                "failureBudget": budget.model_dump(by_alias=True)}
    strategy = sp.strategy or m.StrategySpec()
    out = strategy.model_dump(mode="json", by_alias=True, exclude_none=True)
    out["cumulative"] = strategy.type == "Canary"
    return out


def choose_pipeline(bundle: Bundle, pipeline: str | None) -> Loaded:
    """The pipeline to run: the one named, or the only one in the files."""
    if pipeline:
        if pipeline not in bundle.pipelines:
            raise SpecError(_missing("Pipeline", pipeline, bundle.pipelines), file="--pipeline")
        return bundle.pipelines[pipeline]
    if len(bundle.pipelines) == 1:
        return next(iter(bundle.pipelines.values()))
    if not bundle.pipelines:
        raise SpecError("the given files define no Pipeline", file=", ".join(
            sorted({d.file for d in bundle.documents})))
    raise SpecError("the given files define several pipelines; choose one with --pipeline ("
                    + ", ".join(sorted(bundle.pipelines)) + ")", file="--pipeline")


def resolve(bundle: Bundle, pipeline: Loaded, *, execution_id: str) -> Plan:
    """The whole pipeline as an execution runs it (stored with ``Plan.to_json()``)."""
    from app.definitions.plan import Plan

    errs = _Collector()
    stages = []
    for i in range(len(pipeline.model.spec.stages)):
        try:
            stages.append(resolve_stage(bundle, pipeline, i, execution_id=execution_id))
        except (SpecError, SpecErrors) as exc:
            errs.absorb(exc)
    errs.raise_if_any()
    return Plan.model_validate({
        "identifier": pipeline.ident,
        "name": pipeline.model.metadata.name,
        "files": sorted({d.file for d in [*bundle.documents, *bundle.templates]}),  # + templates
        "stages": stages,
        "notificationRules": [r.model_dump(mode="json", by_alias=True, exclude_none=True)
                               for r in pipeline.model.spec.notification_rules],
    })
