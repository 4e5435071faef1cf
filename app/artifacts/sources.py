"""Where an artifact version comes from, and fetching it once into the cache, verified.

``fetch(artifact)`` takes the plan's artifact dict (``{"type", "spec", "tag", "fileName"}``)::

    Local            spec.path: a file (copied into the cache) or a folder (packed reproducibly
                     into a .tar.gz, see app.artifacts.pack)
    Http             spec.url
    Artifactory      spec.url, or spec.baseUrl (the server URL with its context, e.g.
                     https://acme.jfrog.io/artifactory) + spec.repository + the path below
    Nexus3Registry   spec.url, or spec.baseUrl + "/repository/" + spec.repository + the path
    Jenkins          spec.url, or spec.baseUrl + /job/<jobName, one job/ per folder>/<build>
                     /artifact/<artifactPath>; build = spec.build or the tag
    AmazonS3         spec.bucket (or bucketName) + spec.key (or filePath), spec.region; with an
                     Aws connector (ManualConfig) spec.accessKey + spec.secretKeyRef, written in
                     by the loader and resolved here
    CustomArtifact   refused: use Http or AmazonS3

Artifactory without spec.repository reads the first segment of artifactPath as the
repository (Artifactory's own URLs are ``<server>/<repository>/<path>``): the reference's
``artifactPath: /apps/web-app/`` is the folder ``web-app`` of the repository ``apps``.

The repository path (Artifactory and Nexus) is, in this order:

- maven layout when spec.groupId and spec.artifactId are set (also under a nested ``spec``, as
  Harness writes Nexus): ``g/r/o/u/p/<artifactId>/<tag>/<artifactId>-<tag>[-<classifier>].<ext>``
  (spec.extension, default jar);
- else spec.artifactDirectory (or spec.group) joined with spec.artifactPath; an artifactPath
  ending in "/" is a directory (``artifactPath: /apps/web-app/``), and the file in it is
  spec.fileName, or else the tag itself (Harness's generic repositories list files as tags).

In every template ``<+artifact.tag>``, ``<+artifacts.primary.tag>``, ``<tag>`` and ``{tag}``
become the tag (URL-quoted in URLs). ``connectorRef`` is resolved by the loader
(app.definitions.connectors): the plan's spec holds the connector's server URL as baseUrl (or
url) and its credentials as username and passwordRef.

Authentication (HTTP types): a bearer token or basic (a username and a password). Secrets are
named, never written: ``spec.passwordRef`` / ``spec.tokenRef`` hold a secret id, and
``spec.password`` / ``spec.token`` (and ``spec.username``) may hold ``<+secrets.getValue("id")>``.
They are resolved by ``fetch`` (and DownloadArtifact's worker side) through app.secrets, on the
worker that fetches, so the plan and every SQL row keep only the reference; a secret that cannot
be resolved fails the fetch (ArtifactAuthError) naming its id. ``credentials`` passed to
``fetch`` (values already resolved) win over the spec. The loader refuses a password or token
written in the file (app.definitions.schemas). Credentials are sent over https only: an http://
URL with credentials is refused before anything is fetched. S3 uses boto3's credential chain and
``AWS_ENDPOINT_URL(_S3)``.

Checksums: spec.sha256, or spec.checksum ``sha256:<hex>``; else, what the repository publishes:
Artifactory's ``X-Checksum-Sha256`` header (HEAD, or on the download), a sibling
``<url>.sha256`` file (first token), S3's ChecksumSHA256 / ``sha256`` metadata /
``<key>.sha256``. A mismatch raises ChecksumError and the bytes are discarded. A remote artifact
with no checksum anywhere is refused (ArtifactError, the bytes discarded) unless its spec says
``allowUnverified: true``; then the computed sha256 is recorded and ``Fetched.verified`` is
False. Local artifacts are hashed here and need none.

Caching and concurrency: see app.artifacts.cache. Within one execution a (source, tag) is
fetched once however many hosts, threads or worker processes on the machine ask; a later
execution reuses a cached file only when the checksum is known before downloading and the file
still matches it.

Credentials never appear in ``Fetched.source``, in errors or in logs (URLs are shown without
their user:password and query).
"""

