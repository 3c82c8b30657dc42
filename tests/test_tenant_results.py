"""Own results (KIE_TENANTS_FILE ``webhook_url``/``webhook_secret``/``stream``): real worker and beat
processes, the simulator, and each tenant's webhook receiver as a real loopback HTTP server here.

Tenants ``shop`` (own webhook and own stream), ``blog`` (own webhook, a receiver that refuses each
event twice before taking it) and ``news`` (own webhook that always fails until the test fixes it).
The global ``redis_stream`` handler keeps running for every job.
"""

from __future__ import annotations

import json
import subprocess
import sys
import threading
import time
import uuid
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
import redis

from kie_extend.api import enqueue_many, get_batch, get_job
from kie_extend.cli.devstack import DevStack
from kie_extend.config import Settings
from kie_extend.handlers.tenants import TenantRoutes, handler_name, tenant_of
from kie_extend.handlers.webhook import SIGNATURE_HEADER, TIMESTAMP_HEADER, verify_signature
from kie_extend.store.keys import Keys

API_KEY = "tres-api-key-" + uuid.uuid4().hex
SHOP_SECRET = "shop-whsec-" + uuid.uuid4().hex
BLOG_SECRET = "blog-whsec-" + uuid.uuid4().hex
NEWS_SECRET = "news-whsec-" + uuid.uuid4().hex
ROOT = Path(__file__).resolve().parent.parent
SECRETS = (API_KEY, SHOP_SECRET, BLOG_SECRET, NEWS_SECRET)
TERMINAL = ("succeeded", "failed", "cancelled")


# ----- pure logic ----------------------------------------------------------------------------------

def test_routes_add_a_tenants_own_handlers_to_the_global_ones() -> None:
    routes = TenantRoutes(["redis_stream", "callable:m:f"],
                          [handler_name("webhook", "shop"), handler_name("redis_stream", "shop"),
                           handler_name("webhook", "blog")])
    assert routes.names_for(None) == ("redis_stream", "callable:m:f")
    assert routes.names_for("other") == ("redis_stream", "callable:m:f")
    assert routes.names_for("shop") == ("redis_stream", "callable:m:f", "webhook@shop", "redis_stream@shop")
    assert routes.names_for("blog") == ("redis_stream", "callable:m:f", "webhook@blog")
    assert set(routes.all_names()) == {"redis_stream", "callable:m:f", "webhook@shop", "redis_stream@shop",
                                       "webhook@blog"}
    assert tenant_of("webhook@shop") == "shop" and tenant_of("redis_stream@a.b-c") == "a.b-c"
    assert tenant_of("webhook") is None and tenant_of("callable:pkg.mod:f") is None
    assert tenant_of("download@shop") is None and tenant_of("webhook@") is None


def test_kie_handlers_refuses_a_tenant_handler_name(make_settings: Callable[..., Settings]) -> None:
    with pytest.raises(Exception, match="tenant's own handler"):
        make_settings(handlers="redis_stream,webhook@shop")


# ----- webhook receivers ---------------------------------------------------------------------------

@dataclass
class Received:
    """One request a receiver took."""

    headers: dict[str, str]
    body: bytes

    @property
    def event(self) -> dict[str, Any]:
        return json.loads(self.body)  # type: ignore[no-any-return]


@dataclass
class Receiver:
    """A loopback HTTP server standing for one tenant's webhook endpoint.

    ``refuse_first``: answer 503 to the first N requests of every Idempotency-Key (a receiver that
    is down for a while); ``down``: answer 500 to everything while true. Every accepted (2xx)
    request is kept in ``accepted``; refused ones are counted in ``refused``."""

    refuse_first: int = 0
    down: bool = False
    accepted: list[Received] = field(default_factory=list)
    refused: int = 0
    tries: Counter[str] = field(default_factory=Counter)
    port: int = 0
    lock: threading.Lock = field(default_factory=threading.Lock)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/hooks/kie?src=test"

    def answer(self, headers: dict[str, str], body: bytes) -> int:
        with self.lock:
            key = headers.get("idempotency-key", "")
            self.tries[key] += 1
            if self.down or self.tries[key] <= self.refuse_first:
                self.refused += 1
                return 503 if not self.down else 500
            self.accepted.append(Received(headers, body))
            return 204

    def keys(self) -> Counter[str]:
        with self.lock:
            return Counter(r.headers["idempotency-key"] for r in self.accepted)


