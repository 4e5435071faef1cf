"""Masking secret values in text (logs, reports, JSON output, SQL rows).

A ``Masker`` holds secret values and replaces every occurrence of each, in any of these forms,
with ``***``:

* the value itself; stripped of surrounding blanks; each line of a multi-line value (so a
  private key printed line by line, or through a pty that turns ``\\n`` into ``\\r\\n``, is
  hidden) and the whole value with ``\\r\\n`` line ends;
* base64, standard and URL-safe alphabets, with and without ``=`` padding, plus the part of
  the encoding that the value alone decides when it sits at any byte offset inside a longer
  encoded string (``Authorization: Basic base64(user:password)``, ``echo $S | base64``);
  those inner parts are used when at least 6 characters long;
* URL-encoded: ``quote`` (with and without ``/`` kept) and ``quote_plus``, with upper- and
  lower-case hex escapes;
* JSON-escaped (as inside a JSON string, ASCII-only and not), and JSON-escaped twice (a JSON
  document inside a JSON string).

Values shorter than 4 characters (after stripping blanks) are **not masked**: replacing every
``abc`` or ``123`` in a log would destroy it, and a value that short protects nothing anyway.
Forms are matched longest first with one compiled regex, built as a trie (common prefixes
factored out) so that masking a long log costs about one pass over it whatever the number of
values. Masking is per process: each worker masks what it resolved.

``register(values)`` adds to the process-wide masker that the log sink, the report printer and
JSON output share (``global_masker()``, ``mask(text)``, ``mask_obj(obj)``); ``resolve`` does
it for every value it returns. ``MaskingFilter`` masks ``logging`` records; ``StreamMasker``
masks output that arrives in chunks without letting a value split across two chunks through.
All of it is thread-safe: adding builds a new regex, masking uses whichever is current.
"""

from __future__ import annotations

import base64
import json
import logging
import re
import threading
from collections.abc import Iterable
from typing import Any, TypeVar
from urllib.parse import quote, quote_plus

MIN_LENGTH = 4
MASK = "***"
# Inner parts of a base64 encoding (value at offset 1 or 2 in a longer string) shorter than
# this are not masked: too likely to match unrelated base64.
CORE_MIN = 6
# StreamMasker emits a partial line once this many characters are pending.
STREAM_PENDING_MAX = 64 * 1024

T = TypeVar("T")

_HEX_ESCAPE_RE = re.compile(r"%[0-9A-F]{2}")
_LINE_SPLIT_RE = re.compile(r"\r\n|\r|\n")


