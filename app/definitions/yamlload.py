"""Read YAML into plain data while remembering where every value and key stood.

PyYAML's node graph carries marks; we keep them in two maps keyed by the value's path
(a tuple of mapping keys and list indexes) so that any later error, from pydantic or from our
own checks, can be reported as ``file:line:col``. Duplicate keys are an error (PyYAML would keep
the last one silently), and so are YAML's anchors-merge surprises such as non-string keys.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import yaml

from app.errors import SpecError

Path = tuple[str | int, ...]


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

    def error(self, message: str, path: Path, *, key: bool = False,
              within: str | None = None) -> SpecError:
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
                raise SpecError("recursive YAML alias: a value cannot contain itself",
                                file=self.doc.file, line=line, col=col, field=dotted(path))
            self.open.add(id(node))
            try:
                return self._collection(node, path)
            finally:
                self.open.discard(id(node))
        value = self.loader.construct_object(node)
        mark = node.start_mark
        if isinstance(value, str) and "<+" in value:
            if mark.buffer is not None:
                raw = str(mark.buffer[mark.pointer:node.end_mark.pointer])
            else:  # libyaml's marks carry no buffer; their index counts characters too
                raw = self.text[mark.index:node.end_mark.index]
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
                        f"mapping key {key!r} must be a string", file=self.doc.file,
                        line=line, col=col, field=dotted(path),
                    )
                if key in out:
                    line, col = _mark(knode)
                    raise SpecError(
                        f"duplicate key '{key}'", file=self.doc.file, line=line, col=col,
                        field=dotted((*path, key)),
                    )
                self.doc.keys[(*path, key)] = _mark(knode)
                out[key] = self.build(vnode, (*path, key))
            return out
        return [self.build(v, (*path, i)) for i, v in enumerate(node.value)]


def _documents(text: str, file: str, loader: Any) -> list[Document]:
    docs: list[Document] = []
    index = 0
    while loader.check_node():
        node = loader.get_node()
        if node is None:
            continue
        doc = Document(file=file, index=index, data=None, line=node.start_mark.line + 1)
        doc.data = _Builder(doc, loader, text).build(node, ())
        index += 1
        if doc.data is None:
            continue
        docs.append(doc)
    return docs


# libyaml's parser (when PyYAML has it) reads a 10,000-host inventory ~4x faster. The same
# constructor and resolver build the values; any error reads the file again with PyYAML's own
# parser, whose messages and positions are the ones reported.
_FAST: Any = getattr(yaml, "CSafeLoader", None)


def load_documents(text: str, file: str) -> list[Document]:
    """Every non-empty document of a multi-document YAML text, with positions."""
    if _FAST is not None:
        fast = None
        try:
            fast = _FAST(text)
            return _documents(text, file, fast)
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
        raise SpecError(
            f"invalid YAML: {problem}{context}{hint}{near}", file=file, line=line, col=col
        ) from None
    except yaml.reader.ReaderError as exc:  # a character YAML does not allow (\x07, ...)
        before = text[:max(0, int(exc.position))]
        line = before.count("\n") + 1
        col = len(before) - (before.rfind("\n") + 1) + 1
        raise SpecError(f"invalid YAML: character {exc.character!r} is not allowed in YAML "
                        "(a control character?)", file=file, line=line, col=col) from None
    except yaml.YAMLError as exc:
        raise SpecError(f"invalid YAML: {exc}", file=file, line=1, col=1) from None
    finally:
        if loader is not None:
            loader.dispose()
