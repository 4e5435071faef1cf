"""The CLI's side of server mode: where the server is, who the user is to it, and HTTP.

Server mode is on when ``VMFARM_SERVER`` names a server or ``vmfarm login`` stored a sign-in
(``$XDG_CONFIG_HOME/vmfarm/login.json``, else ``~/.config/vmfarm/login.json``; mode 0600 in
a 0700 folder). Credentials, first found wins::

    VMFARM_TOKEN            an API token (vmf_...): CI systems, schedules
    the stored sign-in      an OpenID Connect token from ``vmfarm login``, renewed with its
                            refresh token when it has expired (or is about to)

Errors, as the commands turn them into exit codes (``fail``)::

    RemoteError                 an answer the command cannot use
    ├── ServerRefused           401 (who you are was not accepted), 403 (you may not): exit 3
    ├── ServerBadInput          400, 404, 409, 413, 422: what was asked cannot be done: exit 2
    └── ServerUnavailable       no answer, or 5xx: exit 1
    LoginError                  no usable sign-in: exit 3, with what to run

Nothing here imports SQLAlchemy, SQLModel or Celery (a test checks ``sys.modules``), and
httpx is imported when a request is made, not when the command line is parsed.
"""

from __future__ import annotations

import base64
import json
import os
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import httpx

LOGIN_FILE = "login.json"
# A token this close to its expiry is renewed before use (a request takes time to arrive).
REFRESH_MARGIN = 30.0
TIMEOUT = 30.0


class RemoteError(Exception):
    """An answer of the server (or its absence) that the command cannot use."""

    code = 1

    def __init__(self, message: str, *, status: int | None = None) -> None:
        super().__init__(message)
        self.status = status


class ServerRefused(RemoteError):
    """401 or 403: nothing was done."""

    code = 3


class ServerBadInput(RemoteError):
    """The request cannot be carried out as asked (bad files, no such thing, wrong state)."""

    code = 2


class ServerUnavailable(RemoteError):
    """No answer from the server, or a server error."""

    code = 1


class LoginError(RemoteError):
    """No usable credentials: not signed in, or the sign-in can no longer be renewed."""

    code = 3


# --- where things are -------------------------------------------------------------------------


def config_dir() -> Path:
    """``$XDG_CONFIG_HOME/vmfarm``, else ``~/.config/vmfarm``."""
    base = os.environ.get("XDG_CONFIG_HOME", "").strip()
    return (Path(base) if base else Path.home() / ".config") / "vmfarm"


def login_path() -> Path:
    return config_dir() / LOGIN_FILE


def read_login() -> dict[str, Any] | None:
    """The stored sign-in, or None (none, or unreadable: treated as signed out)."""
    try:
        data = json.loads(login_path().read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) and data.get("server") else None


def write_login(data: dict[str, Any]) -> Path:
    """Store the sign-in: the folder 0700, the file 0600 from its creation on (never a moment
    readable by others), replaced atomically."""
    folder = config_dir()
    folder.mkdir(parents=True, exist_ok=True, mode=0o700)
    path = folder / LOGIN_FILE
    tmp = folder / f".{LOGIN_FILE}.{os.getpid()}"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        os.fchmod(fd, 0o600)  # whatever the umask
        with os.fdopen(fd, "w") as fh:
            json.dump(data, fh, indent=1)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    os.replace(tmp, path)
    return path


def forget_login() -> bool:
    """Remove the stored sign-in; whether there was one."""
    try:
        login_path().unlink()
    except FileNotFoundError:
        return False
    return True


def server_url() -> str | None:
    """The server this CLI talks to: ``VMFARM_SERVER``, else the stored sign-in's; None in
    local mode."""
    env = os.environ.get("VMFARM_SERVER", "").strip()
    if env:
        return env.rstrip("/")
    login = read_login()
    return str(login["server"]).rstrip("/") if login else None


def server_mode() -> bool:
    return server_url() is not None


# --- credentials ------------------------------------------------------------------------------


def jwt_claims(token: str) -> dict[str, Any]:
    """A JWT's claims, unverified (the server verifies; the CLI only reads ``exp`` and
    ``sub``). Empty for anything that is not a JWT."""
    parts = token.split(".")
    if len(parts) != 3:
        return {}
    try:
        payload = base64.urlsafe_b64decode(parts[1] + "=" * (-len(parts[1]) % 4))
        claims = json.loads(payload)
    except (ValueError, TypeError):
        return {}
    return claims if isinstance(claims, dict) else {}


