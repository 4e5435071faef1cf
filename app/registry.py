"""The registry: Environments, Infrastructures, Services, Connectors, Templates and Pipelines
kept by the server, each entry a sequence of versions (the document's text, who applied it,
when). ``vmfarm apply -f FILE|DIR`` stores a new version of each document that changed;
``vmfarm get`` and ``vmfarm history`` read them (app.server.routes.registry).

An entry is one YAML document, named by its kind and identifier (a template with a
``versionLabel`` by ``identifier@label``). What an environment is (its type, its hosts, its
connectors) is then a fact of the server: a run submitted with files may not define or
redefine an Environment, an Infrastructure or a Connector (nor a Template of type Environment
or Infrastructure), and everything its pipeline names that its files do not define is resolved
from the registry's latest versions (``for_run``). The execution records which versions it
used (``RegistryUse``).

The pure parts (splitting files into entries, what a submission may not define, which entries
a pipeline reaches, diffs) need no database; ``store``, ``latest`` and the readers do.
"""

from __future__ import annotations

import difflib
import re
import tempfile
from collections.abc import Iterable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from app.errors import SpecError, SpecErrors

if TYPE_CHECKING:
    from sqlmodel import Session

    from app.models import RegistryVersion

# Every kind the registry keeps, in the order a listing shows them. Later kinds (Trigger,
# Freeze) are added here and nowhere else.
KINDS: tuple[str, ...] = (
    "Environment",
    "Infrastructure",
    "Service",
    "Connector",
    "Template",
    "Pipeline",
    "Trigger",
)
# What a submitted run may not define: these come only from the registry.
REGISTRY_ONLY: tuple[str, ...] = ("Environment", "Infrastructure", "Connector")
# Template types that would define one of those (a template of an Environment's body).
REGISTRY_ONLY_TEMPLATES: tuple[str, ...] = ("Environment", "Infrastructure")
# Where registry documents are written beside submitted files (a submitted name has no "/").
FOLDER = "registry"


def kind_of(name: str) -> str | None:
    """The registry kind named ``name`` (any case, singular), or None."""
    low = name.strip().lower()
    return next((k for k in KINDS if k.lower() == low), None)


@dataclass(frozen=True)
class Entry:
    """One document of applied or submitted files, as the registry names it."""

    kind: str
    ident: str
    text: str  # the document's own text (from its first line to its end)
    file: str
    line: int
    col: int
    env_type: str | None = None  # an Environment's type
    env_ref: str | None = None  # an Infrastructure's environment
    template_type: str | None = None  # a Template's type
    data: Any = None  # the document in vmfarm's shape
    kind_at: tuple[int, int] = (0, 0)  # where its kind is written
    version: int = 0  # a stored entry's version (0: not stored)

    @property
    def where(self) -> str:
        """``file:line:col`` of its kind (of the document when it names none)."""
        line, col = self.kind_at if self.kind_at[0] else (self.line, self.col)
        return f"{self.file}:{line}:{col}"

    @property
    def key(self) -> tuple[str, str]:
        return (self.kind, self.ident)


# --- documents --------------------------------------------------------------------------------


def _ident(meta: Any) -> str:
    from app.definitions.base import identifier_of

    if not isinstance(meta, dict):
        return ""
    ident = meta.get("identifier") or (identifier_of(str(meta["name"])) if meta.get("name") else "")
    return str(ident)


def _slices(text: str) -> dict[int, str]:
    """Each non-empty document's own text, by the line its content starts on."""
    import yaml

    loader: Any = getattr(yaml, "CSafeLoader", yaml.SafeLoader)
    out: dict[int, str] = {}
    for node in yaml.compose_all(text, Loader=loader):
        if node is None:
            continue
        start = text.rfind("\n", 0, node.start_mark.index) + 1
        # The comment lines right above the document belong to it.
        while start > 0:
            above = text.rfind("\n", 0, start - 1) + 1
            if not text[above : start - 1].lstrip().startswith("#"):
                break
            start = above
        lines = text[start : node.end_mark.index].rstrip().splitlines()
        while lines and lines[-1].strip() in ("---", "..."):
            lines.pop()
        out[node.start_mark.line + 1] = "\n".join(lines).rstrip() + "\n"
    return out


