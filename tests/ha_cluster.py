"""A Redis Sentinel set-up on loopback for tests: one master, replicas, sentinels (all Valkey)."""

from __future__ import annotations

import time
from pathlib import Path

import redis

from kie_extend.infra.embedded import EmbeddedSentinel, EmbeddedValkey


class SentinelCluster:
    """A master, ``replicas`` replicas and ``sentinels`` sentinels watching ``mymaster``."""

    def __init__(self, workdir: Path, *, replicas: int = 1, sentinels: int = 3, quorum: int = 2,
                 appendonly: bool = False) -> None:
        self.workdir = workdir
        self.master = EmbeddedValkey(str(workdir / "master"), appendonly=appendonly).start()
        self.replicas = [EmbeddedValkey(str(workdir / f"replica{i}"), appendonly=appendonly,
                                        args=["--replicaof", "127.0.0.1", str(self.master.port)]).start()
                         for i in range(replicas)]
        self.sentinels = [EmbeddedSentinel(self.master.port, str(workdir / f"sentinel{i}"), quorum=quorum).start()
                          for i in range(sentinels)]
        self.quorum = quorum

    @property
    def url(self) -> str:
        """``sentinel://127.0.0.1:P1;sentinel://127.0.0.1:P2;…/0``."""
        return ";".join(f"sentinel://127.0.0.1:{s.port}" for s in self.sentinels) + "/0"

    def wait_ready(self, timeout: float = 30.0) -> None:
        """Until the replicas are in sync and every sentinel knows the replicas and enough peers."""
        deadline = time.monotonic() + timeout
        while True:
            try:
                if self._ready():
                    return
            except redis.RedisError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError("the sentinel cluster did not become ready")
            time.sleep(0.2)

    def _ready(self) -> bool:
        for replica in self.replicas:
            with redis.Redis(port=replica.port) as r:
                if r.info("replication").get("master_link_status") != "up":
                    return False
        for sentinel in self.sentinels:
            with redis.Redis(port=sentinel.port) as s:
                if len(s.sentinel_slaves("mymaster")) < len(self.replicas):
                    return False
                if len(self.sentinels) > 1 and len(s.sentinel_sentinels("mymaster")) < len(self.sentinels) - 1:
                    return False
                s.execute_command("SENTINEL", "CKQUORUM", "mymaster")
        return True

    def master_port(self) -> int | None:
        """The master's port according to the first sentinel that answers."""
        for sentinel in self.sentinels:
            try:
                return sentinel.master_port_now()
            except redis.RedisError:
                continue
        return None

    def wait_failover(self, old_port: int, timeout: float = 60.0) -> int:
        """Until every sentinel names a new master that says it is one; returns its port."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                ports = {s.master_port_now() for s in self.sentinels}
                if len(ports) == 1 and (port := ports.pop()) not in (None, old_port):
                    with redis.Redis(port=port) as r:
                        if r.info("replication").get("role") == "master":
                            return port
            except redis.RedisError:
                pass
            time.sleep(0.2)
        raise RuntimeError("no failover within the timeout")

    def stop(self) -> None:
        """Stop every server."""
        for server in [*self.sentinels, *self.replicas, self.master]:
            server.stop()