from __future__ import annotations

import dataclasses
import logging
import os
import re
import shlex
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal
from urllib.parse import quote, urlsplit, urlunsplit

from app.artifacts.cache import ArtifactCache, cache_key, copy_hashing, sha256_file
from app.artifacts.errors import ArtifactAuthError, ArtifactError, ChecksumError
from app.artifacts.httpfetch import CHECKSUM_HEADER, SHA256_RE, HttpAuth, HttpSource
from app.artifacts.pack import pack_folder
from app.artifacts.s3 import S3Source, endpoint_url

log = logging.getLogger("vmfarm.artifacts")

TAG_PLACEHOLDERS = ("<+artifact.tag>", "<+artifacts.primary.tag>", "<tag>", "{tag}")
HTTP_TYPES = ("Http", "Artifactory", "Nexus3Registry", "Jenkins")
# The spec fields that give credentials (app.definitions.schemas lists them for the loader).
AUTH_FIELDS = ("username", "password", "token", "passwordRef", "tokenRef")
_URL_SAFE = "-._~+@:!$&'()*,;=%"


@dataclass(frozen=True)
class Credentials:
    """Resolved secrets for a repository; the repr shows none of them."""

    username: str | None = None
    password: str | None = field(default=None, repr=False)
    token: str | None = field(default=None, repr=False)


@dataclass(frozen=True)
class Fetched:
    """An artifact in the local cache.

    ``path`` is ``<cache>/<sha256>.<ext>``; ``source`` describes where it came from (no
    credentials); ``verified`` says the sha256 matched one from the spec or the repository
    (``checksum_from`` says which); ``from_cache`` that no bytes were fetched this time.
    """

    path: str
    sha256: str
    size: int
    source: str
    from_cache: bool
    verified: bool
    checksum_from: str | None = None
    ext: str = "bin"


@dataclass(frozen=True)
class Resolved:
    """An artifact dict turned into something to fetch (no network needed to build it)."""

    type: str
    kind: Literal["local", "http", "s3"]
    identity: str  # the cache key's source part: may hold a URL query, never logged
    source: str  # for people: no credentials, no query
    ext: str
    tag: str | None
    expected: str | None = None
    expected_from: str | None = None
    local_path: Path | None = None
    url: str | None = None
    auth: HttpAuth = field(default_factory=HttpAuth)
    bucket: str | None = None
    key: str | None = None
    region: str | None = None
    allow_unverified: bool = False  # spec.allowUnverified: no checksum anywhere is fine
    # S3: the Aws connector's keys (accessKey, secretKeyRef), resolved here; None: the worker's.
    aws_keys: tuple[str, str] | None = field(default=None, repr=False)


# --- reading the spec ----------------------------------------------------------------------------


def _field(spec: Mapping[str, Any], *names: str) -> str | None:
    """The first of ``names`` set in ``spec`` (or in a nested ``spec``, as Harness nests Nexus
    fields), as a string."""
    nested = spec.get("spec")
    for where in (spec, nested if isinstance(nested, Mapping) else {}):
        for name in names:
            value = where.get(name)
            if value is not None and str(value) != "":
                return str(value)
    return None


def _substitute(template: str, tag: str | None, what: str, *, url: bool = False) -> str:
    out = template
    for ph in TAG_PLACEHOLDERS:
        if ph in out:
            if not tag:
                raise ArtifactError(
                    f"{what}: {template!r} needs the artifact's tag, and it has none (spec.tag)"
                )
            out = out.replace(ph, quote(tag, safe=_URL_SAFE) if url else tag)
    if "<+" in out:
        raise ArtifactError(
            f"{what}: {template!r} holds an unresolved expression (a runtime "
            "input without a value?)"
        )
    return out


