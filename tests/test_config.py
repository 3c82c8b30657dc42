"""Settings: parsing of durations, rates and lists, and start-up errors that name the variable."""

from __future__ import annotations

import pytest

from kie_extend.config import load_settings, parse_duration, parse_rate
from kie_extend.errors import ConfigError


@pytest.mark.parametrize("text,seconds", [("500ms", 0.5), ("8s", 8), ("20m", 1200), ("2h", 7200), ("7d", 604800),
                                          ("12", 12), (3, 3.0), ("1.5s", 1.5)])
def test_durations(text: object, seconds: float) -> None:
    assert parse_duration(text) == seconds


@pytest.mark.parametrize("bad", ["abc", "-1s", "5 parsecs", True, ""])
def test_bad_durations(bad: object) -> None:
    with pytest.raises(ValueError):
        parse_duration(bad)


def test_rates() -> None:
    assert parse_rate("20/10s") == (20, 10.0)
    assert parse_rate("5/500ms") == (5, 0.5)
    for bad in ("20", "0/10s", "x/10s", "20/0s"):
        with pytest.raises(ValueError):
            parse_rate(bad)


def test_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("KIE_SUBMIT_RATE", "30/5s")
    monkeypatch.setenv("KIE_HANDLERS", "redis_stream, download")
    monkeypatch.setenv("KIE_JOB_TIMEOUT", "5m")
    monkeypatch.setenv("KIE_API_KEY", "secret-value-123")
    s = load_settings(_env_file=None)
    assert s.submit_rate == (30, 5.0) and s.handlers == ["redis_stream", "download"] and s.job_timeout == 300
    assert "secret-value-123" not in repr(s) and s.api_key_value() == "secret-value-123"
    assert s.effective_broker_url == s.redis_url


@pytest.mark.parametrize("env,needle", [
    ({"KIE_JOB_TIMEOUT": "soon"}, "KIE_JOB_TIMEOUT"),
    ({"KIE_SUBMIT_RATE": "fast"}, "KIE_SUBMIT_RATE"),
    ({"KIE_MAX_IN_FLIGHT": "0"}, "KIE_MAX_IN_FLIGHT"),
    ({"KIE_LOG_LEVEL": "LOUD"}, "KIE_LOG_LEVEL"),
    ({"KIE_LOG_FORMAT": "xml"}, "KIE_LOG_FORMAT"),
    ({"KIE_BASE_URL": "ftp://x"}, "KIE_BASE_URL"),
    ({"KIE_HANDLERS": "webhook"}, "KIE_WEBHOOK_URL"),
    ({"KIE_TICK_INTERVAL": "0s"}, "KIE_TICK_INTERVAL"),
    ({"KIE_LEASE": "10s", "KIE_READ_TIMEOUT": "30s"}, "KIE_LEASE"),
    ({"KIE_ROUTE": "sideways"}, "KIE_ROUTE"),
])
def test_errors_name_the_variable(monkeypatch: pytest.MonkeyPatch, env: dict[str, str], needle: str) -> None:
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    with pytest.raises(ConfigError, match=needle):
        load_settings(_env_file=None)


def test_worker_refuses_unknown_handler_at_start(monkeypatch: pytest.MonkeyPatch) -> None:
    from kie_extend.worker import create_app

    monkeypatch.setenv("KIE_HANDLERS", "redis_stream,no_such_handler")
    with pytest.raises(ConfigError, match="no_such_handler"):
        create_app(load_settings(_env_file=None))