@pytest.fixture
def receivers() -> Iterator[Callable[..., Receiver]]:
    servers: list[ThreadingHTTPServer] = []

    def start(**options: Any) -> Receiver:
        state = Receiver(**options)

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802 - the stdlib's name
                body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                status = state.answer({k.lower(): v for k, v in self.headers.items()}, body)
                self.send_response(status)
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, *args: Any) -> None:
                pass

        httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        httpd.daemon_threads = True
        state.port = httpd.server_address[1]
        threading.Thread(target=httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()
        servers.append(httpd)
        return state

    yield start
    for httpd in servers:
        httpd.shutdown()
        httpd.server_close()


# ----- the system ----------------------------------------------------------------------------------

BASE_ENV = {
    "KIE_API_KEY": API_KEY, "KIE_HANDLERS": "redis_stream",
    "KIE_POLL_FIRST": "1s", "KIE_POLL_INTERVAL": "1s", "KIE_POLL_MAX_INTERVAL": "2s",
    "KIE_POLL_CALLBACK_INTERVAL": "2s", "KIE_TICK_INTERVAL": "0.3s", "KIE_LEASE": "8s",
    "KIE_VISIBILITY_TIMEOUT": "15s", "KIE_HANDLER_RETRY_BASE": "0.3s", "KIE_HANDLER_MAX_ATTEMPTS": "4",
    "KIE_WEBHOOK_TIMEOUT": "3s", "KIE_READ_TIMEOUT": "5s", "KIE_CONNECT_TIMEOUT": "2s",
}


def tenants_toml(shop: Receiver, blog: Receiver, news: Receiver | None = None) -> str:
    text = f"""
[tenants.shop]
webhook_url = "{shop.url}"
webhook_secret = "env:TRES_SHOP_SECRET"
stream = true

[tenants.blog]
webhook_url = "{blog.url}"
webhook_secret = "{BLOG_SECRET}"
"""
    if news is not None:
        text += f'\n[tenants.news]\nwebhook_url = "{news.url}"\nwebhook_secret = "{NEWS_SECRET}"\n'
    return text


def make_stack(tmp: Path, toml: str, **env: str) -> DevStack:
    path = tmp / "tenants.toml"
    path.write_text(toml)
    return DevStack(tmp, key_prefix=f"tres{uuid.uuid4().hex[:6]}",
                    env={**BASE_ENV, "KIE_TENANTS_FILE": str(path), "TRES_SHOP_SECRET": SHOP_SECRET, **env})


def items(stack: DevStack, tenant: str | None, n: int, **extra: Any) -> list[dict[str, Any]]:
    out = []
    for i in range(n):
        item: dict[str, Any] = {
            "request": {"uploadUrl": f"{stack.sim_url}/files/source/30s.mp3", "defaultParamFlag": True,
                        "instrumental": True, "continueAt": 5 + i, "model": "V5", "style": "rock",
                        "title": f"{tenant} {i}"},
            "metadata": {"tenant": tenant, "i": i}, **extra}
        if tenant:
            item["tenant"] = tenant
        out.append(item)
    return out


def wait_delivered(settings: Settings, ids: list[str], timeout: float,
                   done: tuple[str, ...] = ("delivered", "dead")) -> dict[str, dict[str, Any]]:
    deadline = time.monotonic() + timeout
    recs: dict[str, dict[str, Any]] = {}
    while time.monotonic() < deadline:
        recs = {j: get_job(j, settings=settings) for j in ids}
        if all(r["state"] in TERMINAL and r["handlers"]
               and all(h.get("state") in done for h in r["handlers"].values()) for r in recs.values()):
            return recs
        time.sleep(0.3)
    raise AssertionError(f"not all delivered in {timeout}s: "
                         f"{[(j, r['state'], r['handlers']) for j, r in recs.items()][:6]}")


def stream_entries(r: redis.Redis, key: str) -> list[dict[str, Any]]:
    return [{k.decode(): v.decode() for k, v in f.items()} for _, f in r.xrange(key)]


def assert_no_secret_anywhere(stack: DevStack) -> None:
    """No secret in any Redis key or value, nor in any child's log."""
    r = redis.Redis.from_url(stack.redis_url)
    for key in r.scan_iter(count=1000):
        kind = r.type(key).decode()
        blob = key
        if kind == "string":
            blob += r.get(key) or b""
        elif kind == "hash":
            blob += b"".join(k + v for k, v in r.hgetall(key).items())
        elif kind == "list":
            blob += b"".join(r.lrange(key, 0, -1))
        elif kind in ("zset", "set"):
            blob += b"".join(r.zrange(key, 0, -1) if kind == "zset" else r.smembers(key))
        elif kind == "stream":
            blob += b"".join(b"".join(k + v for k, v in f.items()) for _, f in r.xrange(key))
        for secret in SECRETS:
            assert secret.encode() not in blob, f"a secret is in Redis key {key!r}"
    for child in stack.children:
        if child.name == "simulator":
            continue
        text = Path(child.log_path).read_text(errors="replace")
        for secret in SECRETS:
            assert secret not in text, f"a secret is in {child.log_path.name}"


def cli(stack: DevStack, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "kie_extend.cli", *args], env=stack.env, capture_output=True,
                          text=True, timeout=60)


