"""Harness's own document shape, read as it is written.

Harness writes one entity per document with its kind as the top key::

    pipeline:                         apiVersion: v1
      name: Deploy                    kind: Pipeline
      identifier: deploy      <=>     metadata: {name: Deploy, identifier: deploy}
      projectIdentifier: web          spec:
      stages: [...]                     stages: [...]

(``service:``, ``environment:``, ``infrastructureDefinition:``, ``connector:`` the same way;
``template:`` is read by app.definitions.templates, ``inputSet:`` by app.definitions.inputsets).
The loader turns such a document into vmfarm's shape before anything else looks at it; every
position still points into the file as written, and error fields are named as the file names
them (``pipeline.stages[0]...``, not ``spec.stages[0]...``). ``vmfarm convert`` prints either shape
from the other, as text, so comments stay where they were.
"""

from __future__ import annotations

import re
from typing import Any

import yaml

from app.definitions.templates import ExpandedDocument
from app.definitions.yamlload import Document
from app.errors import SpecError, SpecErrors

KINDS = {
    "pipeline": "Pipeline",
    "service": "Service",
    "environment": "Environment",
    "infrastructureDefinition": "Infrastructure",
    "connector": "Connector",
}
TOP_KEY = {kind: key for key, kind in KINDS.items()}
# Keys of a native body that are vmfarm's metadata; the rest is the spec (an environment's
# tags are its spec's in vmfarm's shape).
META_KEYS = ("name", "identifier", "description", "tags", "orgIdentifier", "projectIdentifier")


def meta_keys(top: str) -> tuple[str, ...]:
    return tuple(k for k in META_KEYS if not (top == "environment" and k == "tags"))


def native_key(data: Any) -> str | None:
    """The top key of a document in Harness's shape, or None."""
    if isinstance(data, dict) and len(data) == 1:
        key = next(iter(data))
        if key in KINDS and isinstance(data[key], dict):
            return str(key)
    return None


class NativeDocument(ExpandedDocument):
    """A Harness-shaped document read as vmfarm's shape (``top``: its top key)."""

    top: str = ""


def from_native(doc: Document) -> Document:
    """``doc`` in vmfarm's shape (itself when it already is)."""
    key = native_key(doc.data)
    if key is None:
        return doc
    body: dict[str, Any] = doc.data[key]
    mk = meta_keys(key)
    meta = {k: body[k] for k in mk if k in body}
    spec = {k: v for k, v in body.items() if k not in mk}
    out = NativeDocument(
        file=doc.file,
        index=doc.index,
        data={"apiVersion": "v1", "kind": KINDS[key], "metadata": meta, "spec": spec},
        line=doc.line,
    )
    out.top = key
    for part in ((), ("apiVersion",), ("kind",), ("metadata",), ("spec",)):
        out.origins[part] = (doc, (key,))
    for k in body:
        out.origins[("metadata" if k in mk else "spec", k)] = (doc, (key, k))
    return out


def rename_fields(exc: SpecError | SpecErrors, documents: list[Document]) -> SpecError | SpecErrors:
    """Errors of Harness-shaped documents with their fields named as the file names them."""
    natives = [d for d in documents if isinstance(d, NativeDocument)]
    if not natives:
        return exc
    starts: dict[str, list[int]] = {}
    for d in documents:
        starts.setdefault(d.file, []).append(d.line)
    out: list[SpecError] = []
    for e in exc.errors if isinstance(exc, SpecErrors) else [exc]:
        doc = _document_at(natives, starts, e.file, e.line)
        fld = e.field
        if doc is not None and fld:
            fld = re.sub(r"^(spec|metadata)(?=$|[.\[])", doc.top, fld)
        out.append(SpecError(e.message, file=e.file, line=e.line, col=e.col, field=fld))
    return out[0] if isinstance(exc, SpecError) else SpecErrors(out)


def _document_at(
    natives: list[NativeDocument], starts: dict[str, list[int]], file: str | None, line: int
) -> NativeDocument | None:
    for d in natives:
        if d.file != file:
            continue
        later = [s for s in starts.get(d.file, []) if s > d.line]
        if d.line <= line < (min(later) if later else 1 << 30):
            return d
    return None


# --- vmfarm convert: either shape from the other, as text ----------------------------------------

_KEY = re.compile(r"^(?P<indent> *)(?P<key>[A-Za-z_][\w-]*|\"[^\"]*\"|'[^']*'):(?=\s|$)")


