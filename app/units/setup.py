"""Setup: prepare the runtime paths on the host (Harness's "Setup Runtime Paths").

```yaml
- identifier: paths
  type: Setup
  spec:
    paths: [/opt/app, /opt/app/logs]
    owner: app:app        # optional: chown
    mode: "0750"          # optional: chmod
```

Each path is created if missing (``mkdir -p``), then given ``owner`` and ``mode`` when set.
"""

from __future__ import annotations

import shlex
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from app.definitions.expressions import render
from app.definitions.models import SetupUnit
from app.units.base import HostSession, Outcome, Rendered, Scope, UnitType, register


@dataclass(frozen=True, kw_only=True)
class RenderedSetup(Rendered):
    paths: tuple[str, ...]
    owner: str | None
    mode: str | None
    script: str  # exactly what the host runs


def setup_script(paths: tuple[str, ...], owner: str | None, mode: str | None) -> str:
    """mkdir -p each path; chown and chmod when asked; list them."""
    quoted = " ".join(shlex.quote(p) for p in paths)
    lines = ["set -e", f"mkdir -p {quoted}"]
    if owner:
        lines.append(f"chown {shlex.quote(owner)} {quoted}")
    if mode:
        lines.append(f"chmod {shlex.quote(mode)} {quoted}")
    lines.append(f"ls -ld {quoted}")
    return "\n".join(lines) + "\n"


@register
class Setup(UnitType[SetupUnit, RenderedSetup]):
    type = "Setup"

    def render(self, unit: SetupUnit, scope: Scope) -> RenderedSetup:
        spec = unit.spec
        paths = tuple(render(str(p), scope.ctx) for p in spec.paths)
        owner = spec.owner or None
        mode = spec.mode or None
        return RenderedSetup(
            identifier=unit.identifier,
            type=self.type,
            paths=paths,
            owner=owner,
            mode=mode,
            script=setup_script(paths, owner, mode),
        )

    def run(self, rendered: RenderedSetup, session: HostSession) -> Outcome:
        res = session.conn.run(
            rendered.script, timeout=session.timeout, on_output=session.out.write
        )
        if res.exit_code != 0:
            return Outcome.failed(
                f"unit '{rendered.identifier}' could not prepare the runtime "
                f"paths (exit {res.exit_code})",
                exit_code=res.exit_code,
            )
        return Outcome()

    def describe(self, shown: Mapping[str, Any]) -> list[str]:
        how = ", ".join(
            x
            for x in (
                f"owner {shown['owner']}" if shown.get("owner") else "",
                f"mode {shown['mode']}" if shown.get("mode") else "",
            )
            if x
        )
        return [
            f"[{shown['identifier']}] setup {' '.join(shown['paths'])}"
            + (f" ({how})" if how else "")
            + ":",
            *(f"  {line}" for line in str(shown["script"]).rstrip("\n").splitlines()),
        ]