def _expected(spec: Mapping[str, Any], what: str) -> tuple[str | None, str | None]:
    for name in ("sha256", "checksum"):
        raw = _field(spec, name)
        if raw is None:
            continue
        algo, sep, digest = raw.strip().partition(":")
        if not sep:
            algo, digest = "sha256", algo
        if algo.lower() != "sha256" or not SHA256_RE.fullmatch(digest):
            raise ArtifactError(
                f"{what}: spec.{name} must be a sha256 (64 hex digits, "
                f"optionally prefixed 'sha256:'), got {raw[:80]!r}"
            )
        return digest.lower(), f"spec.{name}"
    return None, None


def extension(name: str) -> str:
    """``app-1.2.tar.gz`` -> ``tar.gz``; ``app.jar`` -> ``jar``; no usable suffix -> ``bin``."""
    name = name.lower()
    for multi in ("tar.gz", "tar.bz2", "tar.xz", "tar.zst"):
        if name.endswith("." + multi):
            return multi
    suffix = name.rsplit(".", 1)[1] if "." in name else ""
    return (
        suffix if re.fullmatch(r"[a-z0-9]*[a-z][a-z0-9]*", suffix) and len(suffix) <= 8 else "bin"
    )


def _join(*parts: str) -> list[str]:
    return [seg for part in parts for seg in part.split("/") if seg]


def _repo_path(spec: Mapping[str, Any], tag: str | None, what: str) -> list[str]:
    """The path segments inside the repository (see the module docstring), tag substituted."""
    group_id, artifact_id = _field(spec, "groupId"), _field(spec, "artifactId")
    if group_id and artifact_id:
        version = _substitute(_field(spec, "version") or "<tag>", tag, what)
        ext = (_field(spec, "extension") or "jar").lstrip(".")
        classifier = _field(spec, "classifier")
        name = f"{artifact_id}-{version}" + (f"-{classifier}" if classifier else "") + f".{ext}"
        return [*group_id.split("."), artifact_id, version, name]
    directory = _field(spec, "artifactDirectory", "group", "directory") or ""
    apath = _field(spec, "artifactPath") or ""
    if not apath or apath.endswith("/"):
        segs = _join(directory, apath, _field(spec, "fileName") or "<tag>")
    else:
        segs = _join(directory, apath)
    return [_substitute(s, tag, what) for s in segs]


def artifact_url(atype: str, spec: Mapping[str, Any], tag: str | None) -> str:
    """The URL of an Http, Artifactory, Nexus3Registry or Jenkins artifact (may hold
    user:password if the spec's URL does)."""
    what = f"{atype} artifact"
    url = _field(spec, "url", "artifactUrl")
    if url:
        return _substitute(url, tag, what, url=True)
    base = _field(
        spec, "baseUrl", "serverUrl", "artifactoryServerUrl", "nexusServerUrl", "jenkinsUrl"
    )
    if not base:
        ref = _field(spec, "connectorRef")
        raise ArtifactError(
            f"{what}: set spec.url, or spec.baseUrl with the repository fields"
            + (
                f" (connectorRef {ref!r} is not resolved here: the loader "
                "writes the connector's server URL into the plan)"
                if ref
                else ""
            )
        )
    server = urlsplit(_substitute(base, tag, what, url=True))

    def under_base(path: str) -> str:  # a query of the base URL stays a query, after the path
        return urlunsplit(
            (server.scheme, server.netloc, f"{server.path.rstrip('/')}/{path}", server.query, "")
        )

    if atype == "Http":
        raise ArtifactError(f"{what}: set spec.url")
    if atype == "Jenkins":
        job = _field(spec, "jobName")
        apath = _field(spec, "artifactPath")
        if not job or not apath:
            raise ArtifactError(
                f"{what}: spec.jobName and spec.artifactPath are required with spec.baseUrl"
            )
        build = _substitute(_field(spec, "build") or "<tag>", tag, what)
        jobs = "/".join("job/" + quote(seg, safe=_URL_SAFE) for seg in _join(job))
        path = "/".join(quote(_substitute(s, tag, what), safe=_URL_SAFE) for s in _join(apath))
        return under_base(f"{jobs}/{quote(build, safe=_URL_SAFE)}/artifact/{path}")
    repo = _field(spec, "repository", "repositoryName")
    if not repo and not (atype == "Artifactory" and _field(spec, "artifactPath")):
        raise ArtifactError(
            f"{what}: spec.repository is required with spec.baseUrl"
            + (
                " (or an artifactPath that starts with the repository)"
                if atype == "Artifactory"
                else ""
            )
        )
    segs = [*([_substitute(repo, tag, what)] if repo else []), *_repo_path(spec, tag, what)]
    prefix = "repository/" if atype == "Nexus3Registry" else ""
    return under_base(prefix + "/".join(quote(s, safe=_URL_SAFE) for s in segs))


