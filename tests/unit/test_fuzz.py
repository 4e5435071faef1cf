"""Fuzzing the pipeline-file loader and the expression engine with hypothesis.

Whatever the input, the outcome must be a valid result or one of vmfarm's clean errors
(``SpecError``/``SpecErrors`` from ``app.definitions.load``, ``ExpressionError`` from the expression
engine): never another exception, which would reach a user as a Python traceback.

* ``app.definitions.load`` on generated YAML: random documents, and mutations of the valid files in
  ``tests/data/good`` (keys dropped, types changed, unknown keys, odd unicode, huge numbers,
  anchors/aliases, duplicate keys, tabs, truncation, runtime inputs with options), the good
  pipeline with valid-shaped additions whose values are expressions (these pass the schema and
  reach rendering), with and without ``--set`` values;
* ``render``, ``expressions_in``, ``parse_input`` and ``app.secrets.find_refs`` on arbitrary text
  made of ``<+...>`` fragments;
* ``vmfarm validate FILE`` in a subprocess on generated bad files is in
  tests/e2e/test_fuzz.py (it uses the generators here).

Bugs found this way are pinned by strict xfail tests at the end of the module (see
``KNOWN_BUGS``). Runs are deterministic (``derandomize=True``, no example database), so CI sees
the same examples every time. ``VMFARM_FUZZ_EXAMPLES=N`` raises the example count and draws
new random examples, for a longer local hunt.
"""

from __future__ import annotations

import copy
import os
import re
import tempfile
import traceback
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
import yaml
import yaml.reader
from hypothesis import HealthCheck, given, reject, settings
from hypothesis import strategies as st
from pydantic import ValidationError

from app.definitions import load
from app.definitions.expressions import (
    Binder,
    Context,
    ExpressionError,
    expressions_in,
    parse_input,
    render,
)
from app.errors import SpecError, SpecErrors
from app.secrets import find_refs

REPO = Path(__file__).resolve().parents[2]
GOOD = REPO / "tests" / "data" / "good"
GOOD_FILES = {p.name: p.read_text() for p in sorted(GOOD.glob("*.yaml"))}

_HUNT = int(os.environ.get("VMFARM_FUZZ_EXAMPLES", "0"))


def _profile(examples: int) -> Callable[[Any], Any]:
    """Deterministic settings for CI; a random, longer run when VMFARM_FUZZ_EXAMPLES is set."""
    return settings(
        max_examples=_HUNT or examples,
        deadline=None,
        derandomize=not _HUNT,
        database=None,
        suppress_health_check=[
            HealthCheck.too_slow,
            HealthCheck.data_too_large,
            HealthCheck.filter_too_much,
        ],
    )


# --- known bugs -----------------------------------------------------------------------------------

# A bug found here is pinned by a strict xfail test below (it fails until the bug is fixed; then
# XPASS fails the suite: remove the xfail mark and the entry here). Until then the property tests
# set aside the examples that hit it, so that they keep looking for other bugs.
# (exception type name, "file:function" of the innermost vmfarm frame it escaped from)
KNOWN_BUGS: set[tuple[str, str]] = set()  # the three found so far are fixed (tests below)


def _known_bug(exc: BaseException) -> bool:
    frames = [
        f
        for f in traceback.extract_tb(exc.__traceback__)
        if f.filename.startswith(str(REPO / "app"))
    ]
    if not frames:
        return False
    where = f"{Path(frames[-1].filename).relative_to(REPO)}:{frames[-1].name}"
    return (type(exc).__name__, where) in KNOWN_BUGS


@contextmanager
def unless_known_bug() -> Iterator[None]:
    """Set an example aside (hypothesis ``reject``) when it hits a bug pinned below."""
    try:
        yield
    except (SpecError, SpecErrors, ExpressionError, AssertionError):
        raise
    except Exception as exc:
        if _known_bug(exc):
            reject()
        raise


# --- building blocks ------------------------------------------------------------------------------

