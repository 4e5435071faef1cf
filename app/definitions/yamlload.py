"""Read YAML into plain data while remembering where every value and key stood.

PyYAML's node graph carries marks; we keep them in two maps keyed by the value's path
(a tuple of mapping keys and list indexes) so that any later error, from pydantic or from our
own checks, can be reported as ``file:line:col``. Duplicate keys are an error (PyYAML would keep
the last one silently), and so are YAML's anchors-merge surprises such as non-string keys.

A file is hostile input: the nodes are composed here, from the parser's events, with limits
checked as each event arrives, so that a document beyond them is refused at once (a 455-byte
"billion laughs" alias bomb took 48 s and 3.2 GB before), never expanded. The limits:

* ``MAX_FILE_BYTES``: the size of one file (checked before it is read);
* ``MAX_DEPTH``: collections nested in collections (a pipeline needs about 15);
* ``MAX_ALIASES``: alias uses (``*name``) in one document;
* ``MAX_NODES``: values in one document once every alias is expanded, and
  ``MAX_ALIAS_NODES``: how many of those may be copies made by aliases.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import yaml
from yaml.composer import ComposerError
from yaml.events import (
    AliasEvent,
    MappingStartEvent,
    ScalarEvent,
    SequenceStartEvent,
    StreamEndEvent,
)

from app.errors import SpecError

Path = tuple[str | int, ...]

# Limits on one pipeline file (see the module docstring). A 20,000-host inventory is about
# 2 MB and 300,000 values; the reference's pipelines nest about 15 deep.
MAX_FILE_BYTES = 8 * 1024 * 1024
MAX_DEPTH = 64
MAX_ALIASES = 10_000
MAX_NODES = 1_000_000
MAX_ALIAS_NODES = 100_000


@dataclass
class Document:
    """One YAML document: its data and where each part of it stands in the file."""

    file: str
    index: int
    data: Any
    values: dict[Path, tuple[int, int]] = field(default_factory=dict)
    keys: dict[Path, tuple[int, int]] = field(default_factory=dict)
    line: int = 1
    # Source text of the string scalars that hold an expression, to point inside them.
    sources: dict[Path, tuple[int, int, str]] = field(default_factory=dict)

    def pos(self, path: Path, *, key: bool = False) -> tuple[int, int]:
        """Line and column of the value at ``path`` (or of its key), else of the nearest parent."""
        p = tuple(path)
        while p:
            hit = (self.keys if key else self.values).get(p) or self.values.get(p)
            if hit:
                return hit
            p = p[:-1]
        return self.values.get((), (self.line, 1))

    def locate(self, path: Path, needle: str) -> tuple[int, int]:
        """Where ``needle`` stands inside the string at ``path`` (a line of a script block)."""
        src = self.sources.get(tuple(path))
        i = src[2].find(needle) if src and needle else -1
        if src is None or i < 0:
            return self.pos(path)
        line, col, raw = src
        nl = raw.rfind("\n", 0, i)
        return (line + raw.count("\n", 0, i), col + i if nl < 0 else i - nl)

    def error(
        self, message: str, path: Path, *, key: bool = False, within: str | None = None
    ) -> SpecError:
        """A SpecError that points at ``path`` (at ``within`` inside it, when found)."""
        line, col = self.locate(path, within) if within else self.pos(path, key=key)
        return SpecError(message, file=self.file, line=line, col=col, field=dotted(path))


def dotted(path: Path) -> str:
    """``('spec', 'stages', 0, 'stage')`` -> ``spec.stages[0].stage``."""
    out = ""
    for p in path:
        out += f"[{p}]" if isinstance(p, int) else (f".{p}" if out else str(p))
    return out


def _mark(node: yaml.Node) -> tuple[int, int]:
    return (node.start_mark.line + 1, node.start_mark.column + 1)


class _Builder:
    def __init__(self, doc: Document, loader: Any, text: str) -> None:
        self.doc = doc
        self.loader = loader
        self.text = text
        self.open: set[int] = set()  # collections being built: an alias to one is a cycle

    def build(self, node: yaml.Node, path: Path) -> Any:
        self.doc.values[path] = _mark(node)
        if isinstance(node, yaml.MappingNode | yaml.SequenceNode):
            if id(node) in self.open:
                line, col = _mark(node)
                raise SpecError(
                    "recursive YAML alias: a value cannot contain itself",
                    file=self.doc.file,
                    line=line,
                    col=col,
                    field=dotted(path),
                )
            self.open.add(id(node))
            try:
                return self._collection(node, path)
            finally:
                self.open.discard(id(node))
        value = self.loader.construct_object(node)
        mark = node.start_mark
        if isinstance(value, str) and "<+" in value:
            if mark.buffer is not None:
                raw = str(mark.buffer[mark.pointer : node.end_mark.pointer])
            else:  # libyaml's marks carry no buffer; their index counts characters too
                raw = self.text[mark.index : node.end_mark.index]
            self.doc.sources[path] = (*_mark(node), raw)
        return value

    def _collection(self, node: yaml.Node, path: Path) -> Any:
        if isinstance(node, yaml.MappingNode):
            self.loader.flatten_mapping(node)  # resolves YAML merge keys (<<)
            out: dict[str, Any] = {}
            for knode, vnode in node.value:
                key = self.loader.construct_object(knode)
                if not isinstance(key, str):
                    line, col = _mark(knode)
                    raise SpecError(
                        f"mapping key {key!r} must be a string",
                        file=self.doc.file,
                        line=line,
                        col=col,
                        field=dotted(path),
                    )
                if key in out:
                    line, col = _mark(knode)
                    raise SpecError(
                        f"duplicate key '{key}'",
                        file=self.doc.file,
                        line=line,
                        col=col,
                        field=dotted((*path, key)),
                    )
                self.doc.keys[(*path, key)] = _mark(knode)
                out[key] = self.build(vnode, (*path, key))
            return out
        return [self.build(v, (*path, i)) for i, v in enumerate(node.value)]


def _limit(file: str, mark: Any, message: str) -> SpecError:
    return SpecError(message, file=file, line=mark.line + 1, col=mark.column + 1)


def _compose(loader: Any, file: str) -> Any:
    """The root node of the loader's next document, built from its events (as PyYAML's
    Composer does, iteratively) while every limit is checked; None at the end of the stream."""
    if loader.check_event(StreamEndEvent):
        return None
    loader.get_event()  # DocumentStart
    anchors: dict[str, yaml.Node] = {}
    sizes: dict[int, int] = {}  # expanded size of each anchored node (what an alias copies)
    # Open collections: [node, pending mapping key, expanded size so far].
    stack: list[list[Any]] = []
    open_ids: set[int] = set()
    aliases = distinct = expanded = 0
    while True:
        event: Any = loader.get_event()
        kind: Any = type(event)
        size = 1
        if kind is AliasEvent:
            node = anchors.get(event.anchor)
            if node is None:
                raise ComposerError(
                    None, None, f"found undefined alias {event.anchor!r}", event.start_mark
                )
            if id(node) in open_ids:
                raise _limit(
                    file, event.start_mark, "recursive YAML alias: a value cannot contain itself"
                )
            aliases += 1
            if aliases > MAX_ALIASES:
                raise _limit(
                    file,
                    event.start_mark,
                    f"more than {MAX_ALIASES:,} YAML aliases in one document (limit "
                    "MAX_ALIASES): write the values out, or use a template",
                )
            size = sizes[id(node)]
            expanded += size
            if expanded - distinct > MAX_ALIAS_NODES:
                raise _limit(
                    file,
                    event.start_mark,
                    f"YAML aliases copy more than {MAX_ALIAS_NODES:,} values into this "
                    "document (limit MAX_ALIAS_NODES): an alias bomb? write the values "
                    "out, or use a template",
                )
            if expanded > MAX_NODES:
                raise _limit(
                    file,
                    event.start_mark,
                    f"more than {MAX_NODES:,} values in one document once its aliases "
                    "are expanded (limit MAX_NODES): split it into several files",
                )
        elif kind in (ScalarEvent, SequenceStartEvent, MappingStartEvent):
            distinct += 1
            expanded += 1
            if expanded > MAX_NODES:
                raise _limit(
                    file,
                    event.start_mark,
                    f"more than {MAX_NODES:,} values in one document (limit "
                    "MAX_NODES): split it into several files",
                )
            if event.anchor is not None and event.anchor in anchors:
                raise ComposerError(
                    f"found duplicate anchor {event.anchor!r}; first occurrence",
                    anchors[event.anchor].start_mark,
                    "second occurrence",
                    event.start_mark,
                )
            tag = event.tag
            if kind is ScalarEvent:
                if tag is None or tag == "!":
                    tag = loader.resolve(yaml.ScalarNode, event.value, event.implicit)
                node = yaml.ScalarNode(
                    tag, event.value, event.start_mark, event.end_mark, style=event.style
                )
            else:
                cls = yaml.SequenceNode if kind is SequenceStartEvent else yaml.MappingNode
                if tag is None or tag == "!":
                    tag = loader.resolve(cls, None, event.implicit)
                node = cls(tag, [], event.start_mark, None, flow_style=event.flow_style)
            if event.anchor is not None:
                anchors[event.anchor] = node
                sizes[id(node)] = 1
            if kind is not ScalarEvent:
                if len(stack) >= MAX_DEPTH:
                    raise _limit(
                        file,
                        event.start_mark,
                        f"values nested more than {MAX_DEPTH} deep (limit MAX_DEPTH)",
                    )
                stack.append([node, None, 1])
                open_ids.add(id(node))
                continue
        else:  # SequenceEnd / MappingEnd
            node, _, size = stack.pop()
            open_ids.discard(id(node))
            node.end_mark = event.end_mark
            if id(node) in sizes:
                sizes[id(node)] = size
        if not stack:
            loader.get_event()  # DocumentEnd
            return node
        top = stack[-1]
        top[2] += size
        if isinstance(top[0], yaml.SequenceNode):
            top[0].value.append(node)
        elif top[1] is None:
            top[1] = node
        else:
            top[0].value.append((top[1], node))
            top[1] = None


def _documents(text: str, file: str, loader: Any) -> list[Document]:
    docs: list[Document] = []
    index = 0
    loader.get_event()  # StreamStart
    while (node := _compose(loader, file)) is not None:
        doc = Document(file=file, index=index, data=None, line=node.start_mark.line + 1)
        doc.data = _Builder(doc, loader, text).build(node, ())
        index += 1
        if doc.data is None:
            continue
        docs.append(doc)
    return docs


# libyaml's parser (when PyYAML has it) reads a 10,000-host inventory ~4x faster. The same
# constructor and resolver build the values; any error reads the file again with PyYAML's own
# parser, whose messages and positions are the ones reported, unless the file is larger than
# REPARSE_BYTES: then libyaml's own error is reported (a second, slower parse of a big file
# would cost a minute for an error found at its end).
_FAST: Any = getattr(yaml, "CSafeLoader", None)
REPARSE_BYTES = 1024 * 1024


def load_documents(text: str, file: str) -> list[Document]:
    """Every non-empty document of a multi-document YAML text, with positions."""
    if len(text) > MAX_FILE_BYTES:  # (characters: at most as many as bytes)
        raise SpecError(
            f"file is {len(text.encode()) / 2**20:.1f} MiB; vmfarm reads pipeline "
            f"files of at most {MAX_FILE_BYTES // 2**20} MiB (MAX_FILE_BYTES): "
            "split it into several files",
            file=file,
            line=1,
            col=1,
        )
    if _FAST is not None:
        fast = None
        try:
            fast = _FAST(text)
            return _documents(text, file, fast)
        except SpecError:  # a limit, or a duplicate key: the same in either parser
            raise
        except yaml.MarkedYAMLError as exc:
            if len(text) > REPARSE_BYTES:
                raise _yaml_error(exc, text, file) from None
        except Exception:  # whatever it was, PyYAML's own parser reports it
            pass
        finally:
            if fast is not None:
                fast.dispose()
    loader: yaml.SafeLoader | None = None
    try:
        # Inside the try: the reader refuses control characters as soon as it is built.
        loader = yaml.SafeLoader(text)
        return _documents(text, file, loader)
    except yaml.MarkedYAMLError as exc:
        raise _yaml_error(exc, text, file) from None
    except yaml.reader.ReaderError as exc:  # a character YAML does not allow (\x07, ...)
        before = text[: max(0, int(exc.position))]
        line = before.count("\n") + 1
        col = len(before) - (before.rfind("\n") + 1) + 1
        raise SpecError(
            f"invalid YAML: character {exc.character!r} is not allowed in YAML "
            "(a control character?)",
            file=file,
            line=line,
            col=col,
        ) from None
    except yaml.YAMLError as exc:
        raise SpecError(f"invalid YAML: {exc}", file=file, line=1, col=1) from None
    finally:
        if loader is not None:
            loader.dispose()


def _yaml_error(exc: yaml.MarkedYAMLError, text: str, file: str) -> SpecError:
    """A parser's error as a positioned SpecError, with a hint for the usual mistakes."""
    mark = exc.problem_mark or exc.context_mark
    line, col = (mark.line + 1, mark.column + 1) if mark else (1, 1)
    problem = exc.problem or "invalid YAML"
    context = f" ({exc.context})" if exc.context else ""
    hint = ""
    if "mapping values are not allowed" in problem or "expected <block end>" in problem:
        hint = "; check the indentation of this line and the one above"
    if "'\\t'" in problem:
        problem, context = "a tab character where YAML expects spaces", ""
        hint = "; indent with spaces, not tabs"
    lines = text.split("\n")
    src = lines[line - 1].strip() if 0 < line <= len(lines) else ""
    near = f" (line: {src[:60]!r})" if src else ""
    return SpecError(f"invalid YAML: {problem}{context}{hint}{near}", file=file, line=line, col=col)