def _credentials(value: Credentials | Mapping[str, str] | None) -> Credentials:
    if value is None:
        return Credentials()
    if isinstance(value, Credentials):
        return value
    return Credentials(
        username=value.get("username"), password=value.get("password"), token=value.get("token")
    )


def _resolved(text: str | None, what: str, where: str) -> str | None:
    """``text`` with its ``<+secrets.getValue("id")>`` resolved here, on the worker."""
    from app.secrets import SecretError, has_refs, substitute

    if text is None or not has_refs(text):
        return text
    try:
        out, _ = substitute(text)
    except SecretError as exc:  # names the id and the backend, never a value
        raise ArtifactAuthError(f"{what}: {where}: {exc}", artifact=what) from None
    return out


def _secret(secret_id: str, what: str, where: str) -> str:
    """The value of the secret ``where`` (spec.passwordRef, spec.tokenRef) names."""
    from app.secrets import SecretError
    from app.secrets import resolve as resolve_secrets

    try:
        return resolve_secrets([secret_id])[secret_id.strip()]
    except SecretError as exc:
        raise ArtifactAuthError(
            f"{what}: {where} {secret_id.strip()!r}: the secret cannot be "
            f"resolved on this worker: {exc}",
            artifact=what,
        ) from None


def names_credentials(spec: Mapping[str, Any], url: str | None = None) -> bool:
    """True when the spec (or the URL's user:password@) gives any credential."""
    return any(_field(spec, k) for k in AUTH_FIELDS) or bool(url and urlsplit(url).username)


def _http_auth(
    spec: Mapping[str, Any],
    creds: Credentials,
    url_user: str | None,
    url_password: str | None,
    what: str,
    *,
    require_secrets: bool,
) -> HttpAuth:
    """The credentials to send. With ``require_secrets`` (the worker that fetches) the secrets
    the spec names are resolved here; without (plan time) none is, and none is returned."""
    if creds.token:
        return HttpAuth(token=creds.token)
    if not require_secrets:
        return HttpAuth()
    if creds.password is None and not creds.username:
        token = _resolved(_field(spec, "token"), what, "spec.token")
        if not token and (token_ref := _field(spec, "tokenRef")):
            token = _secret(token_ref, what, "spec.tokenRef")
        if token:
            return HttpAuth(token=token)
    username = (
        creds.username or _resolved(_field(spec, "username"), what, "spec.username") or url_user
    )
    if not username:
        return HttpAuth()
    password = creds.password
    if password is None:
        password = _resolved(_field(spec, "password"), what, "spec.password")
    if password is None and (ref := _field(spec, "passwordRef")):
        password = _secret(ref, what, "spec.passwordRef")
    if password is None:
        password = url_password
    return HttpAuth(username=username, password=password)


def allow_unverified(spec: Mapping[str, Any]) -> bool:
    """``spec.allowUnverified: true``: a remote artifact without any checksum may deploy."""
    value = spec.get("allowUnverified")
    return value is True or str(value).lower() == "true"


