"""Signing in to the web console as a browser would, without one: follow the console's
redirect to the OIDC provider, answer its sign-in form with a subject, follow the callback.
The cookies are Secure, so they are carried by hand (httpx keeps Secure cookies for HTTPS)."""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any
from urllib.parse import parse_qs, urlparse

import httpx


@dataclass
class ConsoleUser:
    """A signed-in console session: its cookie and its CSRF token."""

    base: str
    subject: str
    cookie: str
    csrf: str

    def headers(self) -> dict[str, str]:
        return {"Cookie": f"vmfarm_console={self.cookie}"}

    def get(self, path: str, **kw: Any) -> httpx.Response:
        return httpx.get(self.base + path, headers=self.headers(), timeout=30, **kw)

    def post(
        self, path: str, form: dict[str, str] | None = None, *, csrf: bool = True
    ) -> httpx.Response:
        data = dict(form or {})
        if csrf:
            data.setdefault("csrf", self.csrf)
        return httpx.post(self.base + path, headers=self.headers(), data=data, timeout=30)


def set_cookie(resp: httpx.Response, name: str) -> str:
    """The value ``resp`` sets for cookie ``name`` (AssertionError when it sets none)."""
    for header in resp.headers.get_list("set-cookie"):
        if header.startswith(name + "="):
            return header.split(";", 1)[0].split("=", 1)[1]
    raise AssertionError(f"no {name} cookie in {resp.headers.get_list('set-cookie')}")


def console_sign_in(base: str, subject: str) -> ConsoleUser:
    """Sign in to the console at ``base`` as ``subject`` (the provider's form answered)."""
    start = httpx.get(base + "/console/login", params={"next": "/console/executions"})
    assert start.status_code == 303, start.text
    login_cookie = set_cookie(start, "vmfarm_console_login")
    authorize = start.headers["location"]
    url = urlparse(authorize)
    params = {k: v[0] for k, v in parse_qs(url.query).items()}
    assert params["code_challenge_method"] == "S256" and params["nonce"] and params["state"]
    answer = httpx.post(
        f"{url.scheme}://{url.netloc}{url.path}", params=params, data={"sub": subject}
    )
    assert answer.status_code in (302, 303), answer.text
    back = httpx.get(
        answer.headers["location"], headers={"Cookie": f"vmfarm_console_login={login_cookie}"}
    )
    assert back.status_code == 303, back.text
    cookie = set_cookie(back, "vmfarm_console")
    page = httpx.get(
        base + back.headers["location"], headers={"Cookie": f"vmfarm_console={cookie}"}
    )
    assert page.status_code in (200, 403), page.text  # a person who may not list executions
    found = re.search(r'name="csrf" value="([^"]+)"', page.text)
    assert found, page.text
    return ConsoleUser(base, subject, cookie, found.group(1))
