"""Looping strategies in a resolved plan: a stage's iterations, looped steps and step groups
expanded once per iteration (``repeat``, ``matrix``, ``parallelism``), each copy rendered with
its iteration's values and marked with what it is (app.definitions.models.loops holds the file
schema). Used by app.definitions.resolve.
"""

from __future__ import annotations

import copy
import re
from typing import Any

from pydantic import ValidationError

from app.definitions import models as m
from app.definitions.bundle import Bundle, Collector, Loaded
from app.definitions.expressions import Context


def stage_iterations(
    bundle: Bundle, pipe: Loaded, index: int, *, execution_id: str, strict_inputs: bool = True
) -> list[m.Iteration | None]:
    """The iterations of the stage's looping strategy ([None]: it has none)."""
    from app.definitions.resolve import stage_context

    stage = pipe.model.spec.stages[index].stage
    loop = getattr(stage, "strategy", None)
    if not isinstance(loop, m.LoopStrategy):
        return [None]
    errs = Collector()
    ctx = stage_context(bundle, pipe, stage, execution_id=execution_id)
    ctx.allow_inputs = not strict_inputs
    base: tuple[str | int, ...] = ("spec", "stages", index, "stage", "strategy")
    its = _iterations(loop, ctx, pipe, base, errs)
    errs.raise_if_any()
    return list(its)


def _iterations(
    loop: m.LoopStrategy,
    ctx: Context,
    pipe: Loaded,
    base: tuple[str | int, ...],
    errs: Collector,
) -> list[m.Iteration]:
    """A loop's iterations, its items' expressions rendered in ``ctx`` (``base``: where the
    ``strategy`` stands in the file)."""
    from app.definitions.models.loops import item_paths
    from app.definitions.resolve import render_tree

    slots = item_paths(loop)
    rendered = [str(render_tree(text, ctx, pipe, (*base, *at), errs)) for at, text in slots]
    return m.iterations(loop, rendered if slots else None)


def _loop_context(ctx: Context, it: m.Iteration) -> Context:
    """``ctx`` with an iteration's values: an inner loop's hide an outer one's of the same
    name, the others stay readable (a stage's <+matrix.region> in its looped step)."""
    inner = copy.copy(ctx)
    inner.values = dict(ctx.values)
    for k, v in it.values.items():
        inner.set(k, v)
    return inner


def _has_loops(elements: Any) -> bool:
    if not isinstance(elements, list):
        return False
    for el in elements:
        body = next(
            (el[k] for k in ("step", "stepGroup") if isinstance(el, dict) and k in el), None
        )
        if isinstance(body, dict) and (
            body.get("strategy") is not None or _has_loops(body.get("steps"))
        ):
            return True
    return False


def expand_steps(
    elements: list[Any],
    ctx: Context,
    pipe: Loaded,
    path: tuple[str | int, ...],
    errs: Collector,
    *,
    suffix: str = "",
) -> list[Any]:
    """Step elements rendered, a looped step or step group once per iteration: its copies'
    identifiers end in ``_<index>`` and names in ``_<item>``, each rendered with the
    iteration's values and carrying ``loop`` (what the iteration is) for the plan. A step of
    a looped group takes the group's suffix too (step identifiers stay unique in a stage).
    A Command step's repeat over <+stage.output.hosts> is the phase's own fan-out (Harness's
    vocabulary, app.definitions.harness_vocab, takes out one without maxConcurrency): it is
    rendered as if it had no strategy, ``<+repeat.item>`` standing for the host's name, and
    its maxConcurrency caps the hosts in flight."""
    from app.definitions.resolve import render_tree

    out: list[Any] = []
    for i, el in enumerate(elements):
        at = (*path, i)
        kind = next((k for k in ("step", "stepGroup") if isinstance(el, dict) and k in el), None)
        body = el.get(kind) if kind is not None else None
        if kind is None or not isinstance(body, dict):
            out.append(render_tree(el, ctx, pipe, at, errs))
            continue
        loop_raw = body.get("strategy")
        loop: m.LoopStrategy | None = None
        if loop_raw is not None:
            try:
                loop = m.LoopStrategy.model_validate(loop_raw)
            except ValidationError:
                loop = None  # reported where the file was loaded
        if loop is None or loop.over_hosts:
            its: list[m.Iteration | None] = [None]
        else:
            its = list(_iterations(loop, ctx, pipe, (*at, kind, "strategy"), errs))
        for it in its:
            inner_ctx = ctx if it is None else _loop_context(ctx, it)
            own = dict(body)
            own.pop("strategy", None)
            inner = own.pop("steps", None) if kind == "stepGroup" else None
            if loop is not None and loop.over_hosts:
                own = _hosts_item(own)
            done = render_tree({kind: own}, inner_ctx, pipe, at, errs)
            tail = suffix + (f"_{it.suffix}" if it is not None else "")
            if isinstance(inner, list):
                done[kind]["steps"] = expand_steps(
                    inner, inner_ctx, pipe, (*at, kind, "steps"), errs, suffix=tail
                )
            if isinstance(done[kind].get("identifier"), str):
                done[kind]["identifier"] += tail
            if it is not None and isinstance(done[kind].get("name"), str):
                done[kind]["name"] += f"_{it.label}"
            if it is not None:
                done[kind]["strategy"] = {"_loop": it.describe()}
            elif loop is not None:
                done[kind]["strategy"] = {"_hosts": loop.cap}
            out.append(done)
    return out


