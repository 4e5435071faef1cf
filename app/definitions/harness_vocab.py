"""Harness's SSH vocabulary, read as vmfarm's.

Harness generates its SSH pipelines, services and infrastructures with words vmfarm spells
another way. This pass rewrites them, before anything is validated, into vmfarm's form; every
part keeps pointing at where it was written (file:line:col), and whatever has no vmfarm
counterpart is refused here by name with the vmfarm way to write it.

=================================================  =============================================
Harness                                            vmfarm
=================================================  =============================================
a Command step's ``strategy: repeat: items:        nothing: a Command step runs on every host of
<+stage.output.hosts>``                            the phase (one Celery task per host)
``stepGroup`` with ``repeat`` over                 ``strategy: {type: Rolling, phases: ["50%"]}``
``<+stage.output.hosts>``, ``partitionSize`` and   (its inner ``Phase Group`` over
``unit`` (Count / Percentage)                      ``<+repeat.partition>`` is the phase's hosts;
                                                   its ``maxConcurrency`` the stage's)
``stepGroup``\\ s with ``start``/``end``           ``strategy: {type: Canary, phases: [...]}``,
                                                   the ends as cumulative targets
``primaryArtifactRef`` + ``sources[]``             ``primary: {identifier, type, spec}``
``ArtifactoryRegistry``                            ``Artifactory``
``serviceInputs`` that only say ``<+input>``       nothing: the service's runtime inputs are
                                                   asked anyway (--set, --inputs)
``credentialsRef`` (a ``secret:`` of type          ``connection: {user, port, privateKeySecret |
SSHKey, or a secret id)                            passwordSecret, passphraseSecret}``
PDC ``connector:`` with ``hosts``                  the infrastructure's ``spec.hosts``
``hosts`` as plain strings                         ``- hostname: ...``
``hostFilter`` HostNames / HostAttributes          the hosts it keeps (static hosts: at load)
``awsInstanceFilter``                              ``hostFilter: {type: AwsInstanceFilter}``
=================================================  =============================================
"""

from __future__ import annotations

import copy
import re
from typing import Any

from app.definitions.templates import ExpandedDocument, Origin
from app.definitions.yamlload import Document, Path
from app.errors import SpecError

HOSTS = "<+stage.output.hosts>"
PARTITION = "<+repeat.partition>"
ARTIFACT_TYPES = {"ArtifactoryRegistry": "Artifactory"}


class _Rewrite:
    """A document's data being rewritten, with where each moved part came from."""

    def __init__(self, doc: Document) -> None:
        self.doc = doc
        self.data = copy.deepcopy(doc.data)
        self.moves: dict[Path, Origin] = {}
        self.changed = False
        self.errors: list[SpecError] = []
        self.problems: list[tuple[str, Path, bool]] = []

    def source(self, path: Path, other: Document | None = None) -> Origin:
        """Where ``path`` of the data as it is now (or of ``other`` document) was written."""
        path = tuple(path)
        if other is None:
            for n in range(len(path), -1, -1):
                hit = self.moves.get(path[:n])
                if hit is not None:
                    return hit[0], (*hit[1], *path[n:])
        doc = other or self.doc
        if isinstance(doc, ExpandedDocument):
            src, p = doc.origin(path)
            return (src if src is not None else _Plain.of(doc), p)
        return (doc, tuple(path))

    def move(self, new: Path, old: Path, other: Document | None = None) -> None:
        self.moves[tuple(new)] = self.source(old, other)
        self.changed = True

    def error(self, message: str, path: Path, *, key: bool = True) -> None:
        """A problem at ``path`` of the data as it is now (reported by ``result``)."""
        self.problems.append((message, tuple(path), key))

    def result(self) -> Document:
        out = self._result()
        self.errors += [out.error(msg, p, key=key) for msg, p, key in self.problems]
        return out

    def _result(self) -> Document:
        if not self.changed:
            return self.doc
        if isinstance(self.doc, ExpandedDocument):
            out = copy.copy(self.doc)
            out.origins = dict(self.doc.origins)
            # An ExpandedDocument's own parts (origin None) keep reading its own positions.
            out.origins.setdefault((), self.source(()))
        else:
            out = ExpandedDocument(
                file=self.doc.file, index=self.doc.index, data=None, line=self.doc.line
            )
            out.origins = {(): (self.doc, ())}
        out.data = self.data
        for new, origin in sorted(self.moves.items(), key=lambda kv: len(kv[0])):
            # A deeper part moved before keeps its own origin; drop the stale ones below.
            for p in [p for p in out.origins if p[: len(new)] == new and len(p) > len(new)]:
                if p not in self.moves:
                    del out.origins[p]
            out.origins[new] = origin
        return out


