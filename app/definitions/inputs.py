"""Runtime inputs: every ``<+input>`` of the files, filled from ``--set`` and input sets
(allowed values, defaults, linear-time ``.regex()``).
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from typing import TYPE_CHECKING, Any

from app.definitions import base
from app.definitions.expressions import (
    INPUT_RE,
    compile_input_regex,
    has_input,
    parse_input,
)
from app.definitions.yamlload import Document
from app.errors import SpecError

if TYPE_CHECKING:
    pass

from app.definitions.bundle import Collector, InputSlot, get_at, set_at


def input_name(kind: str, ident: str, path: tuple[str | int, ...], data: Any) -> str:
    parts: list[str] = [kind.lower(), ident]
    cur = data
    skip = {("spec",), ("spec", "serviceDefinition"), ("spec", "serviceDefinition", "spec")}
    walked: tuple[str | int, ...] = ()
    i = 0
    while i < len(path):
        p = path[i]
        walked = (*walked, p)
        nxt = cur[p]
        if (
            isinstance(p, int)
            and isinstance(nxt, dict)
            and "name" in nxt
            and i + 1 < len(path)
            and path[i + 1] == "value"
        ):
            parts.append(str(nxt["name"]))
            break
        if isinstance(p, int):
            # Use the element's identifier when it has one (stage/step lists). Hook (input
            # sets): a step group is named by its identifier too, not by its position, so that
            # an --inputs file (which lists only the entries with inputs) can name its inputs.
            inner = (
                (nxt.get("stage") or nxt.get("step") or nxt.get("stepGroup"))
                if isinstance(nxt, dict)
                else None
            )
            ident_v = inner.get("identifier") if isinstance(inner, dict) else None
            if ident_v is None and isinstance(nxt, dict):
                ident_v = nxt.get("identifier")
            parts.append(str(ident_v) if ident_v else str(p))
        elif walked not in skip and p not in ("stage", "step"):
            parts.append(str(p))
        cur = nxt
        i += 1
    return ".".join(parts)


def find_inputs(
    doc: Document, data: Any, path: tuple[str | int, ...] = ()
) -> Iterable[tuple[tuple[str | int, ...], str]]:
    if isinstance(data, dict):
        for k, v in data.items():
            yield from find_inputs(doc, v, (*path, k))
    elif isinstance(data, list):
        for i, v in enumerate(data):
            yield from find_inputs(doc, v, (*path, i))
    elif isinstance(data, str) and has_input(data):
        yield path, data


def apply_inputs(
    bundle_docs: list[Document],
    inputs: Mapping[str, str],
    *,
    require: bool,
    optional: Iterable[str] = (),
) -> tuple[list[InputSlot], set[tuple[str, int, tuple[Any, ...]]]]:
    """Fill every ``<+input>`` from ``inputs`` (``--set`` keys match a name's trailing parts).
    ``optional``: names that need no value here (a Pipeline stage gives them to its child)."""
    optional = set(optional)
    errs = Collector()
    slots: list[InputSlot] = []
    for doc in bundle_docs:
        if not isinstance(doc.data, dict):
            continue
        kind = str(doc.data.get("kind", "doc"))
        meta = doc.data.get("metadata")
        if not isinstance(meta, dict):
            meta = {}
        ident = str(meta.get("identifier") or base.identifier_of(str(meta.get("name", doc.index))))
        for path, text in find_inputs(doc, doc.data):
            slots.append(
                InputSlot(input_name(kind, ident, path, doc.data), doc, path, parse_input(text))
            )
    used: set[str] = set()
    external: set[tuple[str, int, tuple[Any, ...]]] = set()
    patterns: dict[int, Any] = {}  # slot -> its compiled .regex(), checked with or without a value
    for i, slot in enumerate(slots):
        regex = slot.options.get("regex")
        if isinstance(regex, str):
            try:
                patterns[i] = compile_input_regex(regex)
            except ValueError as exc:
                errs.add(
                    slot.doc.error(
                        f"<+input>.regex({regex}) cannot be used: {exc}",
                        slot.path,
                        within=".regex(",
                    )
                )
    for i, slot in enumerate(slots):
        names = slot.name.split(".")
        matches = [k for k in inputs if names[-len(k.split(".")) :] == k.split(".")]
        # Hook (input sets): a name that a longer one overrides for this input still names an
        # input (layered --inputs files and --set give both); it is not reported as unknown.
        used.update(matches)
        if len(matches) > 1:
            longest = max(len(k.split(".")) for k in matches)
            matches = [k for k in matches if len(k.split(".")) == longest]
        text = get_at(slot.doc.data, slot.path)
        if matches:
            key = matches[0]
            used.add(key)
            value: object = inputs[key]
            allowed = slot.options.get("allowed")
            if isinstance(allowed, list) and allowed and value not in allowed:
                errs.add(
                    slot.doc.error(
                        f"input '{key}' = {value!r} is not one of the allowed values {allowed}",
                        slot.path,
                    )
                )
                continue
            regex = slot.options.get("regex")
            if isinstance(regex, str) and i not in patterns:
                continue  # an unusable pattern, reported above
            if i in patterns and patterns[i].fullmatch(str(value)) is None:
                errs.add(
                    slot.doc.error(f"input '{key}' = {value!r} does not match {regex}", slot.path)
                )
                continue
        elif "default" in slot.options:
            value = slot.options["default"]
        elif require and slot.name not in optional:
            errs.add(
                slot.doc.error(
                    f"runtime input <+input> has no value: give it with --set {slot.name}=VALUE "
                    f"(or --set {slot.name.rsplit('.', 1)[-1]}=VALUE)",
                    slot.path,
                    within="<+input>",
                )
            )
            continue
        else:
            continue
        if (
            isinstance(text, str)
            and text.strip() != INPUT_RE.sub("", text).strip()
            and INPUT_RE.fullmatch(text.strip()) is None
        ):
            # <+input> inside a longer string: substitute in place.
            value = INPUT_RE.sub(str(value), text)
        set_at(slot.doc.data, slot.path, _coerce(value))
        external.add((slot.doc.file, slot.doc.index, slot.path))
    unknown = sorted(set(inputs) - used)
    if unknown:
        known = ", ".join(s.name for s in slots) or "none"
        # Hook (input sets): a name read from an --inputs file points at its place there
        # (app.definitions.inputsets.InputValues.origins); a --set name is reported as --set.
        origin = (getattr(inputs, "origins", None) or {}).get(unknown[0])
        file, line, col = origin if origin else ("--set", 0, 0)
        raise SpecError(
            f"no runtime input <+input> is named '{unknown[0]}' (inputs in these files: {known})",
            file=file,
            line=line,
            col=col,
            field=unknown[0],
        )
    errs.raise_if_any()
    return slots, external


def _coerce(value: object) -> object:
    if isinstance(value, str) and re.fullmatch(r"-?\d+", value) and len(value) < 10:
        return value  # keep strings: fields that want numbers coerce them
    return value