@pytest.mark.timeout(240)
def test_each_tenant_gets_its_own_signed_results(tmp_path: Path, receivers: Callable[..., Receiver]) -> None:
    """shop and blog each receive exactly their own jobs' and batch's events, signed with their own
    secret; blog's receiver refuses every event twice (retried, then delivered); news's is down
    (dead letters after the retry budget, then replayed); the global stream gets every event and
    shop's own stream exactly shop's, once each."""
    shop, blog, news = receivers(), receivers(refuse_first=2), receivers(down=True)
    with make_stack(tmp_path, tenants_toml(shop, blog, news)) as stack:
        stack.start_simulator("--time-factor", "0.01", "--seed", "11")
        stack.start_serve(callbacks_only=True)
        stack.start_worker(concurrency=3)
        stack.start_beat()
        settings = stack.settings()
        shop_batch, blog_batch = f"shopb-{uuid.uuid4().hex[:6]}", f"blogb-{uuid.uuid4().hex[:6]}"
        shop_ids = enqueue_many(items(stack, "shop", 3), batch_id=shop_batch, settings=settings)
        shop_ids += enqueue_many(items(stack, "shop", 1), settings=settings)
        blog_ids = enqueue_many(items(stack, "blog", 3), batch_id=blog_batch, settings=settings)
        news_ids = enqueue_many(items(stack, "news", 2), settings=settings)
        plain_ids = enqueue_many(items(stack, None, 2), settings=settings)
        everyone = shop_ids + blog_ids + news_ids + plain_ids
        recs = wait_delivered(settings, everyone, timeout=150)

        # Every job ran, and each job's handlers are the global ones plus its tenant's own.
        assert all(r["state"] == "succeeded" for r in recs.values()), {j: r["state"] for j, r in recs.items()}
        for j in shop_ids:
            assert set(recs[j]["handlers"]) == {"redis_stream", "webhook@shop", "redis_stream@shop"}
            assert all(h["state"] == "delivered" for h in recs[j]["handlers"].values()), recs[j]["handlers"]
            assert recs[j]["handlers"]["webhook@shop"]["attempts"] == 1
        for j in blog_ids:
            assert set(recs[j]["handlers"]) == {"redis_stream", "webhook@blog"}
            assert recs[j]["handlers"]["webhook@blog"] == {"state": "delivered", "attempts": 3}
        for j in news_ids:
            assert recs[j]["handlers"]["redis_stream"]["state"] == "delivered"  # not held back
            assert recs[j]["handlers"]["webhook@news"]["state"] == "dead"
            assert recs[j]["handlers"]["webhook@news"]["attempts"] == 4
        for j in plain_ids:
            assert set(recs[j]["handlers"]) == {"redis_stream"}

        # The batches' batch.finished reach their own tenant's handlers too.
        for batch, tenant in ((shop_batch, "shop"), (blog_batch, "blog")):
            deadline = time.monotonic() + 30
            while not get_batch(batch, settings=settings).get("finished") and time.monotonic() < deadline:
                time.sleep(0.2)
        deadline = time.monotonic() + 30
        want_shop = {f"{j}:job.succeeded" for j in shop_ids} | {f"{shop_batch}:batch.finished"}
        want_blog = {f"{j}:job.succeeded" for j in blog_ids} | {f"{blog_batch}:batch.finished"}
        while time.monotonic() < deadline and (set(shop.keys()) != want_shop or set(blog.keys()) != want_blog):
            time.sleep(0.2)
        # Each receiver got exactly its own tenant's events: once each (shop answers at once; blog
        # took each on the third try).
        assert shop.keys() == Counter({k: 1 for k in want_shop}), shop.keys()
        assert blog.keys() == Counter({k: 1 for k in want_blog}), blog.keys()
        assert blog.refused == 2 * len(want_blog)
        for received, own, other in ((shop, SHOP_SECRET, BLOG_SECRET), (blog, BLOG_SECRET, SHOP_SECRET)):
            for item in received.accepted:
                ts, sig = item.headers.get(TIMESTAMP_HEADER.lower()), item.headers.get(SIGNATURE_HEADER.lower())
                assert verify_signature(own, ts, item.body, sig), item.headers
                assert not verify_signature(other, ts, item.body, sig)
                assert not verify_signature(NEWS_SECRET, ts, item.body, sig)
                assert item.headers["content-type"] == "application/json"
                event = item.event
                key = item.headers["idempotency-key"]
                assert key == f"{event.get('job_id') or event['batch_id']}:{event['event']}"
        assert {e.event["tenant"] for e in shop.accepted if "job_id" in e.event} == {"shop"}
        assert {e.event["tenant"] for e in blog.accepted if "job_id" in e.event} == {"blog"}

        # Streams: the global one has every job once; shop's own has exactly shop's, once each.
        r = redis.Redis.from_url(stack.redis_url)
        keys = Keys(settings.key_prefix)
        every = Counter(e["job_id"] for e in stream_entries(r, keys.results) if "job_id" in e)
        assert every == Counter({j: 1 for j in everyone})
        own = stream_entries(r, keys.tenant_results("shop"))
        assert Counter(e.get("job_id") or e.get("batch_id") for e in own) == \
            Counter({**{j: 1 for j in shop_ids}, shop_batch: 1})
        assert all(json.loads(e["payload"]).get("tenant") in ("shop", None) for e in own)
        assert not r.exists(keys.tenant_results("blog")) and not r.exists(keys.tenant_results("news"))
        # The example reader reads a tenant's own stream with --tenant.
        reader = subprocess.run([sys.executable, str(ROOT / "examples" / "consume_results.py"), "--tenant", "shop",
                                 "--group", "shop-svc", "--timeout", "1.5"], env=stack.env, capture_output=True,
                                text=True, timeout=60)
        assert reader.returncode == 0, reader.stderr
        read = [json.loads(line) for line in reader.stdout.splitlines() if line.strip()]
        assert Counter(x.get("job_id") or x.get("batch_id") for x in read) == \
            Counter({**{j: 1 for j in shop_ids}, shop_batch: 1})

        # news's dead letters: shown per tenant and per handler, replayed once its receiver is back.
        out = cli(stack, "dead-letters", "--tenant", "news", "--json")
        assert out.returncode == 0, out.stderr
        letters = json.loads(out.stdout)["dead_letters"]
        assert sorted(x["job_id"] for x in letters) == sorted(news_ids)
        assert {x["handler"] for x in letters} == {"webhook@news"}
        assert all("HTTP 500" in x["error"] and "src=test" not in x["error"] for x in letters), letters
        assert json.loads(cli(stack, "dead-letters", "--tenant", "shop", "--json").stdout)["dead_letters"] == []
        assert len(json.loads(cli(stack, "dead-letters", "--handler", "webhook@news", "--json").stdout)
                   ["dead_letters"]) == len(news_ids)
        assert not news.accepted and news.refused == 4 * len(news_ids)
        news.down = False
        out = cli(stack, "dead-letters", "--replay", "--tenant", "news")
        assert out.returncode == 0 and out.stdout.strip() == f"replayed {len(news_ids)}", (out.stdout, out.stderr)
        recs = wait_delivered(settings, news_ids, timeout=30, done=("delivered",))
        assert all(r["handlers"]["webhook@news"]["state"] == "delivered" for r in recs.values())
        assert news.keys() == Counter({f"{j}:job.succeeded": 1 for j in news_ids})
        for item in news.accepted:
            ts, sig = item.headers.get(TIMESTAMP_HEADER.lower()), item.headers.get(SIGNATURE_HEADER.lower())
            assert verify_signature(NEWS_SECRET, ts, item.body, sig)
            assert not verify_signature(SHOP_SECRET, ts, item.body, sig)
        assert json.loads(cli(stack, "dead-letters", "--json").stdout)["dead_letters"] == []
        # shop and blog got nothing more.
        assert sum(shop.keys().values()) == len(want_shop) and sum(blog.keys().values()) == len(want_blog)
        assert_no_secret_anywhere(stack)