class _Plain:
    """An ExpandedDocument's own positions as a plain Document (for origins that point at it)."""

    @staticmethod
    def of(doc: ExpandedDocument) -> Document:
        return Document(
            file=doc.file,
            index=doc.index,
            data=doc.data,
            values=doc.values,
            keys=doc.keys,
            line=doc.line,
            sources=doc.sources,
        )


def _at(data: Any, path: Path) -> Any:
    for p in path:
        data = data[p]
    return data


def _mapping(value: Any) -> dict[str, Any]:
    return value if isinstance(value, dict) else {}


def _kind(doc: Document) -> str | None:
    data = doc.data
    return data.get("kind") if isinstance(data, dict) else None


# --- the pass ------------------------------------------------------------------------------------


def map_vocabulary(documents: list[Document]) -> tuple[list[Document], list[SpecError]]:
    """Every document with Harness's SSH vocabulary in vmfarm's; ``secret:`` documents of type
    SSHKey and PDC connectors are taken in by the infrastructures that name them."""

    errors: list[SpecError] = []
    secrets: dict[str, tuple[Document, dict[str, Any]]] = {}
    pdc: dict[str, Document] = {}
    rest: list[Document] = []
    for doc in documents:
        data = doc.data
        if isinstance(data, dict) and set(data) == {"secret"} and isinstance(data["secret"], dict):
            body = data["secret"]
            if body.get("type") != "SSHKey":
                errors.append(
                    doc.error(
                        f"a secret of type {body.get('type')!r} does not go in the pipeline "
                        "files: its value lives in a secrets backend (`vmfarm secrets set ID`, "
                        'VMFARM_SECRET_<ID>, Vault) and files read it with <+secrets.getValue("ID")>; '
                        "only SSHKey secrets (user, port and the key's secret id) are read here",
                        ("secret", "type"),
                        key=False,
                    )
                )
                continue
            secrets[str(body.get("identifier") or body.get("name"))] = (doc, body)
            continue
        if (
            _kind(doc) == "Connector"
            and isinstance(data.get("spec"), dict)
            and data["spec"].get("type") == "Pdc"
        ):
            meta = _mapping(data.get("metadata"))
            pdc[str(meta.get("identifier") or meta.get("name"))] = doc
            continue
        rest.append(doc)
    out: list[Document] = []
    for doc in rest:
        try:
            rw = _rewritten(doc, secrets, pdc)
        except (AttributeError, TypeError, KeyError, IndexError, ValueError):
            # A shape this pass does not read (a mapping where a list stands, a number where a
            # mapping does): the document goes on as written, and validation names the field.
            out.append(doc)
            continue
        out.append(rw.result())
        errors.extend(rw.errors)
    return out, errors


