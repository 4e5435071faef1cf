"""Console sessions: kept on the server, named by an opaque random cookie.

A session holds the identity the OIDC provider's ID token proved at sign-in (never the token
itself) and a CSRF token every form of that session carries. A sign-in in progress holds the
PKCE verifier, the state and the nonce under a short-lived cookie of its own.

Where they are kept: with a Redis broker (service mode), in Redis (``RedisSessionStore``), so
that every server process behind a load balancer knows every session, a restarted server keeps
its users signed in, and signing out on one process signs out on all. Redis holds a session
under the SHA-256 of its cookie (a copy of Redis names no usable cookie), with the session's
lifetime as its expiry; a pending sign-in is taken once (GETDEL). Without Redis (embedded mode,
one process), in this process's memory (``SessionStore``).
"""

from __future__ import annotations

import hashlib
import json
import secrets
import threading
import time
from dataclasses import asdict, dataclass, field
from typing import Any, Protocol

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
    expires: float  # time.time() at which it ends
    csrf: str = field(default_factory=lambda: secrets.token_urlsafe(32))

    def seconds_left(self) -> float:
        return self.expires - time.time()


@dataclass
class PendingLogin:
    """A sign-in between the redirect to the provider and its callback."""

    state: str
    verifier: str
    nonce: str
    next_url: str
    expires: float


class Sessions(Protocol):
    """What the console's routes ask of a session store."""

    lifetime: float

    def begin_login(self, next_url: str) -> tuple[str, PendingLogin]: ...
    def finish_login(self, key: str | None) -> PendingLogin | None: ...
    def create(self, identity: Identity, *, expires_at: float | None = None) -> Session: ...
    def get(self, key: str | None) -> Session | None: ...
    def end(self, key: str | None) -> None: ...


def _pending(next_url: str) -> PendingLogin:
    return PendingLogin(
        state=secrets.token_urlsafe(24),
        verifier=secrets.token_urlsafe(48),
        nonce=secrets.token_urlsafe(24),
        next_url=next_url,
        expires=time.time() + LOGIN_SECONDS,
    )


class SessionStore:
    """Sessions and pending sign-ins by id, in this process's memory; thread-safe (routes run
    in a thread pool)."""

    def __init__(self, lifetime: float) -> None:
        self.lifetime = lifetime
        self._now = time.time
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
        pending = _pending(next_url)
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


class RedisSessionStore:
    """Sessions and pending sign-ins in Redis, shared by every server process (see the
    module's docstring); ``client`` is a redis.Redis."""

    PREFIX = "vmfarm:console:"

    def __init__(self, lifetime: float, client: Any) -> None:
        self.lifetime = lifetime
        self.client = client

    def _key(self, kind: str, cookie: str) -> str:
        return f"{self.PREFIX}{kind}:{hashlib.sha256(cookie.encode()).hexdigest()}"

    def begin_login(self, next_url: str) -> tuple[str, PendingLogin]:
        key = secrets.token_urlsafe(32)
        pending = _pending(next_url)
        self.client.set(self._key("login", key), json.dumps(asdict(pending)), ex=int(LOGIN_SECONDS))
        return key, pending

    def finish_login(self, key: str | None) -> PendingLogin | None:
        if not key:
            return None
        raw = self.client.getdel(self._key("login", key))  # a callback is used once
        if raw is None:
            return None
        pending = PendingLogin(**json.loads(raw))
        return pending if pending.expires > time.time() else None

    def create(self, identity: Identity, *, expires_at: float | None = None) -> Session:
        life = self.lifetime if expires_at is None else min(self.lifetime, expires_at)
        session = Session(secrets.token_urlsafe(32), identity, time.time() + life)
        who = asdict(identity)
        who["groups"] = sorted(identity.groups)
        body = {"identity": who, "expires": session.expires, "csrf": session.csrf}
        self.client.set(
            self._key("session", session.id), json.dumps(body), ex=max(1, int(life + 0.999))
        )
        return session

    def get(self, key: str | None) -> Session | None:
        if not key:
            return None
        raw = self.client.get(self._key("session", key))
        if raw is None:
            return None
        body = json.loads(raw)
        who = dict(body["identity"])
        who["groups"] = frozenset(who.get("groups") or ())
        who["roles"] = tuple(who.get("roles") or ())
        session = Session(key, Identity(**who), float(body["expires"]), str(body["csrf"]))
        return session if session.expires > time.time() else None

    def end(self, key: str | None) -> None:
        if key:
            self.client.delete(self._key("session", key))


def session_store(lifetime: float) -> Sessions:
    """Redis when this process's broker is Redis (service mode), else this process's
    memory."""
    from app.settings import get_settings

    url = get_settings().broker_url or ""
    if url.startswith(("redis://", "rediss://", "unix://")):
        import redis

        return RedisSessionStore(
            lifetime, redis.Redis.from_url(url, socket_timeout=5, socket_connect_timeout=5)
        )
    return SessionStore(lifetime)


__all__ = [
    "LOGIN_COOKIE",
    "SESSION_COOKIE",
    "PendingLogin",
    "RedisSessionStore",
    "Session",
    "SessionStore",
    "Sessions",
    "session_store",
]