@pytest.mark.timeout(300)
def test_tenant_stream_exactly_once_under_kill9(tmp_path: Path, receivers: Callable[..., Receiver]) -> None:
    """Workers killed with kill -9 while shop's and blog's jobs finish: shop's own stream holds each
    of shop's events exactly once (and nothing of blog's), the global stream each job's once, and
    each webhook receiver every one of its own tenant's events (at least once, one key each)."""
    shop, blog = receivers(), receivers()
    with make_stack(tmp_path, tenants_toml(shop, blog)) as stack:
        stack.start_simulator("--time-factor", "0.02", "--seed", "23", "--fault-slow", "0.3", "--slow-seconds", "1")
        stack.start_serve(callbacks_only=True)
        w1 = stack.start_worker(concurrency=2)
        w2 = stack.start_worker(concurrency=2)
        stack.start_beat()
        settings = stack.settings()
        batch = f"kb-{uuid.uuid4().hex[:6]}"
        shop_ids = enqueue_many(items(stack, "shop", 16), batch_id=batch, settings=settings)
        blog_ids = enqueue_many(items(stack, "blog", 8), settings=settings)
        kills = 0
        for round_ in range(4):
            time.sleep(1.5)
            victim = (w1, w2)[round_ % 2]
            victim.kill9()
            kills += 1
            time.sleep(0.3)
            victim.restart()
        recs = wait_delivered(settings, shop_ids + blog_ids, timeout=200, done=("delivered",))
        assert kills == 4
        assert all(r["state"] in TERMINAL for r in recs.values())
        deadline = time.monotonic() + 60
        while not get_batch(batch, settings=settings).get("finished") and time.monotonic() < deadline:
            time.sleep(0.3)
        r = redis.Redis.from_url(stack.redis_url)
        keys = Keys(settings.key_prefix)
        deadline = time.monotonic() + 30
        own: list[dict[str, Any]] = []
        while time.monotonic() < deadline:
            own = stream_entries(r, keys.tenant_results("shop"))
            if any(e["event"] == "batch.finished" for e in own):
                break
            time.sleep(0.3)
        assert Counter(e.get("job_id") or e.get("batch_id") for e in own) == \
            Counter({**{j: 1 for j in shop_ids}, batch: 1})
        every = Counter(e["job_id"] for e in stream_entries(r, keys.results) if "job_id" in e)
        assert every == Counter({j: 1 for j in shop_ids + blog_ids})
        want_shop, want_blog = set(shop_ids) | {batch}, set(blog_ids)
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and ({k.split(":")[0] for k in shop.keys()} != want_shop
                                               or {k.split(":")[0] for k in blog.keys()} != want_blog):
            time.sleep(0.3)
        # At least once, each with its stable key; only the tenant's own.
        assert {k.split(":")[0] for k in shop.keys()} == want_shop
        assert {k.split(":")[0] for k in blog.keys()} == want_blog
        assert all(k == f"{j}:job.{recs[j]['state']}" for k in blog.keys() for j in [k.split(":")[0]])
        for received, own_secret in ((shop, SHOP_SECRET), (blog, BLOG_SECRET)):
            for item in received.accepted:
                assert verify_signature(own_secret, item.headers.get(TIMESTAMP_HEADER.lower()), item.body,
                                        item.headers.get(SIGNATURE_HEADER.lower()))
        assert_no_secret_anywhere(stack)


