"""Where notifications go: Slack and webhook payloads over HTTP(S), email over SMTP (app.notify)."""

from __future__ import annotations

import ipaddress
import json
import logging
import smtplib
import ssl
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable, Mapping, Sequence
from email.message import EmailMessage
from email.utils import formatdate, make_msgid
from typing import Any

from app.notify.messages import (
    Message,
    NotifySettings,
    _first_line,
)

log = logging.getLogger("vmfarm.notify")

Mask = Callable[[str], str]
Claim = Callable[[str], bool]


# --- channels -------------------------------------------------------------------------------------


def _slack_escape(text: str) -> str:
    return text.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")


def slack_payload(msg: Message) -> dict[str, Any]:
    """Slack incoming-webhook body: ``text`` (the notification) and Block Kit ``blocks``."""
    body = msg.text.split("\n")
    details = "\n".join(_slack_escape(x) for x in body if not x.startswith(("Details:", "Then:")))
    return {
        "text": _slack_escape(f"{msg.title}\n{msg.text}")[:3900],
        "blocks": [
            {"type": "header", "text": {"type": "plain_text", "text": msg.title[:150]}},
            {"type": "section", "text": {"type": "mrkdwn", "text": details[:2900]}},
            {
                "type": "context",
                "elements": [
                    {
                        "type": "mrkdwn",
                        "text": " · ".join(f"`{_slack_escape(c)}`" for c in msg.commands)[:2900],
                    }
                ],
            },
        ],
    }


def webhook_payload(msg: Message) -> dict[str, Any]:
    """A generic webhook body: Slack-compatible ``text`` plus the structured fields."""
    return {"text": f"{msg.title}\n{msg.text}", **msg.data()}


def redact_url(url: str) -> str:
    """``https://hooks.example.com/T0/B0/secret`` -> ``https://hooks.example.com/…``."""
    parts = urllib.parse.urlsplit(url)
    host = parts.hostname or "?"
    port = f":{parts.port}" if parts.port else ""
    return f"{parts.scheme}://{host}{port}/…"


class _NoRedirect(urllib.request.HTTPRedirectHandler):
    def redirect_request(self, *args: Any, **kwargs: Any) -> None:
        return None  # a webhook that redirects is misconfigured: report its 3xx


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def post_json(
    url: str,
    payload: Mapping[str, Any],
    *,
    timeout: float,
    retries: int,
    backoff: float,
    sleep: Callable[[float], None] = time.sleep,
) -> tuple[bool, int, int | None, str | None]:
    """POST ``payload`` as JSON: (ok, attempts, last HTTP status, error). Retries connection
    errors, timeouts, 429 and 5xx up to ``retries`` times, waiting ``backoff`` (doubled each
    time; a 429's Retry-After up to 30 s). Never raises; errors never contain the URL."""
    data = json.dumps(payload).encode()
    handlers: list[urllib.request.BaseHandler] = [_NoRedirect()]
    if _is_loopback(urllib.parse.urlsplit(url).hostname or ""):
        handlers.append(urllib.request.ProxyHandler({}))  # never send 127.0.0.1 to a proxy
    opener = urllib.request.build_opener(*handlers)
    attempts, status, error = 0, None, None
    wait = backoff
    while True:
        attempts += 1
        retry_after: float | None = None
        req = urllib.request.Request(
            url,
            data=data,
            method="POST",
            headers={
                "Content-Type": "application/json; charset=utf-8",
                "User-Agent": "vmfarm-notify",
            },
        )
        try:
            with opener.open(req, timeout=timeout) as resp:
                status = int(resp.status)
                resp.read(65536)
            return True, attempts, status, None
        except urllib.error.HTTPError as exc:
            status = int(exc.code)
            error = f"HTTP {exc.code} {exc.reason}"
            retriable = status == 429 or status >= 500
            ra = exc.headers.get("Retry-After") if exc.headers else None
            if ra and ra.strip().isdigit():
                retry_after = min(30.0, float(ra.strip()))
            exc.close()
        except (urllib.error.URLError, TimeoutError, OSError) as exc:
            reason = getattr(exc, "reason", exc)
            error = f"{type(reason).__name__}: {reason}".replace(url, redact_url(url))
            status, retriable = None, True
        except Exception as exc:  # a bug in a handler: report it, do not raise
            error, retriable = f"{type(exc).__name__}: {exc}".replace(url, redact_url(url)), False
        if not retriable or attempts > retries:
            return False, attempts, status, error
        sleep(max(wait, retry_after or 0.0))
        wait *= 2