def _rewritten(
    doc: Document,
    secrets: dict[str, tuple[Document, dict[str, Any]]],
    pdc: dict[str, Document],
) -> _Rewrite:
    """One document's rewrite (its data copied; the document itself is left as it is)."""
    from app.definitions.harness_hosts import infrastructure, service

    rw = _Rewrite(doc)
    kind = _kind(doc)
    if kind == "Pipeline":
        _pipeline(rw)
    elif kind == "Service":
        service(rw)
    elif kind == "Connector":
        spec = _mapping(_mapping(rw.data.get("spec")).get("spec"))
        if "awsSdkClientBackOffStrategyOverride" in spec:
            rw.error(
                "awsSdkClientBackOffStrategyOverride is not supported: vmfarm's AWS calls use "
                "botocore's standard retry mode (backoff, a fixed number of attempts); "
                "remove it",
                ("spec", "spec", "awsSdkClientBackOffStrategyOverride"),
            )
    elif kind == "Infrastructure":
        infrastructure(rw, ("spec",), secrets, pdc)
    elif kind == "Environment":
        infras = (rw.data.get("spec") or {}).get("infrastructureDefinitions")
        for i, inline in enumerate(infras if isinstance(infras, list) else []):
            if isinstance(inline, dict) and isinstance(inline.get("spec"), dict):
                infrastructure(rw, ("spec", "infrastructureDefinitions", i, "spec"), secrets, pdc)
    return rw


# --- pipelines -----------------------------------------------------------------------------------


def _pipeline(rw: _Rewrite) -> None:
    stages = (rw.data.get("spec") or {}).get("stages")
    if not isinstance(stages, list):
        return
    for i, el in enumerate(stages):
        if isinstance(el, dict) and isinstance(el.get("stage"), dict):
            _stage(rw, ("spec", "stages", i, "stage"))
        elif isinstance(el, dict) and isinstance(el.get("parallel"), list):
            for j, inner in enumerate(el["parallel"]):
                if isinstance(inner, dict) and isinstance(inner.get("stage"), dict):
                    _stage(rw, ("spec", "stages", i, "parallel", j, "stage"))


def _stage(rw: _Rewrite, base: Path) -> None:
    stage = _at(rw.data, base)
    if "variables" in stage:
        rw.error(
            "stage variables are not supported: write them as pipeline variables "
            "(spec.variables, read as <+pipeline.variables.NAME>) or as service or "
            "environment variables",
            (*base, "variables"),
        )
    spec = stage.get("spec")
    if not isinstance(spec, dict):
        return
    service = spec.get("service")
    if isinstance(service, dict) and _only_inputs(service.get("serviceInputs")):
        del service["serviceInputs"]  # the service's own <+input> fields are asked anyway
        rw.changed = True
    env = spec.get("environment")
    if isinstance(env, dict) and _only_inputs(env.get("environmentInputs")):
        del env["environmentInputs"]
        rw.changed = True
    execution = spec.get("execution")
    if not isinstance(execution, dict):
        return
    steps = execution.get("steps")
    if stage.get("type") == "Approval" and isinstance(steps, list) and len(steps) > 1:
        rw.error(
            "an Approval stage with more than one step is not supported: vmfarm's Approval "
            "stage runs one HarnessApproval step; put the other steps in a Custom stage "
            "(ShellScript, Http, Wait) after it, or the next approval in an Approval stage of "
            "its own",
            (*base, "spec", "execution", "steps", 1, "step"),
            key=False,
        )
    for key in ("steps", "rollbackSteps"):
        if isinstance(execution.get(key), list):
            _approvals(rw, (*base, "spec", "execution", key))
            _runtime_paths(rw, (*base, "spec", "execution", key))
    for key in ("steps", "rollbackSteps"):
        if isinstance(execution.get(key), list):
            _phases(rw, base, (*base, "spec", "execution", key), rollback=key == "rollbackSteps")
            _repeat_over_hosts(rw, (*base, "spec", "execution", key))


