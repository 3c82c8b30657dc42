"""The infrastructure-error classifier, the broker transport's translation and the did-you-mean text."""

from __future__ import annotations

import ssl

import pytest
import redis
from kombu.exceptions import OperationalError
from redis import exceptions as rx

from kombu.transport.redis import Transport as KombuRedisTransport

from kie_extend.infra.consumer import did_you_mean, unknown_task_reason
from kie_extend.infra.embedded import EmbeddedValkey, free_port
from kie_extend.infra.errors import RETRY_MAX, as_connection_error, is_infra_error, infra_retry_delay
from kie_extend.infra.transport import InfraConnection, Transport, broker_conf


@pytest.mark.parametrize("exc", [
    rx.ConnectionError("refused"), rx.TimeoutError("slow"), rx.BusyLoadingError("loading"),
    rx.ReadOnlyError("You can't write against a read only replica."),
    rx.OutOfMemoryError("command not allowed when used memory > 'maxmemory'."),
    rx.ResponseError("UNBLOCKED force unblock from blocking operation, instance state changed (master -> replica?)"),
    rx.ResponseError("MASTERDOWN Link with MASTER is down and replica-serve-stale-data is set to 'no'."),
    rx.ResponseError("BUSY Redis is busy running a script."), rx.ResponseError("LOADING loading the dataset"),
    rx.ResponseError("OOM command not allowed"), rx.NoScriptError("No matching script."),
    rx.ResponseError("TRYAGAIN Multiple keys request during rehashing of slot"),
    rx.ResponseError("CLUSTERDOWN The cluster is down"), rx.ResponseError("READONLY You can't write"),
    OperationalError("Error 111 connecting"), ConnectionResetError(), TimeoutError(),
])
def test_transient_shapes_are_infra(exc: BaseException) -> None:
    assert is_infra_error(exc)


@pytest.mark.parametrize("exc", [
    rx.ResponseError("WRONGTYPE Operation against a key holding the wrong kind of value"),
    rx.ResponseError("ERR unknown command"), rx.DataError("bad"), ValueError("x"), KeyError("k"),
    rx.ResponseError("BUSYGROUP Consumer Group name already exists"), RuntimeError("OOM but not redis"),
])
def test_other_errors_are_not_infra(exc: BaseException) -> None:
    assert not is_infra_error(exc)


def test_connection_error_form_and_backoff() -> None:
    err = as_connection_error(rx.ReadOnlyError("You can't write against a read only replica."))
    assert isinstance(err, rx.ConnectionError) and "ReadOnlyError" in str(err)
    delays = [infra_retry_delay(n) for n in range(40)]
    assert all(0 < d <= RETRY_MAX for d in delays)
    assert max(delays[:1]) <= 1.0 and min(delays[20:]) >= RETRY_MAX / 2


def test_did_you_mean() -> None:
    for near in ("kie_extend.Extend", "kie_extend.extend ", " KIE_EXTEND.EXTEND", "kie_extend.extnd", "kie-extend.extend"):
        assert did_you_mean(near) == " (did you mean `kie_extend.extend`?)", near
    for far in ("billing.charge", "celery.chord_unlock", ""):
        assert did_you_mean(far) == ""
    text = unknown_task_reason("kie_extend.extend ")
    assert "'kie_extend.extend '" in text and "did you mean `kie_extend.extend`?" in text


def test_broker_conf_redis_and_amqp() -> None:
    conf = broker_conf("redis://127.0.0.1:6379/0", 300)
    assert conf["broker_transport"] == "kie_extend.infra.transport:Transport"
    opts = conf["broker_transport_options"]
    assert opts["visibility_timeout"] == 300 and opts["socket_keepalive"] is True
    # Abandoned deliveries are swept every few seconds, not every 100 s (kombu's 10 s x 10).
    assert opts["unacked_restore_throttle"] == 1 and 1 <= opts["unacked_restore_interval"] <= 10
    assert opts["socket_timeout"] > 0 and opts["socket_connect_timeout"] > 0 and opts["health_check_interval"] > 0
    assert "broker_use_ssl" not in conf
    assert broker_conf("rediss://h:6380/0")["broker_use_ssl"] == {"ssl_cert_reqs": ssl.CERT_NONE}
    assert "broker_use_ssl" not in broker_conf("rediss://h:6380/0?ssl_cert_reqs=required")
    amqp = broker_conf("amqp://guest:guest@127.0.0.1:5672//")
    assert "broker_transport" not in amqp and "broker_transport_options" not in amqp
    assert set(KombuRedisTransport.connection_errors) <= set(Transport.connection_errors)


def test_transport_connection_turns_oom_and_readonly_into_connection_errors(tmp_path) -> None:
    """Against a real Valkey: OOM (noeviction) and READONLY replies reach kombu as connection errors."""
    with EmbeddedValkey(str(tmp_path / "v")) as server:
        admin = redis.Redis(port=server.port)
        pool = redis.ConnectionPool(connection_class=InfraConnection, host="127.0.0.1", port=server.port)
        client = redis.Redis(connection_pool=pool, retry=None)
        client.set("k", "v")
        admin.config_set("maxmemory-policy", "noeviction")
        admin.config_set("maxmemory", 1)
        try:
            with pytest.raises(rx.ConnectionError, match="OutOfMemoryError"):
                client.lpush("q", "x" * 100)
            with pytest.raises(rx.ConnectionError, match="OutOfMemoryError"):
                client.pipeline().zadd("i", {"t": 1}).hset("h", "t", "x").execute()
            assert client.get("k") == b"v"  # reads still work
        finally:
            admin.config_set("maxmemory", 0)
        client.lpush("q", "x")
        # A replica of an unreachable master keeps its data and refuses writes.
        admin.replicaof("127.0.0.1", free_port())
        try:
            with pytest.raises(rx.ConnectionError, match="ReadOnlyError"):
                client.set("k", "w")
            plain = redis.Redis(port=server.port)
            with pytest.raises(rx.ReadOnlyError):  # the job store's own client keeps the real class
                plain.set("k", "w")
        finally:
            admin.replicaof("NO", "ONE")
        client.set("k", "w")


def test_reject_or_ack_on_a_closed_channel_leaves_the_message_to_the_broker(tmp_path) -> None:
    """A requeue (a task's Reject) or an ack that Celery runs after the broker connection was lost
    and rebuilt meets a channel whose connection is gone: kombu fails with AttributeError, which
    stopped the worker. Now the message is forgotten locally and its unacked record stays in the
    broker (restored after the visibility timeout)."""
    from kombu import Connection

    with EmbeddedValkey(str(tmp_path / "v")) as server:
        admin = redis.Redis(port=server.port)
        for op in ("requeue", "ack"):
            with Connection(f"redis://127.0.0.1:{server.port}/0", transport=Transport) as conn:
                q = conn.SimpleQueue(f"q-{op}")
                q.put({"n": op})
                message = q.get(timeout=5)
                assert admin.hlen("unacked") == 1
                channel = message.channel
                # what kombu leaves once the connection is torn down: no pool, no connection
                saved = channel._pool, channel.connection
                channel._pool, channel.connection = None, None
                if op == "requeue":
                    message.reject(requeue=True)
                else:
                    message.ack()
                assert message.delivery_tag not in channel.qos._delivered or channel.qos._dirty
                # the broker still holds the unacked record: it restores the message later
                assert admin.hlen("unacked") == 1 and admin.llen(f"q-{op}") == 0
                admin.delete("unacked", "unacked_index")
                channel._pool, channel.connection = saved  # so the connection can close