def _hosts_item(data: Any) -> Any:
    """``<+repeat.item>`` of a step repeated over the stage's hosts is the host's name."""
    if isinstance(data, dict):
        return {k: _hosts_item(v) for k, v in data.items()}
    if isinstance(data, list):
        return [_hosts_item(v) for v in data]
    if isinstance(data, str):
        return re.sub(r"<\+\s*repeat\.item\s*>", "<+instance.hostName>", data)
    return data


def _take_loops(elements: list[Any]) -> tuple[list[Any], dict[str, Any]]:
    """Steps rendered by ``expand_steps`` with the loop markers taken out (the file schema
    has no place for them): (clean elements, {identifier: marker})."""
    marks: dict[str, Any] = {}
    for el in elements:
        for kind in ("step", "stepGroup"):
            body = el.get(kind) if isinstance(el, dict) else None
            if not isinstance(body, dict):
                continue
            mark = body.pop("strategy", None)
            if isinstance(mark, dict) and ("_loop" in mark or "_hosts" in mark):
                marks[f"{kind}:{body.get('identifier')}"] = mark
            if kind == "stepGroup" and isinstance(body.get("steps"), list):
                _, inner = _take_loops(body["steps"])
                marks.update(inner)
    return elements, marks


def _render_stage(
    raw: Any,
    ctx: Context,
    pipe: Loaded,
    base: tuple[str | int, ...],
    errs: Collector,
) -> tuple[Any, dict[str, Any]]:
    """The stage's data rendered, its looped steps expanded: (data, loop markers by step)."""
    from app.definitions.resolve import render_tree

    data = copy.deepcopy(raw)
    if isinstance(data, dict):
        data.pop("strategy", None)  # the stage's own loop: resolve_stages expands it
    execution = get_execution(data)
    held = {
        key: execution.pop(key)
        for key in ("steps", "rollbackSteps")
        if execution is not None and _has_loops(execution.get(key))
    }
    rendered = render_tree(data, ctx, pipe, base, errs)
    marks: dict[str, Any] = {}
    for key, elements in held.items():
        done = expand_steps(elements, ctx, pipe, (*base, "spec", "execution", key), errs)
        rendered["spec"]["execution"][key], found = _take_loops(done)
        marks.update(found)
    return rendered, marks


def get_execution(data: Any) -> dict[str, Any] | None:
    spec = data.get("spec") if isinstance(data, dict) else None
    execution = spec.get("execution") if isinstance(spec, dict) else None
    return execution if isinstance(execution, dict) else None


def _mark_loops(stage: dict[str, Any], marks: dict[str, Any]) -> None:
    """Each step of a loop says which iteration it is (``loop``); a Command step repeated over
    <+stage.output.hosts> with a maxConcurrency caps the hosts in flight of every phase (the
    rollback's too)."""
    caps = []
    for key in ("steps", "rollbackSteps"):
        for d in stage.get(key) or []:
            mark = marks.get(f"step:{d.get('identifier')}") or marks.get(
                f"stepGroup:{d.get('group')}"
            )
            if not mark:
                continue
            if "_loop" in mark:
                d["loop"] = mark["_loop"]
                continue
            cap = mark.get("_hosts")
            d["loop"] = "repeat over <+stage.output.hosts>: runs on each host of the phase" + (
                f", at most {cap} at a time" if cap else ""
            )
            if cap:
                caps.append(int(cap))
    if caps:
        strategy = stage["strategy"]
        given = strategy.get("maxConcurrency")
        strategy["maxConcurrency"] = min([*caps, *([int(given)] if given else [])])


def _looped(
    stage: dict[str, Any], loop: m.Iteration | None, plan_index: int | None
) -> dict[str, Any]:
    """The stage as one iteration of its loop: its place in the plan, ``<identifier>_<index>``,
    ``<name>_<item>``, and what the iteration is."""
    if plan_index is not None:
        stage["index"] = plan_index
    if loop is not None:
        stage["identifier"] = f"{stage['identifier']}_{loop.suffix}"
        stage["name"] = f"{stage['name']}_{loop.label}"
        stage["loop"] = loop.describe()
    return stage
