"""A real Redis Cluster on loopback: N masters with one replica each, created by `redis-cli --cluster create`."""

from __future__ import annotations

import shutil
import subprocess
import time

import redis
from redis.cluster import RedisCluster

from support.redis_server import RedisServer, cluster_ports


class RedisClusterServers:
    """Starts 2*masters redis-server processes in cluster mode and joins them (masters first, then replicas)."""

    def __init__(self, masters: int = 3, replicas: int = 1, *, appendonly: bool = False) -> None:
        cli = shutil.which("redis-cli")
        if cli is None:
            raise RuntimeError("redis-cli not found: run `make system-deps` (Debian package redis-tools)")
        count = masters * (1 + replicas)
        self.nodes: list[RedisServer] = []
        for port in cluster_ports(count):
            self.nodes.append(
                RedisServer(
                    "--cluster-enabled",
                    "yes",
                    "--cluster-config-file",
                    f"nodes-{port}.conf",
                    "--cluster-node-timeout",
                    "2000",
                    port=port,
                    appendonly=appendonly,
                )
            )
        addresses = [f"127.0.0.1:{node.port}" for node in self.nodes]
        subprocess.run(
            [cli, "--cluster", "create", *addresses, "--cluster-replicas", str(replicas), "--cluster-yes"],
            check=True,
            capture_output=True,
            timeout=60,
        )
        self.url = f"redis://127.0.0.1:{self.nodes[0].port}/0"
        self.wait_ok()

    def wait_ok(self, timeout: float = 30.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            states = []
            for node in self.nodes:
                if node.process.poll() is not None:
                    continue
                try:
                    info = node.client().execute_command("CLUSTER", "INFO")
                except redis.RedisError:
                    states.append(False)
                    continue
                text = info.decode() if isinstance(info, bytes) else str(info)
                states.append("cluster_state:ok" in text)
            if states and all(states):
                return
            time.sleep(0.1)
        raise RuntimeError("redis cluster did not reach cluster_state:ok")

    def client(self) -> RedisCluster:
        return RedisCluster(host="127.0.0.1", port=self.nodes[0].port)

    def flushall(self) -> None:
        self.client().flushall(target_nodes=RedisCluster.PRIMARIES)

    def master_of(self, key: str) -> RedisServer:
        """The node that currently serves the slot of `key`."""
        cluster = self.client()
        node = cluster.get_node_from_key(key)
        return next(n for n in self.nodes if n.port == node.port)

    def stop(self) -> None:
        for node in self.nodes:
            node.stop()
