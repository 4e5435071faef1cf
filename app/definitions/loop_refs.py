"""A looped stage that deploys somewhere else on every iteration: its ``serviceRef``,
``environmentRef`` or infrastructure identifiers read the loop's values, Harness's way of
writing one stage per region or per environment:

```yaml
- stage:
    identifier: deploy
    strategy:
      matrix:
        region: [east, west]
    spec:
      environment:
        environmentRef: prod_<+matrix.region>
        infrastructureDefinitions:
          - identifier: vms_<+matrix.region>
```

The references are rendered with each iteration's values alone (``<+repeat.item>``,
``<+repeat.index>``, ``<+matrix.KEY>``, ``<+strategy.iteration>``...), so every iteration's
service, environment and infrastructures are known when the files are loaded and checked there
like written ones (app.definitions.references, app.definitions.schemas); each iteration is then
resolved against its own (app.definitions.resolve). Anything else in such a reference (a
variable, an input) is refused, and so are loop items that are expressions themselves: the
targets a run may reach are fixed by the files, not found out while it runs.
"""

from __future__ import annotations

from app.definitions import models as m
from app.definitions.bundle import Bundle, Collector, Loaded
from app.definitions.expressions import EXPR_RE, Context, ExpressionError, render

Path = tuple[str | int, ...]

_LOOP_KEYS = ("repeat.item", "repeat.index", "matrix.", "strategy.")


def ref_slots(stage: m.StageSpec) -> list[tuple[Path, str]]:
    """The stage's references with where each stands under the stage (relative path)."""
    env = stage.spec.environment
    out: list[tuple[Path, str]] = [
        (("spec", "service", "serviceRef"), stage.spec.service.service_ref),
        (("spec", "environment", "environmentRef"), env.environment_ref),
    ]
    out += [
        (("spec", "environment", "infrastructureDefinitions", i, "identifier"), r.identifier)
        for i, r in enumerate(env.infrastructure_definitions)
    ]
    return out


def templated(stage: object) -> bool:
    """Whether a Deployment stage's references hold expressions."""
    return isinstance(stage, m.StageSpec) and any("<+" in text for _, text in ref_slots(stage))


def iteration_targets(
    pipe: Loaded, index: int, errs: Collector, *, bundle: Bundle | None = None
) -> list[tuple[m.Iteration, m.StageSpec]] | None:
    """For the stage at ``index`` of the file whose references read its loop: one copy of the
    stage per iteration with its references rendered (None: the stage's references are
    written out). What cannot be rendered is reported in ``errs`` (file, line, field) and
    leaves no copy. With ``bundle``, each copy's infrastructures are chosen as a written
    stage's are (deployToAll, or the environment's only one); what is wrong there is left to
    app.definitions.references, which reports it."""
    stage = pipe.model.spec.stages[index].stage
    if not isinstance(stage, m.StageSpec) or not templated(stage):
        return None
    base: Path = ("spec", "stages", index, "stage")
    slots = [(at, text) for at, text in ref_slots(stage) if "<+" in text]
    loop = stage.strategy
    if not isinstance(loop, m.LoopStrategy) or loop.over_hosts:
        for at, text in slots:
            errs.add(
                pipe.error(
                    f"'{text}': an expression in a stage's service, environment or "
                    "infrastructure reads only the stage's looping strategy (<+repeat.item>, "
                    "<+matrix.KEY>), and this stage has none: write the identifier",
                    (*base, *at),
                )
            )
        return []
    from app.definitions.models.loops import item_paths

    written = [(at, text) for at, text in item_paths(loop) if "<+" in text]
    if written:
        at, text = written[0]
        errs.add(
            pipe.error(
                f"'{text}': this stage's service, environment or infrastructure is chosen by "
                "its loop, so the loop's items are written out (not expressions): the places a "
                "run may deploy to are fixed by the files",
                (*base, "strategy", *at),
            )
        )
        return []
    bad = False
    for at, text in slots:
        for expr in EXPR_RE.findall(text):
            if not expr.strip().startswith(_LOOP_KEYS):
                errs.add(
                    pipe.error(
                        f"<+{expr.strip()}> in '{text}': a stage's service, environment or "
                        "infrastructure reads only its loop's values (<+repeat.item>, "
                        "<+repeat.index>, <+matrix.KEY>, <+strategy.iteration>)",
                        (*base, *at),
                    )
                )
                bad = True
    if bad:
        return []
    out: list[tuple[m.Iteration, m.StageSpec]] = []
    for it in m.iterations(loop):
        ctx = Context()
        for k, v in it.values.items():
            ctx.set(k, v)
        problems: list[str] = []
        rendered = {at: render(text, ctx, on_error=problems.append) for at, text in slots}
        if problems:
            for msg in problems:
                errs.add(pipe.error(f"{msg} (iteration {it.describe()})", (*base, *slots[0][0])))
            continue
        copy = stage.model_copy(deep=True)
        for at, value in rendered.items():
            if at[1] == "service":
                copy.spec.service.service_ref = value
            elif at[-1] == "environmentRef":
                copy.spec.environment.environment_ref = value
            else:
                copy.spec.environment.infrastructure_definitions[int(at[3])].identifier = value
        if bundle is not None:
            from app.definitions.references import _choose_infrastructures

            _choose_infrastructures(bundle, pipe, copy, base, Collector())
        out.append((it, copy))
    return out


def iteration_target(
    bundle: Bundle, pipe: Loaded, index: int, loop: m.Iteration
) -> m.StageSpec | None:
    """The copy of stage ``index`` for iteration ``loop``, its infrastructures chosen (None:
    its references are written out). The references were checked when the files were
    loaded."""
    errs = Collector()
    found = iteration_targets(pipe, index, errs, bundle=bundle)
    if found is None:
        return None
    errs.raise_if_any()
    for it, copy in found:
        if it.index == loop.index:
            return copy
    raise ExpressionError(f"no iteration {loop.index} of stage {index}")  # pragma: no cover
