"""Rolling and canary: phases of hosts, one after another, with a gate between them.

```yaml
strategy:
  type: Rolling
  phases: [1, "25%", "50%"]   # batch sizes; the last one repeats until every host is done
  maxConcurrency: 5
---
strategy:
  type: Canary
  phases: [1, "25%"]          # cumulative targets: 1 host, then up to 25%; then the rest
  verification: {healthCheck: {url: "http://<+instance.hostName>:8080/health"}}
```

Sizes are host counts or percentages of *all* hosts of the stage, rounded up, never below one
host (Ansible's ``serial``). The reference's ``rolloutDeployment``/``canaryDeployment`` phases
are cumulative (Harness: "Instances (cumulative)").
"""

from __future__ import annotations

import math
from collections.abc import Sequence

from app.definitions.models import Size, parse_size
from strategies.basic import Phase


def size_of(value: Size, total: int) -> int:
    """Hosts meant by ``value`` out of ``total``: a count, or a percentage rounded up; >= 1."""
    amount, percent = parse_size(value)
    n = math.ceil(amount * total / 100 - 1e-9) if percent else int(amount)
    return max(1, n)


def batch_sizes(total: int, sizes: Sequence[Size], *, cumulative: bool) -> list[int]:
    """Sizes of the batches that deploy ``total`` hosts (their sum is ``total``)."""
    return [n for n, _ in _batches(total, sizes, cumulative=cumulative)]


def _batches(
    total: int, sizes: Sequence[Size], *, cumulative: bool
) -> list[tuple[int, int | None]]:
    """(batch size, index of the entry it comes from; None for the added remainder)."""
    out: list[tuple[int, int | None]] = []
    done = 0
    if cumulative:
        for i, value in enumerate(sizes):
            target = min(total, size_of(value, total))
            if target > done:
                out.append((target - done, i))
                done = target
        if done < total:
            out.append((total - done, None))  # the rest (Spinnaker appends 100%)
        return out
    i = 0
    while done < total:
        entry = min(i, len(sizes) - 1)
        n = min(size_of(sizes[entry], total), total - done)
        out.append((n, entry if i < len(sizes) else None))
        done += n
        i += 1
    return out


def _split(hosts: Sequence[str], batches: list[int]) -> list[tuple[str, ...]]:
    out, start = [], 0
    for n in batches:
        out.append(tuple(hosts[start : start + n]))
        start += n
    return out


def _name(names: Sequence[str] | None, entry: int | None, default: str) -> str:
    return names[entry] if names and entry is not None and entry < len(names) else default


def plan_rolling(
    hosts: Sequence[str],
    sizes: Sequence[Size],
    *,
    cumulative: bool = False,
    verify: bool = False,
    names: Sequence[str] | None = None,
    verify_after: Sequence[int] | None = None,
) -> list[Phase]:
    """Phases in inventory order; with ``verify``, a gate after every phase but the last (or
    after the entries of ``sizes`` listed in ``verify_after``, when given)."""
    batches = _batches(len(hosts), sizes, cumulative=cumulative)
    groups = _split(hosts, [n for n, _ in batches])
    last = len(groups) - 1
    return [
        Phase(
            index=i,
            name=_name(names, batches[i][1], f"Phase {i + 1}"),
            hosts=g,
            verify=verify and i < last and (verify_after is None or batches[i][1] in verify_after),
        )
        for i, g in enumerate(groups)
    ]


def plan_canary(
    hosts: Sequence[str],
    sizes: Sequence[Size],
    *,
    verify_after: Sequence[int] | None = None,
    names: Sequence[str] | None = None,
) -> list[Phase]:
    """Canary phases (cumulative targets) then the primary phase with every remaining host.

    The gate runs after every canary phase, or after the phases (entries of ``sizes``) listed
    in ``verify_after`` when given.
    """
    batches = _batches(len(hosts), sizes, cumulative=True)
    groups = _split(hosts, [n for n, _ in batches])
    last = len(groups) - 1
    phases = []
    for i, g in enumerate(groups):
        entry = batches[i][1]
        default = "Primary" if i == last and last > 0 else f"Canary {i + 1}"
        # A gate decides whether to go on, so none is needed after the last phase.
        check = (entry in verify_after) if verify_after is not None else True
        phases.append(
            Phase(index=i, name=_name(names, entry, default), hosts=g, verify=check and i < last)
        )
    return phases