def _dump(data: Any) -> str:
    """A document's text when its own cannot be cut out of the file (never expected)."""
    import yaml

    return str(yaml.safe_dump(data, sort_keys=False))


def documents(name: str, text: str) -> Iterator[Entry]:
    """The documents of one file as entries (their kind may be one the registry does not keep:
    ``split`` refuses those). SpecError on YAML the loader would refuse, with its place."""
    from app.definitions.native import from_native
    from app.definitions.templates import is_template_document
    from app.definitions.yamlload import load_documents

    docs = load_documents(text, name)
    slices = _slices(text) if docs else {}
    for raw in docs:
        line, col = raw.pos(())
        own = slices.get(raw.line) or _dump(raw.data)
        # where its kind is written (Harness's shape: the document's top key)
        has_kind = isinstance(raw.data, dict) and "kind" in raw.data
        kind_at = raw.pos(("kind",)) if has_kind else (line, col)
        if is_template_document(raw.data):
            data = raw.data
            native = data.get("kind") != "Template"
            body = data.get("template") if native else data.get("spec")
            meta = data.get("template") if native else data.get("metadata")
            body = body if isinstance(body, dict) else {}
            label = body.get("versionLabel")
            ident = _ident(meta) + (f"@{label}" if label is not None else "")
            ttype = body.get("type")
            yield Entry(
                "Template",
                ident,
                own,
                name,
                line,
                col,
                template_type=str(ttype) if ttype is not None else None,
                data=data,
                kind_at=kind_at,
            )
            continue
        if _is_trigger(raw.data):
            body = raw.data.get("trigger")
            yield Entry(
                "Trigger",
                str(body.get("identifier") or "") if isinstance(body, dict) else "",
                own,
                name,
                line,
                col,
                data=raw.data,
                kind_at=kind_at,
            )
            continue
        doc = from_native(raw)
        data = doc.data
        kind = data.get("kind") if isinstance(data, dict) else None
        if not isinstance(kind, str):
            yield Entry("", "", own, name, line, col, data=data, kind_at=kind_at)
            continue
        spec = data.get("spec") if isinstance(data.get("spec"), dict) else {}
        env_type = spec.get("type") if kind == "Environment" else None
        env_ref = spec.get("environmentRef") if kind == "Infrastructure" else None
        yield Entry(
            kind,
            _ident(data.get("metadata")),
            own,
            name,
            line,
            col,
            env_type=str(env_type) if env_type is not None else None,
            env_ref=str(env_ref) if env_ref is not None else None,
            data=data,
            kind_at=kind_at,
        )


def _is_trigger(data: Any) -> bool:
    """A webhook trigger: Harness's ``trigger:`` document (``kind: Trigger`` optional)."""
    return (
        isinstance(data, dict)
        and data.get("kind") in (None, "Trigger")
        and isinstance(data.get("trigger"), dict)
    ) or (isinstance(data, dict) and data.get("kind") == "Trigger")


def _without_triggers(text: str) -> str:
    """The file with its trigger documents blanked out, line for line (the loader's errors
    keep their lines; triggers are checked by ``check_triggers``)."""
    import yaml

    loader: Any = getattr(yaml, "CSafeLoader", yaml.SafeLoader)
    lines = text.splitlines(keepends=True)
    try:
        nodes = [n for n in yaml.compose_all(text, Loader=loader) if n is not None]
    except yaml.YAMLError:
        return text  # the loader says what is wrong
    for node in nodes:
        if not isinstance(node, yaml.MappingNode):
            continue
        keys = {k.value for k, _ in node.value if isinstance(k, yaml.ScalarNode)}
        kind = next(
            (
                v.value
                for k, v in node.value
                if isinstance(k, yaml.ScalarNode) and k.value == "kind"
            ),
            None,
        )
        if kind == "Trigger" or ("trigger" in keys and kind is None):
            first, last = node.start_mark.line, node.end_mark.line
            if node.end_mark.column == 0:
                last -= 1
            for i in range(first, min(last + 1, len(lines))):
                lines[i] = "\n"
    return "".join(lines)