@pytest.mark.timeout(120)
def test_deliveries_left_by_a_dead_process_go_out_once(tmp_path: Path, receivers: Callable[..., Receiver]) -> None:
    """A job's terminal move written (as the pipeline writes it) by a process that died before it
    delivered anything: the beat's tick hands the tenant's deliveries to a real worker when their
    lease runs out, and a second delivery of the same event (at least once) adds nothing to the
    tenant's stream."""
    from kie_extend.handlers.delivery import Delivery
    from kie_extend.infra.runtime import Runtime
    from kie_extend.jobs.events import build_event
    from kie_extend.store.record import iso_ms as now_iso
    from kie_extend.jobs.states import JobState
    from kie_extend.store.record import EMPTY

    shop, blog = receivers(), receivers()
    with make_stack(tmp_path, tenants_toml(shop, blog)) as stack:
        settings = stack.settings()
        rt = Runtime(settings)
        job = f"orphan-{uuid.uuid4().hex[:8]}"
        error = {"kind": "invalid_request", "message": "test: a message that could not be read"}
        fields = {"job_id": job, "tenant": "shop", "request": {}, "metadata": {}, "created_at": now_iso(),
                  "created_ts": time.time(), "attempts": 0, "polls": 0, "error": error, "finished_at": now_iso()}
        event = build_event(EMPTY, JobState.FAILED, fields)
        assert event["tenant"] == "shop"
        assert rt.store.transition(job, JobState.FAILED, expect=[None], fields=fields, event=event,
                                   handlers=list(rt.routes.names_for("shop")), deliveries_at=time.time() + 1)
        stack.start_worker(concurrency=1)
        stack.start_beat()
        recs = wait_delivered(settings, [job], timeout=60, done=("delivered",))
        assert set(recs[job]["handlers"]) == {"redis_stream", "webhook@shop", "redis_stream@shop"}
        keys = Keys(settings.key_prefix)
        r = redis.Redis.from_url(stack.redis_url)
        # Delivered again, as a lease that ran out under a slow delivery would: still one entry each.
        assert Delivery(rt).deliver(job, "redis_stream@shop") == "delivered"
        rt.store.update(job, **{"handler:redis_stream@shop": {"state": "pending", "attempts": 0}})
        assert Delivery(rt).deliver(job, "redis_stream@shop") == "delivered"
        assert [e["job_id"] for e in stream_entries(r, keys.tenant_results("shop"))] == [job]
        assert [e["job_id"] for e in stream_entries(r, keys.results)] == [job]
        assert shop.keys() == Counter({f"{job}:job.failed": 1}) and not blog.accepted


