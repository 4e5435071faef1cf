"""``vmfarm login``'s OpenID Connect flows: authorization code with PKCE and a redirect to a
one-shot listener on 127.0.0.1 (a random port), or the device-authorization flow (RFC 8628)
when the provider advertises it and ``--device`` asks for it (a machine without a browser).

The server says which issuer, client id and scopes (``GET /api/v1/auth/config``, open); the
issuer's discovery document gives the endpoints. The result is the token endpoint's answer.
"""

from __future__ import annotations

import base64
import hashlib
import secrets
import threading
import time
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, HTTPServer
from typing import TYPE_CHECKING, Any
from urllib.parse import parse_qs, urlencode, urlparse

from cli.remote import LoginError, ServerUnavailable, client_auth, error_for

if TYPE_CHECKING:
    import httpx

DEVICE_GRANT = "urn:ietf:params:oauth:grant-type:device_code"
# How long a person has to sign in in the browser, or to enter the device code.
WAIT_SECONDS = 300.0


def auth_config(http: httpx.Client, server: str) -> dict[str, Any]:
    """The server's sign-in settings (issuer, client_id, scopes)."""
    import httpx

    try:
        resp = http.get(server.rstrip("/") + "/api/v1/auth/config")
    except httpx.HTTPError as exc:
        raise ServerUnavailable(f"cannot reach the vmfarm server at {server}: {exc}") from None
    if resp.status_code != 200:
        raise error_for(resp)
    conf: dict[str, Any] = resp.json()
    return conf


def discovery(http: httpx.Client, issuer: str) -> dict[str, Any]:
    """The issuer's OpenID Connect discovery document."""
    import httpx

    url = issuer.rstrip("/") + "/.well-known/openid-configuration"
    try:
        resp = http.get(url)
        resp.raise_for_status()
        doc: dict[str, Any] = resp.json()
    except (httpx.HTTPError, ValueError) as exc:
        raise ServerUnavailable(f"cannot read the identity provider's {url}: {exc}") from None
    return doc


def _token_answer(resp: httpx.Response, what: str) -> dict[str, Any]:
    if resp.status_code != 200:
        try:
            body = resp.json()
            why = f"{body.get('error')}: {body.get('error_description') or ''}".rstrip(": ")
        except ValueError:
            why = f"HTTP {resp.status_code}"
        raise LoginError(f"{what} failed: {why}")
    tokens: dict[str, Any] = resp.json()
    return tokens


def choose_flow(
    disc: dict[str, Any], *, device: bool, no_browser: bool, browser: Callable[[], bool]
) -> str:
    """``device`` or ``code``: the device flow when asked, or when this machine has no browser
    to open and the provider offers it (over SSH, a redirect to 127.0.0.1 would reach the
    wrong machine); otherwise authorization code with PKCE."""
    if device:
        return "device"
    offered = bool(disc.get("device_authorization_endpoint"))
    if offered and not no_browser and not browser():
        return "device"
    return "code"


def browser_here() -> bool:
    """Whether Python's webbrowser finds a browser to run on this machine."""
    import webbrowser

    try:
        webbrowser.get()
    except webbrowser.Error:
        return False
    return True


# --- authorization code with PKCE -------------------------------------------------------------


def pkce_pair() -> tuple[str, str]:
    """A PKCE code verifier and its S256 challenge (RFC 7636)."""
    verifier = secrets.token_urlsafe(48)
    digest = hashlib.sha256(verifier.encode()).digest()
    return verifier, base64.urlsafe_b64encode(digest).rstrip(b"=").decode()


class _Callback(HTTPServer):
    params: dict[str, str] | None = None
    arrived: threading.Event


class _Handler(BaseHTTPRequestHandler):
    server: _Callback

    def do_GET(self) -> None:
        url = urlparse(self.path)
        if url.path != "/callback":
            self.send_error(404)
            return
        self.server.params = {k: v[0] for k, v in parse_qs(url.query).items()}
        ok = "code" in self.server.params
        body = (
            b"Signed in to vmfarm: you can close this window."
            if ok
            else b"vmfarm sign-in failed: see the terminal."
        )
        self.send_response(200)
        self.send_header("Content-Type", "text/plain; charset=utf-8")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)
        self.server.arrived.set()

    def log_message(self, *args: Any) -> None:
        pass


