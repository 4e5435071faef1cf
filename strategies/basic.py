"""Basic strategy: every host of the stage in one phase.

Planners are pure functions from (stage, hosts) to phases as plain data: no Celery, no SQL, no I/O.

```yaml
# No strategy block, or:
strategy:
  type: Basic
  maxConcurrency: 10     # at most 10 hosts in flight
```
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any


@dataclass(frozen=True)
class Phase:
    """One step of a stage's plan, run after the previous one passed its gate.

    ``kind`` is ``deploy`` (run the steps on ``hosts``) or ``switch`` (move traffic to
    ``hosts``); ``verify`` runs the verification gate on the phase's hosts before going on.
    """

    index: int
    name: str
    hosts: tuple[str, ...]
    kind: str = "deploy"
    verify: bool = False

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["hosts"] = list(self.hosts)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Phase:
        return cls(
            index=int(d["index"]),
            name=str(d["name"]),
            hosts=tuple(d["hosts"]),
            kind=str(d.get("kind", "deploy")),
            verify=bool(d.get("verify", False)),
        )


def plan_basic(hosts: Sequence[str]) -> list[Phase]:
    """One phase with every host, in inventory order."""
    return [Phase(index=0, name="Phase 1", hosts=tuple(hosts))] if hosts else []