# Strings that mean something to YAML, to the expression engine, to the shell or to a terminal.
WEIRD_STRINGS = [
    "",
    " ",
    "\t",
    "yes",
    "no",
    "on",
    "null",
    "~",
    "0x1F",
    "0o17",
    "1e400",
    "-0",
    ".inf",
    ".nan",
    "2001-12-14",
    "12:30:45",
    "<<",
    "&a",
    "*a",
    "!!binary",
    "%YAML",
    "---",
    "...",
    "- x",
    "a: b",
    "{",
    "[",
    "#",
    "|",
    ">",
    "@",
    "`",
    '"',
    "'",
    "\\",
    "\x00",
    "\x07",
    "\x1b[31m",
    "\x85",
    "\u2028",
    "\u202e",
    "\ufeff",
    "\ud7ff",
    "\U0001f600",
    "e\u0301",
    "İ",
    "ß",
    "\u0660",
    "a" * 300,
    "$(reboot)",
    "${HOME}",
    "'; rm -rf / #",
    "<+input>",
    "<+input>.default(1.0)",
    "<+input>.allowedValues(a, b)",
    "<+input>.regex(\\d+)",
    "<+input>.regex([)",
    "<+input>.default(x).allowedValues(x,y)",
    "<+input>.default(",
    "<+input>.executionInput()",
    "<+input>.default())",
    "<+ input >",
    "<+pipeline.variables.release_note>",
    "<+env.variables.install_dir>",
    "<+artifact.tag>",
    "<+service.name>",
    "<+instance.hostName>",
    "<+steps.install.output.outputVariables.x>",
    "<+unknown.thing>",
    "<+>",
    "<+<+service.name>>",
    "<+service.name",
    "service.name>",
    '<+secrets.getValue("db")>',
    "<+secrets.getValue('a:b#c')>",
    "<+secrets.getValue(x)>",
    '<+secrets.getValue("")>',
    "<+secrets.nope>",
]

FIELD_NAMES = [
    "apiVersion",
    "kind",
    "metadata",
    "name",
    "identifier",
    "spec",
    "type",
    "stages",
    "stage",
    "steps",
    "step",
    "stepGroup",
    "execution",
    "rollbackSteps",
    "commandUnits",
    "source",
    "script",
    "timeout",
    "failureStrategies",
    "onFailure",
    "errors",
    "action",
    "retryCount",
    "retryIntervals",
    "variables",
    "value",
    "environmentVariables",
    "outputVariables",
    "serviceRef",
    "environmentRef",
    "infrastructureDefinitions",
    "hosts",
    "hostname",
    "region",
    "connection",
    "port",
    "artifacts",
    "primary",
    "path",
    "tag",
    "strategy",
    "phases",
    "template",
    "templateRef",
    "templateInputs",
    "destinationPath",
    "sourceType",
    "<<",
]
KINDS = ["Service", "Environment", "Infrastructure", "Pipeline", "Template", "service", "Kind"]


def scalars() -> st.SearchStrategy[Any]:
    return st.one_of(
        st.none(),
        st.booleans(),
        st.integers(min_value=-(10**40), max_value=10**40),
        st.floats(allow_nan=True, allow_infinity=True),
        st.text(max_size=12),
        st.sampled_from(WEIRD_STRINGS),
    )


def keys() -> st.SearchStrategy[str]:
    return st.one_of(st.sampled_from(FIELD_NAMES), st.text(max_size=8))


def trees(max_leaves: int = 20) -> st.SearchStrategy[Any]:
    return st.recursive(
        scalars(),
        lambda children: st.one_of(
            st.lists(children, max_size=4),
            st.dictionaries(keys(), children, max_size=5),
        ),
        max_leaves=max_leaves,
    )


def documents() -> st.SearchStrategy[Any]:
    """Anything, or something shaped like a vmfarm document (so the schema code is reached)."""
    shaped = st.fixed_dictionaries(
        {"apiVersion": st.sampled_from(["v1", "v2", 1]), "kind": st.sampled_from(KINDS)},
        optional={
            "metadata": st.one_of(
                st.fixed_dictionaries({"name": scalars()}, optional={"identifier": scalars()}),
                trees(4),
            ),
            "spec": trees(25),
        },
    )
    return st.one_of(trees(), shaped)


def _dump(data: Any, *, unicode: bool = True) -> str:
    return yaml.safe_dump(data, sort_keys=False, allow_unicode=unicode, default_flow_style=False)


def _paths(data: Any, prefix: tuple[Any, ...] = ()) -> Iterator[tuple[Any, ...]]:
    """Every path to a value of ``data`` (the root included)."""
    yield prefix
    if isinstance(data, dict):
        for k, v in data.items():
            yield from _paths(v, (*prefix, k))
    elif isinstance(data, list):
        for i, v in enumerate(data):
            yield from _paths(v, (*prefix, i))


