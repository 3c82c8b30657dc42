"""Who may call the API and use the dashboard.

Tokens come from ``KIE_API_TOKENS`` (comma list). A token prefixed ``read:`` is read-only: it may
read everything and change nothing; clients may send it with or without the prefix. Presented tokens are compared with every configured one in
constant time (``hmac.compare_digest``), and a token never reaches a log line or an error.

The dashboard logs in with a token and keeps a signed, HttpOnly, SameSite=Strict session cookie
(``itsdangerous``, keyed by ``KIE_SESSION_SECRET`` or, without one, by a digest of the tokens); every
state-changing form carries a CSRF token bound to the session.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
from dataclasses import dataclass
from typing import Any

from fastapi import HTTPException, Request
from itsdangerous import BadSignature, SignatureExpired, URLSafeTimedSerializer

#: Prefix that marks a read-only token in KIE_API_TOKENS.
READ_ONLY_PREFIX = "read:"
#: Name of the dashboard's session cookie.
SESSION_COOKIE = "kie_session"
#: Seconds a dashboard session lasts.
SESSION_MAX_AGE = 12 * 3600


@dataclass(frozen=True)
class Principal:
    """An authenticated caller: ``name`` is a short, non-secret fingerprint of its token."""

    name: str
    read_only: bool

    @property
    def can_write(self) -> bool:
        """Whether this caller may change anything."""
        return not self.read_only


def parse_tokens(raw: str | None) -> list[tuple[str, bool]]:
    """``(token, read_only)`` pairs from ``KIE_API_TOKENS``; blanks are ignored."""
    out = []
    for part in (raw or "").split(","):
        token = part.strip()
        if not token:
            continue
        if token.startswith(READ_ONLY_PREFIX):
            out.append((token[len(READ_ONLY_PREFIX):], True))
        else:
            out.append((token, False))
    return [(t, ro) for t, ro in out if t]


def unauthorized_reason(header: str) -> str:
    """Why an ``Authorization`` header opens nothing, without echoing any part of it: missing, not
    the Bearer scheme, or a token that is not configured."""
    scheme, _, value = header.partition(" ")
    if not header.strip():
        return "an Authorization: Bearer <token> header is required (a token from KIE_API_TOKENS)"
    if scheme.lower() != "bearer" or not value.strip():
        return "the Authorization header must be 'Bearer <token>' (a token from KIE_API_TOKENS)"
    return "this bearer token is not one of KIE_API_TOKENS (a read-only token may be sent with or without 'read:')"


def fingerprint(token: str) -> str:
    """A short, non-secret name for a token (the first 8 hex of its SHA-256)."""
    return hashlib.sha256(token.encode()).hexdigest()[:8]


class Auth:
    """Checks bearer tokens and dashboard sessions."""

    def __init__(self, tokens: list[tuple[str, bool]], session_secret: str | None = None) -> None:
        self.tokens = tokens
        secret = session_secret or hashlib.sha256(("kie-extend-session|" + "|".join(t for t, _ in tokens))
                                                  .encode()).hexdigest()
        self._sessions = URLSafeTimedSerializer(secret, salt="kie-extend-dashboard")

    @property
    def enabled(self) -> bool:
        """Whether any token is configured (without one the server may only bind to loopback)."""
        return bool(self.tokens)

    def check(self, presented: str | None) -> Principal | None:
        """The principal for a presented token, or None. Every configured token is compared, in
        constant time, whatever matches first.

        A read-only token may be presented with or without its ``read:`` prefix (as it is written in
        ``KIE_API_TOKENS``, or bare); either way it stays read-only. A write token with ``read:`` in
        front matches nothing: the prefix never names a token it was not configured on."""
        if presented is None:
            return None
        found: Principal | None = None
        given = presented.encode()
        for token, read_only in self.tokens:
            as_written = (READ_ONLY_PREFIX + token) if read_only else token
            bare = hmac.compare_digest(given, token.encode())
            written = hmac.compare_digest(given, as_written.encode())
            if (bare or written) and found is None:
                found = Principal(fingerprint(token), read_only)
        return found

    # -- bearer tokens (the JSON API) -------------------------------------------------------
    def from_request(self, request: Request) -> Principal:
        """The caller of an API request; raises HTTPException 401 (JSON body) when it has no
        valid ``Authorization: Bearer`` token (a dashboard cookie is not enough). Without
        configured tokens (loopback only) every caller may write."""
        if not self.enabled:
            return Principal("loopback", False)
        header = request.headers.get("authorization", "")
        scheme, _, value = header.partition(" ")
        # Bearer tokens only: a dashboard session cookie does not open /v1, whose POSTs carry no
        # CSRF token (the dashboard calls the domain code itself).
        principal = self.check(value.strip()) if scheme.lower() == "bearer" else None
        if principal is None:
            raise HTTPException(401, detail={"kind": "unauthorized", "message": unauthorized_reason(header)},
                                headers={"WWW-Authenticate": "Bearer"})
        return principal

    @staticmethod
    def require_write(principal: Principal) -> None:
        """Raise HTTPException 403 for a read-only caller."""
        if not principal.can_write:
            raise HTTPException(403, detail={"kind": "forbidden", "message": "this token is read-only"})

    # -- dashboard sessions --------------------------------------------------------------------
    def new_session(self, principal: Principal) -> str:
        """A signed session value for the cookie (holds the fingerprint, the rights, a CSRF token)."""
        return self._sessions.dumps({"n": principal.name, "ro": principal.read_only,
                                     "csrf": secrets.token_urlsafe(24)})

    def session(self, request: Request) -> dict[str, Any] | None:
        """The decoded session of a dashboard request, or None."""
        raw = request.cookies.get(SESSION_COOKIE)
        if not raw:
            return None
        try:
            data = self._sessions.loads(raw, max_age=SESSION_MAX_AGE)
        except (BadSignature, SignatureExpired):
            return None
        return data if isinstance(data, dict) else None

    def from_session(self, request: Request) -> Principal | None:
        """The principal of a logged-in dashboard session, or None."""
        data = self.session(request)
        if not data:
            return None
        # A session stays valid only while its token is still configured.
        if not any(fingerprint(t) == data.get("n") for t, _ in self.tokens):
            return None
        return Principal(str(data["n"]), bool(data.get("ro")))

    def csrf_ok(self, request: Request, presented: str | None) -> bool:
        """Whether a form's CSRF token matches its session's."""
        data = self.session(request)
        return bool(data and presented and hmac.compare_digest(str(data.get("csrf", "")), presented))
