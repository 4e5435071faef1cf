"""Copy: the worker fetches the service's artifact (once per execution) and pushes it to the
host over SFTP, then verifies its sha256 there.

```yaml
- identifier: copy
  type: Copy
  spec:
    sourceType: Artifact
    destinationPath: /opt/web/incoming     # a directory: the file keeps its name
```

``$HOME``, ``${HOME}`` and ``~`` at the start of ``destinationPath`` are the login user's home on
the host (SFTP does not expand them; Harness's default is ``$HOME/<+service.name>/<+env.name>``).
``sourceType: Config`` copies the service's config files; a service without configFiles has none
to copy, so the unit does nothing (as in Harness, whose generated rollbacks all carry one).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from app.definitions.expressions import render
from app.definitions.models import CopyUnit
from app.units.base import HIDDEN, HostSession, Outcome, Rendered, Scope, UnitType, register


@dataclass(frozen=True, kw_only=True)
class RenderedCopy(Rendered):
    source: str  # where the artifact comes from: no credentials, no query string
    destination: str  # the file on the host
    checksum: str | None  # the sha256 known before fetching (else computed when fetched)
    artifact: Mapping[str, Any] = field(repr=False, compare=False, metadata=HIDDEN)  # JSON
    sourceType: str = "Artifact"  # (as the YAML field is named)


def artifact_source(artifact: Mapping[str, Any]) -> tuple[str, str | None]:
    """(where the artifact comes from, for people; the sha256 known before fetching).

    ArtifactError when the spec cannot say (the same error the worker's fetch would raise)."""
    from app.artifacts import resolve

    r = resolve(artifact, require_secrets=False)
    return r.source, r.expected


def destination(path: str, scope: Scope) -> str:
    """The file on the host: ``path`` (a directory, rendered for the host) + the artifact's
    file name."""
    return render(path, scope.ctx).rstrip("/") + "/" + scope.file_name


_HOME = ("$HOME/", "${HOME}/", "~/")


def on_host(remote: str, session: HostSession) -> str | None:
    """``remote`` with a leading ``$HOME``/``${HOME}``/``~`` made the login user's home on the
    host (asked with one remote command); None when the host gives no home."""
    if remote not in ("$HOME", "${HOME}", "~") and not remote.startswith(_HOME):
        return remote
    res = session.conn.run('printf %s "$HOME"', timeout=session.timeout)
    home = res.stdout.strip() if res.exit_code == 0 else ""
    if not home.startswith("/"):
        return None
    rest = remote.split("/", 1)[1] if "/" in remote else ""
    return home.rstrip("/") + ("/" + rest if rest else "")


def push_artifact(artifact: Mapping[str, Any], session: HostSession, remote: str) -> Outcome:
    """Copy the artifact to ``remote`` over SFTP and verify its checksum there."""
    from app.artifacts import fetch, verify_remote_command

    got = fetch(artifact, execution_id=session.execution_id)
    host = session.host
    expanded = on_host(remote, session)
    if expanded is None:
        return Outcome.failed(
            f"cannot expand {remote.split('/', 1)[0]} in {remote} on {host.name}: the login "
            "shell gave no home directory; write an absolute destinationPath"
        )
    remote = expanded
    unverified = "" if got.verified else ", not verified at the source"
    session.out.write(
        "stdout",
        f"copying {artifact['fileName']} ({got.source}, sha256 "
        f"{got.sha256}{unverified}) to {host.name}:{remote}\n",
    )
    session.conn.put(str(got.path), remote)
    res = session.conn.run(
        verify_remote_command(remote, got.sha256),
        timeout=session.timeout,
        on_output=session.out.write,
    )
    if res.exit_code != 0:
        return Outcome.failed(
            f"checksum mismatch on {host.name}: {artifact['fileName']} from "
            f"{got.source} is not sha256 {got.sha256} there",
            exit_code=res.exit_code,
        )
    return Outcome()


@register
class Copy(UnitType[CopyUnit, RenderedCopy]):
    type = "Copy"

    def render(self, unit: CopyUnit, scope: Scope) -> RenderedCopy:
        if unit.spec.source_type == "Config":  # the loader refuses configFiles: none to copy
            return RenderedCopy(
                identifier=unit.identifier,
                type=self.type,
                source="the service's config files (it has none)",
                destination=render(unit.spec.destination_path, scope.ctx),
                checksum=None,
                artifact={},
                sourceType="Config",
            )
        source, checksum = artifact_source(scope.artifact_json)
        return RenderedCopy(
            identifier=unit.identifier,
            type=self.type,
            source=source,
            destination=destination(unit.spec.destination_path, scope),
            checksum=checksum,
            artifact=scope.artifact_json,
        )

    def run(self, rendered: RenderedCopy, session: HostSession) -> Outcome:
        if rendered.sourceType == "Config":
            session.out.write("stdout", "the service has no config files: nothing to copy\n")
            return Outcome()
        return push_artifact(rendered.artifact, session, rendered.destination)

    def describe(self, shown: Mapping[str, Any]) -> list[str]:
        if shown.get("sourceType") == "Config":
            return [
                f"[{shown['identifier']}] copy config files: none (the service has no configFiles)"
            ]
        check = (
            f"sha256 {shown['checksum']}"
            if shown.get("checksum")
            else "sha256 computed when fetched"
        )
        return [
            f"[{shown['identifier']}] copy {shown['source']} -> {shown['destination']}",
            f"  (pushed over SFTP by the worker, {check}, checked on the host)",
        ]