def _get(data: Any, path: tuple[Any, ...]) -> Any:
    for p in path:
        data = data[p]
    return data


# Values for grafted snippets: expressions (some resolve to "" or to text) and plain values.
GRAFT_VALUES = [
    "<+pipeline.variables.empty>",
    "<+pipeline.variables.empty>",
    "<+pipeline.variables.empty>",
    "<+pipeline.variables.release_note>",
    "<+input>",
    "<+input>.default()",
    "<+input>.default(8080)",
    "<+input>.allowedValues(a,b)",
    "<+input>.regex(\\d+)",
    "<+instance.hostName>",
    "<+service.name>",
    "<+env.variables.x>",
    "<+artifact.tag>",
    "<+serviceVariables.app_port>",
    "",
    "8080",
    "http://h:1/",
    0,
    None,
]


GRAFTABLE = {
    "steps",
    "stages",
    "variables",
    "environmentVariables",
    "outputVariables",
    "commandUnits",
}


def _grafts(draw: st.DrawFn, key: str) -> Any:
    """A valid-shaped entry for a list named ``key`` (steps, variables, stages, units), whose
    values are drawn from GRAFT_VALUES: reaches the checks that run after the schema."""

    def v() -> Any:
        return draw(st.sampled_from(GRAFT_VALUES))

    ident = draw(st.sampled_from(["g1", "g2", "install", "deploy", "bad-id"]))
    command = {
        "identifier": "u",
        "type": "Script",
        "spec": {"source": {"type": "Inline", "spec": {"script": v()}}},
    }
    if key == "variables":
        return {
            "name": draw(st.sampled_from(["empty", "x", "release_note", "install_dir"])),
            "type": draw(st.sampled_from(["String", "Number", "Secret"])),
            "value": v(),
        }
    if key in ("environmentVariables", "outputVariables"):
        return {"name": draw(st.sampled_from(["A", "B", "PORT"])), "type": "String", "value": v()}
    if key == "commandUnits":
        return draw(
            st.sampled_from(
                [
                    command,
                    {
                        "identifier": "c",
                        "type": "Copy",
                        "spec": {"sourceType": "Artifact", "destinationPath": v()},
                    },
                    {
                        "identifier": "d",
                        "type": "DownloadArtifact",
                        "spec": {"destinationPath": v()},
                    },
                    {"identifier": "r", "type": "Release", "spec": {"deploymentPath": v()}},
                ]
            )
        )
    if key == "stages":
        return draw(
            st.sampled_from(
                [
                    {
                        "stage": {
                            "name": "Approve",
                            "identifier": ident,
                            "type": "Approval",
                            "spec": {
                                "execution": {
                                    "steps": [
                                        {
                                            "step": {
                                                "type": "HarnessApproval",
                                                "name": "a",
                                                "identifier": "a",
                                                "timeout": "1d",
                                                "spec": {
                                                    "approvalMessage": v(),
                                                    "approvers": {"userGroups": [v()]},
                                                },
                                            }
                                        }
                                    ]
                                }
                            },
                        }
                    },
                    copy.deepcopy(yaml.safe_load(GOOD_FILES["pipeline.yaml"])["spec"]["stages"][0]),
                ]
            )
        )
    # steps: a health check, a step group or a command step
    check = draw(st.sampled_from(["HTTP", "TCP", "Command"]))
    health = {"type": check, {"HTTP": "url", "TCP": "port", "Command": "command"}[check]: v()}
    if draw(st.booleans()):
        health[draw(st.sampled_from(["url", "port", "command", "host"]))] = v()
    return draw(
        st.sampled_from(
            [
                {"step": {"type": "HealthCheck", "name": "h", "identifier": ident, "spec": health}},
                {
                    "stepGroup": {
                        "name": "grp",
                        "identifier": ident,
                        "steps": [
                            {
                                "step": {
                                    "type": "Command",
                                    "name": "s",
                                    "identifier": "s" + ident,
                                    "spec": {"commandUnits": [command]},
                                }
                            }
                        ],
                    }
                },
                {
                    "step": {
                        "type": "Command",
                        "name": "c",
                        "identifier": ident,
                        "timeout": "1m",
                        "failureStrategies": [
                            {
                                "onFailure": {
                                    "errors": ["AllErrors"],
                                    "action": {
                                        "type": "Retry",
                                        "spec": {
                                            "retryCount": 1,
                                            "retryIntervals": ["1s"],
                                            "onRetryFailure": {"action": {"type": v()}},
                                        },
                                    },
                                }
                            }
                        ],
                        "spec": {"commandUnits": [command]},
                    }
                },
            ]
        )
    )


