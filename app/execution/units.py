"""The command units as the worker runs them (Setup, Copy, DownloadArtifact, Release and the
output trap of Script units).
"""

from __future__ import annotations

import re
from typing import Any

from app.canvas import HostStepKey
from app.connectors.base import Connector
from app.definitions.expressions import Binder, Context, render
from app.errors import HostError
from app.execution.logs import OUTPUT_MARK, LogSink
from app.models import Status
from app.providers.base import Host


def with_secrets(text: str, *, bind: Binder | None = None) -> str:
    """Resolve ``<+secrets.getValue("id")>`` here, on the worker that runs the step; with
    ``bind`` (a script) each value becomes an environment variable of the command."""
    from app.secrets import has_refs, substitute

    if not has_refs(text):
        return text
    out, _ = substitute(text, bind=bind)
    return out


def in_unit(unit: dict[str, Any], fn: Any, *args: Any, **kwargs: Any) -> Any:
    """Call ``fn``; a host error it raises names the unit it happened in."""
    try:
        return fn(*args, **kwargs)
    except HostError as exc:
        exc.unit = exc.unit or unit["identifier"]
        raise


def setup_script(unit: dict[str, Any], ctx: Context) -> str:
    """mkdir -p each runtime path; chown and chmod when asked."""
    import shlex

    spec = unit["spec"]
    paths = " ".join(shlex.quote(render(str(p), ctx)) for p in spec["paths"])
    lines = ["set -e", f"mkdir -p {paths}"]
    if spec.get("owner"):
        lines.append(f"chown {shlex.quote(str(spec['owner']))} {paths}")
    if spec.get("mode"):
        lines.append(f"chmod {shlex.quote(str(spec['mode']))} {paths}")
    lines.append(f"ls -ld {paths}")
    return "\n".join(lines) + "\n"


def fetch_artifact(key: HostStepKey, artifact: dict[str, Any]) -> Any:
    """The artifact in this worker's cache: fetched once per execution, checksum verified."""
    from app.artifacts import fetch

    return fetch(artifact, execution_id=key.execution)


def push_artifact(key: HostStepKey, artifact: dict[str, Any], conn: Connector, host: Host,
                   remote: str, sink: LogSink, timeout: float) -> dict[str, Any] | None:
    """Copy the artifact to ``remote`` over SFTP and verify its checksum there; None when it
    landed intact, else the failure's fields."""
    from app.artifacts import verify_remote_command

    got = fetch_artifact(key, artifact)
    sink.write("stdout", f"copying {artifact['fileName']} ({got.source}, sha256 {got.sha256}"
                         f"{'' if got.verified else ', not verified at the source'}) to "
                         f"{host.name}:{remote}\n")
    conn.put(str(got.path), remote)
    res = conn.run(verify_remote_command(remote, got.sha256), timeout=timeout,
                   on_output=sink.write)
    if res.exit_code != 0:
        return {"status": Status.FAILED, "error_class": "Unknown", "exit_code": res.exit_code,
                "error": f"checksum mismatch on {host.name}: {artifact['fileName']} from "
                         f"{got.source} is not sha256 {got.sha256} there"}
    return None


def download_on_host(artifact: dict[str, Any], conn: Connector, host: Host, remote: str,
                      sink: LogSink, timeout: float) -> dict[str, Any] | None:
    """The host fetches the artifact itself; credentials travel only in this command's
    environment; the checksum (when the source gives one) is verified on the host."""
    import shlex

    from app.artifacts.sources import resolve

    r = resolve(artifact)
    env: dict[str, str] = {}
    if r.kind == "s3":
        import boto3

        from app.artifacts.s3 import endpoint_url

        client = boto3.client("s3", region_name=r.region, endpoint_url=endpoint_url())
        env["VMFARM_URL"] = client.generate_presigned_url(
            "get_object", Params={"Bucket": r.bucket, "Key": r.key}, ExpiresIn=900)
        auth = ""
    elif r.kind == "http":
        env["VMFARM_URL"] = str(r.url)
        auth = ""
        if r.auth.token:
            env["VMFARM_AUTH"] = f"Authorization: Bearer {r.auth.token}"
            auth = ' -H "$VMFARM_AUTH"'
        elif r.auth.username:
            env["VMFARM_AUTH"] = f"{r.auth.username}:{r.auth.password or ''}"
            auth = ' -u "$VMFARM_AUTH"'
    else:
        return {"status": Status.FAILED, "error_class": "Unknown",
                "error": f"DownloadArtifact cannot fetch a {r.type} artifact on the host; use "
                         "Copy or Release (the worker fetches it)"}
    q = shlex.quote(remote)
    script = (f"set -e\nmkdir -p \"$(dirname {q})\"\n"
              f"curl -fsSL --retry 3{auth} -o {q}.part \"$VMFARM_URL\"\nmv {q}.part {q}\n")
    if r.expected:
        from app.artifacts import verify_remote_command

        script += verify_remote_command(remote, r.expected) + "\n"
    sink.write("stdout", f"downloading {artifact['fileName']} ({r.source}) on {host.name}\n")
    res = conn.run(script, env=env, timeout=timeout, on_output=sink.write)
    if res.exit_code != 0:
        return {"status": Status.FAILED, "error_class": "Unknown", "exit_code": res.exit_code,
                "error": f"{host.name} could not download {artifact['fileName']} from "
                         f"{r.source} (exit {res.exit_code})"}
    return None


