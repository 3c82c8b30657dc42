"""Identifiers and text: the one grammar for job ids, batch ids and tenants (README "Identifiers").

A job id, batch id or tenant is 1 to N characters (128 for ids, 64 for tenants) of ASCII letters,
digits, ``_``, ``.`` and ``-``, starting with a letter or digit:
``^[A-Za-z0-9][A-Za-z0-9_.-]{0,N-1}$``. So it has no ``:`` (it cannot spell another Redis key's
name), no ``/`` and is never ``.`` or ``..`` (it is a URL path segment and a file name as it is),
is ASCII (it goes into HTTP headers) and never starts with ``-`` (it is a CLI argument). UUIDs,
``batch submit``'s file-derived ids (``songs-198d2040``, ``songs-198d2040-7``) all fit.

Idempotency keys are the caller's own strings (order numbers, URLs, hashes): they stay free text
of 1-256 characters, only refused when they cannot be stored as text (see :func:`text_problem`).
They never reach a URL, a header or a file name, and in a Redis key name they come last after
their own family (``{p}:idem:<key>``, store/keys.py), so no key can spell another key's name: restricting
them would break producers that use their own order numbers or URLs as keys, for no safety gained.

Every entrance checks with these functions: the Python API, the CLI, ``/v1`` (the OpenAPI
document states :func:`schema_pattern`), the worker for Celery messages from any producer, and
batch files. A lookup by an id outside the grammar answers "not found" without touching the store.
"""

from __future__ import annotations

import hashlib
import re
import unicodedata
from typing import Any
from urllib.parse import quote

#: Longest job id and batch id.
MAX_ID = 128
#: Longest tenant name.
MAX_TENANT = 64
#: Longest idempotency key.
MAX_IDEMPOTENCY_KEY = 256

#: The characters of an id, as a regex class.
ID_CHARS = "A-Za-z0-9_.-"


def _pattern(max_len: int) -> re.Pattern[str]:
    return re.compile(rf"[A-Za-z0-9][{ID_CHARS}]{{0,{max_len - 1}}}", re.ASCII)


#: Job ids (the Celery task id; a path segment of the job's callback URL).
JOB_ID_PATTERN = _pattern(MAX_ID)
#: Batch ids.
BATCH_ID_PATTERN = _pattern(MAX_ID)
#: Tenant names (README "Sharing one account").
TENANT_PATTERN = _pattern(MAX_TENANT)

PATTERNS: dict[str, re.Pattern[str]] = {"job_id": JOB_ID_PATTERN, "batch_id": BATCH_ID_PATTERN,
                                        "tenant": TENANT_PATTERN}
_MAX = {"job_id": MAX_ID, "batch_id": MAX_ID, "tenant": MAX_TENANT}


def schema_pattern(kind: str) -> str:
    """The grammar of ``kind`` (``job_id``, ``batch_id``, ``tenant``) as a JSON Schema pattern."""
    return f"^[A-Za-z0-9][{ID_CHARS}]{{0,{_MAX[kind] - 1}}}$"


def rule(kind: str) -> str:
    """The grammar in words, for error messages."""
    return (f"must be 1-{_MAX[kind]} characters of A-Z a-z 0-9 _ . - starting with a letter or digit "
            "(no ':' or '/', ASCII only)")


def is_valid(kind: str, value: Any) -> bool:
    """True when ``value`` is a str in the grammar of ``kind``."""
    return isinstance(value, str) and PATTERNS[kind].fullmatch(value) is not None


def id_problem(kind: str, value: Any) -> dict[str, str] | None:
    """``{"field": kind, "message": …}`` when ``value`` is not a valid ``kind``, else None."""
    return None if is_valid(kind, value) else {"field": kind, "message": rule(kind)}


def check_id(kind: str, value: Any, field: str | None = None) -> str:
    """``value`` itself, or :class:`~kie_extend.errors.ValidationError` naming ``field`` (default ``kind``)."""
    from kie_extend.errors import ValidationError

    if not is_valid(kind, value):
        raise ValidationError([{"field": field or kind, "message": rule(kind)}])
    return value


# -- text --------------------------------------------------------------------------------------

#: Control characters a text may carry (line breaks and tabs are ordinary in lyrics and styles).
_ALLOWED_CONTROLS = frozenset("\t\n\r")