def bearer_of(tokens: dict[str, Any]) -> str | None:
    """The token to present from a token endpoint's answer: the ID token (a JWT for this
    client), else an access token that is a JWT; None when there is neither."""
    for key in ("id_token", "access_token"):
        value = tokens.get(key)
        if isinstance(value, str) and jwt_claims(value):
            return value
    return None


def needs_refresh(token: str, *, now: float | None = None) -> bool:
    """Whether ``token`` has expired or will within REFRESH_MARGIN seconds."""
    exp = jwt_claims(token).get("exp")
    if not isinstance(exp, int | float):
        return False  # no expiry to go by: the server says when it no longer takes it
    return (time.time() if now is None else now) >= exp - REFRESH_MARGIN


def refresh(login: dict[str, Any], *, http: httpx.Client | None = None) -> dict[str, Any]:
    """Renew a stored sign-in with its refresh token; the updated sign-in (stored by the
    caller). LoginError when it cannot be renewed."""
    import httpx

    again = f"sign in again: vmfarm login {login.get('server', '')}".rstrip()
    if not login.get("refresh_token") or not login.get("token_endpoint"):
        raise LoginError(f"your sign-in has expired; {again}")
    form, auth = client_auth(login)
    form.update(grant_type="refresh_token", refresh_token=login["refresh_token"])
    client = http or httpx.Client(timeout=TIMEOUT)
    try:
        resp = client.post(login["token_endpoint"], data=form, auth=auth)
    except httpx.HTTPError as exc:
        raise ServerUnavailable(
            f"cannot renew your sign-in at {login['token_endpoint']}: {exc}"
        ) from None
    finally:
        if http is None:
            client.close()
    if resp.status_code != 200:
        raise LoginError(f"your sign-in could not be renewed ({_oauth_error(resp)}); {again}")
    tokens = resp.json()
    token = bearer_of(tokens)
    if token is None:
        raise LoginError(f"the identity provider renewed the sign-in without an ID token; {again}")
    renewed = {**login, "token": token}
    if tokens.get("refresh_token"):
        renewed["refresh_token"] = tokens["refresh_token"]  # rotated
    return renewed


def client_auth(conf: dict[str, Any]) -> tuple[dict[str, str], httpx.Auth]:
    """How the CLI identifies itself to the token endpoint: its client id in the form (a
    public client), or HTTP Basic with the client id and secret when the server handed out a
    secret (client_secret_basic, the method every provider must support; RFC 6749 2.3.1:
    both form-encoded first)."""
    import httpx

    secret = conf.get("client_secret")
    if not secret:
        return {"client_id": str(conf.get("client_id", ""))}, httpx.Auth()  # adds nothing
    from urllib.parse import quote_plus

    return {}, httpx.BasicAuth(quote_plus(str(conf["client_id"])), quote_plus(str(secret)))


def _oauth_error(resp: httpx.Response) -> str:
    try:
        body = resp.json()
    except ValueError:
        return f"HTTP {resp.status_code}"
    if isinstance(body, dict) and body.get("error"):
        desc = body.get("error_description")
        return f"{body['error']}: {desc}" if desc else str(body["error"])
    return f"HTTP {resp.status_code}"


def credentials(server: str, *, http: httpx.Client | None = None, renew: bool = False) -> str:
    """The bearer token for ``server``: ``VMFARM_TOKEN``, else the stored sign-in (renewed
    and stored again when it has expired, or when ``renew`` says the server refused it).
    LoginError when there is none."""
    env = os.environ.get("VMFARM_TOKEN", "").strip()
    if env:
        return env
    login = read_login()
    if login is None or str(login["server"]).rstrip("/") != server:
        raise LoginError(
            f"not signed in to {server}: vmfarm login {server} (or set VMFARM_TOKEN to an "
            "API token)"
        )
    token = str(login.get("token") or "")
    if not token or renew or needs_refresh(token):
        login = refresh(login, http=http)
        write_login(login)
        token = str(login["token"])
    return token


# --- talking to the server --------------------------------------------------------------------


def _detail(resp: httpx.Response) -> str:
    """What the server said went wrong (FastAPI's ``detail``: a string or a list of field
    errors)."""
    try:
        body = resp.json()
    except ValueError:
        return resp.text.strip() or f"HTTP {resp.status_code}"
    detail = body.get("detail", body) if isinstance(body, dict) else body
    if isinstance(detail, list):
        lines = []
        for d in detail:
            if isinstance(d, dict):
                where = ".".join(str(p) for p in d.get("loc", ()) if p != "body")
                lines.append(f"{where}: {d.get('msg', d)}" if where else str(d.get("msg", d)))
            else:
                lines.append(str(d))
        return "\n".join(lines)
    return str(detail)