def authorization_code(
    http: httpx.Client,
    conf: dict[str, Any],
    disc: dict[str, Any],
    *,
    show: Callable[[str], None],
    open_browser: bool = True,
    wait: float = WAIT_SECONDS,
) -> dict[str, Any]:
    """Sign in in a browser: the provider redirects to 127.0.0.1:PORT/callback with a code,
    exchanged (with the PKCE verifier) for tokens."""
    verifier, challenge = pkce_pair()
    state = secrets.token_urlsafe(16)
    listener = _Callback(("127.0.0.1", 0), _Handler)
    listener.arrived = threading.Event()
    redirect = f"http://127.0.0.1:{listener.server_address[1]}/callback"
    url = (
        disc["authorization_endpoint"]
        + ("&" if "?" in disc["authorization_endpoint"] else "?")
        + urlencode(
            {
                "response_type": "code",
                "client_id": conf["client_id"],
                "redirect_uri": redirect,
                "scope": " ".join(conf.get("scopes") or ["openid"]),
                "state": state,
                "code_challenge": challenge,
                "code_challenge_method": "S256",
            }
        )
    )
    thread = threading.Thread(
        target=listener.serve_forever, kwargs={"poll_interval": 0.1}, daemon=True
    )
    thread.start()
    try:
        show(f"Sign in at: {url}")
        if open_browser:
            import contextlib
            import webbrowser

            with contextlib.suppress(Exception):  # no browser here: the printed URL is the way
                webbrowser.open(url)
        if not listener.arrived.wait(wait):
            raise LoginError(f"no sign-in arrived within {int(wait)} s; nothing was stored")
    finally:
        listener.shutdown()
        listener.server_close()
    params = listener.params or {}
    if params.get("state") != state:
        raise LoginError("the sign-in answer did not carry this login's state: refused")
    if "code" not in params:
        why = params.get("error_description") or params.get("error") or "no code"
        raise LoginError(f"the identity provider refused the sign-in: {why}")
    form, auth = client_auth(conf)
    form.update(
        grant_type="authorization_code",
        code=params["code"],
        redirect_uri=redirect,
        code_verifier=verifier,
    )
    resp = http.post(disc["token_endpoint"], data=form, auth=auth)
    return _token_answer(resp, "exchanging the sign-in code")


# --- device authorization (RFC 8628) ----------------------------------------------------------


def device_code(
    http: httpx.Client,
    conf: dict[str, Any],
    disc: dict[str, Any],
    *,
    show: Callable[[str], None],
    sleep: Callable[[float], None] = time.sleep,
    clock: Callable[[], float] = time.monotonic,
) -> dict[str, Any]:
    """Sign in on another device: show the code and where to enter it, then poll the token
    endpoint at the provider's interval (slower when it says slow_down)."""
    endpoint = disc.get("device_authorization_endpoint")
    if not endpoint:
        raise LoginError(
            "the identity provider does not offer the device flow: vmfarm login without --device"
        )
    form, auth = client_auth(conf)
    resp = http.post(
        endpoint, data={**form, "scope": " ".join(conf.get("scopes") or ["openid"])}, auth=auth
    )
    grant = _token_answer(resp, "asking for a device code")
    where = grant.get("verification_uri_complete") or grant.get("verification_uri")
    show(f"Sign in at: {where}")
    show(f"and enter the code: {grant['user_code']}")
    interval = float(grant.get("interval") or 5)
    deadline = clock() + float(grant.get("expires_in") or WAIT_SECONDS)
    while clock() < deadline:
        sleep(interval)
        resp = http.post(
            disc["token_endpoint"],
            data={**form, "grant_type": DEVICE_GRANT, "device_code": grant["device_code"]},
            auth=auth,
        )
        if resp.status_code == 200:
            tokens: dict[str, Any] = resp.json()
            return tokens
        try:
            error = resp.json().get("error")
        except ValueError:
            error = None
        if error == "authorization_pending":
            continue
        if error == "slow_down":
            interval += 5  # RFC 8628 section 3.5
            continue
        _token_answer(resp, "the device sign-in")  # access_denied, expired_token, ...
    raise LoginError("the device code expired before anyone signed in; nothing was stored")


__all__ = [
    "auth_config",
    "authorization_code",
    "browser_here",
    "choose_flow",
    "device_code",
    "discovery",
    "pkce_pair",
]