def _approvals(rw: _Rewrite, path: Path) -> None:
    """Harness's approval options: the ones its editor writes with their default values mean
    what vmfarm does (dropped); any other is refused by name."""
    for i, el in enumerate(_at(rw.data, path)):
        group = el.get("stepGroup") if isinstance(el, dict) else None
        if isinstance(group, dict) and isinstance(group.get("steps"), list):
            _approvals(rw, (*path, i, "stepGroup", "steps"))
        step = el.get("step") if isinstance(el, dict) else None
        if not isinstance(step, dict) or step.get("type") != "HarnessApproval":
            continue
        spec = step.get("spec")
        if not isinstance(spec, dict):
            continue
        at: Path = (*path, i, "step", "spec")
        if spec.get("isAutoRejectEnabled") is False:
            del spec["isAutoRejectEnabled"]  # vmfarm never rejects on its own
            rw.changed = True
        elif "isAutoRejectEnabled" in spec:
            rw.error(
                "isAutoRejectEnabled: true is not supported: vmfarm waits for the approvers until "
                "the step's timeout, then fails the step (vmfarm reject to end it sooner)",
                (*at, "isAutoRejectEnabled"),
            )
        if spec.get("approverInputs") in ([], None) and "approverInputs" in spec:
            del spec["approverInputs"]
            rw.changed = True
        elif "approverInputs" in spec:
            rw.error(
                "approverInputs are not supported: vmfarm's approvers approve or reject with a "
                "comment; ask for values as runtime inputs (<+input>, --set) instead",
                (*at, "approverInputs"),
            )
        if "autoApproval" in spec:
            rw.error(
                "autoApproval is not supported: vmfarm never approves on its own; without "
                "approvers the step fails at its timeout (drop the approval step to deploy "
                "without one)",
                (*at, "autoApproval"),
            )


_RUNTIME_PATH = re.compile(r"\$\{?HARNESS_(RUNTIME|BACKUP|STAGING)_PATH\b")


def _runtime_paths(rw: _Rewrite, path: Path) -> None:
    """Harness's ``$HARNESS_RUNTIME_PATH`` (and BACKUP, STAGING) are set by Harness on the host;
    vmfarm does not set them, so a unit that reads them is refused by name (a Copy would
    reach SFTP with the name, a script would make an empty path)."""
    for i, el in enumerate(_at(rw.data, path)):
        group = el.get("stepGroup") if isinstance(el, dict) else None
        if isinstance(group, dict) and isinstance(group.get("steps"), list):
            _runtime_paths(rw, (*path, i, "stepGroup", "steps"))
        step = el.get("step") if isinstance(el, dict) else None
        spec = step.get("spec") if isinstance(step, dict) else None
        units = spec.get("commandUnits") if isinstance(spec, dict) else None
        for n, unit in enumerate(units if isinstance(units, list) else []):
            uspec = unit.get("spec") if isinstance(unit, dict) else None
            if not isinstance(uspec, dict):
                continue
            script = ((uspec.get("source") or {}).get("spec") or {}).get("script")
            for key, value, at in (
                ("destinationPath", uspec.get("destinationPath"), ("destinationPath",)),
                ("workingDirectory", uspec.get("workingDirectory"), ("workingDirectory",)),
                ("script", script, ("source", "spec", "script")),
            ):
                hit = _RUNTIME_PATH.search(value) if isinstance(value, str) else None
                if hit:
                    rw.error(
                        f"{hit.group(0).lstrip('$').strip('{')} in {key} is not set by vmfarm "
                        "(Harness sets it on the host): write the directory, e.g. "
                        "$HOME/<+service.name>/<+env.name>/runtime",
                        (*path, i, "step", "spec", "commandUnits", n, "spec", *at),
                        key=False,
                    )


def _only_inputs(value: Any) -> bool:
    """True for a Harness input block that only says "asked at run time": ``<+input>`` leaves
    (at least one), and the ``type`` Harness repeats next to a ``spec`` holding them."""
    inputs = 0

    def walk(v: Any) -> bool:
        nonlocal inputs
        if isinstance(v, dict):
            return all(
                (k == "type" and "spec" in v and isinstance(x, str)) or walk(x)
                for k, x in v.items()
            )
        if isinstance(v, list):
            return all(walk(x) for x in v)
        inputs += isinstance(v, str) and v.strip() == "<+input>"
        return isinstance(v, str) and v.strip() == "<+input>"

    return isinstance(value, dict) and walk(value) and inputs > 0


def _repeat(el: Any) -> dict[str, Any] | None:
    """The ``strategy.repeat`` of a step or step group element, else None."""
    if not isinstance(el, dict) or len(el) != 1:
        return None
    body = next(iter(el.values()))
    strategy = body.get("strategy") if isinstance(body, dict) else None
    if not isinstance(strategy, dict) or set(strategy) != {"repeat"}:
        return None
    repeat = strategy["repeat"]
    return repeat if isinstance(repeat, dict) else None


