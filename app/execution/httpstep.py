"""The Http step of a Custom stage: one request from the delegate (this worker) to the URL the
user wrote, judged by the step's assertion.

Only the URL the step names is contacted: no proxy from the environment, no redirect to
another place (a redirect is the response, as Harness's Http step sees it). Secrets in the
URL, headers and body are resolved here, on the worker, and masked in the log.
"""

from __future__ import annotations

import time
import urllib.error
import urllib.request
from typing import Any

from app.definitions.expressions import Context, render
from app.definitions.httpassert import holds
from app.definitions.plan import HttpStepPlan
from app.execution.logs import LogSink
from app.models import Status
from app.units.base import with_secrets

# How much of the response body the step keeps (log, assertion).
BODY_LIMIT = 1024 * 1024


class _NoRedirect(urllib.request.HTTPRedirectHandler):
    def redirect_request(self, *args: Any, **kwargs: Any) -> None:
        return None  # the 3xx response is the answer


def request(step: HttpStepPlan, ctx: Context, sink: LogSink, *, timeout: float) -> dict[str, Any]:
    """Send the step's request and judge the response; the step's ledger fields."""
    spec = step.spec

    def value(text: str) -> str:
        return with_secrets(render(text, ctx))

    url = value(spec.url)
    headers = {h.key: value(h.value) for h in spec.headers}
    body = value(spec.request_body).encode() if spec.request_body is not None else None
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}), _NoRedirect())
    req = urllib.request.Request(url, data=body, headers=headers, method=spec.method)
    sink.write("stdout", f"{spec.method} {url}\n")
    started = time.monotonic()
    try:
        with opener.open(req, timeout=timeout) as resp:
            code, text = int(resp.status), resp.read(BODY_LIMIT).decode(errors="replace")
    except urllib.error.HTTPError as exc:  # a 4xx or 5xx (or 3xx) is a response too
        code, text = int(exc.code), exc.read(BODY_LIMIT).decode(errors="replace")
    except (urllib.error.URLError, OSError, ValueError) as exc:
        reason = getattr(exc, "reason", exc)
        timed_out = isinstance(reason, TimeoutError) or "timed out" in str(reason)
        sink.write("stderr", f"no response: {reason}\n")
        return {
            "status": Status.FAILED,
            "error_class": "Timeout" if timed_out else "Connectivity",
            "failed_unit": step.identifier,
            "error": f"Http step '{step.identifier}': {spec.method} {url}: no response ({reason})"[
                :500
            ],
        }
    took = time.monotonic() - started
    sink.write("stdout", f"HTTP {code} in {took:.2f} s\n")
    if text:
        sink.write("stdout", text[:4000] + ("\n" if not text[:4000].endswith("\n") else ""))
    ok = holds(spec.assertion, code, text) if spec.assertion else code < 400
    rule = spec.assertion or "status below 400"
    if ok:
        sink.write("stdout", f"assertion holds: {rule}\n")
        return {"status": Status.SUCCEEDED, "exit_code": 0}
    sink.write("stderr", f"assertion failed: {rule} (status {code})\n")
    return {
        "status": Status.FAILED,
        "error_class": "Unknown",
        "failed_unit": step.identifier,
        "error": f"Http step '{step.identifier}': assertion failed: {rule} (the response "
        f"was HTTP {code})"[:500],
    }
