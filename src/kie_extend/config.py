"""Settings: every knob, read from the environment (prefix ``KIE_``, ``.env`` supported).

Built once at an entry point (worker, CLI, serve) and passed down; no module reads the
environment at import time. Durations accept ``500ms``, ``8s``, ``20m``, ``2h``, ``7d`` or plain
seconds; the submission rate is ``COUNT/WINDOW`` such as ``20/10s``.
"""

from __future__ import annotations

import re
from typing import Annotated, Any, Literal

from pydantic import Field, PrivateAttr, SecretStr, field_validator, model_validator
from pydantic import ValidationError as PydanticValidationError
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict
from pydantic_settings.exceptions import SettingsError

from kie_extend.credits.prices import DEFAULT_PRICES, parse_prices
from kie_extend.infra.endpoints import check_url
from kie_extend.errors import ConfigError
from kie_extend.jobs.ids import is_valid, schema_pattern

_UNITS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0}
_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(ms|s|m|h|d)?\s*$")


def parse_duration(value: Any) -> float:
    """Seconds from ``20m``-style text or a number; raises ValueError on anything else."""
    if isinstance(value, bool):
        raise ValueError("expected a duration such as 30s, 20m or 2h")
    if isinstance(value, (int, float)):
        seconds = float(value)
    else:
        match = _DURATION.match(str(value))
        if not match:
            raise ValueError(f"{value!r} is not a duration such as 500ms, 30s, 20m, 2h or 7d")
        seconds = float(match.group(1)) * _UNITS[match.group(2) or "s"]
    if seconds < 0:
        raise ValueError("a duration cannot be negative")
    return seconds


def parse_rate(value: Any) -> tuple[int, float]:
    """``(count, window_seconds)`` from ``20/10s``; raises ValueError on anything else."""
    if isinstance(value, (tuple, list)) and len(value) == 2:
        count, window = int(value[0]), parse_duration(value[1])
    else:
        text = str(value)
        if "/" not in text:
            raise ValueError(f"{value!r} is not a rate such as 20/10s")
        left, right = text.split("/", 1)
        try:
            count = int(left.strip())
        except ValueError:
            raise ValueError(f"{value!r} is not a rate such as 20/10s") from None
        window = parse_duration(right)
    if count <= 0 or window <= 0:
        raise ValueError(f"{str(value)[:40]!r}: the count and the window must be positive")
    return count, window


Duration = Annotated[float, Field(ge=0)]