def _repeat_over_hosts(rw: _Rewrite, path: Path) -> None:
    """Drop ``repeat: items: <+stage.output.hosts>`` from Command steps (and in step groups)."""
    for i, el in enumerate(_at(rw.data, path)):
        repeat = _repeat(el)
        group = el.get("stepGroup") if isinstance(el, dict) else None
        if isinstance(group, dict) and isinstance(group.get("steps"), list):
            _repeat_over_hosts(rw, (*path, i, "stepGroup", "steps"))
        if not (isinstance(el, dict) and "step" in el) or repeat is None:
            continue
        if repeat.get("items") != HOSTS:
            continue  # another loop: vmfarm's looping reads it, or refuses it
        spec = el["step"].get("spec")
        if isinstance(spec, dict) and str(spec.get("host", "")).strip() == "<+repeat.item>":
            del spec["host"]
            rw.changed = True
        if set(repeat) != {"items"}:
            continue  # with maxConcurrency: vmfarm's looping caps the hosts in flight
        del el["step"]["strategy"]
        _item_is_the_host(el["step"])
        rw.changed = True


def _item_is_the_host(data: Any) -> None:
    """In a step repeated over the stage's hosts, ``<+repeat.item>`` is the host: written as
    ``<+instance.hostName>`` (in place, so every part keeps its place in the file)."""
    items = (
        data.items()
        if isinstance(data, dict)
        else enumerate(data)
        if isinstance(data, list)
        else []
    )
    for k, v in list(items):
        if isinstance(v, str) and "repeat.item" in v:
            data[k] = re.sub(r"<\+\s*repeat\.item\s*>", "<+instance.hostName>", v)
        elif isinstance(v, dict | list):
            _item_is_the_host(v)


def _phase_repeat(el: Any) -> dict[str, Any] | None:
    """The repeat of a Harness Phase (a step group, or a step, over a part of the stage's
    hosts), else None."""
    repeat = _repeat(el)
    if repeat is None or repeat.get("items") != HOSTS:
        return None
    if not {"partitionSize", "start", "end"} & set(repeat):
        return None
    return repeat


def _phases(rw: _Rewrite, stage: Path, path: Path, *, rollback: bool) -> None:
    """Harness's Phase step groups -> the stage's rolling or canary strategy and its steps."""
    elements = _at(rw.data, path)
    repeats = [_phase_repeat(el) for el in elements]
    if not any(r is not None for r in repeats):
        return
    for i, r in enumerate(repeats):
        if r is None:
            rw.error(
                "a step next to Phase step groups is not supported: vmfarm runs a stage's steps "
                "in every phase; put it inside the Phase group, or in a stage of its own",
                (*path, i),
            )
            return
    rolling = [i for i, r in enumerate(repeats) if r is not None and "partitionSize" in r]
    if rolling and len(elements) > 1:
        rw.error(
            "a rolling stage has one Phase step group (partitionSize repeats it over the hosts); "
            "write the others' steps inside it",
            (*path, 1),
        )
        return
    strategy: dict[str, Any] = {}
    kind = next(iter(elements[0]))
    if rolling:
        strategy = _rolling(rw, (*path, 0, kind, "strategy", "repeat"), repeats[0] or {})
    else:
        strategy = _canary(rw, path, elements, [r for r in repeats if r is not None])
    if not strategy:
        return
    steps, inner_concurrency = _phase_steps(rw, path, elements)
    if steps is None:
        return
    if inner_concurrency is not None:
        strategy["maxConcurrency"] = inner_concurrency
    # The phase group's steps become the stage's; each keeps pointing where it was written.
    origins = [rw.source(old) for _, old in steps]
    strategy_origin = rw.source((*path, 0, kind, "strategy"))
    _set_at(rw.data, path, [value for value, _ in steps])
    for n, origin in enumerate(origins):
        rw.moves[(*path, n)] = origin
    rw.changed = True
    if rollback:
        return  # vmfarm rolls back the hosts it deployed, phase by phase as they were deployed
    spec = _at(rw.data, (*stage, "spec"))
    if "strategy" in spec:
        rw.error(
            "this stage has both a strategy and Harness's Phase step groups; keep one",
            (*stage, "spec", "strategy"),
        )
        return
    spec["strategy"] = strategy
    rw.moves[(*stage, "spec", "strategy")] = strategy_origin


