"""Script: a bash script run on the host as one remote command.

```yaml
- identifier: start
  type: Script
  spec:
    workingDirectory: /opt/app        # optional
    source:
      type: Inline
      spec:
        script: |
          echo "starting <+artifact.tag> on <+instance.hostName>"
```

Expressions are rendered for the host. A value from outside the files (a runtime input, a host
name, an earlier step's output) reaches bash byte-identical, as one word, never executed: it
travels in the command's environment (``VMFARM_VALUE_1``, shown by ``vmfarm plan`` as the values
bound), written for the quoting context the expression stands in (app.definitions.shell); one
that no form can carry intact is refused. Secrets are resolved on the worker, in the same way,
and never pasted. When the step has outputVariables, a trap prints the
ones the script set when it exits, however it exits.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from app.definitions.expressions import Binder, ExpressionError, render_script
from app.definitions.models import ScriptUnit
from app.units.base import HostSession, Outcome, Rendered, Scope, UnitType, register

# Marks an output-variable line in stdout (app.execution.logs picks these lines out).
OUTPUT_MARK = "::vmfarm-output::"


@dataclass(frozen=True, kw_only=True)
class RenderedScript(Rendered):
    script: str  # the script as the host runs it, expressions rendered
    values: dict[str, str]  # environment variables bound in place of unsafe values
    workingDirectory: str | None = None  # (as the YAML field is named)
    # The step's output variables (name -> the shell variable read), printed when it exits.
    outputVariables: dict[str, str] = field(default_factory=dict)

    def command(self) -> str:
        """What the connector runs: the output trap (when the step has output variables),
        then the script, unchanged."""
        if not self.outputVariables:
            return self.script
        return (
            output_trap([{"name": k, "value": v} for k, v in self.outputVariables.items()])
            + self.script
        )


def output_trap(outputs: Sequence[Mapping[str, Any]]) -> str:
    """Shell lines that print the output variables the script set when it ends, however it
    ends.

    Only variables the unit actually set are printed, so a later unit of the step does not
    overwrite an earlier unit's value with nothing.
    """
    parts = []
    for o in outputs:
        var = str(o.get("value") or o["name"])
        if not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", var):
            continue
        parts.append(
            f'[ -n "${{{var}+x}}" ] && printf "%s{o["name"]}=%s\\n" '
            f'"{OUTPUT_MARK}" "$(printf %s "${{{var}}}" | base64 -w0)"'
        )
    return "__vmfarm_out() { " + "; ".join([*parts, "true"]) + "; }\ntrap __vmfarm_out EXIT\n"


def _secret_value(secret_id: str) -> str:
    """A secret's value, resolved here (the worker) and registered for masking."""
    from app.secrets import resolve

    return resolve([secret_id])[secret_id.strip()]


@register
class Script(UnitType[ScriptUnit, RenderedScript]):
    type = "Script"

    def render(self, unit: ScriptUnit, scope: Scope) -> RenderedScript:
        spec = unit.spec
        binder = Binder()
        problem = None
        text = spec.source.spec.script
        try:
            script = render_script(
                text, scope.ctx, bind=binder, secrets=_secret_value if scope.secrets else None
            )
        except ExpressionError as exc:  # the run fails with it, touching nothing
            script, problem = text, str(exc)
        return RenderedScript(
            identifier=unit.identifier,
            type=self.type,
            script=script,
            values=dict(binder.env),
            problem=problem,
            workingDirectory=spec.working_directory,
            outputVariables={o.name: str(o.value or o.name) for o in scope.outputs},
        )

    def run(self, rendered: RenderedScript, session: HostSession) -> Outcome:
        res = session.conn.run(
            rendered.command(),
            env={**session.env, **rendered.values},
            timeout=session.timeout,
            on_output=session.out.write,
            workdir=rendered.workingDirectory,
        )
        if res.exit_code != 0:
            return Outcome.failed(
                f"unit '{rendered.identifier}' exited with code {res.exit_code}",
                exit_code=res.exit_code,
            )
        return Outcome(exit_code=res.exit_code)

    def describe(self, shown: Mapping[str, Any]) -> list[str]:
        where = f" (in {shown['workingDirectory']})" if shown.get("workingDirectory") else ""
        lines = [f"[{shown['identifier']}] script{where}:"]
        lines += [f"  {line}" for line in str(shown["script"]).rstrip("\n").splitlines()]
        lines += [f"  (with {k}={v!r})" for k, v in (shown.get("values") or {}).items()]
        if shown.get("outputVariables"):
            lines.append(
                "  (prints output variables "
                + ", ".join(shown["outputVariables"])
                + " when it exits)"
            )
        return lines
