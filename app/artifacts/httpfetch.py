"""HTTP(S) downloads (Http, Artifactory, Nexus3Registry and Jenkins sources).

A download streams to a temporary file while it is hashed. Connection errors, truncated bodies
and HTTP 429/500/502/503/504 are retried ``ATTEMPTS`` times in all with exponential backoff
(``BACKOFF_BASE`` doubling up to ``BACKOFF_MAX`` seconds; a ``Retry-After`` from the server
replaces it, capped at ``BACKOFF_MAX``). 401, 403 and 404 are not retried. The
``Authorization`` header follows a redirect only to the same scheme, host and port (Artifactory
may redirect to signed S3 URLs).

TLS: the system's trusted CAs, plus the bundle file ``VMFARM_ARTIFACT_CA_BUNDLE`` names (a
private repository's CA) when it is set.
"""

from __future__ import annotations

import base64
import hashlib
import http.client
import logging
import os
import re
import ssl
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass, field
from email.message import Message
from pathlib import Path
from typing import Any, TypeVar
from urllib.parse import urlsplit

from app.artifacts.cache import CHUNK
from app.artifacts.errors import (
    ArtifactAccessError,
    ArtifactAuthError,
    ArtifactError,
    ArtifactUnavailableError,
)
from app.errors import VmfarmError

log = logging.getLogger("vmfarm.artifacts")

ATTEMPTS = 5
BACKOFF_BASE = 0.5
BACKOFF_MAX = 8.0
TIMEOUT = 60.0
RETRY_STATUSES = frozenset({429, 500, 502, 503, 504})
CHECKSUM_HEADER = "X-Checksum-Sha256"
SHA256_RE = re.compile(r"[0-9a-fA-F]{64}")
CA_BUNDLE_ENV = "VMFARM_ARTIFACT_CA_BUNDLE"

T = TypeVar("T")


@dataclass(frozen=True)
class HttpAuth:
    """Basic (username + password) or bearer (token) authentication; repr shows no secret."""

    username: str | None = None
    password: str | None = field(default=None, repr=False)
    token: str | None = field(default=None, repr=False)

    def header(self) -> str | None:
        if self.token:
            return f"Bearer {self.token}"
        if self.username is not None:
            raw = f"{self.username}:{self.password or ''}".encode()
            return "Basic " + base64.b64encode(raw).decode()
        return None

    def who(self) -> str:
        if self.token:
            return "the bearer token"
        if self.username is not None:
            return f"user {self.username!r}"
        return ""


class RetryableFetchError(VmfarmError):
    """One failed attempt worth another (never leaves this module)."""

    def __init__(self, reason: str, delay: float | None = None, *, status: int = 0) -> None:
        super().__init__(reason)
        self.reason = reason
        self.delay = delay
        self.status = status


def _origin(url: str) -> tuple[str, str, int | None]:
    parts = urlsplit(url)
    return parts.scheme, (parts.hostname or "").lower(), parts.port


class _Redirect(urllib.request.HTTPRedirectHandler):
    """Follows redirects, but sends credentials only back to the same origin."""

    def redirect_request(
        self,
        req: urllib.request.Request,
        fp: Any,
        code: int,
        msg: str,
        headers: http.client.HTTPMessage,
        newurl: str,
    ) -> urllib.request.Request | None:
        new = super().redirect_request(req, fp, code, msg, headers, newurl)
        if new is not None and _origin(newurl) != _origin(req.full_url):
            new.remove_header("Authorization")
        return new


def _tls_context(what: str) -> ssl.SSLContext:
    """The system's CAs, and ``VMFARM_ARTIFACT_CA_BUNDLE``'s when set."""
    ctx = ssl.create_default_context()
    bundle = os.environ.get(CA_BUNDLE_ENV)
    if bundle:
        try:
            ctx.load_verify_locations(cafile=bundle)
        except (OSError, ssl.SSLError) as exc:
            raise ArtifactError(
                f"artifact {what}: {CA_BUNDLE_ENV}={bundle!r} is not a readable CA bundle: {exc}",
                artifact=what,
            ) from None
    return ctx


def _retry_after(headers: Message | None) -> float | None:
    value = headers.get("Retry-After") if headers is not None else None
    try:
        return max(0.0, float(value)) if value is not None else None
    except ValueError:
        return None


def checksum_token(text: str) -> str | None:
    """The sha256 in a ``.sha256`` file or header (first token), lower case; None if none."""
    token = text.strip().split()[0] if text.strip() else ""
    token = token.removeprefix("sha256:")
    return token.lower() if SHA256_RE.fullmatch(token) else None