def _set_at(data: Any, path: Path, value: Any) -> None:
    _at(data, path[:-1])[path[-1]] = value


def _rolling(rw: _Rewrite, at: Path, repeat: dict[str, Any]) -> dict[str, Any]:
    known = {"items", "partitionSize", "unit", "maxConcurrency"}
    for k in repeat:
        if k not in known:
            rw.error(
                f"repeat.{k} in a Phase step group is not supported (vmfarm reads items, "
                "partitionSize, unit and maxConcurrency: 1)",
                (*at, k),
            )
            return {}
    size = repeat.get("partitionSize")
    unit = repeat.get("unit", "Count")
    if unit not in ("Count", "Percentage"):
        rw.error(f"unit {unit!r}: write Count or Percentage", (*at, "unit"), key=False)
        return {}
    if not isinstance(size, int) or isinstance(size, bool) or size < 1:
        rw.error("partitionSize must be a whole number above 0", (*at, "partitionSize"), key=False)
        return {}
    if unit == "Percentage" and size > 100:
        rw.error("partitionSize is at most 100 (%)", (*at, "partitionSize"), key=False)
        return {}
    if repeat.get("maxConcurrency", 1) != 1:
        rw.error(
            "maxConcurrency of a Phase step group other than 1 is not supported: vmfarm deploys "
            "a stage's phases one after another, each with its own gate (hosts in flight inside "
            "a phase: the Phase Group's maxConcurrency)",
            (*at, "maxConcurrency"),
        )
        return {}
    return {"type": "Rolling", "phases": [f"{size}%" if unit == "Percentage" else size]}


def _canary(
    rw: _Rewrite, path: Path, elements: list[Any], repeats: list[dict[str, Any]]
) -> dict[str, Any]:
    ends: list[int | str] = []
    done: tuple[float, str] = (0, "")
    concurrency = repeats[0].get("maxConcurrency")
    for i, repeat in enumerate(repeats):
        at = (*path, i, next(iter(elements[i])), "strategy", "repeat")
        unknown = [
            k for k in repeat if k not in ("items", "start", "end", "unit", "maxConcurrency")
        ]
        if unknown:
            rw.error(
                f"repeat.{unknown[0]} in a canary Phase is not supported (vmfarm reads items, "
                "start, end, unit and maxConcurrency)",
                (*at, unknown[0]),
            )
            return {}
        if repeat.get("maxConcurrency") != concurrency:
            rw.error(
                "each Phase has its own maxConcurrency: vmfarm has one for the stage's phases "
                "(the hosts in flight at once); give them all the same",
                (*at, "maxConcurrency"),
            )
            return {}
        unit = repeat.get("unit", "Count")
        start, end = repeat.get("start", 0), repeat.get("end")
        if unit not in ("Count", "Percentage"):
            rw.error(f"unit {unit!r}: write Count or Percentage", (*at, "unit"), key=False)
            return {}
        if not isinstance(end, int) or isinstance(end, bool) or not isinstance(start, int):
            rw.error("start and end must be whole numbers", (*at, "end"))
            return {}
        previous = done[0] if (not done[1] or done[1] == unit) else None
        if start != previous:
            rw.error(
                f"this Phase starts at {start} but the one before it ends at "
                f"{done[0] if done[1] else 0}{'%' if done[1] == 'Percentage' else ''}: vmfarm's "
                "phases follow one another over the hosts (start of each = end of the last, "
                "in the same unit)",
                (*at, "start"),
            )
            return {}
        if end <= start or (unit == "Percentage" and end > 100):
            rw.error(f"end {end} must be above start {start} (and at most 100%)", (*at, "end"))
            return {}
        ends.append(f"{end}%" if unit == "Percentage" else end)
        done = (end, unit)
    if done != (100, "Percentage"):
        rw.error(
            "the last Phase ends before every host (Harness would leave the rest on the old "
            "version): vmfarm's canary finishes with every host, so end the last Phase at "
            "end: 100, unit: Percentage (or add such a Phase)",
            (*path, len(repeats) - 1, "stepGroup", "strategy", "repeat", "end"),
        )
        return {}
    out: dict[str, Any] = {"type": "Canary", "phases": ends[:-1] or ends}
    if concurrency is not None:
        out["maxConcurrency"] = concurrency
    return out


