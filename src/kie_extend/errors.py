"""One error tree for kie-extend.

::

    KieExtendError
     ├── ConfigError                      bad setting, named by its variable
     ├── ValidationError                  a request breaks the provider's rules (.errors lists them all)
     │    ├── JobExistsError              an explicit job id that is already taken
     │    └── IdempotencyConflictError    an idempotency key another request holds (in its tenant)
     └── ProviderError                    anything that went wrong talking to KIE
          ├── ProviderCodeError           KIE answered with a non-200 code (.code, .retryable, .kind)
          │    ├── InvalidRequestError    400, 413, 422, 500 "field is required"   kind invalid_request
          │    ├── RejectedError          404, 409, 451, 505, other 4xx            kind rejected
          │    ├── AccountError           401, 402, 433: pause all submission, fail no job
          │    ├── RateLimitedError       429: not queued by KIE, send again later
          │    ├── UnavailableError       455, 500, 408, 502-504, other 5xx        retryable, bounded
          │    │    └── EdgeError         a proxy's 5xx without KIE's envelope     provider unreachable
          │    └── GenerationFailedError  501, 531                                 kind generation_failed
          └── TransportError              no usable answer (.sent says whether KIE may have the request)
               ├── ConnectError           never reached KIE: retry freely
               └── OutcomeUnknownError    sent, then timed out or dropped: never resend blindly

Beside their concern, under the same root: ``InfraUnavailable`` (infra/check.py: the job store or
broker refuses us; also a ``ConnectionError``), ``InputError`` (cli/errors.py: a file or flag of the
command line) and the handlers' delivery errors (``WebhookError``, ``DownloadError``, ``StoreError``:
raised to have a delivery retried).

`error_for_code` is the one place a provider code becomes an exception; `retry_delay` is the one
place that decides how long to wait before trying the provider again; `is_unreachable` and `costs_nothing` say
which errors mean "KIE cannot be reached" (they pause submission for everyone, see admission/reach.py) and
which of those provably never reached KIE (a submission that met one keeps its attempt). Constructor arguments stay plain strings
and ints so Celery can rebuild them, and nothing in them ever carries the API key.
"""

from __future__ import annotations

import random
from collections.abc import Iterable, Mapping
from typing import Any, Literal

ErrorKind = Literal[
    "invalid_request",
    "rejected",
    "generation_failed",
    "timed_out",
    "submit_outcome_unknown",
    "provider_unavailable",
]


class KieExtendError(Exception):
    """Root of every error raised by kie-extend."""


class ConfigError(KieExtendError):
    """A setting is missing or malformed; the message names the environment variable."""


def config_error_line(exc: ConfigError) -> str:
    """The one line shown for a bad setting (``exc``'s message plus where to fix it): a setting is
    set in the environment or in .env; a mistake inside the tenants file is fixed in the file; an
    ``env:NAME`` the file names is read from the environment only (never from .env)."""
    text = str(exc)
    if text.startswith("KIE_TENANTS_FILE ") and ": no such file" not in text:
        if "the environment variable" in text:
            return text + " (export it to every process that reads the file: env: is not read from .env)"
        return text + " (fix the file)"
    return text + " (set it in the environment or in .env)"


def describe_problems(errors: Iterable[Mapping[str, Any]], limit: int = 1000) -> str:
    """``continueAt: must be > 0; title: required``: field problems on one line, at most ``limit``
    characters (cut with ``…``). A problem filed under the field ``message`` (the whole message
    was unusable) is given without its field name."""
    parts = [str(e.get("message", "")) if e.get("field") == "message" else f"{e.get('field')}: {e.get('message')}"
             for e in errors]
    text = "; ".join(parts)
    return text if len(text) <= limit else text[:limit - 1] + "…"


def describe_error(error: Mapping[str, Any] | None) -> str:
    """A job record's ``error`` as one line that names the cause: ``invalid_request: continueAt:
    must be > 0; title: required``, ``rejected (code 451): …``, ``cancelled (deadline): …``.
    ``""`` for no error."""
    if not error:
        return ""
    message = str(error.get("message") or "")
    head = str(error.get("kind") or "error")
    if error.get("reason"):
        head += f" ({error['reason']})"
    elif error.get("code") is not None and str(error["code"]) not in message:
        head += f" (code {error['code']})"
    problems = error.get("errors")
    text = describe_problems(problems) if isinstance(problems, list) and problems else message
    return f"{head}: {text}" if text else head


