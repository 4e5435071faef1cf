"""Who is looking at the console: sign-in through the server's OpenID Connect provider
(authorization code with PKCE), the session cookie, CSRF tokens, and permission checks.

::

    GET  /console/login?next=/console/...   redirect to the provider (state, nonce, S256 PKCE)
    GET  /console/callback?code=&state=     exchange the code, verify the ID token, start a session
    POST /console/logout                    end the session (CSRF token required)

The console's client id is the server's audience (``VMFARM_SERVER_AUDIENCE``): the ID token is
verified as every bearer token is (issuer, audience, signature, expiry), and its ``nonce``
must be the one this sign-in sent. The session cookie is HttpOnly, SameSite=Lax and Secure
(unless ``VMFARM_SERVER_CONSOLE_INSECURE_COOKIES`` is set for a plain-HTTP trial); every POST
form carries the session's CSRF token, compared in constant time. The server still checks
each action's permissions: a button that is not shown is also refused (403) when posted.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import logging
from typing import Annotated, Any
from urllib.parse import parse_qs, urlencode

from fastapi import APIRouter, Depends, HTTPException, Request, status
from fastapi.responses import RedirectResponse, Response

from app.auth.identity import AuthError, Identity
from app.rbac import PermissionRefused, RbacConfig
from app.server.console.session import LOGIN_COOKIE, SESSION_COOKIE, Session, Sessions

log = logging.getLogger("vmfarm.server.console")

router = APIRouter(prefix="/console", include_in_schema=False)

MAX_FORM_BYTES = 64 * 1024


class SignInRequired(Exception):
    """A page was asked for without a session: the handler redirects to the sign-in."""

    def __init__(self, next_url: str) -> None:
        super().__init__(next_url)
        self.next_url = next_url


def store(request: Request) -> Sessions:
    sessions: Sessions = request.app.state.console_sessions
    return sessions


def _secure(request: Request) -> bool:
    return not request.app.state.settings.console_insecure_cookies


def _safe_next(value: str | None) -> str:
    """Only a path of this console: a sign-in never sends anyone elsewhere."""
    if value and value.startswith("/console/") and not value.startswith("/console//"):
        return value
    return "/console/executions"


def current_session(request: Request) -> Session | None:
    return store(request).get(request.cookies.get(SESSION_COOKIE))


def signed_in(request: Request) -> Session:
    """The session of a page request; SignInRequired (a redirect) when there is none."""
    session = current_session(request)
    if session is None:
        target = request.url.path + (f"?{request.url.query}" if request.url.query else "")
        raise SignInRequired(_safe_next(target))
    return session


SignedIn = Annotated[Session, Depends(signed_in)]


async def form_of(request: Request) -> dict[str, str]:
    """The POSTed form (application/x-www-form-urlencoded), first value of each field."""
    body = await request.body()
    if len(body) > MAX_FORM_BYTES:
        raise HTTPException(status.HTTP_413_CONTENT_TOO_LARGE, detail="form too large")
    try:
        parsed = parse_qs(body.decode(), keep_blank_values=True, strict_parsing=False)
    except UnicodeDecodeError:
        raise HTTPException(status.HTTP_400_BAD_REQUEST, detail="form is not UTF-8") from None
    return {k: v[0] for k, v in parsed.items()}


async def posted(request: Request) -> tuple[Session, dict[str, str]]:
    """The session and form of a POST: 401 without a session, 403 when the form's CSRF
    token is not the session's."""
    session = current_session(request)
    if session is None:
        raise HTTPException(status.HTTP_401_UNAUTHORIZED, detail="sign in to the console first")
    form = await form_of(request)
    if not hmac.compare_digest(form.get("csrf", "").encode(), session.csrf.encode()):
        log.info("refused a console form without its CSRF token from %s", session.identity.subject)
        raise HTTPException(status.HTTP_403_FORBIDDEN, detail="the form's CSRF token is wrong")
    return session, form


Posted = Annotated[tuple[Session, dict[str, str]], Depends(posted)]


def rules(request: Request) -> RbacConfig:
    cfg: RbacConfig = request.app.state.rbac.get()
    return cfg


def may(cfg: RbacConfig, who: Identity, permission: str) -> bool:
    """Whether the signed-in identity holds ``permission`` (what the page offers; the
    action itself is checked again when posted)."""
    from app.auth.permissions import allows

    return allows(cfg, who, permission)


def authorize(cfg: RbacConfig, who: Identity, permission: str) -> None:
    """403 unless ``who`` holds ``permission``."""
    from app.auth.permissions import authorize as check

    try:
        check(cfg, who, permission)
    except PermissionRefused as exc:
        raise HTTPException(status.HTTP_403_FORBIDDEN, detail=str(exc)) from None


# --- sign-in --------------------------------------------------------------------------------


