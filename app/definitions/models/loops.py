"""Looping strategies: Harness's ``strategy`` on a stage, a step group or a step.

```yaml
- stage:
    name: Deploy
    identifier: deploy
    strategy:
      repeat:
        items: [us-east-1, eu-west-1, ap-south-1]   # <+repeat.item>, <+repeat.index>
        maxConcurrency: 1
    spec: {...}
- step:
    type: Command
    name: Smoke
    identifier: smoke
    strategy:
      matrix:
        endpoint: [/health, /ready]                  # <+matrix.endpoint>
        port: [8080, 8081]
        exclude: [{endpoint: /ready, port: 8081}]
    spec: {...}
- step:
    type: Command
    name: Deploy
    identifier: deploy
    strategy:
      repeat:
        items: <+stage.output.hosts>   # Harness's way of running a step on every host: in
        maxConcurrency: 1              # vmfarm that is what every step of a phase does
    spec: {...}
```

A loop is expanded when the plan is resolved: every iteration is a stage (``deploy_0``,
``deploy_1``...) or a step (``smoke_0_1``) of its own, with its own ledger rows, named
``<name>_<item>`` (a matrix: ``<name>_<value>_<value>``). ``parallelism: N`` makes N
iterations. Every iteration reads ``<+strategy.iteration>`` (from 0),
``<+strategy.iterations>`` and ``<+strategy.identifierPostFix>`` (``_0``, ``_1_0``).

A stage's iterations are stages in order, run one after another, or with ``maxConcurrency``
above 1 side by side, that many at a time (app.definitions.stage_concurrency says what such a
stage may not hold). A step's iterations are steps in order on each host (hosts still run side
by side): there ``maxConcurrency`` above 1 is refused. Repeating a Command step over
``<+stage.output.hosts>`` is the phase's own fan-out: the step is planned exactly as without
it, ``<+repeat.item>`` in it standing for the host's name, and its ``maxConcurrency`` caps the
hosts in flight in every phase of the stage (as the strategy's ``maxConcurrency`` does; the
smaller one wins). Anywhere else it is refused.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from itertools import product
from typing import Any, ClassVar, TypeVar

from pydantic import Field, ValidationInfo, field_validator, model_validator

from app.definitions.base import Model, Scalar

HOSTS_ITEMS = "<+stage.output.hosts>"

_ONE_AT_A_TIME = (
    "vmfarm runs a step's (or step group's) iterations one after another, in order on each "
    "host, so at most 1 runs at a time: running them side by side is not supported (leave "
    "maxConcurrency out, or write 1; a stage's iterations may run side by side)"
)


def _max_concurrency(v: Any) -> Any:
    if isinstance(v, bool) or not isinstance(v, int):
        raise ValueError(f"maxConcurrency must be a whole number of at least 1, got {v!r}")
    if v < 1:
        raise ValueError(f"maxConcurrency must be at least 1, got {v}")
    return v


def _scalar_list(where: str, v: Any) -> list[Scalar]:
    if isinstance(v, str) and v.strip() == "<+repeat.partition>":
        raise ValueError(
            "items <+repeat.partition> (Harness's batches of hosts) is not supported: a "
            "Deployment stage's strategy makes the batches (spec.strategy phases), and every "
            "step of a phase runs on each of its hosts"
        )
    if isinstance(v, str) and v.strip().startswith("<+"):
        raise ValueError(
            f"{where} {v.strip()!r} from an expression is not supported: write the list in the "
            "file (a runtime input can fill one item: [<+input>])"
        )
    if not isinstance(v, list):
        raise ValueError(f"{where} must be a list, got {type(v).__name__} {v!r}")
    if not v:
        raise ValueError(f"{where} is empty: a loop needs at least one item")
    for i, item in enumerate(v):
        if not isinstance(item, str | int | float | bool):
            raise ValueError(
                f"{where}[{i}] must be a string or a number, got {type(item).__name__}"
            )
    return list(v)


class RepeatSpec(Model):
    """``repeat: {items: [...], maxConcurrency: N}``; ``items`` may be
    ``<+stage.output.hosts>`` on a Command step."""

    items: Any
    max_concurrency: Any = None

    @model_validator(mode="before")
    @classmethod
    def _harness_only(cls, data: Any) -> Any:
        # Harness's partitioned repeat (its rolling SSH template) is a strategy's phases here.
        if isinstance(data, dict):
            for name in ("partitionSize", "unit", "start", "end"):
                if name in data:
                    raise ValueError(
                        f"repeat's {name} is not supported: hosts in batches are a Deployment "
                        "stage's strategy (spec.strategy: {type: Rolling, phases: [...]}; "
                        "README: Strategies), and a repeat lists its items"
                    )
        return data

    @field_validator("items", mode="before")
    @classmethod
    def _items(cls, v: Any) -> Any:
        if isinstance(v, str) and v.strip() == HOSTS_ITEMS:
            return HOSTS_ITEMS
        return _scalar_list("items", v)

    @field_validator("max_concurrency")
    @classmethod
    def _cap(cls, v: Any) -> Any:
        return None if v is None else _max_concurrency(v)

    @property
    def over_hosts(self) -> bool:
        """``items: <+stage.output.hosts>``: the phase's own per-host fan-out."""
        return bool(self.items == HOSTS_ITEMS)


