"""DownloadArtifact: the host fetches the service's artifact itself (for hosts that reach the
repository), and verifies its sha256 when the source gives one.

```yaml
- identifier: fetch
  type: DownloadArtifact
  spec:
    destinationPath: /opt/web/incoming     # a directory: the file keeps its name
```

HTTP(S) sources (Http, Artifactory, Nexus3Registry, Jenkins): the URL and its credentials
travel only in that one command's environment. AmazonS3: the worker makes a presigned URL
valid for 15 minutes. The script itself holds neither, so ``vmfarm plan`` shows it whole.
"""

from __future__ import annotations

import shlex
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from app.definitions.models import DownloadArtifactUnit
from app.units.base import HIDDEN, HostSession, Outcome, Rendered, Scope, UnitType, register
from app.units.copy import destination

if TYPE_CHECKING:
    from app.artifacts import Resolved

PRESIGNED_SECONDS = 900


@dataclass(frozen=True, kw_only=True)
class RenderedDownload(Rendered):
    source: str  # where the host fetches from: no credentials, no token, no query string
    destination: str  # the file on the host
    checksum: str | None  # verified on the host when the source gives one
    script: str  # what the host runs ($VMFARM_URL and $VMFARM_AUTH come in its environment)
    fileName: str = field(repr=False, compare=False, metadata=HIDDEN)
    resolved: Resolved | None = field(default=None, repr=False, compare=False,
                                      metadata=HIDDEN)


def download_script(remote: str, *, auth: str, checksum: str | None) -> str:
    """curl into ``remote``.part, then rename: a file is whole or absent."""
    q = shlex.quote(remote)
    flag = {"token": ' -H "$VMFARM_AUTH"', "basic": ' -u "$VMFARM_AUTH"'}.get(auth, "")
    script = (f"set -e\nmkdir -p \"$(dirname {q})\"\n"
              f"curl -fsSL --retry 3{flag} -o {q}.part \"$VMFARM_URL\"\nmv {q}.part {q}\n")
    if checksum:
        from app.artifacts import verify_remote_command

        script += verify_remote_command(remote, checksum) + "\n"
    return script


@register
class DownloadArtifact(UnitType[DownloadArtifactUnit, RenderedDownload]):
    type = "DownloadArtifact"

    def render(self, unit: DownloadArtifactUnit, scope: Scope) -> RenderedDownload:
        from app.artifacts import resolve

        # On the worker a secret the source names must be there; for plan it comes later.
        r = resolve(scope.artifact_json, require_secrets=scope.secrets)
        remote = destination(unit.spec.destination_path, scope)
        auth = "token" if r.auth.token else "basic" if r.auth.username else ""
        problem = None if r.kind in ("http", "s3") else (
            f"DownloadArtifact cannot fetch a {r.type} artifact on the host; use Copy or "
            "Release (the worker fetches it)")
        return RenderedDownload(
            identifier=unit.identifier, type=self.type, problem=problem, source=r.source,
            destination=remote, checksum=r.expected,
            script=download_script(remote, auth=auth, checksum=r.expected),
            fileName=scope.file_name, resolved=r)

    def run(self, rendered: RenderedDownload, session: HostSession) -> Outcome:
        r = rendered.resolved
        if rendered.problem or r is None:
            return Outcome.failed(rendered.problem or "the artifact was not resolved")
        env: dict[str, str] = {}
        if r.kind == "s3":
            import boto3

            from app.artifacts.s3 import endpoint_url

            client = boto3.client("s3", region_name=r.region, endpoint_url=endpoint_url())
            env["VMFARM_URL"] = client.generate_presigned_url(
                "get_object", Params={"Bucket": r.bucket, "Key": r.key},
                ExpiresIn=PRESIGNED_SECONDS)
        else:
            env["VMFARM_URL"] = str(r.url)
            if r.auth.token:
                env["VMFARM_AUTH"] = f"Authorization: Bearer {r.auth.token}"
            elif r.auth.username:
                env["VMFARM_AUTH"] = f"{r.auth.username}:{r.auth.password or ''}"
        host = session.host
        session.out.write("stdout", f"downloading {rendered.fileName} ({r.source}) on "
                                    f"{host.name}\n")
        res = session.conn.run(rendered.script, env=env, timeout=session.timeout,
                               on_output=session.out.write)
        if res.exit_code != 0:
            return Outcome.failed(f"{host.name} could not download {rendered.fileName} from "
                                  f"{r.source} (exit {res.exit_code})", exit_code=res.exit_code)
        return Outcome()

    def describe(self, shown: Mapping[str, Any]) -> list[str]:
        check = f"sha256 {shown['checksum']} checked" if shown.get("checksum") else \
            "no checksum from the source: not verified"
        return [f"[{shown['identifier']}] download {shown['source']} -> {shown['destination']}"
                f" (by the host, {check}):",
                *(f"  {line}" for line in str(shown["script"]).rstrip("\n").splitlines())]
