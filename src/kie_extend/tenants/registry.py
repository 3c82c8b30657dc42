"""The tenants file (``KIE_TENANTS_FILE``, TOML): which tenants exist, their tokens and settings.

Shape (README "Tenants")::

    [admin]
    tokens = ["env:KIE_ADMIN_TOKEN"]

    [tenants.shop]
    tokens = ["env:SHOP_TOKEN", "read:env:SHOP_READ_TOKEN"]
    weight = 2
    rate = "5/10s"
    budget = "2000/1d"
    webhook_url = "https://shop.example/hooks/kie"
    webhook_secret = "env:SHOP_WEBHOOK_SECRET"
    stream = true

A secret (a token, ``webhook_secret``) is written literally or as ``env:NAME`` (the value of the
environment variable ``NAME``, which must be set and non-empty). A token prefixed ``read:`` is
read-only. Every problem raises :class:`~kie_extend.errors.ConfigError` naming the file and the key
(``tenants.shop.rate``), never a secret's value. The same token may appear only once in the file.
"""

from __future__ import annotations

import hmac
import os
import re
import tomllib
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from kie_extend.errors import ConfigError
from kie_extend.jobs.ids import is_valid, rule
from kie_extend.store.keys import LEDGER_TTL, SPEND_BUCKET

#: Prefix of a read-only token.
READ_ONLY_PREFIX = "read:"
#: Prefix of a secret read from an environment variable.
ENV_PREFIX = "env:"
#: Keys a tenant's table may have.
TENANT_KEYS = ("tokens", "weight", "rate", "budget", "webhook_url", "webhook_secret", "stream")
#: Keys the ``[admin]`` table may have.
ADMIN_KEYS = ("tokens",)
#: A tenant of this name cannot have ``stream = true``: ``{prefix}:results:unhandled`` is the results
#: readers' set-aside stream (examples/consume_results.py).
RESERVED_STREAM = "unhandled"
_ENV_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
_BUDGET = re.compile(r"^\s*(\d+)\s*/\s*(.+?)\s*$")


@dataclass(frozen=True)
class Token:
    """One configured token: its value (a secret: never logged or shown), read-only or not, and
    the tenant it acts for (None: an admin token)."""

    value: str = field(repr=False)
    read_only: bool
    tenant: str | None


@dataclass(frozen=True)
class Tenant:
    """A declared tenant: ``name`` (ids.py grammar), ``weight`` (>= 1), ``rate`` (``(count,
    window seconds)`` or None), ``budget`` (``(credits, window seconds)`` or None), ``webhook_url``,
    ``webhook_secret`` (a secret), ``stream``; ``rate_text`` and ``budget_text`` as written."""

    name: str
    weight: int = 1
    rate: tuple[int, float] | None = None
    rate_text: str | None = None
    budget: tuple[int, float] | None = None
    budget_text: str | None = None
    webhook_url: str | None = None
    webhook_secret: str | None = field(default=None, repr=False)
    stream: bool = False

    def public(self) -> dict[str, Any]:
        """The tenant's settings as ``GET /v1/tenants`` shows them: no token, no secret (only
        whether a webhook secret is set)."""
        return {"name": self.name, "weight": self.weight, "rate": self.rate_text, "budget": self.budget_text,
                "webhook_url": self.webhook_url, "webhook_secret_set": self.webhook_secret is not None,
                "stream": self.stream}


@dataclass(frozen=True)
class Registry:
    """The parsed tenants file: ``tenants`` by name, every ``tokens`` entry (tenant and admin)."""

    path: str
    tenants: dict[str, Tenant]
    tokens: tuple[Token, ...]

    def declared(self, name: str) -> bool:
        """Whether ``name`` is a declared tenant."""
        return name in self.tenants

    def match(self, presented: str) -> Token | None:
        """The configured token ``presented`` names, or None. Every token is compared in constant
        time, whatever matches first. A read-only token may be presented with or without its
        ``read:`` prefix; a write token with ``read:`` in front matches nothing."""
        found: Token | None = None
        given = presented.encode()
        for token in self.tokens:
            bare = hmac.compare_digest(given, token.value.encode())
            written = token.read_only and hmac.compare_digest(given, (READ_ONLY_PREFIX + token.value).encode())
            if (bare or written) and found is None:
                found = token
        return found


