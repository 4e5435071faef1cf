"""Input sets: runtime-input values read from files (``--inputs FILE``, repeatable).

A file holds one or more YAML documents, each one of:

* a flat map of input names to values, the names ``--set`` takes (a full name such as
  ``pipeline.hello.variables.release_note`` or its end, ``release_note``)::

      tag: 1.4.2
      release_note: hotfix

* Harness's input set: the pipeline's shape with only the runtime-input fields filled::

      inputSet:
        name: prod
        identifier: prod
        pipeline:
          identifier: hello
          variables:
            - name: release_note
              type: String
              value: hotfix
          stages:
            - stage:
                identifier: deploy
                type: Deployment
                spec:
                  service:
                    serviceRef: hello_app          # only when the pipeline asks for it
                    serviceInputs:
                      serviceDefinition:
                        type: Ssh
                        spec:
                          artifacts: {primary: {spec: {tag: 1.4.2}}}
                  execution:
                    steps:
                      - step:
                          identifier: install
                          type: Command
                          timeout: 10m

  (also without the ``inputSet:`` wrapper, as a bare ``pipeline:`` document). Stages, steps
  and step groups that use a template give their inputs under ``template.templateInputs``.
  Each filled field becomes the name the loader gives that input: ``pipeline.<id>.variables.x``,
  ``pipeline.<id>.stages.<stage>.<path>`` (entries named by identifier, variables by name),
  ``service.<serviceRef>.<path>`` for ``serviceInputs``, ``environment.<environmentRef>...``
  for ``environmentInputs``, ``infrastructure.<id>...`` for an infrastructure's ``inputs``.
  Without the pipeline's (or the service's) identifier the name is its end, which ``--set``
  matching accepts too. Fields still ``<+input>`` are left out; ``identifier``, ``type`` and
  ``name`` of entries only say where values go.

* Harness's overlay: ``overlayInputSet: {identifier, inputSetReferences: [a, b]}`` applies the
  input sets it names (from any of the given files), in its order, where it stands.

Later values win: a later document, file or reference over an earlier one, and ``--set`` over
every file (``merge_inputs``). Errors are SpecErrors naming the file, line, column and field.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import yaml

from app.definitions.bundle import Collector as _Collector
from app.definitions.expressions import has_input
from app.definitions.loader import _read, expand_paths
from app.definitions.validation import _type_name
from app.definitions.yamlload import Document, Path, load_documents
from app.errors import SpecError

_SET_KEYS = {
    "name",
    "identifier",
    "description",
    "tags",
    "orgIdentifier",
    "projectIdentifier",
    "pipeline",
}
_OVERLAY_KEYS = {
    "name",
    "identifier",
    "description",
    "tags",
    "orgIdentifier",
    "projectIdentifier",
    "pipelineIdentifier",
    "inputSetReferences",
}
# Keys that say which entry values belong to; never values themselves.
_ENTRY_KEYS = {"identifier", "type", "name"}
_INNER = ("stage", "step", "stepGroup")

Where = tuple[str, int, int]


class InputValues(dict[str, str]):
    """Input names to values (what ``--set`` gives), with where each name was read
    (``origins``: file, line, column), so that a name no input has is reported there."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.origins: dict[str, Where] = {}


def _suffix(short: str, long: str) -> bool:
    """True when the dotted name ``short`` is ``long`` or ends it (``--set`` matching)."""
    s, t = short.split("."), long.split(".")
    return len(s) <= len(t) and t[len(t) - len(s) :] == s


def overlay(base: Mapping[str, str], newer: Mapping[str, str]) -> InputValues:
    """``base`` with ``newer`` applied on top, so that ``newer`` wins for every input.

    A name fills every input whose full name it ends, and the longest name that matches an
    input wins; a plain ``{**base, **newer}`` would let ``pipeline.p.variables.x`` from ``base``
    beat ``x`` from ``newer``. So the names of ``base`` that a name of ``newer`` ends are
    dropped.
    """
    out = InputValues()
    origins = getattr(base, "origins", {})
    for k, v in base.items():
        if not any(_suffix(n, k) for n in newer):
            out[k] = v
            if k in origins:
                out.origins[k] = origins[k]
    new_origins = getattr(newer, "origins", {})
    for k, v in newer.items():
        out[k] = v
        if k in new_origins:
            out.origins[k] = new_origins[k]
    return out