# Harness's matrix fields that are not axes.
_MATRIX_FIELDS = {"exclude", "maxConcurrency", "nodeName", "batchSize"}


class MatrixSpec(Model):
    """``matrix: {KEY: [...], ..., exclude: [{KEY: value, ...}], maxConcurrency: N}``: every
    combination of the keys' values, in the order written, but those that match an
    ``exclude`` entry on every key it names."""

    axes: dict[str, list[Scalar]] = Field(default_factory=dict)
    exclude: list[dict[str, Scalar]] = Field(default_factory=list)
    max_concurrency: Any = None

    @model_validator(mode="before")
    @classmethod
    def _collect(cls, data: Any) -> Any:
        if not isinstance(data, dict):
            return data
        if "nodeName" in data:
            raise ValueError(
                "nodeName is not supported: an iteration is named <name>_<value>_<value> "
                "(its identifier <identifier>_<index>_<index>)"
            )
        if "batchSize" in data:
            raise ValueError("batchSize is not supported: vmfarm runs iterations one at a time")
        if "axes" in data:
            raise ValueError("'axes' is not a matrix key: write the keys themselves")
        axes: dict[str, list[Scalar]] = {}
        for key, values in data.items():
            if key in _MATRIX_FIELDS:
                continue
            if not isinstance(key, str) or not key.isidentifier():
                raise ValueError(f"matrix key {key!r} must be letters, digits and _")
            axes[key] = _scalar_list(f"matrix key '{key}'", values)
        if not axes:
            raise ValueError("a matrix needs at least one key with a list of values")
        out = {"axes": axes, "exclude": data.get("exclude") or []}
        if "maxConcurrency" in data:
            out["maxConcurrency"] = data["maxConcurrency"]
        return out

    @field_validator("max_concurrency")
    @classmethod
    def _cap(cls, v: Any) -> Any:
        return None if v is None else _max_concurrency(v)

    @field_validator("exclude")
    @classmethod
    def _excludes(cls, v: list[dict[str, Scalar]], info: ValidationInfo) -> list[dict[str, Scalar]]:
        axes = info.data.get("axes") or {}
        for i, entry in enumerate(v):
            if not entry:
                raise ValueError(f"exclude[{i}] is empty: name the keys of the combination")
            for key in entry:
                if key not in axes:
                    raise ValueError(
                        f"exclude[{i}] names '{key}', which is not a key of the matrix "
                        f"(keys: {', '.join(axes)})"
                    )
        return v

    @model_validator(mode="after")
    def _something_left(self) -> MatrixSpec:
        if not combinations(self):
            raise ValueError("exclude leaves no combination of the matrix")
        return self


def _text(v: Scalar) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    return str(v)


def combinations(matrix: MatrixSpec) -> list[tuple[tuple[int, ...], dict[str, Scalar]]]:
    """Every combination left after ``exclude``: (index of each key's value, values by key)."""
    keys = list(matrix.axes)
    out = []
    for idx in product(*(range(len(matrix.axes[k])) for k in keys)):
        values = {k: matrix.axes[k][i] for k, i in zip(keys, idx, strict=True)}
        if any(all(_text(values[k]) == _text(v) for k, v in ex.items()) for ex in matrix.exclude):
            continue
        out.append((idx, values))
    return out


class LoopStrategy(Model):
    """Harness's looping ``strategy``: one of ``repeat``, ``matrix`` or ``parallelism``."""

    repeat: RepeatSpec | None = None
    matrix: MatrixSpec | None = None
    parallelism: int | None = Field(default=None, ge=1, le=1000)
    max_concurrency: Any = None  # next to parallelism

    @field_validator("max_concurrency")
    @classmethod
    def _cap(cls, v: Any) -> Any:
        return None if v is None else _max_concurrency(v)

    @model_validator(mode="after")
    def _one(self) -> LoopStrategy:
        given = [
            n
            for n, v in (
                ("repeat", self.repeat),
                ("matrix", self.matrix),
                ("parallelism", self.parallelism),
            )
            if v is not None
        ]
        if len(given) != 1:
            raise ValueError(
                "a looping strategy holds one of repeat, matrix or parallelism"
                + (f", not {' and '.join(given)}" if given else "")
            )
        if self.max_concurrency is not None and self.parallelism is None:
            raise ValueError(
                f"maxConcurrency goes inside {given[0]} (next to parallelism only for parallelism)"
            )
        cap = self.cap
        if cap is not None and cap > 1 and not self.over_hosts and not self._side_by_side:
            raise ValueError(f"maxConcurrency {cap}: {_ONE_AT_A_TIME}")
        return self

    # A stage's iterations may run side by side (StageLoopStrategy); a step's may not.
    _side_by_side: ClassVar[bool] = False

    @property
    def cap(self) -> int | None:
        """The ``maxConcurrency`` written, wherever it stands."""
        for v in (
            self.max_concurrency,
            self.repeat.max_concurrency if self.repeat else None,
            self.matrix.max_concurrency if self.matrix else None,
        ):
            if v is not None:
                return int(v)
        return None

    @property
    def over_hosts(self) -> bool:
        """``repeat: {items: <+stage.output.hosts>}``."""
        return self.repeat is not None and self.repeat.over_hosts