def _fail(path: str, key: str, message: str) -> ConfigError:
    return ConfigError(f"KIE_TENANTS_FILE {path}: {key}: {message}")


def _secret(path: str, key: str, value: Any) -> str:
    """A secret as written (``env:NAME`` read from the environment); ConfigError naming ``key``."""
    if not isinstance(value, str) or not value:
        raise _fail(path, key, "must be a non-empty string (the secret, or env:NAME)")
    if value.startswith(ENV_PREFIX):
        name = value[len(ENV_PREFIX):]
        if not _ENV_NAME.fullmatch(name):
            raise _fail(path, key, f"env:{name[:64]} does not name an environment variable")
        found = os.environ.get(name, "")
        if not found:
            raise _fail(path, key, f"the environment variable {name} is not set (or empty)")
        return found
    return value


def _tokens(path: str, key: str, value: Any, tenant: str | None) -> list[Token]:
    if not isinstance(value, list) or not value:
        raise _fail(path, key, "must be a non-empty list of tokens")
    out = []
    for i, item in enumerate(value):
        where = f"{key}[{i}]"
        read_only = isinstance(item, str) and item.startswith(READ_ONLY_PREFIX)
        secret = _secret(path, where, item[len(READ_ONLY_PREFIX):] if read_only else item)
        if secret.startswith(READ_ONLY_PREFIX):
            raise _fail(path, where, "a token's value may not itself start with 'read:'")
        if len(secret) < 8:
            raise _fail(path, where, "a token must be at least 8 characters")
        out.append(Token(secret, read_only, tenant))
    return out


def budget_window_problem(seconds: float) -> str | None:
    """Why a budget's window (seconds) cannot be counted, or None: spend is kept in hour buckets for
    35 days, so a window must be a whole number of hours from 1h to 35d."""
    got = f"{seconds:g}s" if seconds < SPEND_BUCKET else f"{seconds / SPEND_BUCKET:g}h"
    if seconds < SPEND_BUCKET or seconds % SPEND_BUCKET:
        return f"a budget's window is counted in whole hours: use 1h or longer, in hours (got {got})"
    if seconds > LEDGER_TTL:
        return f"a budget's window can be at most 35d, how long spend is kept (got {got})"
    return None


def _windowed(path: str, key: str, value: Any, parse_rate: Callable[[Any], tuple[int, float]]) -> tuple[int, float]:
    if not isinstance(value, str):
        raise _fail(path, key, "must be a string such as 5/10s")
    try:
        return parse_rate(value)
    except (ValueError, TypeError) as exc:
        raise _fail(path, key, str(exc)) from None


def _unknown(path: str, where: str, table: Mapping[str, Any], known: tuple[str, ...]) -> None:
    extra = sorted(set(table) - set(known))
    if extra:
        raise _fail(path, f"{where}.{extra[0]}", f"unknown key; accepted: {', '.join(known)}")