def merge_inputs(input_sets: Mapping[str, str], sets: Mapping[str, str]) -> InputValues:
    """What to pass to ``load(inputs=...)``: the ``--inputs`` values with ``--set`` on top."""
    return overlay(input_sets, sets)


@dataclass
class _Source:
    doc: Document
    raw: dict[Path, str]  # source text of every non-string scalar (1.10 stays "1.10")


def read_input_sets(paths: Iterable[str | os.PathLike[str]]) -> InputValues:
    """The flat mapping of runtime-input names to values of the given files (or folders of
    .yaml/.yml files), later ones winning. Raises SpecError / SpecErrors."""
    errs = _Collector()
    sources: list[_Source] = []
    for f in expand_paths(paths):
        try:
            text = _read(f)
            docs = load_documents(text, str(f))
        except SpecError as exc:
            errs.add(exc)
            continue
        if not docs:
            errs.add(
                SpecError(
                    "input file is empty: expected input names and values, or an inputSet",
                    file=str(f),
                    line=1,
                    col=1,
                )
            )
        raws = _raw_scalars(text)
        sources.extend(_Source(d, raws.get(d.index, {})) for d in docs)
    errs.raise_if_any()
    by_id: dict[str, _Source] = {}
    for src in sources:
        data = src.doc.data
        if isinstance(data, dict) and isinstance(data.get("inputSet"), dict):
            ident = data["inputSet"].get("identifier")
            if isinstance(ident, str):
                by_id.setdefault(ident, src)
    values = InputValues()
    for src in sources:
        data = src.doc.data
        if isinstance(data, dict) and "overlayInputSet" in data:
            for ref_src in _overlay_refs(src, by_id, errs):
                values = overlay(values, _values_of(ref_src, errs))
        else:
            values = overlay(values, _values_of(src, errs))
    errs.raise_if_any()
    return values


def _overlay_refs(src: _Source, by_id: Mapping[str, _Source], errs: _Collector) -> list[_Source]:
    doc = src.doc
    body = doc.data["overlayInputSet"]
    if not isinstance(body, dict):
        errs.add(
            doc.error(
                f"'overlayInputSet' must be a mapping, got {_type_name(body)}", ("overlayInputSet",)
            )
        )
        return []
    extra = [k for k in body if k not in _OVERLAY_KEYS] + [
        k for k in doc.data if k != "overlayInputSet"
    ]
    for k in extra:
        where: Path = ("overlayInputSet", k) if k in body else (k,)
        errs.add(
            doc.error(
                f"unknown field '{k}' (allowed: {', '.join(sorted(_OVERLAY_KEYS))})",
                where,
                key=True,
            )
        )
    refs = body.get("inputSetReferences")
    if not isinstance(refs, list) or not refs:
        errs.add(
            doc.error(
                "an overlayInputSet needs inputSetReferences: a list of input set identifiers",
                ("overlayInputSet", "inputSetReferences")
                if "inputSetReferences" in body
                else ("overlayInputSet",),
            )
        )
        return []
    out: list[_Source] = []
    for i, ref in enumerate(refs):
        target = by_id.get(str(ref))
        if target is None:
            known = ", ".join(sorted(by_id)) or "none"
            errs.add(
                doc.error(
                    f"input set '{ref}' is not in the given --inputs files (input sets: {known})",
                    ("overlayInputSet", "inputSetReferences", i),
                )
            )
            continue
        out.append(target)
    return out


