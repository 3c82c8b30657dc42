"""``webhook``: POST every result event as JSON to ``KIE_WEBHOOK_URL``, signed when a secret is set.

Each request carries:

- ``Content-Type: application/json``; the body is the event as compact JSON, and those exact
  bytes are what is signed;
- ``Idempotency-Key: {job_id}:{event}``: the same on every repeat of a delivery (they are at least
  once), so a receiver can drop duplicates. Always printable ASCII: ids follow the id grammar
  (jobs/ids.py); a non-ASCII one an earlier version accepted is sent percent-escaped (UTF-8);
- ``X-Kie-Extend-Timestamp``: unix seconds when the request was signed;
- ``X-Kie-Extend-Signature: sha256=<hex HMAC-SHA256(secret, timestamp + "." + body)>`` when
  ``KIE_WEBHOOK_SECRET`` is set.

Any 2xx answer means delivered. Anything else (another status, a redirect, a timeout, a refused
connection) raises :class:`WebhookError` so the delivery is retried later; its message never
contains the secret or the URL's query string.

A Python receiver checks a request with :func:`verify_signature`::

    from kie_extend.handlers.webhook import verify_signature

    ok = verify_signature(secret, request.headers.get("X-Kie-Extend-Timestamp"),
                          request.get_data(), request.headers.get("X-Kie-Extend-Signature"))

Receivers in other languages compute the HMAC over the raw body bytes as received (never over
re-serialised JSON), compare in constant time, and refuse stale timestamps.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import time
from typing import Any
from urllib.parse import urlsplit

import requests

from kie_extend.provider.client import USER_AGENT
from kie_extend.config import Settings
from kie_extend.errors import ConfigError, KieExtendError
from kie_extend.jobs.ids import header_value
from kie_extend.handlers.base import HandlerContext

#: Header carrying the delivery's stable dedup key.
IDEMPOTENCY_HEADER = "Idempotency-Key"
#: Header carrying the signing time in unix seconds.
TIMESTAMP_HEADER = "X-Kie-Extend-Timestamp"
#: Header carrying ``sha256=<hex HMAC>``; present only when a secret is configured.
SIGNATURE_HEADER = "X-Kie-Extend-Signature"
#: Default largest accepted difference, in seconds, between a signature's timestamp and now.
DEFAULT_MAX_SKEW = 300.0

_PREFIX = "sha256="


class WebhookError(KieExtendError):
    """The webhook receiver did not accept the event; the delivery will be retried."""


def encode_body(event: dict[str, Any]) -> bytes:
    """The event as the compact JSON bytes that are sent and signed."""
    return json.dumps(event, separators=(",", ":")).encode("utf-8")


def _key(secret: str | bytes) -> bytes:
    return secret if isinstance(secret, bytes) else secret.encode("utf-8")


def sign(secret: str | bytes, timestamp: str | int, body: bytes) -> str:
    """The signature header value: ``sha256=`` + hex HMAC-SHA256(secret, timestamp + "." + body)."""
    mac = hmac.new(_key(secret), f"{timestamp}.".encode("ascii") + body, hashlib.sha256)
    return _PREFIX + mac.hexdigest()


def verify_signature(
    secret: str | bytes,
    timestamp: str | int | None,
    body: bytes,
    header: str | None,
    max_skew: float = DEFAULT_MAX_SKEW,
    *,
    now: float | None = None,
) -> bool:
    """True when ``header`` is the valid signature of ``body`` at ``timestamp``, signed at most ``max_skew`` s from now.

    ``timestamp`` is the ``X-Kie-Extend-Timestamp`` header and ``header`` the
    ``X-Kie-Extend-Signature`` header as received; ``body`` is the raw request body. Missing or
    malformed values give False, never an exception. The comparison runs in constant time.
    """
    if not secret or header is None or timestamp is None:
        return False
    ts_text = str(timestamp).strip()
    if not ts_text.isascii() or not ts_text.isdigit():
        return False
    current = time.time() if now is None else now
    if abs(current - int(ts_text)) > max_skew:
        return False
    expected = sign(secret, ts_text, body)
    return hmac.compare_digest(expected.encode("ascii"), header.strip().lower().encode("utf-8", "replace"))


def _redacted(url: str) -> str:
    """``url`` without user info and query, safe for error messages and logs."""
    parts = urlsplit(url)
    host = parts.hostname or ""
    if parts.port:
        host = f"{host}:{parts.port}"
    return f"{parts.scheme}://{host}{parts.path}"


class WebhookHandler:
    """POSTs each event to one URL; any 2xx answer means delivered."""

    name = "webhook"

    def __init__(self, settings: Settings, *, name: str | None = None, url: str | None = None,
                 secret: str | None = None) -> None:
        """The global handler from ``KIE_WEBHOOK_URL``/``KIE_WEBHOOK_SECRET``; or, with ``url`` (and
        ``secret``), a handler called ``name`` for that URL (a tenant's own, handlers/tenants.py).
        ``KIE_WEBHOOK_TIMEOUT`` applies to both. Raises ConfigError without a URL."""
        if url is None:
            if not settings.webhook_url:
                raise ConfigError("KIE_HANDLERS includes 'webhook' but KIE_WEBHOOK_URL is not set")
            url = settings.webhook_url
            secret = settings.webhook_secret.get_secret_value() if settings.webhook_secret else None
        if name is not None:
            self.name = name
        self._url = url
        self._shown = _redacted(url)
        self._secret = secret or None
        self._timeout = settings.webhook_timeout

    def deliver(self, event: dict[str, Any], dedup_key: str) -> None:
        """POST the event; raise WebhookError unless the receiver answers 2xx."""
        body = encode_body(event)
        timestamp = str(int(time.time()))
        headers = {
            "Content-Type": "application/json",
            "User-Agent": USER_AGENT,
            IDEMPOTENCY_HEADER: header_value(dedup_key),
            TIMESTAMP_HEADER: timestamp,
        }
        if self._secret:
            headers[SIGNATURE_HEADER] = sign(self._secret, timestamp, body)
        try:
            # A redirect is not a delivery: requests would turn the POST into a body-less GET.
            response = requests.post(self._url, data=body, headers=headers, timeout=self._timeout,
                                     allow_redirects=False)
        except requests.Timeout:
            raise WebhookError(f"webhook {self._shown}: no answer within {self._timeout:g}s") from None
        except requests.RequestException as exc:
            # requests' own message repeats the full URL (query included); name the failure only.
            raise WebhookError(f"webhook {self._shown}: request failed ({type(exc).__name__})") from None
        with response:
            if not 200 <= response.status_code < 300:
                raise WebhookError(
                    f"webhook {self._shown} answered HTTP {response.status_code} {response.reason or ''}".rstrip()
                )


def factory(ctx: HandlerContext) -> WebhookHandler:
    """Build the handler from the settings."""
    return WebhookHandler(ctx.settings)