def check_triggers(
    entries: Iterable[Entry],
    pipelines: Iterable[str],
    files: Mapping[str, str],
    connectors: Mapping[str, str] | None = None,
) -> None:
    """Each applied trigger as ``app.triggers`` reads it, naming a pipeline that is stored or
    applied with it, and (an artifact trigger) a connector of ``connectors`` (id -> type, the
    stored and applied ones) of the type its repository takes: SpecError(s) with the file,
    line and field."""
    from app.definitions.bundle import Collector
    from app.triggers import load_text

    errs = Collector()
    known = set(pipelines)
    for name in sorted({e.file for e in entries if e.kind == "Trigger"}):
        try:
            found = load_text(_only_triggers(files[name]), name)
        except (SpecError, SpecErrors) as exc:
            errs.absorb(exc)
            continue
        for t in found:
            if t.pipeline not in known:
                line = t.pipeline_line
                errs.add(
                    SpecError(
                        f"trigger '{t.id}' names pipeline '{t.pipeline}', which is neither "
                        "stored nor applied with it (vmfarm get Pipeline lists them)",
                        file=name,
                        line=line,
                        col=1,
                        field="trigger.pipelineIdentifier",
                    )
                )
            if connectors is not None and t.kind == "artifact":
                problem = _connector_problem(t, connectors)
                if problem:
                    errs.add(
                        SpecError(
                            problem,
                            file=name,
                            line=t.connector_line,
                            col=1,
                            field="trigger.source.spec.spec.connectorRef",
                        )
                    )
    errs.raise_if_any()


def _connector_problem(trig: Any, connectors: Mapping[str, str]) -> str | None:
    """Why an artifact trigger's connectorRef does not fit (None when it does)."""
    from app.definitions.models.connector import connector_id
    from app.triggers.artifact import CONNECTOR_TYPES

    ref = trig.artifact.spec.connector_ref
    if not ref:
        return None
    want = CONNECTOR_TYPES[trig.artifact.type]
    got = connectors.get(connector_id(ref))
    if got is None:
        return (
            f"trigger '{trig.id}' names connector '{ref}', which is neither stored nor "
            "applied with it (vmfarm get Connector lists them)"
        )
    if got != want:
        return f"connector '{ref}' is of type {got}; a {trig.artifact.type} trigger takes {want}"
    return None


def _only_triggers(text: str) -> str:
    """The file with everything but its trigger documents blanked out, line for line."""
    keep = _without_triggers(text)
    return "".join(
        line if kept.strip() == "" or line.strip() in ("---", "...") else "\n"
        for line, kept in zip(
            text.splitlines(keepends=True), keep.splitlines(keepends=True), strict=False
        )
    )


def stored_trigger(ident: str) -> Any:
    """The latest version of the stored trigger ``ident`` (an ``app.triggers.Trigger``), or
    None."""
    from app.db import session_scope
    from app.triggers import load_text

    with session_scope() as s:
        row = latest(s, kind="Trigger").get(("Trigger", ident))
        if row is None:
            return None
        text, name = row.text, file_name(row.kind, row.ident)
    found = load_text(text, name)
    return found[0] if found else None


def stored_triggers() -> list[tuple[int, Any]]:
    """Every stored trigger's latest version: (version, trigger), by id."""
    from app.db import session_scope
    from app.triggers import load_text

    with session_scope() as s:
        rows = [
            (r.version, r.text, file_name(r.kind, r.ident))
            for r in latest(s, kind="Trigger").values()
        ]
    out = [(v, t) for v, text, name in rows for t in load_text(text, name)]
    return sorted(out, key=lambda vt: vt[1].id)


