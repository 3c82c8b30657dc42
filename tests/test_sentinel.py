"""The job store through Redis Sentinel: ``redis_client`` on a ``sentinel://`` URL reaches the master."""

from __future__ import annotations

from pathlib import Path

import redis

from ha_cluster import SentinelCluster
from kie_extend.config import Settings
from kie_extend.store.keys import Keys
from kie_extend.infra.clients import redis_client
from kie_extend.infra.runtime import Runtime


def test_redis_client_on_a_sentinel_url_reaches_the_master(tmp_path: Path) -> None:
    cluster = SentinelCluster(tmp_path, replicas=0, sentinels=1, quorum=1)
    try:
        cluster.wait_ready()
        client = redis_client(f"sentinel://127.0.0.1:{cluster.sentinels[0].port}/3")
        info = client.info("server")
        assert int(info["tcp_port"]) == cluster.master.port
        assert client.info("replication")["role"] == "master"
        keys = Keys("sentineltest")
        client.set(keys.stats + ":probe", "1")
        with redis.Redis(port=cluster.master.port, db=3) as direct:
            assert direct.get(keys.stats + ":probe") == b"1"
        # The same through Settings and the Runtime, with a named master that does not exist: an error.
        rt = Runtime(Settings(_env_file=None, redis_url=cluster.url, key_prefix="sentineltest"))
        assert rt.redis.ping()
        wrong = redis_client(cluster.url, sentinel_master="no-such-master")
        try:
            wrong.ping()
        except redis.sentinel.MasterNotFoundError:
            pass
        else:
            raise AssertionError("a master unknown to the sentinels must not be reached")
    finally:
        cluster.stop()