def release(key: HostStepKey, artifact: dict[str, Any], unit: dict[str, Any], ctx: Context,
             conn: Connector, host: Host, sink: LogSink, timeout: float) -> dict[str, Any]:
    """Install the artifact as releases/<version>, switch ``current`` atomically, keep the
    last N. Nothing is fetched when the host already holds that release."""
    import shlex

    base = render(unit["spec"]["deploymentPath"], ctx).rstrip("/")
    version = str(artifact.get("tag") or "")
    if not re.fullmatch(r"[A-Za-z0-9._+-]+", version):
        return {"status": Status.FAILED, "error_class": "Unknown",
                "error": f"version {version!r} cannot name a release directory"}
    keep = int(unit["spec"].get("keep", 3))
    b, v = shlex.quote(base), shlex.quote(version)
    has = conn.run(f"test -d {b}/releases/{v} && test -e {b}/releases/{v}/.vmfarm-release",
                   timeout=timeout)
    if has.exit_code != 0:
        incoming = f"{base}/incoming/{artifact['fileName']}"
        problem = push_artifact(key, artifact, conn, host, incoming, sink, timeout)
        if problem:
            return problem
        i = shlex.quote(incoming)
        unpack = (f"tar -xzf {i} -C \"$tmp\"" if str(artifact["fileName"]).endswith(
            (".tar.gz", ".tgz")) else f"cp {i} \"$tmp\"/")
        install = (f"set -e\nmkdir -p {b}/releases\ntmp=$(mktemp -d {b}/releases/.{v}.XXXX)\n"
                   f"{unpack}\necho {v} > \"$tmp\"/.vmfarm-release\n"
                   f"rm -rf {b}/releases/{v}\nmv \"$tmp\" {b}/releases/{v}\nrm -f {i}\n")
        res = conn.run(install, timeout=timeout, on_output=sink.write)
        if res.exit_code != 0:
            return {"status": Status.FAILED, "error_class": "Unknown", "exit_code": res.exit_code,
                    "error": f"could not unpack release {version} into {base}/releases"}
    else:
        sink.write("stdout", f"release {version} is already on {host.name}: nothing to fetch\n")
    # ln + rename: `current` always points at a whole release, never at nothing.
    switch = (f"set -e\ncd {b}\nln -sfn releases/{v} .current.$$\nmv -T .current.$$ current\n"
              f"ls -1t releases | grep -v '^[.]' | tail -n +{keep + 1} | while read -r old; do "
              f"[ \"$old\" = {v} ] || rm -rf \"releases/$old\"; done\n"
              f"echo \"RELEASES $(ls -1t releases | grep -v '^[.]' | tr '\\n' ' ')\"\n")
    res = conn.run(switch, timeout=timeout)
    if res.exit_code != 0:
        return {"status": Status.FAILED, "error_class": "Unknown", "exit_code": res.exit_code,
                "error": f"could not switch {base}/current to release {version}: "
                         f"{res.stderr.strip()[-300:]}"}
    listed = next((line for line in res.stdout.splitlines() if line.startswith("RELEASES ")),
                  "RELEASES ")
    sink.write("stdout", f"{base}/current -> releases/{version}\n")
    return {"status": Status.SUCCEEDED, "releases": listed.split()[1:]}


def with_output_trap(script: str, outputs: list[dict[str, Any]]) -> str:
    """Print the output variables the script set when it ends, however it ends.

    Only variables the unit actually set are printed, so a later unit of the step does not
    overwrite an earlier unit's value with nothing.
    """
    parts = []
    for o in outputs:
        var = str(o.get("value") or o["name"])
        if not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", var):
            continue
        parts.append(f'[ -n "${{{var}+x}}" ] && printf "%s{o["name"]}=%s\\n" '
                     f'"{OUTPUT_MARK}" "$(printf %s "${{{var}}}" | base64 -w0)"')
    trap = "__vmfarm_out() { " + "; ".join([*parts, "true"]) + "; }\ntrap __vmfarm_out EXIT\n"
    return trap + script
