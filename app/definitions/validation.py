"""File schemas applied to a document, and their errors turned into messages that name the
file, the line and column, and the field (with "did you mean" suggestions).
"""

from __future__ import annotations

import difflib
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from pydantic import ValidationError

from app.definitions import base
from app.definitions.yamlload import Document, dotted
from app.errors import SpecError

if TYPE_CHECKING:
    pass

from app.definitions.bundle import Collector, get_at


def loc_to_path(
    doc: Document, base: tuple[str | int, ...], loc: tuple[Any, ...]
) -> tuple[str | int, ...]:
    """Map pydantic's loc (which includes union tags) onto the data path in the document."""
    path = list(base)
    data: Any = doc.data
    for p in base:
        data = data[p]
    for part in loc:
        present = isinstance(data, dict) and isinstance(part, str) and part in data
        present = present or (
            isinstance(data, list) and isinstance(part, int) and 0 <= part < len(data)
        )
        if present:
            path.append(part)
            data = data[part]
        elif isinstance(data, dict) and isinstance(part, str) and part not in data:
            # Either a union tag (skip it) or a missing field (the error names it).
            continue
    return tuple(path)


# Harness types a user may bring that vmfarm knows of and does not carry out: refused with the
# reason, not as an unknown word.
UNSUPPORTED_TYPES = {
    "CI": "a CI stage is refused: vmfarm deploys and does not build; let your CI system "
    "build and publish the artifact, then run the Deployment stages with vmfarm (a webhook "
    "or `vmfarm run --set tag=...` from the CI job)",
    "Pdc": "a Pdc connector is not supported: list the hosts under a Pdc infrastructure's "
    "spec.hosts",
    "Github": "write the repository as a Git connector (type: Git)",
    "Gitlab": "write the repository as a Git connector (type: Git)",
    "Bitbucket": "write the repository as a Git connector (type: Git)",
    "DockerRegistry": "vmfarm deploys files to VMs, not images: use an Artifactory, Nexus or "
    "Http connector",
}


# Step types of one kind of stage written in the other: refused saying where they belong.
OTHER_STAGE_TYPES = {
    "ShellScript": "a ShellScript step runs in a Custom stage (on the delegate); in a Deployment "
    "stage write a Command step with a Script unit (onDelegate: true runs it on "
    "the worker)",
    "Http": "an Http step runs in a Custom stage (from the delegate); in a Deployment stage use "
    "a HealthCheck step of type HTTP",
    "Command": "a Command step runs on hosts, in a Deployment stage; in a Custom stage write a "
    "ShellScript step",
    **{
        t: f"a {t} step runs in a Custom stage (on the delegate), like the reference's "
        "Terraform pipeline; put it in a stage of type Custom"
        for t in ("TerraformPlan", "TerraformApply", "TerraformDestroy", "TerraformRollback")
    },
    "HealthCheck": "a HealthCheck step checks hosts, in a Deployment stage; in a Custom stage "
    "write an Http step",
}


def friendly(err: Mapping[str, Any], model: type[Any], loc_path: tuple[Any, ...]) -> str:
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
            if tag in UNSUPPORTED_TYPES:
                return f"type '{tag}': {UNSUPPORTED_TYPES[tag]} (vmfarm has {expected})"
            if tag in OTHER_STAGE_TYPES:
                return f"type '{tag}' here: {OTHER_STAGE_TYPES[tag]} (expected one of {expected})"
            return f"unknown type '{tag}' (expected one of {expected})"
        return f"invalid value {inp!r} for '{name}' (expected one of {expected})"
    if etype == "union_tag_not_found":
        return f"missing required field '{err.get('ctx', {}).get('discriminator', 'type')}'"
    if etype in ("dict_type", "model_type", "model_attributes_type"):
        return f"'{name}' must be a mapping, got {_type_name(inp)}"
    if etype == "list_type":
        return f"'{name}' must be a list, got {_type_name(inp)}"
    if etype == "string_pattern_mismatch":  # e.g. a delegate tag: say which pattern
        pattern = err.get("ctx", {}).get("pattern", "")
        return f"'{name}' {inp!r} does not match {pattern}"
    if etype.startswith(("int_", "float_", "bool_", "string_")) or etype in (
        "string_type",
        "int_type",
        "bool_type",
        "float_type",
    ):
        want = etype.split("_")[0]
        want = {
            "int": "an integer",
            "float": "a number",
            "bool": "true or false",
            "string": "a string",
        }.get(want, want)
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
    return {
        dict: "a mapping",
        list: "a list",
        str: "a string",
        int: "an integer",
        float: "a number",
        bool: "a boolean",
        type(None): "nothing (null)",
    }.get(type(v), type(v).__name__)


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
        fields.extend(
            f.alias or n
            for n, f in cand.model_fields.items()
            if not (isinstance(f.json_schema_extra, dict) and f.json_schema_extra.get("refused"))
        )
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


def position(
    doc: Document, path: tuple[str | int, ...], *, key: bool = False
) -> tuple[str, int, int]:
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


def validate(
    doc: Document, base: tuple[str | int, ...], model: type[base.Model], data: Any, errs: Collector
) -> Any:
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
                path = loc_to_path(doc, base, loc[:-1])
                file, line, col = position(doc, path)  # hook (templates)
                errs.add(
                    SpecError(
                        f"'{loc[-2]}' must be a string, number or boolean, got "
                        f"{_type_name(err.get('input'))}",
                        file=file,
                        line=line,
                        col=col,
                        field=dotted(path[len(base) :]),
                    )
                )
                continue
            path = loc_to_path(doc, base, loc)
            if (
                err["type"] == "union_tag_invalid"
                and isinstance(get_at(doc.data, path), dict)
                and "type" in get_at(doc.data, path)
            ):
                path = (*path, "type")
            key = err["type"] == "extra_forbidden"
            file, line, col = position(doc, path, key=key)  # hook (templates)
            fld = dotted(path[len(base) :]) if path[len(base) :] else dotted(loc)
            if err["type"] == "missing":
                fld = dotted((*path[len(base) :], loc[-1]))
            errs.add(SpecError(friendly(err, model, loc), file=file, line=line, col=col, field=fld))
        return None
