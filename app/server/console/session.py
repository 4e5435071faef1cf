"""Console sessions: kept on the server, named by an opaque random cookie.

A session holds the identity the OIDC provider's ID token proved at sign-in (never the token
itself) and a CSRF token every form of that session carries. A sign-in in progress holds the
PKCE verifier, the state and the nonce under a short-lived cookie of its own. Sessions live in
this process's memory: a restarted server signs everyone out, which is the safe direction.
"""

from __future__ import annotations

import secrets
import threading
import time
from dataclasses import dataclass, field

from app.auth.identity import Identity

SESSION_COOKIE = "vmfarm_console"
LOGIN_COOKIE = "vmfarm_console_login"
LOGIN_SECONDS = 600.0
MAX_SESSIONS = 10_000


@dataclass
class Session:
    """A signed-in person: who, until when, and the CSRF token of their forms."""

    id: str
    identity: Identity
    expires: float
    csrf: str = field(default_factory=lambda: secrets.token_urlsafe(32))


@dataclass
class PendingLogin:
    """A sign-in between the redirect to the provider and its callback."""

    state: str
    verifier: str
    nonce: str
    next_url: str
    expires: float


class SessionStore:
    """Sessions and pending sign-ins by id; thread-safe (routes run in a thread pool)."""

    def __init__(self, lifetime: float) -> None:
        self.lifetime = lifetime
        self._now = time.monotonic
        self._lock = threading.Lock()
        self._sessions: dict[str, Session] = {}
        self._logins: dict[str, PendingLogin] = {}

    def _sweep(self) -> None:
        now = self._now()
        for store in (self._sessions, self._logins):
            for key in [k for k, v in store.items() if v.expires <= now]:
                del store[key]

    def begin_login(self, next_url: str) -> tuple[str, PendingLogin]:
        """A new pending sign-in and the cookie value naming it."""
        key = secrets.token_urlsafe(32)
        pending = PendingLogin(
            state=secrets.token_urlsafe(24),
            verifier=secrets.token_urlsafe(48),
            nonce=secrets.token_urlsafe(24),
            next_url=next_url,
            expires=self._now() + LOGIN_SECONDS,
        )
        with self._lock:
            self._sweep()
            self._logins[key] = pending
        return key, pending

    def finish_login(self, key: str | None) -> PendingLogin | None:
        """The pending sign-in ``key`` names, removed (a callback is used once)."""
        if not key:
            return None
        with self._lock:
            pending = self._logins.pop(key, None)
        return pending if pending and pending.expires > self._now() else None

    def create(self, identity: Identity, *, expires_at: float | None = None) -> Session:
        """A new session for ``identity``: it ends after the store's lifetime, or earlier
        when ``expires_at`` (seconds from now) says so."""
        life = self.lifetime if expires_at is None else min(self.lifetime, expires_at)
        session = Session(secrets.token_urlsafe(32), identity, self._now() + life)
        with self._lock:
            self._sweep()
            if len(self._sessions) >= MAX_SESSIONS:  # the oldest go first
                for key in sorted(self._sessions, key=lambda k: self._sessions[k].expires)[
                    : len(self._sessions) - MAX_SESSIONS + 1
                ]:
                    del self._sessions[key]
            self._sessions[session.id] = session
        return session

    def get(self, key: str | None) -> Session | None:
        if not key:
            return None
        with self._lock:
            session = self._sessions.get(key)
        return session if session and session.expires > self._now() else None

    def end(self, key: str | None) -> None:
        if key:
            with self._lock:
                self._sessions.pop(key, None)


__all__ = ["LOGIN_COOKIE", "SESSION_COOKIE", "PendingLogin", "Session", "SessionStore"]