def _values_of(src: _Source, errs: _Collector) -> InputValues:
    """The names and values one document gives."""
    doc = src.doc
    data = doc.data
    out = InputValues()
    if not isinstance(data, dict):
        errs.add(
            doc.error(
                f"an input file holds a mapping of input names to values (or an "
                f"inputSet), got {_type_name(data)}",
                (),
            )
        )
        return out
    walker = _Walker(src, out, errs)
    if "inputSet" in data or "pipeline" in data:
        top = "inputSet" if "inputSet" in data else "pipeline"
        for k in data:
            if k != top:
                errs.add(doc.error(f"unknown field '{k}' next to '{top}'", (k,), key=True))
        if top == "inputSet":
            body = data["inputSet"]
            if not isinstance(body, dict):
                errs.add(
                    doc.error(
                        f"'inputSet' must be a mapping, got {_type_name(body)}", ("inputSet",)
                    )
                )
                return out
            for k in body:
                if k not in _SET_KEYS:
                    errs.add(
                        doc.error(
                            f"unknown field '{k}' (allowed: {', '.join(sorted(_SET_KEYS))})",
                            ("inputSet", k),
                            key=True,
                        )
                    )
            if "pipeline" not in body:
                errs.add(
                    doc.error(
                        "an inputSet needs 'pipeline' (the pipeline's shape with "
                        "its runtime inputs filled)",
                        ("inputSet",),
                        key=True,
                    )
                )
                return out
            walker.pipeline(body["pipeline"], ("inputSet", "pipeline"))
        else:
            walker.pipeline(data["pipeline"], ("pipeline",))
        return out
    for k, v in data.items():
        if isinstance(v, dict | list):
            errs.add(
                doc.error(
                    f"'{k}' must be a string, number or boolean, got {_type_name(v)} (a flat input "
                    "file maps input names to values; for the pipeline's shape use 'inputSet:')",
                    (k,),
                    key=True,
                )
            )
        elif v is not None:
            walker.emit(k, v, (k,))
    return out