def split(files: Mapping[str, str]) -> list[Entry]:
    """Every document of the files to apply, as registry entries. SpecErrors naming
    ``file:line:col`` for bad YAML, a document of a kind the registry does not keep, a
    document without an identifier, or one entry given twice."""
    errors: list[SpecError] = []
    out: list[Entry] = []
    seen: dict[tuple[str, str], Entry] = {}
    for name, text in sorted(files.items()):
        try:
            found = list(documents(name, text))
        except SpecError as exc:
            errors.append(exc)
            continue
        if not found:
            errors.append(SpecError("file has no document", file=name, line=1, col=1))
        for e in found:
            if e.kind not in KINDS:
                what = f"kind '{e.kind}'" if e.kind else "a document without a kind"
                errors.append(
                    SpecError(
                        f"{what} is not kept in the registry (one of: {', '.join(KINDS)})",
                        file=e.file,
                        line=e.kind_at[0] or e.line,
                        col=e.kind_at[1] or e.col,
                        field="kind",
                    )
                )
            elif not e.ident.split("@")[0]:
                errors.append(
                    SpecError(
                        f"a {e.kind} needs metadata.identifier or metadata.name",
                        file=e.file,
                        line=e.line,
                        col=e.col,
                        field="metadata",
                    )
                )
            elif e.key in seen:
                first = seen[e.key]
                errors.append(
                    SpecError(
                        f"{e.kind} '{e.ident}' is given twice (first at {first.where})",
                        file=e.file,
                        line=e.kind_at[0],
                        col=e.kind_at[1],
                        field="metadata.identifier",
                    )
                )
            else:
                seen[e.key] = e
                out.append(e)
    if errors:
        raise errors[0] if len(errors) == 1 else SpecErrors(errors)
    return out


def redefinitions(files: Mapping[str, str]) -> list[str]:
    """Where submitted run files define what only the registry may (``file:line:col:
    message``). A file that is not YAML is left to the loader, which says why."""
    found: list[str] = []
    for name, text in sorted(files.items()):
        try:
            entries = list(documents(name, text))
        except SpecError:
            continue
        for e in entries:
            if e.kind in REGISTRY_ONLY:
                found.append(
                    f"{e.where}: {e.kind} '{e.ident}' comes from the registry: a submitted "
                    f"file may not define or redefine it (`vmfarm apply -f FILE` stores a "
                    f"new version; `vmfarm get {e.kind}` lists them)"
                )
            elif e.kind == "Template" and e.template_type in REGISTRY_ONLY_TEMPLATES:
                found.append(
                    f"{e.where}: Template '{e.ident}' of type {e.template_type} would define an "
                    f"{e.template_type}, which comes from the registry: a submitted file may "
                    "not (`vmfarm apply -f FILE` stores it)"
                )
    return found


# --- which entries a pipeline reaches -------------------------------------------------------------

_SCOPE = re.compile(r"^(account|org|project)\.")


def refs(data: Any, out: set[str], depth: int = 0) -> bool:
    """Add to ``out`` every identifier ``data`` names (``*Ref`` values, a stage's listed
    infrastructures); True when one is an expression (decided at run time)."""
    if depth > 200:
        return False
    dynamic = False
    if isinstance(data, dict):
        for k, v in data.items():
            if isinstance(k, str) and k.endswith("Ref") and isinstance(v, str):
                if "<+" in v:
                    dynamic = True
                else:
                    out.add(_SCOPE.sub("", v))
            elif k == "infrastructureDefinitions" and isinstance(v, list):
                for item in v:
                    ident = item.get("identifier") if isinstance(item, dict) else None
                    if isinstance(ident, str):
                        if "<+" in ident:
                            dynamic = True
                        out.add(ident)
            dynamic = refs(v, out, depth + 1) or dynamic
    elif isinstance(data, list):
        for v in data:
            dynamic = refs(v, out, depth + 1) or dynamic
    return dynamic