def _challenge(verifier: str) -> str:
    digest = hashlib.sha256(verifier.encode()).digest()
    return base64.urlsafe_b64encode(digest).rstrip(b"=").decode()


def _callback_url(request: Request) -> str:
    return str(request.url_for("console_callback"))


def _verifier(request: Request) -> Any:
    verifier = request.app.state.verifier
    if verifier is None:
        raise HTTPException(
            status.HTTP_503_SERVICE_UNAVAILABLE,
            detail="the console signs in through OpenID Connect: set VMFARM_SERVER_ISSUER "
            "and VMFARM_SERVER_AUDIENCE",
        )
    return verifier


@router.get("/login", name="console_login")
def login(request: Request, next: str | None = None) -> Response:
    """Send the browser to the provider's authorization endpoint."""
    verifier = _verifier(request)
    try:
        endpoint = verifier.discovery()["authorization_endpoint"]
    except (AuthError, KeyError) as exc:
        raise HTTPException(
            status.HTTP_502_BAD_GATEWAY, detail=f"the OIDC provider did not answer: {exc}"
        ) from None
    key, pending = store(request).begin_login(_safe_next(next))
    params = {
        "response_type": "code",
        "client_id": verifier.audience,
        "redirect_uri": _callback_url(request),
        "scope": "openid profile email",
        "state": pending.state,
        "nonce": pending.nonce,
        "code_challenge": _challenge(pending.verifier),
        "code_challenge_method": "S256",
    }
    resp = RedirectResponse(f"{endpoint}?{urlencode(params)}", status.HTTP_303_SEE_OTHER)
    resp.set_cookie(
        LOGIN_COOKIE,
        key,
        max_age=600,
        httponly=True,
        secure=_secure(request),
        samesite="lax",
        path="/console/",
    )
    return resp


@router.get("/callback", name="console_callback")
def callback(
    request: Request, code: str = "", state: str = "", error: str = "", error_description: str = ""
) -> Response:
    """Finish a sign-in: the code for tokens, the ID token verified, a new session."""
    import httpx

    verifier = _verifier(request)
    pending = store(request).finish_login(request.cookies.get(LOGIN_COOKIE))
    if error:
        raise HTTPException(
            status.HTTP_401_UNAUTHORIZED,
            detail=f"the provider refused: {error} {error_description}",
        )
    if pending is None or not code or not hmac.compare_digest(state, pending.state):
        raise HTTPException(
            status.HTTP_400_BAD_REQUEST,
            detail="this sign-in is unknown, expired or was already used: sign in again",
        )
    settings = request.app.state.settings
    token_endpoint = verifier.discovery()["token_endpoint"]
    data = {
        "grant_type": "authorization_code",
        "code": code,
        "redirect_uri": _callback_url(request),
        "client_id": verifier.audience,
        "code_verifier": pending.verifier,
    }
    if settings.console_client_secret:
        data["client_secret"] = settings.console_client_secret
    try:
        answer = httpx.post(token_endpoint, data=data, timeout=verifier.timeout)
    except httpx.HTTPError as exc:
        raise HTTPException(
            status.HTTP_502_BAD_GATEWAY, detail=f"the OIDC provider did not answer: {exc}"
        ) from None
    if answer.status_code != 200:
        log.info("the token endpoint refused a console sign-in: %s", answer.text[:200])
        raise HTTPException(
            status.HTTP_401_UNAUTHORIZED, detail="the OIDC provider refused the sign-in"
        )
    id_token = str(answer.json().get("id_token", ""))
    try:
        who: Identity = verifier.verify(id_token)
    except AuthError as exc:
        raise HTTPException(status.HTTP_401_UNAUTHORIZED, detail=str(exc)) from None
    if not hmac.compare_digest(str(who.claims.get("nonce", "")), pending.nonce):
        raise HTTPException(
            status.HTTP_401_UNAUTHORIZED, detail="the ID token is not for this sign-in (nonce)"
        )
    session = store(request).create(who)
    log.info("%s signed in to the console", who.subject)
    resp = RedirectResponse(pending.next_url, status.HTTP_303_SEE_OTHER)
    resp.set_cookie(
        SESSION_COOKIE,
        session.id,
        max_age=int(max(60.0, session.seconds_left())),
        httponly=True,
        secure=_secure(request),
        samesite="lax",
        path="/",
    )
    resp.delete_cookie(LOGIN_COOKIE, path="/console/")
    return resp


@router.post("/logout", name="console_logout")
def logout(request: Request, sent: Posted) -> Response:
    store(request).end(sent[0].id)
    resp = RedirectResponse("/console/signed-out", status.HTTP_303_SEE_OTHER)
    resp.delete_cookie(SESSION_COOKIE, path="/")
    return resp


__all__ = [
    "Posted",
    "SignInRequired",
    "SignedIn",
    "authorize",
    "current_session",
    "form_of",
    "may",
    "router",
    "rules",
]