def _mutate_tree(draw: st.DrawFn, data: Any, *, graft_only: bool = False) -> Any:
    """Apply 1-4 structural mutations at random places of a parsed good file (with
    ``graft_only``, only valid-shaped additions: the file stays close to valid)."""
    data = copy.deepcopy(data)
    variables = data.get("spec", {}).get("variables") if isinstance(data, dict) else None
    if isinstance(variables, list) and draw(st.booleans()):
        # a variable that renders to nothing, for the grafts' expressions to name
        variables.append({"name": "empty", "type": "String", "value": ""})
    for _ in range(draw(st.integers(1, 4))):
        paths = [p for p in _paths(data) if p]
        if not paths:
            break
        path = draw(st.sampled_from(paths))
        parent, last = _get(data, path[:-1]), path[-1]
        op = (
            "graft"
            if graft_only
            else draw(
                st.sampled_from(
                    [
                        "drop",
                        "replace",
                        "unknown_key",
                        "weird",
                        "huge",
                        "listify",
                        "duplicate_item",
                        "expression",
                        "empty",
                        "graft",
                    ]
                )
            )
        )
        if op == "graft":
            lists = [p for p in paths if p[-1] in GRAFTABLE and isinstance(_get(data, p), list)]
            if lists:  # pick a kind of list first: steps as likely as variables
                kind = draw(st.sampled_from(sorted({str(p[-1]) for p in lists})))
                where = draw(st.sampled_from([p for p in lists if p[-1] == kind]))
                _get(data, where).append(_grafts(draw, kind))
        elif op == "drop":
            del parent[last]
        elif op == "replace":
            parent[last] = draw(trees(6))
        elif op == "unknown_key":
            target = _get(data, path)
            if isinstance(target, dict):
                target[draw(keys())] = draw(scalars())
            else:
                parent[last] = {draw(keys()): target}
        elif op == "weird":
            parent[last] = draw(st.one_of(st.sampled_from(WEIRD_STRINGS), st.text(max_size=30)))
        elif op == "huge":
            parent[last] = draw(
                st.sampled_from(
                    [
                        10**30,
                        -(10**30),
                        2**63,
                        -(2**63) - 1,
                        1e308,
                        float("inf"),
                        float("nan"),
                        "9" * 50,
                        0,
                        -1,
                    ]
                )
            )
        elif op == "listify":
            parent[last] = [_get(data, path)]
        elif op == "duplicate_item" and isinstance(parent, list):
            parent.append(copy.deepcopy(parent[last]))
        elif op == "expression":
            old = _get(data, path)
            frag = draw(st.sampled_from([w for w in WEIRD_STRINGS if "<+" in w]))
            parent[last] = f"{old} {frag}" if isinstance(old, str) else frag
        elif op == "empty":
            parent[last] = draw(st.sampled_from([None, {}, [], ""]))
    return data


