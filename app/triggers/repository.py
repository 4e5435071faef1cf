"""What an artifact trigger's repository holds now: its builds, oldest first.

``builds(artifact, connector)`` asks the repository once, with the connector's server URL and
credentials (secrets resolved here, through app.secrets, as the worker that fetches resolves
them; none is kept or shown), through the clients app.artifacts downloads with:

    AmazonS3             ListObjectsV2 of the bucket (below the regex's literal prefix); the
                         keys the whole of filePathRegex matches (RE2); newest by LastModified
    ArtifactoryRegistry  the File List API, GET <server>/api/storage/<repository>/<directory>
                         ?list&deep=0&listFolders=0: the folder's files, newest by lastModified
    Nexus3Registry       the search API, GET <server>/service/rest/v1/search?repository=...
                         with maven.groupId, maven.artifactId (maven.extension,
                         maven.classifier) or group (raw), every page (continuationToken)

Each build is ``(build, modified)``; the eventConditions choose among them. Errors are
ArtifactError's messages (no credential in them).
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any
from urllib.parse import quote, urlencode

from app.artifacts.errors import ArtifactError
from app.triggers.artifact import CONNECTOR_TYPES, EventCondition

# The most builds one poll reads (a bucket of a million keys is not listed to its end).
MAX_BUILDS = 10_000
MAX_PAGES = 100


@dataclass(frozen=True)
class Build:
    build: str
    modified: str = ""  # ISO 8601 when the repository says, else ""


def matches(conditions: list[EventCondition], build: str) -> bool:
    """Every eventCondition holds for ``build``."""
    from app.triggers.webhook import holds

    return all(holds(c.operator, build, c.value) for c in conditions)


def newest(found: list[Build]) -> Build | None:
    """The newest build (by its time, else the last the repository listed)."""
    if not found:
        return None
    return max(enumerate(found), key=lambda ib: (ib[1].modified, ib[0]))[1]


def connector_fields(connector: Any, atype: str, what: str) -> dict[str, str]:
    """The artifact spec fields a stored connector gives (as app.definitions.connectors
    writes them into a plan): a server URL as baseUrl and credentials by secret id, or an Aws
    connector's keys. ArtifactError when it is of the wrong type."""
    if connector is None:
        return {}
    want = CONNECTOR_TYPES[atype]
    if connector.type != want:
        raise ArtifactError(
            f"{what}: its connector is of type {connector.type}; a {atype} trigger takes "
            f"{'an' if want[0] in 'AEIOU' else 'a'} {want} connector"
        )
    out: dict[str, str] = {}
    if want == "Aws":
        cred = connector.spec.credential
        if cred.type == "ManualConfig" and cred.spec is not None:
            out["accessKey"] = (
                cred.spec.access_key
                if cred.spec.access_key is not None
                else f'<+secrets.getValue("{cred.spec.access_key_ref}")>'
            )
            out["secretKeyRef"] = cred.spec.secret_key_ref
        return out
    conn = connector.spec
    out["baseUrl"] = conn.url().rstrip("/")
    if conn.auth.type == "UsernamePassword" and conn.auth.spec is not None:
        a = conn.auth.spec
        out["username"] = (
            a.username if a.username is not None else f'<+secrets.getValue("{a.username_ref}")>'
        )
        out["passwordRef"] = a.password_ref
    return out


def _literal_prefix(pattern: str) -> str:
    """The characters every key the regex matches starts with (for ListObjectsV2's Prefix)."""
    out = []
    i = 0
    while i < len(pattern):
        c = pattern[i]
        if c == "\\" and i + 1 < len(pattern) and pattern[i + 1] in "./-_":
            out.append(pattern[i + 1])
            i += 2
            continue
        if c in ".^$*+?{}[]()|\\":
            break
        out.append(c)
        i += 1
    # a quantifier applies to the character before it: that one is not certain
    if i < len(pattern) and pattern[i] in "*?{" and out:
        out.pop()
    return "".join(out)


def _http(atype: str, fields: Mapping[str, str], url: str, what: str) -> Any:
    """An HttpSource for ``url`` with the connector's credentials (https only with them)."""
    from app.artifacts.httpfetch import HttpSource
    from app.artifacts.sources import resolve

    vm_type = "Artifactory" if atype == "ArtifactoryRegistry" else "Nexus3Registry"
    spec = {k: v for k, v in fields.items() if k != "baseUrl"} | {"url": url}
    src = resolve({"type": vm_type, "spec": spec})
    assert src.url is not None
    return HttpSource(src.url, src.auth, what, attempts=2)