class ValidationError(KieExtendError, ValueError):
    """A request breaks the provider's rules; ``errors`` lists every bad field."""

    def __init__(self, errors: list[dict[str, str]]) -> None:
        self.errors = list(errors)
        super().__init__(f"invalid request ({len(self.errors)} problem(s)): {describe_problems(self.errors)}")

    def __reduce__(self) -> tuple[Any, ...]:
        return (type(self), (self.errors,))


class JobExistsError(ValidationError):
    """An explicit job id that another job already holds; nothing was enqueued."""

    def __init__(self, job_id: str) -> None:
        self.job_id = job_id
        super().__init__([{"field": "job_id", "message": f"a job with id {job_id!r} already exists; "
                           "job ids must be unique (use idempotency_key to make a retry harmless)"}])

    def __reduce__(self) -> tuple[Any, ...]:
        return (type(self), (self.job_id,))


class IdempotencyConflictError(ValidationError):
    """An idempotency key that another request already holds in the same tenant; nothing was sent.
    The refusal is recorded as a failed job (``invalid_request``, with its own result event):
    ``job_ids`` names it (one per refused item; ``fields`` the items' field names)."""

    def __init__(self, job_ids: list[str], fields: list[str] | None = None) -> None:
        self.job_ids = list(job_ids)
        self.fields = list(fields or ["idempotency_key"] * len(self.job_ids))
        super().__init__([{"field": f, "message": "idempotency key reused with a different request"}
                          for f in self.fields])

    def __reduce__(self) -> tuple[Any, ...]:
        return (type(self), (self.job_ids, self.fields))


class ProviderError(KieExtendError):
    """Something went wrong talking to the provider."""

    retryable: bool = False
    kind: ErrorKind = "provider_unavailable"


class ProviderCodeError(ProviderError):
    """The provider answered with a non-success code (body ``code``, else the HTTP status)."""

    def __init__(self, code: int, msg: str = "") -> None:
        self.code = int(code)
        self.msg = str(msg)[:500]
        super().__init__(f"KIE code {self.code}: {self.msg}" if self.msg else f"KIE code {self.code}")

    def __reduce__(self) -> tuple[Any, ...]:
        return (type(self), (self.code, self.msg))


class InvalidRequestError(ProviderCodeError):
    """The provider refused the request's content (400, 413, 422, 500 'field is required')."""

    kind: ErrorKind = "invalid_request"


class RejectedError(ProviderCodeError):
    """A permanent refusal that is not about the fields (404, 409, 451, 505, other 4xx)."""

    kind: ErrorKind = "rejected"


class AccountError(ProviderCodeError):
    """The account cannot submit (401 key, 402 credits, 433 sub-key quota): pause, fail nothing."""


class RateLimitedError(ProviderCodeError):
    """429: the request was refused for rate and not queued; send again later."""

    retryable = True


class UnavailableError(ProviderCodeError):
    """A transient provider problem (455, 500, 408, 502-504, other 5xx); retry with backoff."""

    retryable = True


class EdgeError(UnavailableError):
    """A 5xx from something in front of KIE (a proxy, load balancer or CDN): the HTTP status is one
    of :data:`EDGE_STATUSES` and the body is not KIE's JSON envelope. KIE itself did not answer, so
    this counts towards "provider unreachable" (admission/reach.py) like a refused connection."""

    @property
    def may_have_reached(self) -> bool:
        """Whether the edge may have handed the request on to KIE before failing (bad gateway or
        an unusable answer: 502, 520; a gateway timeout: 504, 524), so a submission that met it
        keeps counting an attempt."""
        return self.code in EDGE_MAY_HAVE_REACHED


class GenerationFailedError(ProviderCodeError):
    """The provider accepted the work but produced no music (501, 531)."""

    kind: ErrorKind = "generation_failed"


