"""Handler lookup: built-ins, ``callable:``, third-party entry points, and clear errors."""

from __future__ import annotations

import importlib
import sys
from pathlib import Path
from typing import Any

import pytest

from kie_extend.errors import ConfigError
from kie_extend.handlers import ENTRY_POINT_GROUP, HandlerContext, build_handler, build_handlers
from kie_extend.store.keys import Keys


def _ctx(make_settings: Any) -> HandlerContext:
    import redis

    settings = make_settings()
    return HandlerContext(settings, redis.Redis.from_url(settings.redis_url), Keys(settings.key_prefix))


def test_builtins_and_callable(make_settings: Any) -> None:
    ctx = _ctx(make_settings)
    handlers = build_handlers(["redis_stream", "callable:json:dumps"], ctx)
    assert handlers["redis_stream"].name == "redis_stream"
    handlers["callable:json:dumps"].deliver({"event": "job.succeeded", "job_id": "x"}, "x:job.succeeded")


def test_unknown_and_bad_handlers_name_the_variable(make_settings: Any) -> None:
    ctx = _ctx(make_settings)
    with pytest.raises(ConfigError, match="KIE_HANDLERS.*nope"):
        build_handler("nope", ctx)
    with pytest.raises(ConfigError, match="KIE_HANDLERS"):
        build_handler("callable:no_such_module_here:f", ctx)
    with pytest.raises(ConfigError, match="KIE_HANDLERS"):
        build_handler("callable:json", ctx)


def test_entry_point_plugin(make_settings: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A third-party package registers a handler under the ``kie_extend.handlers`` group."""
    (tmp_path / "acme_sink.py").write_text(
        "class Sink:\n"
        "    name = 'acme'\n"
        "    seen = []\n"
        "    def __init__(self, ctx):\n"
        "        self.prefix = ctx.keys.prefix\n"
        "    def deliver(self, event, dedup_key):\n"
        "        Sink.seen.append(dedup_key)\n"
    )
    dist = tmp_path / "acme_sink-1.0.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: acme-sink\nVersion: 1.0\n")
    (dist / "entry_points.txt").write_text(f"[{ENTRY_POINT_GROUP}]\nacme = acme_sink:Sink\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    importlib.invalidate_caches()
    handler = build_handler("acme", _ctx(make_settings))
    handler.deliver({"event": "job.failed", "job_id": "j"}, "j:job.failed")
    assert sys.modules["acme_sink"].Sink.seen == ["j:job.failed"]