def error_for(resp: httpx.Response) -> RemoteError:
    """The RemoteError an unsuccessful answer means."""
    status, detail = resp.status_code, _detail(resp)
    if status == 401:
        return ServerRefused(
            f"the server did not accept your credentials: {detail} (vmfarm login, or VMFARM_TOKEN)",
            status=status,
        )
    if status == 403:
        return ServerRefused(detail, status=status)
    if status in (400, 404, 405, 409, 413, 422):
        return ServerBadInput(detail, status=status)
    return ServerUnavailable(f"the server answered {status}: {detail}", status=status)


@dataclass
class Remote:
    """An authenticated client of one server. ``request`` returns the decoded JSON of a 2xx
    answer and raises a RemoteError for anything else."""

    url: str
    token: str | None = None
    transport: httpx.BaseTransport | None = None  # tests: httpx.MockTransport
    renewable: bool = field(default=False, init=False)  # the token is a stored sign-in's

    def _client(self, timeout: Any = TIMEOUT) -> httpx.Client:
        import httpx

        return httpx.Client(
            base_url=self.url,
            timeout=timeout,
            headers={"Authorization": f"Bearer {self._token()}"},
            transport=self.transport,
            # Plain http has no TLS to verify; skipping the CA bundle saves ~35 ms of every
            # command. https verifies against it, as always (redirects are not followed).
            verify=self.url.startswith("https://"),
        )

    def _token(self) -> str:
        if self.token is None:
            self.token = credentials(self.url)
            self.renewable = not os.environ.get("VMFARM_TOKEN", "").strip()
        return self.token

    def request(self, method: str, path: str, **kwargs: Any) -> Any:
        import httpx

        try:
            with self._client() as http:
                resp = http.request(method, path, **kwargs)
                if resp.status_code == 401 and self.renewable:
                    # A sign-in the server no longer takes before its expiry (clocks apart,
                    # keys rotated): renewed once, the request sent again (a 401 did nothing).
                    self.renewable = False
                    self.token = credentials(self.url, renew=True)
                    http.headers["Authorization"] = f"Bearer {self.token}"
                    resp = http.request(method, path, **kwargs)
        except httpx.HTTPError as exc:
            raise ServerUnavailable(
                f"cannot reach the vmfarm server at {self.url}: {exc}"
            ) from None
        if resp.status_code >= 300:
            raise error_for(resp)
        if resp.status_code == 204 or not resp.content:
            return None
        return resp.json()

    def get(self, path: str, **params: Any) -> Any:
        return self.request("GET", path, params={k: v for k, v in params.items() if v is not None})

    def post(self, path: str, body: Any = None) -> Any:
        return self.request("POST", path, json=body)

    def delete(self, path: str) -> Any:
        return self.request("DELETE", path)

    def events(self, path: str) -> Iterator[tuple[str, dict[str, Any]]]:
        """A server-sent event stream's (event, data) pairs until the server ends it."""
        import httpx

        timeout = httpx.Timeout(TIMEOUT, read=120.0)  # the server says something every 15 s
        try:
            with self._client(timeout) as http, http.stream("GET", path) as resp:
                if resp.status_code >= 300:
                    resp.read()
                    raise error_for(resp)
                yield from iter_events(resp.iter_lines())
        except httpx.HTTPError as exc:
            raise ServerUnavailable(f"lost the event stream of {self.url}{path}: {exc}") from None


def iter_events(lines: Iterator[str]) -> Iterator[tuple[str, dict[str, Any]]]:
    """The (event, data) pairs of server-sent event lines; a comment (the server's keep-alive,
    every 15 s of a quiet stream) is ``("keepalive", {})``."""
    name, data = "message", list[str]()
    for line in lines:
        if not line:
            if data:
                yield name, json.loads("\n".join(data))
            name, data = "message", []
        elif line.startswith(":"):
            yield "keepalive", {}
        elif line.startswith("event:"):
            name = line[6:].strip()
        elif line.startswith("data:"):
            data.append(line[5:].strip())


def connect() -> Remote:
    """A client of the configured server (server mode only)."""
    url = server_url()
    assert url is not None, "connect() in local mode"
    return Remote(url)


__all__ = [
    "LoginError",
    "Remote",
    "RemoteError",
    "ServerBadInput",
    "ServerRefused",
    "ServerUnavailable",
    "bearer_of",
    "client_auth",
    "config_dir",
    "connect",
    "credentials",
    "error_for",
    "forget_login",
    "iter_events",
    "jwt_claims",
    "login_path",
    "needs_refresh",
    "read_login",
    "refresh",
    "server_mode",
    "server_url",
    "write_login",
]