class _Walker:
    """Walks a pipeline-shaped tree and names each filled field as the loader names its input
    (app.definitions.inputs.input_name)."""

    def __init__(self, src: _Source, out: InputValues, errs: _Collector) -> None:
        self.src = src
        self.doc = src.doc
        self.out = out
        self.errs = errs

    def emit(self, name: str, value: Any, path: Path) -> None:
        text = value if isinstance(value, str) else (self.src.raw.get(path) or str(value))
        line, col = self.doc.pos(path)
        self.out[name] = text
        self.out.origins[name] = (self.doc.file, line, col)

    def pipeline(self, body: Any, path: Path) -> None:
        if not isinstance(body, dict):
            self.errs.add(
                self.doc.error(f"'pipeline' must be a mapping, got {_type_name(body)}", path)
            )
            return
        pid = body.get("identifier")
        names = ["pipeline", str(pid)] if isinstance(pid, str) and pid else []
        self.node(body, names, path, entry=True)

    def node(self, data: Any, names: list[str], path: Path, *, entry: bool = False) -> None:
        """``entry``: ``data`` is the body of a stage, step, step group or list entry (its
        identifier, name and type only say which one it is)."""
        if isinstance(data, dict):
            for k, v in data.items():
                at: Path = (*path, k)
                if entry and k in _ENTRY_KEYS:
                    continue
                if k == "template" and isinstance(v, dict):
                    inputs = v.get("templateInputs")
                    if inputs is not None:
                        self.node(inputs, names, (*at, "templateInputs"), entry=True)
                elif k in ("stage", "step"):
                    self.node(v, names, at, entry=True)
                elif k == "stepGroup":
                    self.node(v, [*names, k], at, entry=True)
                elif k == "serviceInputs":
                    self.service(data, v, at)
                elif k == "environmentInputs":
                    ref = data.get("environmentRef")
                    self.node(v, self._owner("environment", ref, at), at, entry=True)
                elif (
                    k == "infrastructureDefinitions"
                    and isinstance(v, list)
                    and any(isinstance(e, dict) and "inputs" in e for e in v)
                ):
                    self.infrastructures(v, names, at)
                else:
                    self.node(v, [*names, k], at)
        elif isinstance(data, list):
            for i, v in enumerate(data):
                at = (*path, i)
                if isinstance(v, dict) and "name" in v and "value" in v:
                    self.leaf(v["value"], [*names, str(v["name"])], (*at, "value"))
                    continue
                ident = _ident(v)
                self.node(v, [*names, ident if ident is not None else str(i)], at, entry=True)
        else:
            self.leaf(data, names, path)

    def leaf(self, value: Any, names: list[str], path: Path) -> None:
        if value is None or (isinstance(value, str) and has_input(value)):
            return  # not filled: left for --set (or for its default)
        if isinstance(value, dict | list):
            self.node(value, names, path)
            return
        if not names:
            self.errs.add(self.doc.error("this value names no input", path))
            return
        self.emit(".".join(names), value, path)

    def _owner(self, kind: str, ref: Any, at: Path) -> list[str]:
        """``service.<ref>`` (or nothing, when the input set does not say which one: the names
        are then matched from their end)."""
        if isinstance(ref, str) and ref and not has_input(ref):
            return [kind, ref]
        return []

    def service(self, parent: dict[str, Any], inputs: Any, at: Path) -> None:
        names = self._owner("service", parent.get("serviceRef"), at)
        sd = inputs.get("serviceDefinition") if isinstance(inputs, dict) else None
        if (
            not isinstance(inputs, dict)
            or set(inputs) - {"serviceDefinition"}
            or not isinstance(sd, dict)
            or set(sd) - {"type", "spec"}
        ):
            self.errs.add(self.doc.error("serviceInputs holds serviceDefinition: {type, spec}", at))
            return
        if "spec" in sd:
            self.node(sd["spec"], names, (*at, "serviceDefinition", "spec"), entry=True)

    def infrastructures(self, entries: list[Any], names: list[str], at: Path) -> None:
        for i, e in enumerate(entries):
            if not isinstance(e, dict):
                continue
            ident = e.get("identifier")
            if "inputs" in e:
                owner = self._owner("infrastructure", ident, (*at, i))
                self.node(e["inputs"], owner, (*at, i, "inputs"), entry=True)


def _ident(v: Any) -> str | None:
    if not isinstance(v, dict):
        return None
    for inner in _INNER:
        body = v.get(inner)
        if isinstance(body, dict) and isinstance(body.get("identifier"), str):
            return str(body["identifier"])
    ident = v.get("identifier")
    return str(ident) if isinstance(ident, str | int) and not isinstance(ident, bool) else None


def _raw_scalars(text: str) -> dict[int, dict[Path, str]]:
    """Per document index (as load_documents counts them), the source text of every plain
    scalar that YAML reads as something other than a string: ``tag: 1.10`` is "1.10", not 1.1.
    """
    out: dict[int, dict[Path, str]] = {}
    loader = yaml.SafeLoader(text)
    try:
        index = 0
        while loader.check_node():
            node = loader.get_node()
            if node is None:
                continue
            found: dict[Path, str] = {}
            _walk_nodes(loader, node, (), found)
            out[index] = found
            index += 1
    except yaml.YAMLError:  # load_documents has reported it already
        pass
    finally:
        loader.dispose()
    return out


def _walk_nodes(
    loader: yaml.SafeLoader, node: yaml.Node, path: Path, found: dict[Path, str]
) -> None:
    if isinstance(node, yaml.MappingNode):
        loader.flatten_mapping(node)
        for k, v in node.value:
            if isinstance(k, yaml.ScalarNode):
                _walk_nodes(loader, v, (*path, str(k.value)), found)
    elif isinstance(node, yaml.SequenceNode):
        for i, v in enumerate(node.value):
            _walk_nodes(loader, v, (*path, i), found)
    elif (
        isinstance(node, yaml.ScalarNode)
        and node.style is None
        and node.tag != "tag:yaml.org,2002:str"
    ):
        found[path] = str(node.value)