#: The same rule as a JSON Schema pattern (no control character but tab and line breaks; JSON
#: text in UTF-8 cannot hold an unpaired surrogate anyway).
TEXT_SCHEMA_PATTERN = "^[^\\u0000-\\u0008\\u000b\\u000c\\u000e-\\u001f\\u007f-\\u009f]*$"
#: KIE's text fields: controls are refused in these (any field refuses what is not UTF-8).
TEXT_FIELDS = ("prompt", "style", "title", "negativeTags", "personaId", "personaModel", "vocalGender")


def text_problem(value: str, controls: bool = True) -> str | None:
    """Why ``value`` cannot be sent or stored as text, else None: an unpaired surrogate (or anything
    else that does not encode as UTF-8), or, with ``controls``, a NUL or other control character
    (Unicode category Cc) but tab and line breaks."""
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as exc:
        return (f"is not valid Unicode text: {ascii(value[exc.start:exc.end])} at character {exc.start} "
                "cannot be encoded as UTF-8 (an unpaired surrogate?)")
    if not controls:
        return None
    for i, ch in enumerate(value):
        if ch not in _ALLOWED_CONTROLS and unicodedata.category(ch) == "Cc":
            return f"holds the control character U+{ord(ch):04X} at character {i}; only tab and line breaks are allowed"
    return None


def text_problems(value: Any, field: str, depth: int = 0, controls: bool = False) -> list[dict[str, str]]:
    """Every string in ``value`` (and every key of its objects, recursively) that fails
    :func:`text_problem` (``controls`` as there), as problems naming ``field`` (``metadata.a.b``)."""
    out: list[dict[str, str]] = []
    if depth > 64:
        return out
    if isinstance(value, str):
        why = text_problem(value, controls)
        if why:
            out.append({"field": field, "message": why})
    elif isinstance(value, dict):
        for k, v in value.items():
            bad_key = text_problem(k, False) if isinstance(k, str) else None
            name = f"{field}.<key>" if bad_key else f"{field}.{k}"
            if bad_key:
                out.append({"field": name, "message": f"key {bad_key}"})
            out += text_problems(v, name, depth + 1, controls)
    elif isinstance(value, (list, tuple)):
        for i, v in enumerate(value):
            out += text_problems(v, f"{field}[{i}]", depth + 1, controls)
    return out


def idempotency_problem(value: Any) -> dict[str, str] | None:
    """A problem for ``idempotency_key`` when it is not 1-256 characters of storable text, else None."""
    if not isinstance(value, str) or not 0 < len(value) <= MAX_IDEMPOTENCY_KEY:
        return {"field": "idempotency_key", "message": f"must be a string of 1-{MAX_IDEMPOTENCY_KEY} characters"}
    why = text_problem(value)
    return {"field": "idempotency_key", "message": why} if why else None


# -- names built from ids ------------------------------------------------------------------------

def header_value(value: str) -> str:
    """``value`` fit for an HTTP header: itself when printable ASCII, else percent-escaped (UTF-8)."""
    if value.isascii() and value.isprintable():
        return value
    return quote(value.encode("utf-8", "surrogatepass"), safe="!#$%&'*+-.^_`|~:@/")


#: Prefix of the id a message is recorded under when its own task id breaks the grammar.
DERIVED_PREFIX = "invalid-"


def derived_job_id(raw: Any) -> str:
    """The job id a Celery message is recorded under when its task id ``raw`` is not a valid job id:
    ``invalid-`` + 32 hex of SHA-256 of the raw id (the same message always maps to the same id)."""
    data = str(raw).encode("utf-8", "surrogatepass")
    return DERIVED_PREFIX + hashlib.sha256(data).hexdigest()[:32]


__all__ = ["MAX_ID", "MAX_TENANT", "MAX_IDEMPOTENCY_KEY", "JOB_ID_PATTERN", "BATCH_ID_PATTERN",
           "TENANT_PATTERN", "schema_pattern", "rule", "is_valid", "id_problem", "check_id", "text_problem",
           "text_problems", "idempotency_problem", "TEXT_SCHEMA_PATTERN", "TEXT_FIELDS", "header_value", "derived_job_id"]
