"""The web console: server-rendered pages (Jinja2, a little plain JavaScript) where people
sign in, watch executions and act on them as far as their permissions go (see ``auth`` and
``pages``)."""

from __future__ import annotations

from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, RedirectResponse, Response
from starlette.exceptions import HTTPException as StarletteHTTPException

CSP = (
    "default-src 'self'; script-src 'self'; style-src 'self' 'unsafe-inline'; "
    "img-src 'self' data:; frame-ancestors 'none'; form-action 'self'; base-uri 'none'"
)


def install(api: FastAPI) -> None:
    """Add the console's routes, its session store and its error pages to ``api``."""
    from fastapi.exception_handlers import http_exception_handler

    from app.server.console import auth, pages
    from app.server.console.session import session_store

    state: Any = api.state
    state.console_sessions = session_store(state.settings.console_session_hours * 3600.0)
    api.include_router(auth.router)
    api.include_router(pages.router)
    from app.server.console import registry_pages

    state.console_registry = registry_pages.available()
    if state.console_registry:  # the registry's pages only where there is a registry
        api.include_router(registry_pages.router)

    @api.middleware("http")
    async def _headers(request: Request, call_next: Any) -> Response:
        response: Response = await call_next(request)
        if request.url.path.startswith("/console"):
            # No framing (an approve button under someone else's page), scripts and styles
            # from this server only (inline style attributes draw the count bars).
            response.headers.setdefault("Content-Security-Policy", CSP)
            response.headers.setdefault("X-Frame-Options", "DENY")
            response.headers.setdefault("X-Content-Type-Options", "nosniff")
            response.headers.setdefault("Referrer-Policy", "same-origin")
        return response

    @api.exception_handler(auth.SignInRequired)
    async def _sign_in(request: Request, exc: auth.SignInRequired) -> Response:
        from urllib.parse import urlencode

        return RedirectResponse(f"/console/login?{urlencode({'next': exc.next_url})}", 303)

    @api.exception_handler(StarletteHTTPException)
    async def _errors(request: Request, exc: StarletteHTTPException) -> Response:
        # The API answers JSON as before; a console page answers a page saying why.
        if not request.url.path.startswith("/console/") or request.url.path.endswith("/log"):
            return await http_exception_handler(request, exc)
        try:
            return pages.templates.TemplateResponse(
                request,
                "error.html",
                {
                    "session": auth.current_session(request),
                    "who": None,
                    "can": {},
                    "code": exc.status_code,
                    "detail": exc.detail,
                },
                status_code=exc.status_code,
                headers=getattr(exc, "headers", None),
            )
        except Exception:
            return JSONResponse({"detail": exc.detail}, status_code=exc.status_code)


__all__ = ["CSP", "install"]