def _format_subject(template: str, msg: Message) -> str:
    values = {
        "event": msg.event,
        "pipeline": msg.pipeline,
        "execution": msg.execution_id,
        "status": msg.status,
        "stage": msg.stage or "",
    }
    out = template
    for k, v in values.items():
        out = out.replace("{" + k + "}", v)
    return " ".join(out.split())[:200]


def email_message(
    msg: Message, to: Sequence[str], sender: str, subject: str | None = None
) -> EmailMessage:
    em = EmailMessage()
    em["Subject"] = _format_subject(subject, msg) if subject else msg.title
    em["From"] = sender
    em["To"] = ", ".join(to)
    em["Date"] = formatdate(localtime=False, usegmt=True)
    em["Message-ID"] = make_msgid(domain=sender.rpartition("@")[2] or "vmfarm")
    em["X-Vmfarm-Execution"] = msg.execution_id
    em["X-Vmfarm-Event"] = msg.event
    em.set_content(msg.text + "\n")
    return em


_TRANSIENT_SMTP = (smtplib.SMTPConnectError, smtplib.SMTPServerDisconnected, ConnectionRefusedError)


def send_email(
    em: EmailMessage, settings: NotifySettings, *, sleep: Callable[[float], None] = time.sleep
) -> tuple[bool, int, int | None, str | None]:
    """Send over SMTP: (ok, attempts, SMTP code, error). Retries (like webhooks) only what
    cannot have delivered the message: connection failures and 4xx (temporary) replies."""
    if not settings.smtp_host:
        return False, 0, None, "VMFARM_SMTP_HOST is not set"
    attempts, wait = 0, settings.webhook_backoff
    while True:
        attempts += 1
        code: int | None = None
        try:
            cls = smtplib.SMTP_SSL if settings.smtp_ssl else smtplib.SMTP
            with cls(settings.smtp_host, settings.smtp_port, timeout=settings.smtp_timeout) as smtp:
                if settings.smtp_starttls and not settings.smtp_ssl:
                    smtp.starttls(context=ssl.create_default_context())
                if settings.smtp_user:
                    password = (
                        settings.smtp_password.get_secret_value() if settings.smtp_password else ""
                    )
                    smtp.login(settings.smtp_user, password)
                refused = smtp.send_message(em)
            if refused:
                return True, attempts, 250, "refused recipients: " + ", ".join(sorted(refused))
            return True, attempts, 250, None
        except smtplib.SMTPRecipientsRefused as exc:
            return False, attempts, None, "refused recipients: " + ", ".join(sorted(exc.recipients))
        except smtplib.SMTPResponseException as exc:
            code = int(exc.smtp_code)
            msg = (
                exc.smtp_error.decode(errors="replace")
                if isinstance(exc.smtp_error, bytes)
                else str(exc.smtp_error)
            )
            error = f"SMTP {code}: {_first_line(msg, 200)}"
            retriable = 400 <= code < 500
        except _TRANSIENT_SMTP as exc:
            error, retriable = f"{type(exc).__name__}: {exc}", True
        except (OSError, smtplib.SMTPException) as exc:
            error, retriable = f"{type(exc).__name__}: {exc}", isinstance(exc, TimeoutError)
        except Exception as exc:
            error, retriable = f"{type(exc).__name__}: {exc}", False
        if not retriable or attempts > settings.webhook_retries:
            return False, attempts, code, error
        sleep(wait)
        wait *= 2
