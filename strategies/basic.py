"""Basic strategy: every host of the stage in one phase.

Planners are pure functions from (stage, hosts) to phases as plain data: no Celery, no SQL, no I/O.

```yaml
# No strategy block, or:
execution:
  steps: [...]        # run on every host at once (maxConcurrency arrives with rolling)
```
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass


@dataclass(frozen=True)
class Phase:
    """One batch of hosts; phases of a stage run one after another."""

    index: int
    name: str
    hosts: tuple[str, ...]


def plan_basic(hosts: Sequence[str]) -> list[Phase]:
    """One phase with every host, in inventory order."""
    return [Phase(index=0, name="Phase 1", hosts=tuple(hosts))] if hosts else []