def test_the_tenants_file_keeps_the_readers_set_aside_stream_free() -> None:
    from kie_extend.config import parse_rate
    from kie_extend.errors import ConfigError
    from kie_extend.tenants.registry import parse

    with pytest.raises(ConfigError, match="tenants.unhandled.stream"):
        parse({"tenants": {"unhandled": {"stream": True}}}, "t.toml", parse_rate)
    assert parse({"tenants": {"unhandled": {"webhook_url": "https://x.example/h"}}}, "t.toml", parse_rate)


def _commands(r: redis.Redis) -> int:
    return int(r.info("stats")["total_commands_processed"])


def test_a_tenant_without_own_results_costs_no_extra_redis_command(
        make_settings: Callable[..., Settings], rclient: redis.Redis, tmp_path: Path) -> None:
    """The same job ending (an invalid request, failed at once: the whole finish path with its
    inline stream delivery) costs the same Redis commands without a tenants file and, with one, for
    a tenant without its own results; a tenant with its own stream costs its one delivery more."""
    from kie_extend.infra.runtime import NoDispatch, Runtime
    from kie_extend.jobs.pipeline import Pipeline

    path = tmp_path / "tenants.toml"
    path.write_text('[tenants.blog]\n\n[tenants.shop]\nstream = true\n')
    bad = {"uploadUrl": "ftp://nowhere", "model": "V5"}

    def cost(settings: Settings, tenant: str) -> list[int]:
        pipeline = Pipeline(Runtime(settings), NoDispatch())
        pipeline.accept(f"warm-{uuid.uuid4().hex[:8]}", bad, tenant=tenant)  # scripts loaded, handlers built
        out = []
        for _ in range(3):
            before = _commands(rclient)
            pipeline.accept(f"job-{uuid.uuid4().hex[:8]}", bad, tenant=tenant)
            out.append(_commands(rclient) - before - 1)  # less our own INFO
        return out

    plain = cost(make_settings(handlers="redis_stream"), "blog")
    with_file = cost(make_settings(handlers="redis_stream", tenants_file=str(path)), "blog")
    own_stream = cost(make_settings(handlers="redis_stream", tenants_file=str(path)), "shop")
    print(f"\nRedis commands per finished job: no tenants file {plain}, tenant without own results "
          f"{with_file}, tenant with its own stream {own_stream}")
    assert len(set(plain)) == 1 and plain == with_file
    assert own_stream[0] > plain[0]