_Loop = TypeVar("_Loop", bound=LoopStrategy)


class StageLoopStrategy(LoopStrategy):
    """A stage's looping strategy: its ``maxConcurrency`` is how many iterations run side by
    side (app.definitions.stage_concurrency)."""

    _side_by_side: ClassVar[bool] = True

    def count(self) -> int:
        """How many iterations the loop makes."""
        return len(iterations(self))

    def side_by_side(self) -> int:
        """How many iterations run at once: ``maxConcurrency`` (at most the iterations),
        1 without it."""
        return max(1, min(self.cap or 1, self.count()))


def no_hosts_loop(loop: _Loop | None, where: str) -> _Loop | None:
    """Refuse ``<+stage.output.hosts>`` where it does not mean the phase's per-host fan-out."""
    if loop is not None and loop.over_hosts:
        raise ValueError(
            f"repeat over {HOSTS_ITEMS} is the per-host fan-out of a Command step; on {where} "
            "it is not supported (every step of a Deployment stage already runs on each host of "
            "its phase: leave the strategy out)"
        )
    return loop


@dataclass(frozen=True)
class Iteration:
    """One iteration of a loop: the suffixes of its identifier and name, and the values its
    expressions read (``repeat.item``, ``matrix.KEY``, ``strategy.iteration``...)."""

    kind: str
    index: int
    count: int
    suffix: str
    label: str
    values: dict[str, str] = field(default_factory=dict)

    def describe(self) -> str:
        """One line for plans and status: ``repeat 2/3: us-east-1``."""
        shown = {
            "repeat": self.values.get("repeat.item", ""),
            "matrix": ", ".join(
                f"{k.removeprefix('matrix.')}={v}"
                for k, v in self.values.items()
                if k.startswith("matrix.")
            ),
            "parallelism": "",
        }[self.kind]
        return f"{self.kind} {self.index + 1}/{self.count}" + (f": {shown}" if shown else "")


def _common(i: int, n: int, suffix: str) -> dict[str, str]:
    return {
        "strategy.iteration": str(i),
        "strategy.iterations": str(n),
        "strategy.identifierPostFix": f"_{suffix}",
    }


def iterations(loop: LoopStrategy, items: list[str] | None = None) -> list[Iteration]:
    """The iterations of ``loop`` in order; ``items`` are the repeat's items (or the matrix's
    values, key by key in order) as rendered, when they held expressions."""
    if loop.repeat is not None:
        assert not loop.repeat.over_hosts
        values = items if items is not None else [_text(v) for v in loop.repeat.items]
        n = len(values)
        return [
            Iteration(
                "repeat",
                i,
                n,
                str(i),
                v,
                {"repeat.item": v, "repeat.index": str(i), **_common(i, n, str(i))},
            )
            for i, v in enumerate(values)
        ]
    if loop.matrix is not None:
        combos = combinations(loop.matrix)
        n = len(combos)
        rendered = dict(zip(_matrix_slots(loop.matrix), items, strict=True)) if items else {}
        out = []
        for i, (idx, vals) in enumerate(combos):
            suffix = "_".join(str(j) for j in idx)
            texts = {
                k: rendered.get((k, j), _text(vals[k]))
                for k, j in zip(loop.matrix.axes, idx, strict=True)
            }
            out.append(
                Iteration(
                    "matrix",
                    i,
                    n,
                    suffix,
                    "_".join(texts.values()),
                    {**{f"matrix.{k}": v for k, v in texts.items()}, **_common(i, n, suffix)},
                )
            )
        return out
    assert loop.parallelism is not None
    n = loop.parallelism
    return [Iteration("parallelism", i, n, str(i), str(i), _common(i, n, str(i))) for i in range(n)]


def _matrix_slots(matrix: MatrixSpec) -> list[tuple[str, int]]:
    return [(k, j) for k, vs in matrix.axes.items() for j in range(len(vs))]


def item_paths(loop: LoopStrategy) -> list[tuple[tuple[str | int, ...], str]]:
    """Where each item (or matrix value) stands under ``strategy``, with its text: the order
    ``iterations(loop, items)`` takes them rendered."""
    if loop.repeat is not None and not loop.repeat.over_hosts:
        return [(("repeat", "items", i), _text(v)) for i, v in enumerate(loop.repeat.items)]
    if loop.matrix is not None:
        return [
            (("matrix", k, j), _text(loop.matrix.axes[k][j])) for k, j in _matrix_slots(loop.matrix)
        ]
    return []
