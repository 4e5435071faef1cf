"""DownloadArtifact: the host fetches the service's artifact itself (for hosts that reach the
repository), and verifies its sha256 when the source gives one.

```yaml
- identifier: fetch
  type: DownloadArtifact
  spec:
    destinationPath: /opt/web/incoming     # a directory: the file keeps its name
```

HTTP(S) sources (Http, Artifactory, Nexus3Registry, Jenkins): the worker resolves the secrets
the spec names and writes the URL and its credentials as a curl config; AmazonS3: the worker
makes a presigned URL valid for 15 minutes. The config travels in that one command's
environment (``VMFARM_CURL_CONFIG``, not exported to curl) and reaches curl on its stdin
(``curl -K -``, fed by bash's own ``printf``), so no process's argv on the host shows a URL, a
token or a password. The script holds none of them, so ``vmfarm plan`` shows it whole. The
step's environmentVariables reach curl (``CURL_CA_BUNDLE``, ``https_proxy``, ...).

The host verifies the file against spec.sha256 (or spec.checksum); a remote artifact without
one is refused at load unless its spec says ``allowUnverified: true``.
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
    from app.artifacts.httpfetch import HttpAuth

PRESIGNED_SECONDS = 900
CONFIG_VAR = "VMFARM_CURL_CONFIG"


@dataclass(frozen=True, kw_only=True)
class RenderedDownload(Rendered):
    source: str  # where the host fetches from: no credentials, no token, no query string
    destination: str  # the file on the host
    checksum: str | None  # verified on the host when the source gives one
    script: str  # what the host runs (curl's config comes in its environment, then on stdin)
    fileName: str = field(repr=False, compare=False, metadata=HIDDEN)
    resolved: Resolved | None = field(default=None, repr=False, compare=False, metadata=HIDDEN)


def download_script(remote: str, *, checksum: str | None) -> str:
    """curl into ``remote``.part, then rename: a file is whole or absent. curl reads its URL
    and credentials from stdin (``-K -``), never from its command line."""
    q = shlex.quote(remote)
    script = (
        f'set -e\nexport -n {CONFIG_VAR}\nmkdir -p "$(dirname {q})"\n'
        f"printf '%s\\n' \"${CONFIG_VAR}\" | curl -fsSL --retry 3 -K - -o {q}.part\n"
        f"mv {q}.part {q}\n"
    )
    if checksum:
        from app.artifacts import verify_remote_command

        script += verify_remote_command(remote, checksum) + "\n"
    return script


def _quoted(name: str, value: str) -> str:
    """One curl config line ``name = "value"`` (curl's escapes); no line breaks."""
    if any(c in value for c in "\r\n\0"):
        raise ValueError(f"the artifact's {name} holds a line break")
    return f'{name} = "' + value.replace("\\", "\\\\").replace('"', '\\"') + '"\n'


def curl_config(url: str, auth: HttpAuth | None = None) -> str:
    """What curl reads on stdin: the URL, and the header or user that authenticates."""
    out = _quoted("url", url)
    if auth is not None and auth.token:
        out += _quoted("header", f"Authorization: Bearer {auth.token}")
    elif auth is not None and auth.username is not None:
        out += _quoted("user", f"{auth.username}:{auth.password or ''}")
    return out


@register
class DownloadArtifact(UnitType[DownloadArtifactUnit, RenderedDownload]):
    type = "DownloadArtifact"

    def render(self, unit: DownloadArtifactUnit, scope: Scope) -> RenderedDownload:
        from app.artifacts import resolve

        # On the worker a secret the source names must be there; for plan it comes later.
        r = resolve(scope.artifact_json, require_secrets=scope.secrets)
        remote = destination(unit.spec.destination_path, scope)
        problem = (
            None
            if r.kind in ("http", "s3")
            else (
                f"DownloadArtifact cannot fetch a {r.type} artifact on the host; use Copy or "
                "Release (the worker fetches it)"
            )
        )
        return RenderedDownload(
            identifier=unit.identifier,
            type=self.type,
            problem=problem,
            source=r.source,
            destination=remote,
            checksum=r.expected,
            script=download_script(remote, checksum=r.expected),
            fileName=scope.file_name,
            resolved=r,
        )

    def run(self, rendered: RenderedDownload, session: HostSession) -> Outcome:
        r = rendered.resolved
        if rendered.problem or r is None:
            return Outcome.failed(rendered.problem or "the artifact was not resolved")
        if r.kind == "s3":
            import boto3

            from app.artifacts.s3 import endpoint_url

            keys = (
                {"aws_access_key_id": r.aws_keys[0], "aws_secret_access_key": r.aws_keys[1]}
                if r.aws_keys
                else {}
            )  # an Aws connector's, resolved on this worker
            client = boto3.client("s3", region_name=r.region, endpoint_url=endpoint_url(), **keys)
            config = curl_config(
                client.generate_presigned_url(
                    "get_object",
                    Params={"Bucket": r.bucket, "Key": r.key},
                    ExpiresIn=PRESIGNED_SECONDS,
                )
            )
        else:
            try:
                config = curl_config(str(r.url), r.auth)
            except ValueError as exc:
                return Outcome.failed(f"cannot download {rendered.fileName}: {exc}")
        env = {**session.env, CONFIG_VAR: config}
        host = session.host
        session.out.write(
            "stdout", f"downloading {rendered.fileName} ({r.source}) on {host.name}\n"
        )
        res = session.conn.run(
            rendered.script, env=env, timeout=session.timeout, on_output=session.out.write
        )
        if res.exit_code != 0:
            return Outcome.failed(
                f"{host.name} could not download {rendered.fileName} from "
                f"{r.source} (exit {res.exit_code})",
                exit_code=res.exit_code,
            )
        return Outcome()

    def describe(self, shown: Mapping[str, Any]) -> list[str]:
        check = (
            f"sha256 {shown['checksum']} checked"
            if shown.get("checksum")
            else "no checksum from the source: not verified"
        )
        return [
            f"[{shown['identifier']}] download {shown['source']} -> {shown['destination']}"
            f" (by the host, {check}):",
            *(f"  {line}" for line in str(shown["script"]).rstrip("\n").splitlines()),
        ]