class TransportError(ProviderError):
    """No usable answer came back; ``sent`` tells whether the provider may have the request."""

    sent: bool = True

    def __init__(self, detail: str = "") -> None:
        self.detail = str(detail)[:500]
        super().__init__(self.detail or type(self).__name__)

    def __reduce__(self) -> tuple[Any, ...]:
        return (type(self), (self.detail,))


class ConnectError(TransportError):
    """The request never reached the provider (DNS, refused, TLS, edge block): safe to resend."""

    sent = False
    retryable = True


class OutcomeUnknownError(TransportError):
    """The request went out but no answer came (read timeout, dropped): do not resend."""

    sent = True
    retryable = False
    kind: ErrorKind = "submit_outcome_unknown"


def error_for_code(code: int, msg: str = "") -> ProviderCodeError:
    """Map a provider code (body code, or HTTP status when the body has none) to its exception."""
    text = (msg or "").lower()
    if code == 500 and "field is required" in text:
        return InvalidRequestError(code, msg)
    if code == 400 and "try again later" in text:
        return GenerationFailedError(code, msg)
    if code in (400, 413, 422):
        return InvalidRequestError(code, msg)
    if code in (401, 402, 433):
        return AccountError(code, msg)
    if code == 429:
        return RateLimitedError(code, msg)
    if code in (501, 531):
        return GenerationFailedError(code, msg)
    if code == 505:  # feature disabled: permanent, whatever its 5xx looks
        return RejectedError(code, msg)
    if code in (408, 455) or code >= 500:
        return UnavailableError(code, msg)
    return RejectedError(code, msg)


#: HTTP statuses that, without KIE's JSON envelope, come from an edge in front of KIE: bad gateway,
#: service unavailable, gateway timeout, and the CDN's origin-unreachable family (520-526, 530).
EDGE_STATUSES = frozenset({502, 503, 504, 520, 521, 522, 523, 524, 525, 526, 530})
#: Edge statuses after which the request may have been handed on to KIE: the upstream's answer was
#: broken (502, 520) or late (504, 524). The others (503, 521-523, 525, 526, 530) mean the edge
#: found no upstream to talk to.
EDGE_MAY_HAVE_REACHED = frozenset({502, 504, 520, 524})


def is_unreachable(exc: BaseException) -> bool:
    """Whether ``exc`` says no answer came from KIE itself: a connect-level failure (refused, DNS,
    TLS, connect timeout; :class:`ConnectError`), an edge's 5xx (:class:`EdgeError`), or a request
    that went out and got no answer (read timeout, dropped; :class:`OutcomeUnknownError`, which
    keeps its own never-resend handling: it only counts towards the pause, see admission/reach.py)."""
    return isinstance(exc, (TransportError, EdgeError))


def costs_nothing(exc: BaseException) -> bool:
    """Whether a submission that failed with ``exc`` provably never reached KIE, so it is put back
    without counting an attempt: a connect-level failure, or the 5xx of an edge that found no
    upstream (503, 521-523, 525, 526, 530). Everything else keeps counting attempts
    (an edge 502/504 may have handed the request on; never-pay-twice)."""
    if isinstance(exc, ConnectError):
        return True
    return isinstance(exc, EdgeError) and not exc.may_have_reached


#: Base delay (seconds) of the exponential backoff for retryable provider errors.
RETRY_BASE_SECONDS = 2.0
#: Upper bound (seconds) of any single backoff delay.
RETRY_MAX_SECONDS = 300.0
#: Minimum wait (seconds) after a 455 "maintenance" answer.
MAINTENANCE_MIN_SECONDS = 30.0


def retry_delay(error: ProviderError, attempt: int, *, rate_window: float = 10.0,
                maintenance: float = MAINTENANCE_MIN_SECONDS) -> float:
    """Seconds to wait before attempt ``attempt + 1`` after ``error`` (jittered, bounded)."""
    base = RETRY_BASE_SECONDS * (2 ** max(0, attempt - 1))
    floor = 0.0
    if isinstance(error, RateLimitedError):
        floor = rate_window
    elif isinstance(error, ProviderCodeError) and error.code == 455:
        floor = maintenance
    return float(min(RETRY_MAX_SECONDS, max(floor, base * (0.75 + random.random() * 0.5))))