class HttpSource:
    """Downloads one URL (no credentials in it) with ``auth``; ``what`` names it in errors."""

    def __init__(self, url: str, auth: HttpAuth, what: str, *, attempts: int | None = None) -> None:
        self.url = url
        self.auth = auth
        self.what = what
        self.attempts = max(1, attempts if attempts is not None else ATTEMPTS)
        self._opener = urllib.request.build_opener(
            _Redirect(), urllib.request.HTTPSHandler(context=_tls_context(what))
        )

    # --- requests ------------------------------------------------------------------------------

    def _request(self, method: str, url: str) -> urllib.request.Request:
        req = urllib.request.Request(url, method=method)
        req.add_header("User-Agent", "vmfarm")
        header = self.auth.header()
        if header:
            req.add_header("Authorization", header)
        return req

    def _open(self, method: str, url: str, *, missing_ok: bool = False) -> Any:
        """The response, or None (404/405/... when ``missing_ok``); raises RetryableFetchError
        or errors."""
        try:
            return self._opener.open(self._request(method, url), timeout=TIMEOUT)
        except urllib.error.HTTPError as exc:
            code, headers = exc.code, exc.headers
            exc.close()
            if code in RETRY_STATUSES:
                raise RetryableFetchError(
                    f"HTTP {code}", _retry_after(headers), status=code
                ) from None
            if code == 401:
                who = self.auth.who()
                hint = (
                    (
                        f"the repository refused the credentials of {who} (HTTP 401); check "
                        "the username and the password or token secret"
                    )
                    if who
                    else (
                        "the repository needs credentials (HTTP 401): set spec.username and "
                        "spec.passwordRef, or a token"
                    )
                )
                raise ArtifactAuthError(
                    f"artifact {self.what}: {hint}", artifact=self.what
                ) from None
            if code == 403:
                raise ArtifactAccessError(
                    f"artifact {self.what}: access denied (HTTP 403)"
                    + (f" for {self.auth.who()}" if self.auth.who() else ""),
                    artifact=self.what,
                ) from None
            if missing_ok:
                return None
            if code == 404:
                raise ArtifactError(
                    f"artifact {self.what}: not found (HTTP 404); check the URL fields and the tag",
                    artifact=self.what,
                ) from None
            raise ArtifactError(
                f"artifact {self.what}: HTTP {code} {exc.reason}", artifact=self.what
            ) from None
        except urllib.error.URLError as exc:
            if isinstance(exc.reason, ssl.SSLCertVerificationError):
                raise ArtifactError(
                    f"artifact {self.what}: the server's TLS certificate is not "
                    f"trusted ({exc.reason.verify_message})",
                    artifact=self.what,
                ) from None
            raise RetryableFetchError(f"cannot connect: {exc.reason}") from None
        except (OSError, http.client.HTTPException) as exc:
            raise RetryableFetchError(f"connection failed: {exc!r}") from None

    def _retrying(self, fn: Callable[[], T]) -> T:
        for attempt in range(1, self.attempts + 1):
            try:
                return fn()
            except RetryableFetchError as exc:
                if attempt >= self.attempts:
                    raise ArtifactUnavailableError(
                        f"artifact {self.what}: {exc.reason} (gave up after {attempt} "
                        f"attempt{'s' if attempt > 1 else ''})",
                        artifact=self.what,
                    ) from None
                delay = min(BACKOFF_MAX, BACKOFF_BASE * 2 ** (attempt - 1))
                if exc.delay is not None:  # the server's Retry-After
                    delay = min(exc.delay, BACKOFF_MAX)
                log.warning(
                    "artifact %s: %s; retrying in %.1f s (attempt %d of %d)",
                    self.what,
                    exc.reason,
                    delay,
                    attempt + 1,
                    self.attempts,
                )
                time.sleep(delay)
        raise AssertionError("unreachable")

    # --- a repository's API (an artifact trigger's poll) ----------------------------------------

    def get_json(self, url: str, *, limit: int = 8 * 1024 * 1024) -> Any:
        """The JSON document at ``url`` (same credentials and errors as a download; at most
        ``limit`` bytes)."""
        import json

        def get() -> Any:
            with self._open("GET", url) as resp:
                body = resp.read(limit + 1)
            if len(body) > limit:
                raise ArtifactError(
                    f"artifact {self.what}: the repository's answer is over {limit} bytes",
                    artifact=self.what,
                )
            try:
                return json.loads(body)
            except ValueError:
                raise ArtifactError(
                    f"artifact {self.what}: the repository's answer is not JSON",
                    artifact=self.what,
                ) from None

        return self._retrying(get)

    # --- checksums the repository publishes ----------------------------------------------------

    def header_checksum(self) -> str | None:
        """Artifactory's ``X-Checksum-Sha256`` on a HEAD request (None if not sent)."""

        def head() -> str | None:
            resp = self._open("HEAD", self.url, missing_ok=True)
            if resp is None:
                return None
            with resp:
                value = resp.headers.get(CHECKSUM_HEADER)
            return checksum_token(value) if value else None

        return self._retrying(head)

    def sibling_checksum(self) -> str | None:
        """The first token of ``<url>.sha256`` (None if there is no such file)."""
        sibling = self.url + ".sha256"

        def get() -> str | None:
            resp = self._open("GET", sibling, missing_ok=True)
            if resp is None:
                return None
            with resp:
                body = resp.read(4096).decode("utf-8", "replace")
            digest = checksum_token(body)
            if digest is None:
                log.warning("artifact %s: %s holds no sha256; ignored", self.what, sibling)
            return digest

        return self._retrying(get)

    # --- the download ---------------------------------------------------------------------------

    def download(self, tmp: Path) -> tuple[str, int, str | None]:
        """Stream the artifact to ``tmp``: (sha256, size, X-Checksum-Sha256 if sent)."""

        def get() -> tuple[str, int, str | None]:
            with self._open("GET", self.url) as resp:
                header = resp.headers.get(CHECKSUM_HEADER)
                length = resp.headers.get("Content-Length")
                h = hashlib.sha256()
                size = 0
                with tmp.open("wb") as fh:
                    while True:
                        try:
                            chunk = resp.read(CHUNK)
                        except (OSError, http.client.HTTPException) as exc:
                            raise RetryableFetchError(f"the download broke off: {exc!r}") from None
                        if not chunk:
                            break
                        fh.write(chunk)  # a full disk is an OSError that is not retried
                        h.update(chunk)
                        size += len(chunk)
                digest = h.hexdigest()
            if length is not None and length.isdigit() and int(length) != size:
                raise RetryableFetchError(f"the download broke off after {size} of {length} bytes")
            return digest, size, checksum_token(header) if header else None

        return self._retrying(get)