def test_an_operators_retry_lets_the_tenants_stream_take_the_new_outcome(
        make_settings: Callable[..., Settings], rclient: redis.Redis, tmp_path: Path) -> None:
    """After ``kie-extend retry`` the job's next ``job.failed`` is a new outcome: the dedup markers of
    every handler of its tenant (its own stream's included) are cleared, so it is appended again."""
    from kie_extend.handlers.delivery import Delivery
    from kie_extend.infra.runtime import NoDispatch, Runtime
    from kie_extend.jobs.events import build_event
    from kie_extend.store.record import iso_ms as now_iso
    from kie_extend.jobs.pipeline import Pipeline
    from kie_extend.jobs.states import JobState
    from kie_extend.store.record import EMPTY

    path = tmp_path / "tenants.toml"
    path.write_text('[tenants.shop]\nstream = true\n')
    rt = Runtime(make_settings(handlers="redis_stream", tenants_file=str(path)))
    job = f"retry-{uuid.uuid4().hex[:8]}"

    def fail_and_deliver(expect: list[JobState | None]) -> None:
        fields = {"job_id": job, "tenant": "shop", "request": {}, "metadata": {}, "created_at": now_iso(),
                  "created_ts": time.time(), "error": {"kind": "provider_unavailable", "message": "test"},
                  "finished_at": now_iso()}
        assert rt.store.transition(job, JobState.FAILED, expect=expect, fields=fields,
                                   event=build_event(rt.store.get_record(job) or EMPTY, JobState.FAILED, fields),
                                   handlers=list(rt.routes.names_for("shop")))
        for name in rt.routes.names_for("shop"):
            assert Delivery(rt).deliver(job, name) == "delivered"

    fail_and_deliver([None])
    assert Pipeline(rt, NoDispatch()).retry(job)
    fail_and_deliver([JobState.QUEUED])
    for stream in (rt.keys.results, rt.keys.tenant_results("shop")):
        assert [f[b"event"] for _, f in rclient.xrange(stream)] == [b"job.failed", b"job.failed"]


