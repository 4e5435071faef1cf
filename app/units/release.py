"""Release: install the artifact as ``<deploymentPath>/releases/<version>`` and switch
``<deploymentPath>/current`` to it atomically; the newest ``keep`` releases stay.

```yaml
- identifier: release
  type: Release
  spec:
    deploymentPath: /opt/app
    keep: 3               # default 3
```

The artifact is copied (fetched once per execution, pushed over SFTP, checksum verified) only
when that release is not on the host yet: going back to a release the host still holds (a
rollback) fetches nothing. The unit reports the releases the host holds, newest first, as the
output ``RELEASES_OUTPUT`` (the coordinator reads it to know where a rollback can go).
"""

from __future__ import annotations

import re
import shlex
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from app.definitions.expressions import render
from app.definitions.models import ReleaseUnit
from app.units.base import HIDDEN, HostSession, Outcome, Rendered, Scope, UnitType, register
from app.units.copy import artifact_source, push_artifact

# The output a Release unit leaves: the releases the host holds, newest first.
RELEASES_OUTPUT = "vmfarm_releases"

# A version names a folder: it starts with a letter or a digit and never climbs out ('..').
VERSION_RE = re.compile(r"(?!.*\.\.)[A-Za-z0-9][A-Za-z0-9._+~-]{0,127}")


@dataclass(frozen=True, kw_only=True)
class RenderedRelease(Rendered):
    source: str  # where the artifact comes from: no credentials, no query string
    deploymentPath: str  # (as the YAML field is named)
    version: str
    releasesDirectory: str
    keep: int
    current: str  # the symbolic link switched to the new release
    currentTarget: str  # (what ``current`` will point to, relative to deploymentPath)
    fileName: str = field(repr=False, compare=False, metadata=HIDDEN)
    artifact: Mapping[str, Any] = field(repr=False, compare=False, metadata=HIDDEN)


def has_release_command(r: RenderedRelease) -> str:
    """Exits 0 when the host holds this release whole (its marker file is written last)."""
    rel = shlex.quote(f"{r.releasesDirectory}/{r.version}")
    return f"test -d {rel} && test -e {rel}/.vmfarm-release"


def is_tarball(file_name: str) -> bool:
    return file_name.endswith((".tar.gz", ".tgz"))


def install_script(r: RenderedRelease, incoming: str) -> str:
    """Unpack (or copy) ``incoming`` into a temporary directory, mark it, rename it into
    place. Files belong to the SSH user with its umask (never the archive's owners or modes);
    whatever happens, the temporary directory and the pushed archive are gone at the end."""
    b, v, i = shlex.quote(r.deploymentPath), shlex.quote(r.version), shlex.quote(incoming)
    unpack = (
        f'tar --no-same-owner --no-same-permissions -xzf {i} -C "$tmp"'
        if is_tarball(r.fileName)
        else f'cp {i} "$tmp"/'
    )
    return (
        f"set -e\nincoming={i}\nmkdir -p {b}/releases\n"
        f"tmp=$(mktemp -d {b}/releases/.{v}.XXXX)\n"
        'trap \'rm -rf "$tmp" "$incoming"\' EXIT\n'
        f'{unpack}\necho {v} > "$tmp"/.vmfarm-release\n'
        f'rm -rf {b}/releases/{v}\nmv "$tmp" {b}/releases/{v}\n'
    )


def switch_script(r: RenderedRelease) -> str:
    """Point ``current`` at the release, drop all but the newest ``keep``, list what is left.

    ln + rename: ``current`` always points at a whole release, never at nothing."""
    b, v = shlex.quote(r.deploymentPath), shlex.quote(r.version)
    return (
        f"set -e\ncd {b}\nln -sfn releases/{v} .current.$$\nmv -T .current.$$ current\n"
        f"ls -1t releases | grep -v '^[.]' | tail -n +{r.keep + 1} | while read -r old; do "
        f'[ "$old" = {v} ] || rm -rf "releases/$old"; done\n'
        f"echo \"RELEASES $(ls -1t releases | grep -v '^[.]' | tr '\\n' ' ')\"\n"
    )


def check_archive(r: RenderedRelease, session: HostSession) -> Outcome | None:
    """The archive's members, checked here before anything is pushed (app.artifacts.archive);
    a failure naming the first members refused, or None."""
    if not is_tarball(r.fileName):
        return None
    from app.artifacts import fetch
    from app.artifacts.archive import unsafe_members

    got = fetch(r.artifact, execution_id=session.execution_id)
    problems = unsafe_members(str(got.path))
    if not problems:
        return None
    more = f" (and {len(problems) - 3} more)" if len(problems) > 3 else ""
    return Outcome.failed(
        f"release {r.version}: {r.fileName} is refused before anything is "
        f"unpacked: {'; '.join(problems[:3])}{more}"
    )


@register
class Release(UnitType[ReleaseUnit, RenderedRelease]):
    type = "Release"

    def render(self, unit: ReleaseUnit, scope: Scope) -> RenderedRelease:
        spec = unit.spec
        base = render(spec.deployment_path, scope.ctx).rstrip("/")
        version = str((scope.artifact.tag if scope.artifact else None) or "")
        source, _ = artifact_source(scope.artifact_json)
        return RenderedRelease(
            identifier=unit.identifier,
            type=self.type,
            source=source,
            problem=None
            if VERSION_RE.fullmatch(version)
            else f"version {version!r} cannot name a release directory",
            deploymentPath=base,
            version=version,
            releasesDirectory=f"{base}/releases",
            keep=spec.keep,
            current=f"{base}/current",
            currentTarget=f"releases/{version}",
            fileName=scope.file_name,
            artifact=scope.artifact_json,
        )

    def run(self, r: RenderedRelease, session: HostSession) -> Outcome:
        if r.problem:
            return Outcome.failed(r.problem)
        conn, host, out = session.conn, session.host, session.out
        has = conn.run(has_release_command(r), timeout=session.timeout)
        if has.exit_code != 0:
            refused = check_archive(r, session)
            if refused is not None:
                return refused
            incoming = f"{r.deploymentPath}/incoming/{r.fileName}"
            pushed = push_artifact(r.artifact, session, incoming)
            if not pushed.ok:
                return pushed
            res = conn.run(
                install_script(r, incoming), timeout=session.timeout, on_output=out.write
            )
            if res.exit_code != 0:
                return Outcome.failed(
                    f"could not unpack release {r.version} into {r.releasesDirectory}",
                    exit_code=res.exit_code,
                )
        else:
            out.write(
                "stdout", f"release {r.version} is already on {host.name}: nothing to fetch\n"
            )
        res = conn.run(switch_script(r), timeout=session.timeout)
        if res.exit_code != 0:
            return Outcome.failed(
                f"could not switch {r.current} to release {r.version}: {res.stderr.strip()[-300:]}",
                exit_code=res.exit_code,
            )
        listed = next(
            (line for line in res.stdout.splitlines() if line.startswith("RELEASES ")), "RELEASES "
        )
        out.write("stdout", f"{r.current} -> {r.currentTarget}\n")
        return Outcome(outputs={RELEASES_OUTPUT: " ".join(listed.split()[1:])})

    def describe(self, shown: Mapping[str, Any]) -> list[str]:
        return [
            f"[{shown['identifier']}] release {shown['version']} ({shown['source']}) into "
            f"{shown['releasesDirectory']}/{shown['version']}, keeping the newest "
            f"{shown['keep']}",
            f"  {shown['current']} -> {shown['currentTarget']}",
        ]