def _blocks(lines: list[str], indent: int) -> list[tuple[str, list[str]]]:
    """The key blocks at ``indent`` of a block mapping: (key, its lines, comments before it
    included). Lines deeper than ``indent`` and blank lines belong to the block above."""
    out: list[tuple[str, list[str]]] = []
    pending: list[str] = []
    for line in lines:
        m = _KEY.match(line)
        if m and len(m.group("indent")) == indent:
            out.append((m.group("key").strip("'\""), [*pending, line]))
            pending = []
        elif not line.strip() or (
            line.lstrip().startswith("#") and len(line) - len(line.lstrip()) <= indent
        ):
            pending.append(line)
        elif out:
            out[-1][1].extend([*pending, line])
            pending = []
        else:
            raise ValueError(f"cannot read {line.strip()!r} as a key of a block mapping")
    if out:
        out[-1][1].extend(pending)
    return out


def _reindent(lines: list[str], by: int) -> list[str]:
    if by >= 0:
        return [(" " * by + line) if line.strip() else line for line in lines]
    return [line[-by:] if line[:-by].strip() == "" else line.lstrip() for line in lines]


def _child_indent(lines: list[str]) -> int:
    for line in lines:
        if line.strip() and not line.lstrip().startswith("#"):
            return len(line) - len(line.lstrip())
    return 2


def convert_document(text: str, to: str) -> str:
    """One YAML document's text in the other shape (``to``: ``harness`` or ``vmfarm``); the
    text unchanged when it is already in that shape or is not an entity vmfarm converts.
    Raises ValueError for text it cannot rewrite as text (flow style at the top)."""
    lines = text.split("\n")
    head: list[str] = []
    while lines and (
        not lines[0].strip() or lines[0].lstrip().startswith("#") or lines[0].startswith("---")
    ):
        head.append(lines.pop(0))
    top = _blocks(lines, 0)
    keys = [k for k, _ in top]
    if to == "vmfarm" and len(top) == 1 and keys[0] in KINDS:
        key, block = top[0]
        body = block[1:]
        inner = _child_indent(body)
        parts = _blocks(body, inner)
        mk = meta_keys(key)
        meta = [ln for k, b in parts if k in mk for ln in b]
        spec = [ln for k, b in parts if k not in mk for ln in b]
        out = [*head, "apiVersion: v1", f"kind: {KINDS[key]}"]
        if meta:
            out += ["metadata:", *_reindent(meta, 2 - inner)]
        if spec:
            out += ["spec:", *_reindent(spec, 2 - inner)]
        return "\n".join(out)
    if to == "harness" and {"kind", "metadata", "spec"} <= set(keys):
        kind = next(b[0].split(":", 1)[1].strip() for k, b in top if k == "kind")
        top_key = TOP_KEY.get(kind.strip("'\""))
        if top_key is None:
            return text
        out = [*head, f"{top_key}:"]
        seen: set[str] = set()
        for name in ("metadata", "spec"):
            block = next(b for k, b in top if k == name)
            if not block[0].split(":", 1)[1].split(" #", 1)[0].strip():
                names = {k for k, _ in _blocks(block[1:], _child_indent(block[1:]))}
                if seen & names:
                    raise ValueError(
                        f"'{sorted(seen & names)[0]}' is in both metadata and "
                        "spec; Harness's shape has one"
                    )
                seen |= names
            inline = block[0].split(":", 1)[1].split(" #", 1)[0].strip()
            if inline:  # a flow mapping on the key's line
                value = yaml.safe_load(inline)
                if not isinstance(value, dict):
                    raise ValueError(f"'{name}' must be a mapping")
                dumped = yaml.safe_dump(value, default_flow_style=False, sort_keys=False)
                out += ["  " + ln for ln in dumped.rstrip("\n").split("\n")]
                continue
            body = block[1:]
            out += _reindent(body, 2 - _child_indent(body))
        extra = [k for k in keys if k not in ("apiVersion", "kind", "metadata", "spec")]
        if extra:
            raise ValueError(f"'{extra[0]}' has no place in Harness's shape")
        return "\n".join(out)
    return text


def convert_text(text: str, to: str) -> str:
    """Every document of a file in the ``to`` shape."""
    docs = re.split(r"(?m)^(?=---\s*$)", text)
    return "".join(convert_document(d, to) if d.strip() else d for d in docs)