def reach(
    start: Iterable[Any], stored: Mapping[tuple[str, str], Entry], *, skip: set[tuple[str, str]]
) -> list[Entry]:
    """The stored entries the documents ``start`` name, and what those name in turn: the
    environments, infrastructures, services, connectors and templates a run is resolved with.
    An environment brings its infrastructures (a stage deploys to all, or to its only one);
    a reference written as an expression brings every entry of the kinds it could name; a
    Pipeline stage brings the pipeline it chains (app.definitions.chaining).
    ``skip``: entries the submitted files define themselves."""
    from app.definitions.chaining import chained

    pending = list(start)
    names: set[str] = set()
    pipelines: set[str] = set()
    chosen: dict[tuple[str, str], Entry] = {}
    everything = False
    while pending:
        found: set[str] = set()
        for data in pending:
            everything = refs(data, found) or everything
            pipelines |= chained(data)
        pending = []
        names |= found
        for key, e in stored.items():
            if key in chosen or key in skip or e.kind == "Trigger":
                continue
            if e.kind == "Pipeline":
                if e.ident in pipelines:  # a child: what it names is reached in turn
                    chosen[key] = e
                    pending.append(e.data)
                continue
            base = e.ident.split("@")[0] if e.kind == "Template" else e.ident
            hit = (
                everything
                or base in names
                or (e.kind == "Infrastructure" and e.env_ref is not None and e.env_ref in names)
            )
            if hit:
                chosen[key] = e
                pending.append(e.data)
                if e.kind == "Environment":
                    names.add(e.ident)
    return sorted(chosen.values(), key=lambda e: (KINDS.index(e.kind), e.ident))


# --- diffs ----------------------------------------------------------------------------------------


def diff(kind: str, ident: str, before: str | None, after: str, version: int) -> str:
    """A unified diff of one version against the previous one (the first: against nothing)."""
    return "".join(
        difflib.unified_diff(
            (before or "").splitlines(keepends=True),
            after.splitlines(keepends=True),
            fromfile=f"{kind}/{ident} version {version - 1}" if before is not None else "/dev/null",
            tofile=f"{kind}/{ident} version {version}",
        )
    )


def normalise(text: str) -> str:
    """A document's text as stored: trailing blanks and blank lines do not make a version."""
    return "\n".join(line.rstrip() for line in text.rstrip().splitlines()) + "\n"


# --- the ledger -----------------------------------------------------------------------------------


def latest(session: Session, *, kind: str | None = None) -> dict[tuple[str, str], RegistryVersion]:
    """The newest version of every entry (of ``kind``)."""
    from sqlalchemy import and_, func
    from sqlmodel import col, select

    from app.models import RegistryVersion as RV

    newest = select(RV.kind, RV.ident, func.max(RV.version).label("v")).group_by(
        col(RV.kind), col(RV.ident)
    )
    if kind is not None:
        newest = newest.where(RV.kind == kind)
    sub = newest.subquery()
    rows = session.exec(
        select(RV).join(
            sub,
            and_(
                col(RV.kind) == sub.c.kind, col(RV.ident) == sub.c.ident, col(RV.version) == sub.c.v
            ),
        )
    ).all()
    return {(r.kind, r.ident): r for r in rows}


def entry_of(row: RegistryVersion) -> Entry:
    """A stored version as an entry (its text read again)."""
    e = next(documents(file_name(row.kind, row.ident), row.text), None)
    if e is None:  # stored texts were entries when applied; never empty
        raise SpecError(f"{row.kind} '{row.ident}' version {row.version} is empty")
    return Entry(
        row.kind,
        row.ident,
        row.text,
        e.file,
        e.line,
        e.col,
        env_type=row.env_type,
        env_ref=row.env_ref,
        template_type=e.template_type,
        data=e.data,
        kind_at=e.kind_at,
        version=row.version,
    )


def file_name(kind: str, ident: str) -> str:
    """Where a stored entry is written for the loader (its errors name this file)."""
    safe = re.sub(r"[^A-Za-z0-9_.@-]", "_", ident)
    return f"{FOLDER}/{kind.lower()}-{safe}.yaml"