def test_a_pending_delivery_of_a_tenant_no_longer_in_the_file_is_dead_lettered(
        make_settings: Callable[..., Settings]) -> None:
    from kie_extend.handlers.delivery import Delivery
    from kie_extend.infra.runtime import Runtime
    from kie_extend.jobs.events import build_event
    from kie_extend.store.record import iso_ms as now_iso
    from kie_extend.jobs.states import JobState
    from kie_extend.store.record import EMPTY

    rt = Runtime(make_settings(handlers="redis_stream", handler_max_attempts=1))
    job = f"gone-{uuid.uuid4().hex[:8]}"
    fields = {"job_id": job, "tenant": "gone", "request": {}, "metadata": {}, "created_at": now_iso(),
              "error": {"kind": "provider_unavailable", "message": "test"}, "finished_at": now_iso()}
    assert rt.store.transition(job, JobState.FAILED, expect=[None], fields=fields,
                               event=build_event(EMPTY, JobState.FAILED, fields),
                               handlers=["redis_stream", "webhook@gone"])
    delivery = Delivery(rt)
    assert delivery.deliver(job, "redis_stream") == "delivered"
    assert delivery.deliver(job, "webhook@gone") == "dead"
    [letter] = delivery.dead_letters(tenant="gone")
    assert letter["handler"] == "webhook@gone" and "is not configured in this process" in letter["error"]
    assert delivery.dead_letters(tenant="other") == [] and delivery.dead_letters(handler="webhook@gone")


def test_cancelled_jobs_events_go_to_their_tenants_own_handlers(
        make_settings: Callable[..., Settings], rclient: redis.Redis, tmp_path: Path) -> None:
    """A batch cancel (Pipeline.cancel_many, one round trip for many jobs) queues each job's event for
    its own tenant's handlers; the tick's deliveries then put it on the tenant's stream."""
    from kie_extend.handlers.delivery import Delivery
    from kie_extend.infra.runtime import NoDispatch, Runtime
    from kie_extend.jobs.pipeline import Pipeline
    from kie_extend.jobs.states import JobState

    path = tmp_path / "tenants.toml"
    path.write_text('[tenants.shop]\nstream = true\n\n[tenants.blog]\n')
    rt = Runtime(make_settings(handlers="redis_stream", tenants_file=str(path)))
    jobs = {f"c-{tenant}-{uuid.uuid4().hex[:6]}": tenant for tenant in ("shop", "blog", "shop")}
    for job, tenant in jobs.items():
        assert rt.store.transition(job, JobState.QUEUED, expect=[None],
                                   fields={"job_id": job, "tenant": tenant, "request": {}, "metadata": {}})
    assert Pipeline(rt, NoDispatch()).cancel_many([(j, rt.store.get_record(j)) for j in jobs]) == 3
    for job, tenant in jobs.items():
        handlers = get_job(job, settings=rt.settings)["handlers"]
        assert set(handlers) == ({"redis_stream", "redis_stream@shop"} if tenant == "shop" else {"redis_stream"})
        for name in handlers:
            assert Delivery(rt).deliver(job, name) == "delivered"
    own = [f[b"job_id"].decode() for _, f in rclient.xrange(rt.keys.tenant_results("shop"))]
    assert sorted(own) == sorted(j for j, t in jobs.items() if t == "shop")
    assert not rclient.exists(rt.keys.tenant_results("blog"))