def _mutate_text(draw: st.DrawFn, text: str, *, at_least: int = 0, most: int = 3) -> str:
    """Apply some textual mutations: the YAML-level accidents people make."""
    for _ in range(draw(st.integers(at_least, most))):
        lines = text.split("\n")
        i = draw(st.integers(0, max(0, len(lines) - 1)))
        op = draw(
            st.sampled_from(
                [
                    "dup_line",
                    "tab",
                    "truncate",
                    "insert_char",
                    "anchor",
                    "alias_undefined",
                    "merge",
                    "second_doc",
                    "bom",
                    "crlf",
                    "dedent",
                    "indent",
                    "flow",
                ]
            )
        )
        if op == "dup_line":  # in a mapping: a duplicate key
            lines.insert(i, lines[i])
        elif op == "tab":
            lines[i] = re.sub(r"^( +)", lambda m: "\t" * max(1, len(m.group(1)) // 2), lines[i])
            if not lines[i].startswith("\t"):
                lines[i] = "\t" + lines[i]
        elif op == "truncate":
            cut = draw(st.integers(0, len(text)))
            text = text[:cut]
            continue
        elif op == "insert_char":
            at = draw(st.integers(0, len(text)))
            ch = draw(
                st.one_of(
                    st.characters(),
                    st.sampled_from(["\t", "\r", ":", "-", "&", "*", "!", "%", "\x00", "\ufeff"]),
                )
            )
            text = text[:at] + ch + text[at:]
            continue
        elif op == "anchor":
            lines[i] = re.sub(r":( +)(\S)", r": &anc\1\2", lines[i], count=1)
            lines.append("extra: *anc")
        elif op == "alias_undefined":
            lines[i] = re.sub(r":( +)\S.*$", ": *nowhere", lines[i], count=1)
        elif op == "merge":
            lines.append("merged:\n  <<: *anc\n  x: 1")
            lines.insert(0, "base: &anc {name: a, kind: Service}")
        elif op == "second_doc":
            lines.append("---")
            lines.append(_dump(draw(documents())))
        elif op == "bom":
            text = "\ufeff" + text
            continue
        elif op == "crlf":
            text = text.replace("\n", "\r\n")
            continue
        elif op == "dedent":
            lines[i] = lines[i].lstrip(" ")
        elif op == "indent":
            lines[i] = "   " + lines[i]
        elif op == "flow":
            lines[i] = lines[i] + " {"
        text = "\n".join(lines)
    return text


@st.composite
def mutated_good_file(draw: st.DrawFn) -> tuple[str, str]:
    """(file name, text): one of the good files, broken in some way (or not at all)."""
    name = draw(st.sampled_from(["pipeline.yaml", *sorted(GOOD_FILES)]))  # the richest, twice
    text = GOOD_FILES[name]
    mode = draw(st.sampled_from(["text", "tree", "graft"]))
    if mode == "text":  # the file as written (comments, block scalars), with accidents
        return name, _mutate_text(draw, text, at_least=1)
    tree = _mutate_tree(draw, yaml.safe_load(text), graft_only=mode == "graft")
    text = _dump(tree, unicode=draw(st.booleans()))
    return name, text if mode == "graft" else _mutate_text(draw, text, most=1)


@st.composite
def near_valid_pipeline(draw: st.DrawFn) -> tuple[str, str]:
    """The good pipeline with 1-2 valid-shaped additions (steps, step groups, stages, units,
    variables) whose values are expressions: these pass the schema and reach rendering."""
    data = yaml.safe_load(GOOD_FILES["pipeline.yaml"])
    data["spec"]["variables"].append({"name": "empty", "type": "String", "value": ""})
    stage = data["spec"]["stages"][0]["stage"]["spec"]
    step = stage["execution"]["steps"][0]["step"]["spec"]
    places = {
        "steps": stage["execution"]["steps"],
        "stages": data["spec"]["stages"],
        "variables": data["spec"]["variables"],
        "commandUnits": step["commandUnits"],
        "environmentVariables": step["environmentVariables"],
    }
    for _ in range(draw(st.integers(1, 2))):
        kind = draw(st.sampled_from(sorted(places)))
        places[kind].append(_grafts(draw, kind))
    return "pipeline.yaml", _dump(data)


@st.composite
def random_file(draw: st.DrawFn) -> tuple[str, str]:
    """(file name, text): one or more generated documents, as a new file next to good ones."""
    docs = draw(st.lists(documents(), min_size=1, max_size=3))
    text = "---\n".join(_dump(d, unicode=draw(st.booleans())) for d in docs)
    return "extra.yaml", _mutate_text(draw, text)


def set_values() -> st.SearchStrategy[dict[str, str]]:
    """``--set`` values: none, the good files' one input, or odd names and values."""
    value = st.one_of(st.text(max_size=10), st.sampled_from(WEIRD_STRINGS))
    return st.one_of(
        st.just({}),
        st.fixed_dictionaries({"tag": value}),
        st.dictionaries(
            st.one_of(
                st.sampled_from(["tag", "primary.spec.tag", "x", "", "."]), st.text(max_size=6)
            ),
            value,
            max_size=2,
        ),
    )


@contextmanager
def bundle_dir(name: str, text: str) -> Iterator[Path]:
    """The good files (with ``name`` replaced or added) and their local artifact, in a folder."""
    with tempfile.TemporaryDirectory(prefix="vmfarm-fuzz-") as tmp:
        root = Path(tmp)
        for fname, content in GOOD_FILES.items():
            (root / fname).write_text(content)
        (root / "app").mkdir()
        (root / "app" / "hello.sh").write_text("#!/bin/sh\necho hello\n")
        (root / name).write_bytes(text.encode("utf-8", "surrogatepass"))
        yield root


def assert_clean_load(root: Path, inputs: Mapping[str, str], require: bool) -> None:
    """``load`` returns a bundle or raises a SpecError/SpecErrors that says where and what."""
    try:
        with unless_known_bug():
            load([root], inputs=inputs, require_inputs=require)
    except (SpecError, SpecErrors) as exc:
        errors = exc.errors if isinstance(exc, SpecErrors) else [exc]
        assert errors, "SpecErrors without any error"
        for e in errors:
            assert isinstance(e, SpecError)
            assert e.message.strip(), f"an error without a message: {e!r}"
            assert e.line >= 0 and e.col >= 0, repr(e)
            str(e)  # printable


# --- (a) the loader -------------------------------------------------------------------------------


@_profile(200)
@given(raw=st.binary(max_size=200))
def test_load_of_arbitrary_bytes_ends_in_a_clean_result(raw: bytes) -> None:
    with tempfile.TemporaryDirectory(prefix="vmfarm-fuzz-") as tmp:
        path = Path(tmp) / "x.yaml"
        path.write_bytes(raw)
        try:
            with unless_known_bug():
                load([path])
        except (SpecError, SpecErrors):
            pass


# --- (b) the expression engine --------------------------------------------------------------------

FRAGMENTS = [
    "<+",
    ">",
    "<",
    "+",
    "<+>",
    "<+input>",
    "<+input>.default(",
    ")",
    ".default(",
    ".regex(",
    ".allowedValues(",
    "a,b",
    ".executionInput()",
    "<+service.name>",
    "<+env.variables.x>",
    "<+pipeline.variables.v>",
    "<+instance.hostName>",
    "<+infra.region>",
    "<+steps.s.output.outputVariables.o>",
    "<+rollbackArtifact.tag>",
    "<+secrets.getValue(",
    "secrets.getValue",
    '"',
    "'",
    "id",
    "#key",
    "aws:",
    "account.",
    "<+secrets.",
    "\n",
    " ",
    "$(",
    "`",
    "${",
    "}",
    "\\",
    "\x00",
    "\U0001f600",
    "<+unknown>",
]


def expression_texts() -> st.SearchStrategy[str]:
    return st.lists(st.one_of(st.sampled_from(FRAGMENTS), st.text(max_size=6)), max_size=12).map(
        "".join
    )


def contexts() -> st.SearchStrategy[Context]:
    names = st.sampled_from(
        ["service.name", "env.variables.x", "pipeline.variables.v", "artifact.tag", "a", "x.y"]
    )
    values = st.one_of(expression_texts(), scalars())

    def build(vals: dict[str, tuple[Any, bool]], allow: bool) -> Context:
        ctx = Context(allow_inputs=allow)
        for k, (v, ext) in vals.items():
            ctx.set(k, v, external=ext)
        return ctx

    return st.builds(
        build, st.dictionaries(names, st.tuples(values, st.booleans()), max_size=4), st.booleans()
    )


@_profile(300)
@given(
    text=expression_texts(),
    ctx=contexts(),
    quote=st.booleans(),
    bind=st.booleans(),
    collect=st.booleans(),
)
def test_render_gives_text_or_an_expression_error(
    text: str, ctx: Context, quote: bool, bind: bool, collect: bool
) -> None:
    binder = Binder() if bind else None
    problems: list[str] = []
    try:
        out = render(
            text, ctx, quote=quote, bind=binder, on_error=problems.append if collect else None
        )
    except ExpressionError as exc:
        assert not collect, "with on_error, render reports instead of raising"
        assert str(exc)
        return
    assert isinstance(out, str)
    assert all(isinstance(p, str) and p for p in problems)
    if "<+" not in text:
        assert out == text  # nothing to render: the text is left as it is
    if binder is not None:
        # a bound value travels in the environment, never in the script text
        for name, value in binder.env.items():
            assert "${" + name + "}" in out
            assert isinstance(value, str)


@_profile(300)
@given(text=expression_texts())
def test_expression_scanners_accept_any_text(text: str) -> None:
    found = expressions_in(text)
    assert all(isinstance(e, str) for e in found)
    assert len(found) <= text.count("<+")
    opts = parse_input(text)
    assert set(opts) <= {"default", "allowed", "regex"}
    if "<+input>" not in text:
        assert opts == {}
    refs = find_refs(text)
    assert len(refs) == len(set(refs)) and all(isinstance(r, str) for r in refs)
    assert len(refs) <= text.count("secrets.getValue")


# --- through the command line ---------------------------------------------------------------------


# --- bugs found by the properties above (fixed; these keep them fixed) ---------------------------

GOOD_PIPELINE_WITH_EMPTY_URL = (
    GOOD_FILES["pipeline.yaml"].replace(
        "      value: first release\n",
        '      value: first release\n    - name: empty\n      type: String\n      value: ""\n',
    )
    + """\
              - step:
                  type: HealthCheck
                  name: Health
                  identifier: health
                  spec:
                    type: HTTP
                    url: <+pipeline.variables.empty>
"""
)
_LINES = GOOD_PIPELINE_WITH_EMPTY_URL.split("\n")
# The error may name the url or the check's spec: any line of the health-check step will do.
HEALTH_STEP_LINES = range(len(_LINES) - 8, len(_LINES))

# (id, file name, text, --set values, lines the error may name, exception that escapes today)
BUGS: list[tuple[str, str, str, dict[str, str], range, type[BaseException]]] = [
    (
        "control-character",
        "service.yaml",
        GOOD_FILES["service.yaml"].replace("name: hello-app", "name: hello-app\x07"),
        {},
        range(5, 6),
        yaml.reader.ReaderError,
    ),
    (
        "invalid-input-regex",
        "service.yaml",
        GOOD_FILES["service.yaml"].replace("tag: <+input>", "tag: <+input>.regex([)"),
        {"tag": "1.0"},
        range(16, 17),
        re.error,
    ),
    (
        "expression-renders-check-invalid",
        "pipeline.yaml",
        GOOD_PIPELINE_WITH_EMPTY_URL,
        {},
        HEALTH_STEP_LINES,
        ValidationError,
    ),
]

BUG_REASONS = {
    "control-character": "bug: app/definitions/yamlload.py load_documents() builds yaml.SafeLoader(text) outside "
    "its try block; a control character (e.g. \\x07) anywhere in a file raises "
    "yaml.reader.ReaderError instead of a SpecError (vmfarm validate: traceback, exit 1)",
    "invalid-input-regex": "bug: app/definitions/inputs.py apply_inputs() calls re.fullmatch(regex, value) on the "
    "<+input>.regex(...) option unchecked; an invalid pattern with a --set value raises "
    "re.error instead of a SpecError at the input (traceback, exit 1)",
    "expression-renders-check-invalid": "bug: app/definitions/resolve.py resolve_stage() re-validates the rendered stage with "
    "m.StageSpec.model_validate(rendered) outside any handler; an expression that renders "
    "a field invalid (HealthCheck url <+pipeline.variables.empty> with value '') raises "
    "pydantic ValidationError instead of a SpecError (validate/run: traceback, exit 1)",
}


def _bug_params(cli: bool) -> list[Any]:
    """The inputs that once escaped as tracebacks (BUG_REASONS says how); fixed, kept."""
    return [
        pytest.param(name, text, sets, line, id=bug_id)
        for bug_id, name, text, sets, line, _exc in BUGS
    ]


@pytest.mark.parametrize(("name", "text", "sets", "lines"), _bug_params(cli=False))
def test_found_bug_in_process_is_a_clean_spec_error(
    name: str, text: str, sets: dict[str, str], lines: range
) -> None:
    with bundle_dir(name, text) as root:
        with pytest.raises((SpecError, SpecErrors)) as caught:
            load([root], inputs=sets)
        exc = caught.value
        assert isinstance(exc, SpecError | SpecErrors)
        errors = exc.errors if isinstance(exc, SpecErrors) else [exc]
        assert any(e.file == str(root / name) and e.line in lines for e in errors), errors