def builds(artifact: Any, connector: Any, what: str) -> list[Build]:
    """The builds the repository holds now (see the module docstring)."""
    from app.artifacts.errors import ArtifactAuthError

    try:
        return _builds(artifact, connector, what)
    except ArtifactAuthError as exc:  # the credentials are the connector's, not a spec's
        message = str(exc).replace(
            "set spec.username and spec.passwordRef, or a token",
            "give the trigger's connector credentials (auth: UsernamePassword)",
        )
        raise ArtifactAuthError(message, artifact=what) from None


def _builds(artifact: Any, connector: Any, what: str) -> list[Build]:
    spec = artifact.spec
    fields = connector_fields(connector, artifact.type, what)
    if artifact.type == "AmazonS3":
        return _s3(spec, fields, what)
    base = fields.get("baseUrl")
    if not base:
        raise ArtifactError(f"{what}: connectorRef names no connector with a server URL")
    if artifact.type == "ArtifactoryRegistry":
        return _artifactory(spec, fields, base, what)
    return _nexus(spec, fields, base, what)


def _s3(spec: Any, fields: Mapping[str, str], what: str) -> list[Build]:
    from app.artifacts.s3 import S3Source
    from app.artifacts.sources import resolve
    from app.definitions.expressions import compile_input_regex

    src = resolve(
        {
            "type": "AmazonS3",
            "spec": {"bucket": spec.bucket_name, "key": "-", "region": spec.region, **fields},
        }
    )
    s3 = S3Source(spec.bucket_name, "", src.region, what, keys=src.aws_keys)
    regex = compile_input_regex(spec.file_path_regex)
    found = s3.objects(_literal_prefix(spec.file_path_regex), MAX_BUILDS)
    return [Build(k, m) for k, m in found if regex.fullmatch(k)]


def _artifactory(spec: Any, fields: Mapping[str, str], base: str, what: str) -> list[Build]:
    path = "/".join(
        quote(seg, safe="-._~")
        for seg in [spec.repository, *spec.artifact_directory.split("/")]
        if seg
    )
    url = f"{base}/api/storage/{path}?list&deep=0&listFolders=0"
    data = _http("ArtifactoryRegistry", fields, url, what).get_json(url)
    files = data.get("files") if isinstance(data, dict) else None
    if not isinstance(files, list):
        raise ArtifactError(f"{what}: Artifactory's file list has no 'files'")
    out = []
    for f in files[:MAX_BUILDS]:
        if not isinstance(f, dict) or f.get("folder"):
            continue
        name = str(f.get("uri") or "").lstrip("/")
        if name and "/" not in name:
            out.append(Build(name, str(f.get("lastModified") or "")))
    return out


def _nexus(spec: Any, fields: Mapping[str, str], base: str, what: str) -> list[Build]:
    query: dict[str, str] = {"repository": spec.repository}
    if spec.repository_format == "maven":
        query["maven.groupId"] = spec.group_id
        query["maven.artifactId"] = spec.artifact_id
        if spec.extension:
            query["maven.extension"] = spec.extension.lstrip(".")
        if spec.classifier:
            query["maven.classifier"] = spec.classifier
    else:
        query["group"] = "/" + spec.group.strip("/")
    client = None
    token: str | None = None
    seen: dict[str, Build] = {}
    for _ in range(MAX_PAGES):
        url = f"{base}/service/rest/v1/search?" + urlencode(
            {**query, **({"continuationToken": token} if token else {})}
        )
        client = client or _http("Nexus3Registry", fields, url, what)
        data = client.get_json(url)
        items = data.get("items") if isinstance(data, dict) else None
        if not isinstance(items, list):
            raise ArtifactError(f"{what}: Nexus's search answer has no 'items'")
        for item in items:
            if not isinstance(item, dict):
                continue
            build = _nexus_build(spec, item)
            if not build:
                continue
            raw = item.get("assets")
            assets: list[Any] = raw if isinstance(raw, list) else []
            modified = max(
                (str(a.get("lastModified") or "") for a in assets if isinstance(a, dict)),
                default="",
            )
            if build not in seen or modified > seen[build].modified:
                seen[build] = Build(build, modified)
        token = data.get("continuationToken")
        if not token or len(seen) >= MAX_BUILDS:
            break
    return list(seen.values())


def _nexus_build(spec: Any, item: Mapping[str, Any]) -> str | None:
    if spec.repository_format == "maven":
        version = item.get("version")
        return str(version) if version else None
    name = str(item.get("name") or "")
    group = spec.group.strip("/")
    rest = re.sub(rf"^/?{re.escape(group)}/", "", name) if group else name.lstrip("/")
    return rest or None


__all__ = ["Build", "builds", "connector_fields", "matches", "newest"]