def parse(data: Mapping[str, Any], path: str, parse_rate: Callable[[Any], tuple[int, float]]) -> Registry:
    """A Registry from the file's parsed TOML ``data``; ``parse_rate`` reads ``COUNT/WINDOW``
    (config.parse_rate). Raises ConfigError naming ``path`` and the key."""
    _unknown(path, "(top level)", data, ("admin", "tenants"))
    tokens: list[Token] = []
    admin = data.get("admin", {})
    if not isinstance(admin, dict):
        raise _fail(path, "admin", "must be a table")
    _unknown(path, "admin", admin, ADMIN_KEYS)
    if "tokens" in admin:
        tokens += _tokens(path, "admin.tokens", admin["tokens"], None)
    declared = data.get("tenants", {})
    if not isinstance(declared, dict):
        raise _fail(path, "tenants", "must be a table of tenants ([tenants.NAME])")
    tenants: dict[str, Tenant] = {}
    for name, table in declared.items():
        where = f"tenants.{name}"
        if not is_valid("tenant", name):
            raise _fail(path, where, f"a tenant name {rule('tenant')}")
        if not isinstance(table, dict):
            raise _fail(path, where, "must be a table")
        _unknown(path, where, table, TENANT_KEYS)
        if "tokens" in table:
            tokens += _tokens(path, f"{where}.tokens", table["tokens"], name)
        weight = table.get("weight", 1)
        if not isinstance(weight, int) or isinstance(weight, bool) or not 1 <= weight <= 1000:
            raise _fail(path, f"{where}.weight", "must be an integer from 1 to 1000")
        rate = _windowed(path, f"{where}.rate", table["rate"], parse_rate) if "rate" in table else None
        budget = None
        if "budget" in table:
            raw = table["budget"]
            match = _BUDGET.match(raw) if isinstance(raw, str) else None
            if match is None:
                raise _fail(path, f"{where}.budget", "must be a string such as 2000/1d (credits per window)")
            budget = _windowed(path, f"{where}.budget", raw, parse_rate)
            if (problem := budget_window_problem(budget[1])) is not None:
                raise _fail(path, f"{where}.budget", problem)
        url = table.get("webhook_url")
        if url is not None and (not isinstance(url, str) or not re.match(r"^https?://[^/\s]+", url)):
            raise _fail(path, f"{where}.webhook_url", "must be an http(s) URL")
        secret = _secret(path, f"{where}.webhook_secret", table["webhook_secret"]) if "webhook_secret" in table else None
        if secret is not None and url is None:
            raise _fail(path, f"{where}.webhook_secret", "is set without webhook_url")
        stream = table.get("stream", False)
        if not isinstance(stream, bool):
            raise _fail(path, f"{where}.stream", "must be true or false")
        if stream and name == RESERVED_STREAM:
            raise _fail(path, f"{where}.stream", f"a tenant named {RESERVED_STREAM!r} cannot have its own stream: "
                        "{prefix}:results:unhandled is where results readers set entries aside")
        tenants[name] = Tenant(name, weight, rate, table.get("rate"), budget, table.get("budget"),
                               url.rstrip("/") if url else None, secret, stream)
    seen: dict[str, str] = {}
    for i, token in enumerate(tokens):
        owner = "admin" if token.tenant is None else f"tenants.{token.tenant}"
        digest = token.value
        if digest in seen:
            raise _fail(path, f"{owner}.tokens", f"the same token is also in {seen[digest]}.tokens; "
                                                 "every token must be unique")
        seen[digest] = owner
    return Registry(path, tenants, tuple(tokens))


def load(path: str, parse_rate: Callable[[Any], tuple[int, float]]) -> Registry:
    """Read and parse the tenants file at ``path`` (see :func:`parse`); ConfigError when it is
    missing, unreadable or not TOML, naming the file (and the line TOML reports)."""
    try:
        with open(path, "rb") as fh:
            data = tomllib.load(fh)
    except FileNotFoundError:
        raise ConfigError(f"KIE_TENANTS_FILE {path}: no such file") from None
    except OSError as exc:
        raise ConfigError(f"KIE_TENANTS_FILE {path}: cannot read it ({exc.strerror or exc})") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"KIE_TENANTS_FILE {path}: not valid TOML ({exc})") from None
    return parse(data, path, parse_rate)


__all__ = ["Token", "Tenant", "Registry", "parse", "load", "READ_ONLY_PREFIX", "TENANT_KEYS"]
