"""Who may call the API and use the dashboard.

Tokens come from ``KIE_API_TOKENS`` (comma list: admin tokens) and from the tenants file
(``KIE_TENANTS_FILE``, tenants/registry.py: its ``[admin]`` tokens, and each tenant's, which act for
that tenant alone). A caller is a :class:`Principal`: admin or one tenant, read-only or not. A token prefixed ``read:`` is read-only: it may
read everything and change nothing; clients may send it with or without the prefix. Presented tokens are compared with every configured one in
constant time (``hmac.compare_digest``), and a token never reaches a log line or an error.

The dashboard logs in with a token and keeps a signed, HttpOnly, SameSite=Strict session cookie
(``itsdangerous``, keyed by ``KIE_SESSION_SECRET`` or, without one, by a digest of the tokens); every
state-changing form carries a CSRF token bound to the session. The cookie holds a random session id
and HMAC-SHA256(session secret, token), never the token: each request finds the configured token
with that digest and takes its rights as configured now, so removing the token ends the session and
making it ``read:`` makes the session read-only. Logging out records the session id as revoked in
the job store (:meth:`Keys.session_revoked`, for the session's remaining life), so the old cookie
opens nothing afterwards.

Failed authentications are counted per client address (:class:`FailureLimit`, in this process):
past ``KIE_HTTP_AUTH_FAILURES`` (default 20 per 60 s) an address gets 429 with ``Retry-After`` on
/v1 and on the dashboard's login until its oldest failure leaves the window, whatever token it sends.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
import threading
import time
from collections import OrderedDict, deque
from dataclasses import dataclass
from typing import Any, Callable

from fastapi import HTTPException, Request
from itsdangerous import BadSignature, SignatureExpired, URLSafeTimedSerializer

from kie_extend.tenants.registry import READ_ONLY_PREFIX

#: Name of the dashboard's session cookie.
SESSION_COOKIE = "kie_session"
#: Seconds a dashboard session lasts.
SESSION_MAX_AGE = 12 * 3600


@dataclass(frozen=True)
class Principal:
    """An authenticated caller: ``name`` is a short, non-secret fingerprint of its token;
    ``tenant`` the tenant it acts for, None for an admin (every tenant, account-wide settings)."""

    name: str
    read_only: bool
    tenant: str | None = None

    @property
    def is_admin(self) -> bool:
        """Whether this caller sees every tenant and may change account-wide settings."""
        return self.tenant is None

    def sees(self, tenant: str | None) -> bool:
        """Whether this caller may see a job or batch of ``tenant``."""
        return self.tenant is None or self.tenant == tenant

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
        return "an Authorization: Bearer <token> header is required (a token from KIE_API_TOKENS or the tenants file)"
    if scheme.lower() != "bearer" or not value.strip():
        return "the Authorization header must be 'Bearer <token>' (a token from KIE_API_TOKENS or the tenants file)"
    return ("this bearer token is not one of KIE_API_TOKENS or the tenants file's (a read-only token may be sent "
            "with or without 'read:')")


def fingerprint(token: str, secret: bytes) -> str:
    """A short, non-secret name for a token in logs: the first 8 hex of an HMAC-SHA256 keyed by
    ``secret`` (the session secret). A plain hash of a weak token could be reversed offline from a
    log line; without the secret this cannot."""
    return hmac.new(secret, b"kie-extend-token-name|" + token.encode(), hashlib.sha256).hexdigest()[:8]


class FailureLimit:
    """At most ``count`` failed authentications per client address within ``window`` seconds.

    Kept in this process, not in Redis: it must hold while the job store is down (a login or a 401
    touches no Redis) and costs a guesser no round trip; with several ``serve`` replicas each counts
    its own, so an address may fail ``count`` times per replica. At most ``max_addresses`` addresses
    are remembered (the least recently failing are forgotten first). Thread-safe."""

    def __init__(self, count: int = 20, window: float = 60.0, max_addresses: int = 100_000,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.count = count
        self.window = window
        self.max_addresses = max_addresses
        self._clock = clock
        self._lock = threading.Lock()
        self._failures: OrderedDict[str, deque[float]] = OrderedDict()

    def retry_after(self, address: str) -> float:
        """Seconds until ``address`` may try again (0.0: it may now)."""
        with self._lock:
            times = self._recent(address)
            if times is None or len(times) < self.count:
                return 0.0
            return max(0.0, times[0] + self.window - self._clock())

    def failed(self, address: str) -> None:
        """Count one failed authentication from ``address``."""
        with self._lock:
            times = self._recent(address) or deque()
            times.append(self._clock())
            while len(times) > self.count:
                times.popleft()
            self._failures[address] = times
            self._failures.move_to_end(address)
            while len(self._failures) > self.max_addresses:
                self._failures.popitem(last=False)

    def _recent(self, address: str) -> deque[float] | None:
        times = self._failures.get(address)
        if times is None:
            return None
        cutoff = self._clock() - self.window
        while times and times[0] <= cutoff:
            times.popleft()
        if not times:
            del self._failures[address]
            return None
        return times


def client_address(request: Request) -> str:
    """The address a request came from (uvicorn's view: the peer, or the forwarded address when the
    peer is a trusted proxy, see ``--forwarded-allow-ips``)."""
    return request.client.host if request.client else "unknown"


class Revocations:
    """Logged-out session ids, in the job store: ``revoke`` records one for ``ttl`` seconds."""

    def __init__(self, redis: Any, key: Callable[[str], str]) -> None:
        self.redis = redis
        self.key = key

    def revoke(self, sid: str, ttl: int) -> None:
        """Record ``sid`` as logged out for ``ttl`` seconds (its cookie's remaining life)."""
        self.redis.set(self.key(sid), "1", ex=max(1, ttl))

    def revoked(self, sid: str) -> bool:
        """Whether ``sid`` was logged out."""
        return bool(self.redis.exists(self.key(sid)))


class Auth:
    """Checks bearer tokens and dashboard sessions."""

    def __init__(self, tokens: list[tuple[str, bool]], session_secret: str | None = None, *,
                 failures: FailureLimit | None = None, revocations: Revocations | None = None,
                 tenant_tokens: list[tuple[str, bool, str | None]] | None = None) -> None:
        """``tokens``: ``(token, read_only)`` admin tokens (KIE_API_TOKENS); ``tenant_tokens``:
        ``(token, read_only, tenant or None for admin)`` from the tenants file."""
        self.tokens: list[tuple[str, bool, str | None]] = [(t, ro, None) for t, ro in tokens] + list(tenant_tokens or [])
        secret = session_secret or hashlib.sha256(("kie-extend-session|" + "|".join(t for t, _, _ in self.tokens))
                                                  .encode()).hexdigest()
        self._secret = secret.encode()
        self._sessions = URLSafeTimedSerializer(secret, salt="kie-extend-dashboard")
        self.failures = failures or FailureLimit()
        self.revocations = revocations

    def name(self, token: str) -> str:
        """The token's name in logs and actions (:func:`fingerprint` with the session secret)."""
        return fingerprint(token, self._secret)

    def token_digest(self, token: str) -> str:
        """HMAC-SHA256 of a (bare) token keyed by the session secret: what a session stores."""
        return hmac.new(self._secret, b"kie-extend-session-token|" + token.encode(), hashlib.sha256).hexdigest()

    def throttle(self, request: Request) -> None:
        """Raise HTTPException 429 (``Retry-After``) when the request's address has failed to
        authenticate too often (:class:`FailureLimit`)."""
        wait = self.failures.retry_after(client_address(request))
        if wait > 0:
            raise HTTPException(429, detail={"kind": "too_many_failures",
                                             "message": f"too many failed authentications from this address; "
                                                        f"try again in {int(wait) + 1} s"},
                                headers={"Retry-After": str(int(wait) + 1)})

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
        match = self.match(presented)
        return Principal(self.name(match[0]), match[1], match[2]) if match else None

    def match(self, presented: str | None) -> tuple[str, bool, str | None] | None:
        """The configured ``(bare token, read_only, tenant)`` a presented token names, or None (see
        :meth:`check`; ``tenant`` None: an admin token)."""
        if presented is None:
            return None
        found: tuple[str, bool, str | None] | None = None
        given = presented.encode()
        for token, read_only, tenant in self.tokens:
            as_written = (READ_ONLY_PREFIX + token) if read_only else token
            bare = hmac.compare_digest(given, token.encode())
            written = hmac.compare_digest(given, as_written.encode())
            if (bare or written) and found is None:
                found = (token, read_only, tenant)
        return found

    # -- bearer tokens (the JSON API) -------------------------------------------------------
    def from_request(self, request: Request) -> Principal:
        """The caller of an API request; raises HTTPException 401 (JSON body) when it has no
        valid ``Authorization: Bearer`` token (a dashboard cookie is not enough). Without
        configured tokens (loopback only) every caller may write."""
        if not self.enabled:
            return Principal("loopback", False)
        self.throttle(request)
        header = request.headers.get("authorization", "")
        scheme, _, value = header.partition(" ")
        # Bearer tokens only: a dashboard session cookie does not open /v1, whose POSTs carry no
        # CSRF token (the dashboard calls the domain code itself).
        principal = self.check(value.strip()) if scheme.lower() == "bearer" else None
        if principal is None:
            if header.strip():  # a guess (a request with no credentials at all guesses nothing)
                self.failures.failed(client_address(request))
            raise HTTPException(401, detail={"kind": "unauthorized", "message": unauthorized_reason(header)},
                                headers={"WWW-Authenticate": "Bearer"})
        return principal

    @staticmethod
    def require_write(principal: Principal) -> None:
        """Raise HTTPException 403 for a read-only caller."""
        if not principal.can_write:
            raise HTTPException(403, detail={"kind": "forbidden", "message": "this token is read-only"})

    @staticmethod
    def require_admin(principal: Principal) -> None:
        """Raise HTTPException 403 for a tenant's token (account-wide actions need an admin token)."""
        if not principal.is_admin:
            raise HTTPException(403, detail={"kind": "forbidden", "message": "this needs an admin token (KIE_API_TOKENS "
                                                                           "or the tenants file's [admin] tokens)"})

    # -- dashboard sessions --------------------------------------------------------------------
    def new_session(self, token: str | None = None) -> str:
        """A signed session value for the cookie: a random session id, the digest of the (bare,
        configured) ``token`` it was made with (:meth:`token_digest`; None for the open loopback
        dashboard), a CSRF token. Never the token itself."""
        return self._sessions.dumps({"sid": secrets.token_urlsafe(18),
                                     "d": self.token_digest(token) if token is not None else "",
                                     "csrf": secrets.token_urlsafe(24)})

    def session(self, request: Request, *, check_revoked: bool = True) -> dict[str, Any] | None:
        """The decoded session of a dashboard request, or None (no cookie, a bad or expired
        signature, or a session that was logged out). ``check_revoked=False`` skips the job store
        (only for the "job store unreachable" page, which can show or change nothing)."""
        raw = request.cookies.get(SESSION_COOKIE)
        if not raw:
            return None
        try:
            data = self._sessions.loads(raw, max_age=SESSION_MAX_AGE)
        except (BadSignature, SignatureExpired):
            return None
        if not isinstance(data, dict) or not isinstance(data.get("sid"), str):
            return None
        if check_revoked and self.revocations is not None and self.revocations.revoked(data["sid"]):
            return None
        return data

    def from_session(self, request: Request, *, check_revoked: bool = True) -> Principal | None:
        """The principal of a logged-in dashboard session, or None. Its rights are those its token
        has now: a session whose token is no longer configured is None, one whose token became
        ``read:`` is read-only. ``check_revoked``: as for :meth:`session`."""
        data = self.session(request, check_revoked=check_revoked)
        if not data or not data.get("d"):
            return None
        digest = str(data["d"])
        found: Principal | None = None
        for token, read_only, tenant in self.tokens:
            if hmac.compare_digest(self.token_digest(token), digest) and found is None:
                found = Principal(self.name(token), read_only, tenant)
        return found

    def end_session(self, request: Request) -> None:
        """Revoke the request's session server-side (logout): its cookie opens nothing afterwards."""
        data = self.session(request)
        if data is not None and self.revocations is not None:
            self.revocations.revoke(data["sid"], SESSION_MAX_AGE)

    def csrf_ok(self, request: Request, presented: str | None) -> bool:
        """Whether a form's CSRF token matches its session's."""
        data = self.session(request)
        return bool(data and presented and hmac.compare_digest(str(data.get("csrf", "")), presented))