@contextmanager
def folder(
    files: Mapping[str, str], stored: Iterable[Entry], *, prefix: str = "vmfarm-"
) -> Iterator[tuple[str, list[str]]]:
    """A temporary folder holding ``files`` by name and ``stored`` entries under registry/;
    yields it and the paths the loader reads."""
    with tempfile.TemporaryDirectory(prefix=prefix) as tmp:
        paths = []
        for name, text in sorted(files.items()):
            path = Path(tmp) / name
            path.write_text(text)
            paths.append(str(path))
        (Path(tmp) / FOLDER).mkdir()
        for e in stored:
            path = Path(tmp) / file_name(e.kind, e.ident)
            path.write_text(e.text)
            paths.append(str(path))
        yield tmp, paths


def check(files: Mapping[str, str], stored: Iterable[Entry]) -> None:
    """Load the applied files together with the stored entries they do not replace, as a run
    would (schemas, references, templates): SpecError/SpecErrors naming the applied file (or
    ``registry/kind-id.yaml`` for a stored entry it breaks)."""
    from app.definitions import load

    files = {name: _without_triggers(text) for name, text in files.items()}
    files = {  # a file of triggers only is checked by check_triggers
        name: text
        for name, text in files.items()
        if any(
            ln.strip() not in ("", "---", "...") and not ln.lstrip().startswith("#")
            for ln in text.splitlines()
        )
    }
    stored = [e for e in stored if e.kind != "Trigger"]
    with folder(files, stored, prefix="vmfarm-apply-") as (tmp, paths):
        try:
            load(paths, inputs={}, require_inputs=False)
        except (SpecError, SpecErrors) as exc:
            raise _relative(exc, tmp + "/") from None


def _relative(exc: SpecError | SpecErrors, root: str) -> SpecError | SpecErrors:
    """The error with file names relative to the temporary folder (no server path)."""

    def fix(e: SpecError) -> SpecError:
        name = e.file[len(root) :] if e.file.startswith(root) else e.file
        return SpecError(
            e.message.replace(root, ""), file=name, line=e.line, col=e.col, field=e.field
        )

    if isinstance(exc, SpecErrors):
        return SpecErrors([fix(e) for e in exc.errors])
    return fix(exc)


def store(
    session: Session,
    entries: Iterable[Entry],
    current: Mapping[tuple[str, str], RegistryVersion],
    *,
    author: str,
    token_id: str | None = None,
) -> list[tuple[Entry, int, bool]]:
    """Add a version of each entry whose text changed; (entry, its version, changed) each."""
    from app.models import RegistryVersion as RV

    out: list[tuple[Entry, int, bool]] = []
    for e in entries:
        text = normalise(e.text)
        old = current.get(e.key)
        if old is not None and old.text == text:
            out.append((e, old.version, False))
            continue
        version = (old.version if old is not None else 0) + 1
        session.add(
            RV(
                kind=e.kind,
                ident=e.ident,
                version=version,
                text=text,
                author=author,
                token_id=token_id,
                env_type=e.env_type,
                env_ref=e.env_ref,
            )
        )
        out.append((e, version, True))
    return out


def versions(session: Session, kind: str, ident: str) -> list[RegistryVersion]:
    """Every version of one entry, oldest first."""
    from sqlmodel import col, select

    from app.models import RegistryVersion as RV

    return list(
        session.exec(
            select(RV).where(RV.kind == kind, RV.ident == ident).order_by(col(RV.version))
        ).all()
    )


def uses(session: Session, execution_id: str) -> list[dict[str, Any]]:
    """The registry versions an execution used: ``[{kind, id, version}]``."""
    from sqlmodel import col, select

    from app.models import RegistryUse

    rows = session.exec(
        select(RegistryUse)
        .where(RegistryUse.execution_id == execution_id)
        .order_by(col(RegistryUse.id))
    ).all()
    return [{"kind": r.kind, "id": r.ident, "version": r.version} for r in rows]


__all__ = [
    "FOLDER",
    "KINDS",
    "REGISTRY_ONLY",
    "Entry",
    "check",
    "diff",
    "documents",
    "folder",
    "kind_of",
    "latest",
    "normalise",
    "reach",
    "redefinitions",
    "refs",
    "split",
    "store",
    "uses",
    "versions",
]