def _describe_url(url: str) -> str:
    parts = urlsplit(url)
    host = parts.hostname or ""
    if ":" in host:
        host = f"[{host}]"
    netloc = host + (f":{parts.port}" if parts.port else "")
    return urlunsplit((parts.scheme, netloc, parts.path, "…" if parts.query else "", ""))


def resolve(
    artifact: Mapping[str, Any],
    credentials: Credentials | Mapping[str, str] | None = None,
    *,
    require_secrets: bool = True,
) -> Resolved:
    """What to fetch, from where, with which checksum; ArtifactError if the spec cannot say.

    Needs no network. With ``require_secrets`` (the worker that fetches) the secrets the spec
    names are resolved (ArtifactAuthError naming the one that cannot be); with
    ``require_secrets=False`` (plan time) none is, and ``auth`` is empty."""
    if not artifact or not artifact.get("type"):
        raise ArtifactError("the service has no artifact (artifacts.primary)")
    atype = str(artifact["type"])
    spec: Mapping[str, Any] = artifact.get("spec") or {}
    raw_tag = artifact.get("tag")
    if raw_tag is None or str(raw_tag) == "":
        raw_tag = spec.get("tag")
    tag = str(raw_tag) if raw_tag is not None and str(raw_tag) != "" else None
    what = f"{atype} artifact"
    expected, expected_from = _expected(spec, what)
    if atype == "Local":
        raw = _field(spec, "path", "filePath")
        if not raw:
            raise ArtifactError(f"{what}: spec.path is required")
        p = Path(_substitute(raw, tag, what)).expanduser().resolve()
        if p.is_dir():
            kind_name, ext = "folder", "tar.gz"
        elif p.is_file():
            kind_name, ext = "file", extension(p.name)
        else:
            raise ArtifactError(f"{what}: {p} does not exist on this worker", artifact=f"Local {p}")
        return Resolved(
            atype,
            "local",
            f"local:{p}",
            f"Local {kind_name} {p}",
            ext,
            tag,
            expected,
            expected_from,
            local_path=p,
        )
    if atype in HTTP_TYPES:
        url = artifact_url(atype, spec, tag)
        parts = urlsplit(url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ArtifactError(f"{what}: {_describe_url(url)!r} is not an http(s) URL")
        clean = urlunsplit(
            (parts.scheme, parts.netloc.rpartition("@")[2], parts.path, parts.query, "")
        )
        source = f"{atype} {_describe_url(clean)}"
        given = _credentials(credentials)
        if parts.scheme == "http" and (names_credentials(spec, url) or given != Credentials()):
            raise ArtifactError(
                f"{source}: credentials are sent over https only, and this URL "
                "is plain http (anyone on the way could read them): use an "
                "https:// URL",
                artifact=source,
            )
        auth = _http_auth(
            spec, given, parts.username, parts.password, source, require_secrets=require_secrets
        )
        return Resolved(
            atype,
            "http",
            clean,
            source,
            extension(parts.path.rsplit("/", 1)[-1]),
            tag,
            expected,
            expected_from,
            url=clean,
            auth=auth,
            allow_unverified=allow_unverified(spec),
        )
    if atype == "AmazonS3":
        bucket = _field(spec, "bucket", "bucketName")
        key_t = _field(spec, "key", "filePath", "artifactPath")
        if not bucket or not key_t:
            raise ArtifactError(
                f"{what}: spec.bucket and spec.key (or bucketName and filePath) are required"
            )
        key = _substitute(key_t, tag, what).lstrip("/")
        region = (
            _field(spec, "region")
            or os.environ.get("AWS_REGION")
            or os.environ.get("AWS_DEFAULT_REGION")
        )
        source = f"AmazonS3 s3://{bucket}/{key}" + (f" ({region})" if region else "")
        aws_keys = None
        if require_secrets and (ref := _field(spec, "secretKeyRef")):
            access = _resolved(_field(spec, "accessKey"), source, "spec.accessKey")
            aws_keys = (access or "", _secret(ref, source, "the connector's secretKeyRef"))
        identity = f"s3://{bucket}/{key}?region={region or ''}&endpoint={endpoint_url() or ''}"
        return Resolved(
            atype,
            "s3",
            identity,
            source,
            extension(key.rsplit("/", 1)[-1]),
            tag,
            expected,
            expected_from,
            bucket=bucket,
            key=key,
            region=region,
            allow_unverified=allow_unverified(spec),
            aws_keys=aws_keys,
        )
    if atype == "CustomArtifact":
        raise ArtifactError(
            f"{what}: CustomArtifact sources are not supported; use Http (spec.url) or AmazonS3"
        )
    raise ArtifactError(f"unknown artifact type {atype!r}")


def check(artifact: Mapping[str, Any]) -> list[str]:
    """Problems fetch would meet before any network (for the loader); [] when fine."""
    try:
        resolve(artifact, require_secrets=False)
    except ArtifactError as exc:
        return [exc.message]
    return []


def extension_of(artifact: Mapping[str, Any]) -> str:
    """The file extension the fetched artifact will have (``tar.gz``, ``jar``, ...)."""
    return resolve(artifact, require_secrets=False).ext


# --- fetching ------------------------------------------------------------------------------------


def default_cache_dir() -> Path:
    from app.settings import get_settings

    return get_settings().home_dir / "cache" / "artifacts"


def fetch(
    artifact: Mapping[str, Any],
    *,
    execution_id: str | None = None,
    credentials: Credentials | Mapping[str, str] | None = None,
    cache_dir: Path | str | None = None,
) -> Fetched:
    """The artifact as a verified file in the cache (see the module docstring).

    Raises ArtifactError (a TransferError) and its subclasses: ChecksumError,
    ArtifactAuthError, ArtifactAccessError, ArtifactUnavailableError.
    """
    src = resolve(artifact, credentials)
    cache = ArtifactCache(Path(cache_dir) if cache_dir is not None else default_cache_dir())
    key = cache_key(src.identity, src.tag)
    try:
        with cache.locked(key):
            if execution_id:
                entry = cache.index_get(execution_id, key)
                if entry is not None:
                    fields = {f.name for f in dataclasses.fields(Fetched)}
                    hit = Fetched(**{k: v for k, v in entry.items() if k in fields})
                    return dataclasses.replace(hit, from_cache=True)
            fetched = _obtain(src, cache)
            if execution_id:
                cache.index_put(execution_id, key, dataclasses.asdict(fetched))
    except OSError as exc:
        raise ArtifactError(
            f"artifact {src.source}: cannot use the artifact cache "
            f"{cache.root}: {exc.strerror or exc}",
            artifact=src.source,
        ) from None
    log.info(
        "artifact %s: %s, %d bytes, sha256 %s (%s)",
        src.source,
        "reused from the cache" if fetched.from_cache else "fetched",
        fetched.size,
        fetched.sha256,
        f"verified against {fetched.checksum_from}"
        if fetched.verified
        else "hashed here"
        if src.kind == "local"
        else "not verified: no checksum anywhere, and spec.allowUnverified is true",
    )
    return fetched


def forget_execution(execution_id: str, *, cache_dir: Path | str | None = None) -> None:
    """Drop an execution's index when it ends (its cached files stay)."""
    ArtifactCache(Path(cache_dir) if cache_dir is not None else default_cache_dir()).forget(
        execution_id
    )


def _obtain(src: Resolved, cache: ArtifactCache) -> Fetched:
    expected, expected_from = src.expected, src.expected_from
    http: HttpSource | None = None
    s3: S3Source | None = None
    if src.kind == "http":
        assert src.url is not None
        http = HttpSource(src.url, src.auth, src.source)
        if expected is None:
            expected = http.header_checksum()
            expected_from = CHECKSUM_HEADER if expected else None
        if expected is None:
            expected = http.sibling_checksum()
            expected_from = "<url>.sha256" if expected else None
    elif src.kind == "s3":
        assert src.bucket is not None and src.key is not None
        s3 = S3Source(src.bucket, src.key, src.region, src.source, keys=src.aws_keys)
        if expected is None:
            expected, expected_from = s3.checksum()
    if expected is None and src.kind == "s3" and not src.allow_unverified:
        raise ArtifactError(unverified_message(src), artifact=src.source)
    if (
        expected is not None
        and src.kind != "local"
        and (hit := cache.lookup(expected, src.ext)) is not None
    ):
        return Fetched(
            str(hit), expected, hit.stat().st_size, src.source, True, True, expected_from, src.ext
        )

    tmp = cache.tmp_path(src.ext)
    try:
        if src.kind == "local":
            assert src.local_path is not None
            if src.local_path.is_dir():
                pack_folder(src.local_path, tmp)
                digest, size = sha256_file(tmp), tmp.stat().st_size
            else:
                with src.local_path.open("rb") as fh_in, tmp.open("wb") as fh_out:
                    digest, size = copy_hashing(fh_in, fh_out)
        elif http is not None:
            digest, size, header = http.download(tmp)
            if expected is None and header:
                expected, expected_from = header, CHECKSUM_HEADER
        else:
            assert s3 is not None
            s3.download(tmp)
            digest, size = sha256_file(tmp), tmp.stat().st_size
        if expected is None and src.kind != "local" and not src.allow_unverified:
            raise ArtifactError(unverified_message(src), artifact=src.source)
        if expected is not None and digest != expected:
            raise ChecksumError(
                f"artifact {src.source}: sha256 mismatch: expected {expected} (from "
                f"{expected_from}), got {digest}; the download was discarded",
                artifact=src.source,
                expected=expected,
                actual=digest,
                checksum_from=expected_from or "",
            )
        path = cache.commit(tmp, digest, src.ext)
    finally:
        tmp.unlink(missing_ok=True)
    if expected is None and src.kind != "local":
        log.warning(
            "artifact %s: neither the spec nor the repository gives a checksum "
            "(spec.allowUnverified: true); recorded the computed sha256 %s",
            src.source,
            digest,
        )
    return Fetched(
        str(path), digest, size, src.source, False, expected is not None, expected_from, src.ext
    )


def unverified_message(src: Resolved) -> str:
    """Why a remote artifact without any checksum is refused, and how to fix it."""
    published = (
        "S3's ChecksumSHA256, a sha256 metadata entry or <key>.sha256"
        if src.kind == "s3"
        else f"{CHECKSUM_HEADER} or <url>.sha256"
    )
    return (
        f"artifact {src.source}: refused: no checksum from any source (the spec, or the "
        f"repository's {published}), so the bytes cannot be verified; set spec.sha256 "
        "(or spec.checksum: sha256:<hex>), publish a checksum in the repository, or write "
        "spec.allowUnverified: true to deploy it unverified"
    )


# --- on the host ---------------------------------------------------------------------------------


def verify_remote_command(path_on_host: str, sha256: str) -> str:
    """A POSIX shell snippet that exits 0 if the file on the host has this sha256, else prints
    why on stderr and exits 1 (``sha256sum -c``; ``shasum -a 256 -c`` where there is none)."""
    if not SHA256_RE.fullmatch(sha256):
        raise ValueError(f"not a sha256: {sha256!r}")
    if not path_on_host or any(c in path_on_host for c in "\n\r\\"):
        raise ValueError(f"cannot verify a path with a newline or backslash: {path_on_host!r}")
    line = shlex.quote(f"{sha256.lower()}  {path_on_host}")
    return (
        "if command -v sha256sum >/dev/null 2>&1; then "
        f"printf '%s\\n' {line} | sha256sum -c -; "
        f"else printf '%s\\n' {line} | shasum -a 256 -c -; fi || "
        "{ printf 'vmfarm: %s does not have sha256 %s\\n' "
        f"{shlex.quote(path_on_host)} {sha256.lower()} >&2; exit 1; }}"
    )