class Settings(BaseSettings):
    """All kie-extend settings; each field is the environment variable ``KIE_<NAME>``."""

    model_config = SettingsConfigDict(
        env_prefix="KIE_", env_file=".env", env_file_encoding="utf-8", extra="ignore",
        hide_input_in_errors=True,  # a rejected value may hold a password or the API key
    )

    api_key: SecretStr | None = None
    base_url: str = "https://api.kie.ai"
    route: Literal["legacy", "jobs"] = "legacy"  # provider route: legacy upload-extend, or jobs/createTask
    upload_base_url: str = "https://kieai.redpandaai.co"
    redis_url: str = "redis://localhost:6379/0"
    broker_url: str | None = None
    key_prefix: str = "kie_extend"
    queue: str = "kie_extend"
    callback_base_url: str | None = None
    submit_rate: Annotated[tuple[int, float], NoDecode] = (20, 10.0)
    submit_rate_margin: Duration = 0.1
    max_in_flight: int = Field(100, ge=1)
    job_timeout: Duration = 1200.0
    handlers: Annotated[list[str], NoDecode] = ["redis_stream"]
    allow_private_urls: bool = False

    connect_timeout: Duration = 5.0
    read_timeout: Duration = 30.0
    max_submit_attempts: int = Field(5, ge=1)
    maintenance_backoff: Duration = 30.0
    regenerate: int = Field(0, ge=0)
    submit_unknown_window: Duration = 900.0
    # Generations take about 40-120 s and the final audio is never ready before ~55 s, so the first
    # poll waits 25 s: about 3.7 polls per job without callbacks, one with them.
    poll_first: Duration = 25.0
    poll_interval: Duration = 20.0
    poll_max_interval: Duration = 30.0
    poll_callback_interval: Duration = 120.0
    poll_min_gap: Duration = 0.4
    poll_not_found_grace: Duration = 60.0
    tick_interval: Duration = 1.0
    lease: Duration = 60.0
    visibility_timeout: Duration = 300.0
    pause_probe_interval: Duration = 30.0
    retention: Duration = 7 * 86400.0
    idempotency_window: Duration = 86400.0
    metadata_max_bytes: int = Field(16384, ge=0)
    handler_max_attempts: int = Field(8, ge=1)
    progress_events: bool = False
    handler_retry_base: Duration = 2.0
    claim_batch: int = Field(200, ge=1)
    poll_batch: int = Field(8, ge=1, le=100)
    results_maxlen: int = Field(100_000, ge=1000)  # about 1.5 KB an entry: ~150 MB

    webhook_url: str | None = None
    webhook_secret: SecretStr | None = None
    webhook_timeout: Duration = 10.0
    download_dir: str = "downloads"
    store_url: str | None = None
    store_endpoint_url: str | None = None
    store_region: str | None = None
    callback_secret: SecretStr | None = None
    api_tokens: SecretStr | None = None  # KIE_API_TOKENS: comma list of bearer tokens; "read:" prefix = read-only
    session_secret: SecretStr | None = None  # signs dashboard session cookies (default: derived from the tokens)
    http_callback_max_body: int = Field(256 * 1024, ge=1024)  # bytes: largest body of POST /kie/callback/{job_id}
    http_api_max_body: int = Field(16 * 1024 * 1024, ge=1024)  # bytes: largest body of a /v1 request
    http_form_max_body: int = Field(64 * 1024, ge=1024)  # bytes: largest body of any other request (dashboard forms)
    http_json_max_depth: int = Field(64, ge=2)  # deepest nesting of arrays/objects a JSON body may have
    http_body_timeout: Duration = 30.0  # a request's whole body must arrive within this (else 408)
    http_header_timeout: Duration = 10.0  # a request's headers must arrive within this (else the connection is closed)
    http_keep_alive: Duration = 5.0  # an idle keep-alive connection is closed after this
    http_auth_failures: Annotated[tuple[int, float], NoDecode] = (20, 60.0)  # failed logins per client address
    # comma list of proxy addresses whose X-Forwarded-For / X-Forwarded-Proto serve believes; empty = none
    http_trusted_proxies: str = ""
    # the tenants file (TOML, tenants/registry.py): tenants, their tokens and settings; unset = none
    tenants_file: str | None = None
    tenants_strict: bool = False  # with a tenants file: a job naming an undeclared tenant fails (invalid_request)
    _tenants: Any = PrivateAttr(default=None)

    log_level: str = "INFO"
    log_format: str = "text"

    # Redis endpoints: Sentinel and start-up checks (infra/endpoints.py, infra/preflight.py).
    sentinel_master: str = Field("mymaster", min_length=1)  # master name, for sentinel:// URLs
    sentinel_password: SecretStr | None = None  # the sentinels' own password, when they require one
    allow_eviction: bool = False  # start even if Redis may evict keys (a loud warning instead)

    @field_validator("redis_url")
    @classmethod
    def _redis_url(cls, value: str) -> str:
        return check_url(value)

    @field_validator("broker_url")
    @classmethod
    def _broker_url(cls, value: str | None) -> str | None:
        return None if value is None or value == "" else check_url(value, broker=True)

    # -- provider breaker, invariant sweep, success checks --------------------------------------
    breaker_threshold: int = Field(5, ge=1)  # consecutive generation failures that open the breaker
    breaker_cooldown: Duration = 120.0  # wait before one probe job is let through
    sweep_interval: Duration = 60.0  # how often one beat checks every unfinished job is on a schedule
    sweep_grace: Duration = 30.0  # a job must be this long in its state before the sweep repairs it
    admission: Literal["fair", "arrival"] = "fair"  # who gets a free slot: priority/tenants/age, or arrival order
    default_tenant: str = Field("default", pattern=schema_pattern("tenant"))  # tenant of jobs that name none (jobs/ids.py)
    # per-tenant caps on top of the account's rate: "svc-a=5/10s,svc-b=30/1m"
    tenant_limits: Annotated[dict[str, tuple[int, float]], NoDecode] = Field(default_factory=dict)
    # credits (credits/): the estimate each operation reserves, "extend=12,wav=0.4,..." over the defaults
    prices: Annotated[dict[str, float], NoDecode] = Field(default_factory=lambda: dict(DEFAULT_PRICES))
    balance_interval: Duration = 60.0  # the tick snapshots the provider's balance at most this often (0: never)
    redis_socket_timeout: Duration = 15.0  # job store: a reply slower than this counts as lost (the command is re-sent)
    empty_success_polls: int = Field(3, ge=0)  # re-polls of a SUCCESS without audio before failing
    # -- provider unreachable (admission/reach.py): connect failures and edge 5xx pause submission ---------------
    unreachable_threshold: int = Field(3, ge=1)  # such failures (any workers) within the window: unreachable
    unreachable_window: Duration = 30.0  # seconds from the first failure in which the threshold must be met
    unreachable_probe_interval: Duration = 5.0  # one credit probe per interval while unreachable

    @field_validator(
        "job_timeout", "connect_timeout", "read_timeout", "submit_unknown_window", "poll_first",
        "poll_interval", "poll_max_interval", "poll_callback_interval", "poll_min_gap", "poll_not_found_grace",
        "tick_interval", "lease", "maintenance_backoff", "visibility_timeout", "pause_probe_interval", "retention",
        "idempotency_window", "handler_retry_base", "webhook_timeout", "submit_rate_margin",
        "breaker_cooldown", "sweep_interval", "sweep_grace", "redis_socket_timeout",
        "unreachable_window", "unreachable_probe_interval", "http_body_timeout", "http_header_timeout",
        "http_keep_alive", "balance_interval",
        mode="before",
    )
    @classmethod
    def _duration(cls, value: Any) -> float:
        return parse_duration(value)

    @field_validator("submit_rate", "http_auth_failures", mode="before")
    @classmethod
    def _rate(cls, value: Any) -> tuple[int, float]:
        return parse_rate(value)

    @field_validator("tenant_limits", mode="before")
    @classmethod
    def _tenant_limits(cls, value: Any) -> dict[str, tuple[int, float]]:
        if isinstance(value, dict):
            return {str(k): parse_rate(v) for k, v in value.items()}
        out: dict[str, tuple[int, float]] = {}
        for part in str(value or "").split(","):
            if not part.strip():
                continue
            name, sep, rate = part.partition("=")
            name = name.strip()
            if not sep or not is_valid("tenant", name):
                raise ValueError(f"{part.strip()!r} is not TENANT=COUNT/WINDOW such as svc-a=5/10s")
            out[name] = parse_rate(rate.strip())
        return out

    @field_validator("prices", mode="before")
    @classmethod
    def _prices(cls, value: Any) -> dict[str, float]:
        return parse_prices(value)

    @field_validator("handlers", mode="before")
    @classmethod
    def _handlers(cls, value: Any) -> list[str]:
        if isinstance(value, str):
            value = value.split(",")
        names = [str(v).strip() for v in value if str(v).strip()]
        for name in names:
            if "@" in name and not name.startswith("callable:"):
                raise ValueError(f"{name!r}: a name with '@' is a tenant's own handler (webhook@TENANT, "
                                 "redis_stream@TENANT), made from the tenants file (KIE_TENANTS_FILE), not listed here")
        return names

    @field_validator("log_level")
    @classmethod
    def _log_level(cls, value: str) -> str:
        if value.upper() not in ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL"):
            raise ValueError("must be one of DEBUG, INFO, WARNING, ERROR, CRITICAL")
        return value.upper()

    @field_validator("log_format")
    @classmethod
    def _log_format(cls, value: str) -> str:
        if value not in ("text", "json"):
            raise ValueError("must be 'text' or 'json'")
        return value

    @field_validator("base_url", "upload_base_url", "callback_base_url", "webhook_url")
    @classmethod
    def _http_url(cls, value: str | None) -> str | None:
        if value is None or value == "":
            return None if value == "" else value
        if not re.match(r"^https?://[^/\s]+", value):
            raise ValueError(f"{value!r} is not an http(s) URL")
        return value.rstrip("/")

    @model_validator(mode="after")
    def _coherent(self) -> Settings:
        if self.tick_interval <= 0:
            raise ValueError("KIE_TICK_INTERVAL must be greater than 0")
        if self.lease < self.connect_timeout + self.read_timeout:
            raise ValueError("KIE_LEASE must be longer than KIE_CONNECT_TIMEOUT + KIE_READ_TIMEOUT "
                             "(a claimed step must finish before its lease runs out)")
        if self.unreachable_window <= 0:
            raise ValueError("KIE_UNREACHABLE_WINDOW must be greater than 0 (seconds in which "
                             "KIE_UNREACHABLE_THRESHOLD connect failures make the provider unreachable)")
        if self.unreachable_probe_interval <= 0:
            raise ValueError("KIE_UNREACHABLE_PROBE_INTERVAL must be greater than 0 (how often an "
                             "unreachable provider is probed)")
        if self.poll_max_interval < self.poll_interval:
            self.poll_max_interval = self.poll_interval
        if "webhook" in self.handlers and not self.webhook_url:
            raise ValueError("KIE_HANDLERS includes 'webhook' but KIE_WEBHOOK_URL is not set")
        if self.broker_url is None and self.redis_url.strip().lower().startswith("unix://"):
            raise ValueError("KIE_REDIS_URL is a unix:// socket, which the Celery broker cannot use: "
                             "set KIE_BROKER_URL to a redis://, sentinel:// or amqp:// URL")
        self._load_tenants()
        return self

    def _load_tenants(self) -> None:
        """Read KIE_TENANTS_FILE (ConfigError naming the file and key); a tenant's ``rate`` joins
        KIE_TENANT_LIMITS unless that names the tenant itself."""
        if not self.tenants_file:
            self._tenants = None
            return
        from kie_extend.tenants.registry import READ_ONLY_PREFIX, load

        registry = load(self.tenants_file, parse_rate)
        listed = {t.strip().removeprefix(READ_ONLY_PREFIX)
                  for t in (self.api_tokens.get_secret_value() if self.api_tokens else "").split(",") if t.strip()}
        for token in registry.tokens:
            if token.value in listed:
                owner = "admin" if token.tenant is None else f"tenants.{token.tenant}"
                raise ConfigError(f"KIE_TENANTS_FILE {self.tenants_file}: {owner}.tokens: a token is also in "
                                  "KIE_API_TOKENS; every token must be unique")
        for tenant in registry.tenants.values():
            if tenant.rate is not None and tenant.name not in self.tenant_limits:
                self.tenant_limits[tenant.name] = tenant.rate
        self._tenants = registry

    @property
    def tenants(self) -> Any:
        """The parsed tenants file (:class:`kie_extend.tenants.registry.Registry`), or None without
        KIE_TENANTS_FILE."""
        return self._tenants

    @property
    def effective_broker_url(self) -> str:
        """The Celery broker URL: ``KIE_BROKER_URL``, else the job store's Redis URL."""
        return self.broker_url or self.redis_url

    def api_key_value(self) -> str:
        """The bearer token, or an empty string when none is configured."""
        return self.api_key.get_secret_value() if self.api_key else ""


def load_settings(**overrides: Any) -> Settings:
    """Build Settings from the environment (plus overrides), with errors naming the variable."""
    try:
        return Settings(**overrides)
    except PydanticValidationError as exc:
        lines = []
        for err in exc.errors():
            loc = ".".join(str(p) for p in err.get("loc", ()) if p != "__root__")
            var = f"KIE_{loc.upper()}" if loc else "configuration"
            lines.append(f"{var}: {err.get('msg', 'invalid value')}")
        raise ConfigError("invalid configuration: " + "; ".join(lines)) from None
    except SettingsError as exc:
        raise ConfigError(f"invalid configuration: {exc}") from None