def _b64_forms(data: bytes) -> set[str]:
    out: set[str] = set()
    for enc in (base64.b64encode, base64.urlsafe_b64encode):
        full = enc(data).decode("ascii")
        out.add(full)
        out.add(full.rstrip("="))
        for k in (0, 1, 2):
            # Output character i covers input bits [6i, 6i+6); keep those inside the value.
            shifted = enc(b"\0" * k + data).decode("ascii").rstrip("=")
            start, end = -(-8 * k // 6), (8 * (k + len(data))) // 6
            core = shifted[start:end]
            if len(core) >= CORE_MIN:
                out.add(core)
    return out


def _url_forms(value: str) -> set[str]:
    out = {quote(value, safe=""), quote(value), quote_plus(value), quote_plus(value, safe="/")}
    out |= {_HEX_ESCAPE_RE.sub(lambda m: m.group(0).lower(), q) for q in out}
    return out


def _json_forms(value: str) -> set[str]:
    once = {json.dumps(value)[1:-1], json.dumps(value, ensure_ascii=False)[1:-1]}
    return once | {json.dumps(v)[1:-1] for v in once}


def forms(value: str, min_length: int = MIN_LENGTH) -> set[str]:
    """Every string that ``value`` is masked as (empty when the value is too short)."""
    if len(value.strip()) < min_length:
        return set()
    out = {value, value.strip()}
    if "\n" in value or "\r" in value:
        out.add(_LINE_SPLIT_RE.sub("\r\n", value))
        out.update(line.strip() for line in _LINE_SPLIT_RE.split(value))
    out |= _b64_forms(value.encode("utf-8"))
    out |= _url_forms(value)
    out |= _json_forms(value)
    return {f for f in out if len(f.strip()) >= min_length}


def _trie_regex(words: Iterable[str]) -> str:
    """A regex matching any of ``words``, longest first, with common prefixes factored."""
    trie: dict[str, Any] = {}
    for word in words:
        node = trie
        for ch in word:
            node = node.setdefault(ch, {})
        node[""] = True  # end of a word ("" is never a character)
    return _emit(trie)


def _emit(node: dict[str, Any]) -> str:
    alts = []
    for ch in sorted(k for k in node if k):
        chars, sub = [ch], node[ch]
        while len(sub) == 1 and "" not in sub:  # a chain: one literal, no group
            ((c2, sub),) = sub.items()
            chars.append(c2)
        alts.append(re.escape("".join(chars)) + _emit(sub))
    if not alts:
        return ""
    body = alts[0] if len(alts) == 1 else "(?:" + "|".join(alts) + ")"
    if "" in node:  # a word may end here: the rest is optional (greedy: longest first)
        return "(?:" + body + ")?"
    return body


def compile_forms(words: Iterable[str]) -> re.Pattern[str] | None:
    """One regex for ``words`` (trie-shaped; a plain longest-first alternation as fallback)."""
    ordered = sorted(set(words), key=lambda w: (-len(w), w))
    if not ordered:
        return None
    try:
        return re.compile(_trie_regex(ordered))
    except (RecursionError, re.error, OverflowError):  # pathological nesting
        return re.compile("|".join(re.escape(w) for w in ordered))


class Masker:
    """Secret values, and ``mask``/``mask_obj`` replacing them (see the module docstring)."""

    def __init__(
        self,
        values: str | Iterable[str] = (),
        *,
        min_length: int = MIN_LENGTH,
        placeholder: str = MASK,
    ) -> None:
        self.min_length = min_length
        self.placeholder = placeholder
        self._repl = placeholder.replace("\\", "\\\\")
        self._lock = threading.Lock()
        self._values: set[str] = set()
        self._forms: set[str] = set()
        self._pattern: re.Pattern[str] | None = None
        self.add(values)

    def __repr__(self) -> str:  # never the values
        return f"<Masker {len(self._values)} value(s)>"

    @property
    def count(self) -> int:
        """How many values are masked (values too short to mask are not counted)."""
        return len(self._values)

    def add(self, values: str | Iterable[str]) -> int:
        """Mask these values too (one string or several); how many were new."""
        if isinstance(values, str):
            values = [values]
        with self._lock:
            new = 0
            for value in values:
                if not isinstance(value, str) or value in self._values:
                    continue
                fs = forms(value, self.min_length)
                if fs:
                    self._values.add(value)
                    self._forms |= fs
                    new += 1
            if new:
                self._pattern = compile_forms(self._forms)
            return new

    def clear(self) -> None:
        with self._lock:
            self._values.clear()
            self._forms.clear()
            self._pattern = None

    def mask(self, text: str) -> str:
        """``text`` with every form of every value replaced by the placeholder."""
        pattern = self._pattern
        if pattern is None or not text:
            return text
        return pattern.sub(self._repl, text)

    def mask_obj(self, obj: T) -> T:
        """A copy of ``obj`` with every string in it masked: in dicts (keys too; any mapping
        comes back a plain dict), lists, tuples (named ones keep their type) and sets. Other
        objects are returned as they are; so is ``obj`` when no value is registered."""
        pattern = self._pattern
        if pattern is None:
            return obj
        return self._walk(obj)  # type: ignore[no-any-return]

    def _walk(self, obj: Any) -> Any:
        if isinstance(obj, str):
            return self.mask(obj)
        if isinstance(obj, dict):
            return {self._walk(k): self._walk(v) for k, v in obj.items()}
        if isinstance(obj, list):
            return [self._walk(v) for v in obj]
        if isinstance(obj, tuple):
            items = [self._walk(v) for v in obj]
            return type(obj)(*items) if hasattr(obj, "_fields") else tuple(items)
        if isinstance(obj, (set, frozenset)):
            return type(obj)(self._walk(v) for v in obj)
        return obj


class MaskingFilter(logging.Filter):
    """A logging filter masking the message, its arguments and any traceback.

    Attach it to handlers (``handler.addFilter(MaskingFilter())``): the record's message is
    formatted, masked and stored back (``args`` emptied), and ``exc_text`` is pre-rendered
    masked, so formatters print only masked text.
    """

    def __init__(self, masker: Masker | None = None) -> None:
        super().__init__()
        self._masker = masker

    def filter(self, record: logging.LogRecord) -> bool:
        masker = self._masker if self._masker is not None else _GLOBAL
        record.msg = masker.mask(record.getMessage())
        record.args = ()
        if record.exc_info and not record.exc_text:
            record.exc_text = logging.Formatter().formatException(record.exc_info)
        if record.exc_text:
            record.exc_text = masker.mask(record.exc_text)
        if record.stack_info:
            record.stack_info = masker.mask(record.stack_info)
        return True


class StreamMasker:
    """Masks output arriving in chunks (an SSH channel): complete lines are masked and given
    back; a partial line waits for the next chunk (or ``flush``), so a value split across two
    chunks is still found. A line longer than ``STREAM_PENDING_MAX`` is given back masked as it
    is. Multi-line values are masked line by line (each line is a form of the value)."""

    def __init__(
        self, masker: Masker | None = None, *, pending_max: int = STREAM_PENDING_MAX
    ) -> None:
        self._masker = masker
        self._pending = ""
        self._pending_max = pending_max

    def _m(self) -> Masker:
        return self._masker if self._masker is not None else _GLOBAL

    def feed(self, chunk: str) -> str:
        """Masked text that is safe to emit now (possibly empty)."""
        buf = self._pending + chunk
        cut = max(buf.rfind("\n"), buf.rfind("\r")) + 1
        if cut == 0 and len(buf) < self._pending_max:
            self._pending = buf
            return ""
        if cut == 0:
            cut = len(buf)
        self._pending = buf[cut:]
        return self._m().mask(buf[:cut])

    def flush(self) -> str:
        """The rest, masked."""
        rest, self._pending = self._pending, ""
        return self._m().mask(rest)


_GLOBAL = Masker()


def global_masker() -> Masker:
    """The process-wide masker (what ``register`` adds to)."""
    return _GLOBAL


def register(values: str | Iterable[str]) -> int:
    """Mask these values in this process from now on; how many were new."""
    return _GLOBAL.add(values)


def mask(text: str) -> str:
    """``text`` masked with the process-wide masker."""
    return _GLOBAL.mask(text)


def mask_obj(obj: T) -> T:
    """``obj`` masked with the process-wide masker (see ``Masker.mask_obj``)."""
    return _GLOBAL.mask_obj(obj)