def _phase_steps(
    rw: _Rewrite, path: Path, elements: list[Any]
) -> tuple[list[tuple[Any, Path]] | None, int | None]:
    """The steps every phase runs (with where they were written), and the hosts-at-once of
    the inner ``Phase Group``; None when the phases differ."""
    first: list[tuple[Any, Path]] | None = None
    concurrency: int | None = None
    for i, el in enumerate(elements):
        if "step" in el:  # a step over a part of the hosts: a Phase of that one step
            step = copy.deepcopy(el)
            del step["step"]["strategy"]
            mine = [(_without_host(step), (*path, i))]
            if first is None:
                first = mine
            elif _shape([s for s, _ in mine]) != _shape([s for s, _ in first]):
                rw.error(
                    "the steps of this Phase differ from the first Phase's: vmfarm runs the "
                    "same steps in every phase of a stage (write one stage per set of steps)",
                    (*path, i),
                )
                return None, None
            continue
        group = el["stepGroup"]
        base: Path = (*path, i, "stepGroup")
        for k in group:
            if k not in ("name", "identifier", "strategy", "steps"):
                rw.error(
                    f"{k} on a Phase step group is not supported: give it to the stage "
                    "(failureStrategies, when) or to its steps",
                    (*base, k),
                )
                return None, None
        steps = group.get("steps") or []
        if (
            len(steps) == 1
            and isinstance(steps[0], dict)
            and "stepGroup" in steps[0]
            and (_repeat(steps[0]) or {}).get("items") == PARTITION
        ):
            inner = _repeat(steps[0]) or {}
            extra = [k for k in inner if k not in ("items", "maxConcurrency")]
            if extra:
                rw.error(
                    f"repeat.{extra[0]} in a Phase Group is not supported (vmfarm reads items "
                    "and maxConcurrency)",
                    (*base, "steps", 0, "stepGroup", "strategy", "repeat", extra[0]),
                )
                return None, None
            if i == 0:
                concurrency = inner.get("maxConcurrency")
            base = (*base, "steps", 0, "stepGroup")
            steps = steps[0]["stepGroup"].get("steps") or []
        mine = [(_without_host(s), (*base, "steps", n)) for n, s in enumerate(steps)]
        if first is None:
            first = mine
        elif _shape([s for s, _ in mine]) != _shape([s for s, _ in first]):
            rw.error(
                "the steps of this Phase differ from the first Phase's: vmfarm runs the same "
                "steps in every phase of a stage (write one stage per set of steps)",
                (*path, i),
            )
            return None, None
    return first, concurrency


def _without_host(el: Any) -> Any:
    """A Command step without ``spec.host: <+repeat.item>`` (Harness's way of saying "the host
    of this iteration", which is where vmfarm runs a step anyway)."""
    spec = el.get("step", {}).get("spec") if isinstance(el, dict) else None
    if isinstance(spec, dict) and str(spec.get("host", "")).strip() == "<+repeat.item>":
        el = copy.deepcopy(el)
        del el["step"]["spec"]["host"]
    return el


def _shape(value: Any) -> Any:
    """A step list without its names and identifiers (Harness numbers them per phase)."""
    if isinstance(value, dict):
        return {k: _shape(v) for k, v in value.items() if k not in ("identifier", "name")}
    if isinstance(value, list):
        return [_shape(v) for v in value]
    return value
