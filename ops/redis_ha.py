"""A replicated Redis on loopback: one master, one replica and three sentinels.

For `awork-uploads stack --ha`, the failover test and trying failover by hand. Every process
is the same redis-server binary (the sentinels run it in sentinel mode), on a free loopback
port, with its data, config and log under `root`. Sentinel timings are short, so a killed
master is replaced within a few seconds on one machine (down-after 1 s, failover-timeout 3 s);
production sentinels keep their own settings.

    with RedisHA(Path("var/ha")) as ha:
        os.environ.update(ha.env)    # REDIS_URL=sentinel://...;..., REDIS_SENTINEL_MASTER, ...
        ha.kill_master()             # SIGKILL, as a crash would
        ha.wait_failover()           # the replica is the master now
"""

from __future__ import annotations

import os
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path

import redis

from ops.redis_server import find_redis_server, free_port, new_password

MASTER_NAME = "mymaster"
SENTINELS = 3
QUORUM = 2
DOWN_AFTER_MS = 1000
FAILOVER_TIMEOUT_MS = 3000


@dataclass
class _Node:
    """One redis-server process (data node or sentinel)."""

    name: str
    port: int
    argv: list[str]
    log: Path
    proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        self.log.parent.mkdir(parents=True, exist_ok=True)
        self.proc = subprocess.Popen(self.argv, stdin=subprocess.DEVNULL, start_new_session=True)

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def stop(self, kill: bool = False) -> None:
        if not self.alive():
            return
        assert self.proc is not None
        self.proc.kill() if kill else self.proc.terminate()
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(10)


@dataclass
class RedisHA:
    """Master + replica + 3 sentinels. `password` guards the data nodes, `sentinel_password`
    the sentinels; both are generated unless given (None turns one off)."""

    root: Path
    password: str | None = field(default_factory=new_password)
    sentinel_password: str | None = field(default_factory=new_password)
    master_name: str = MASTER_NAME
    nodes: list[_Node] = field(default_factory=list)
    sentinels: list[_Node] = field(default_factory=list)

    # -- what clients need ---------------------------------------------------------------------
    @property
    def url(self) -> str:
        """REDIS_URL in Celery's sentinel form (the master's password in the first part)."""
        auth = f":{self.password}@" if self.password else ""
        ports = [s.port for s in self.sentinels]
        return ";".join(f"sentinel://{auth if i == 0 else ''}127.0.0.1:{p}/0" for i, p in enumerate(ports))

    @property
    def env(self) -> dict[str, str]:
        out = {"REDIS_URL": self.url, "REDIS_SENTINEL_MASTER": self.master_name}
        if self.sentinel_password:
            out["REDIS_SENTINEL_PASSWORD"] = self.sentinel_password
        return out

    # -- start and stop --------------------------------------------------------------------------
    def start(self, timeout: float = 30.0) -> RedisHA:
        self.root = Path(self.root).resolve()
        try:
            master = self._data_node("master", None)
            master.start()
            self._wait_ping(master, timeout)
            replica = self._data_node("replica", master.port)
            replica.start()
            for n in range(SENTINELS):
                node = self._sentinel(n + 1, master.port)
                node.start()
            self.wait_ready(timeout)
        except BaseException:
            self.stop()
            raise
        return self

    def stop(self) -> None:
        """Sentinels first (so they start no failover while the data nodes go), then the nodes."""
        for node in [*self.sentinels, *reversed(self.nodes)]:
            node.stop()

    def __enter__(self) -> RedisHA:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def _data_node(self, name: str, master_port: int | None) -> _Node:
        port, folder = free_port(), self.root / name
        folder.mkdir(mode=0o700, parents=True, exist_ok=True)
        argv = [find_redis_server(), "--bind", "127.0.0.1", "--port", str(port), "--dir", str(folder)]
        argv += ["--appendonly", "yes", "--appendfsync", "everysec", "--save", ""]
        argv += ["--maxmemory-policy", "noeviction", "--logfile", str(folder / "redis.log")]
        if self.password:
            argv += ["--requirepass", self.password, "--masterauth", self.password]
        if master_port is not None:
            argv += ["--replicaof", "127.0.0.1", str(master_port)]
        node = _Node(name, port, argv, folder / "redis.log")
        self.nodes.append(node)
        return node

    def _sentinel(self, n: int, master_port: int) -> _Node:
        port, folder = free_port(), self.root / f"sentinel-{n}"
        folder.mkdir(mode=0o700, parents=True, exist_ok=True)  # the config holds the passwords
        name = self.master_name
        lines = [
            f"port {port}",
            "bind 127.0.0.1",
            f"dir {folder}",
            f"logfile {folder / 'sentinel.log'}",
            f"sentinel monitor {name} 127.0.0.1 {master_port} {QUORUM}",
            f"sentinel down-after-milliseconds {name} {DOWN_AFTER_MS}",
            f"sentinel failover-timeout {name} {FAILOVER_TIMEOUT_MS}",
            f"sentinel parallel-syncs {name} 1",
        ]
        if self.password:
            lines.append(f"sentinel auth-pass {name} {self.password}")
        if self.sentinel_password:
            lines.append(f"requirepass {self.sentinel_password}")
        conf = folder / "sentinel.conf"  # sentinels rewrite their config: one file each
        conf.touch(mode=0o600)
        conf.write_text("\n".join(lines) + "\n")
        argv = [find_redis_server(), str(conf), "--sentinel"]
        node = _Node(f"sentinel-{n}", port, argv, folder / "sentinel.log")
        self.sentinels.append(node)
        return node

    # -- looking and failing -------------------------------------------------------------------
    def _client(self, node: _Node) -> redis.Redis:
        sentinel = node in self.sentinels
        password = self.sentinel_password if sentinel else self.password
        return redis.Redis(
            "127.0.0.1",
            node.port,
            password=password,
            socket_timeout=1,
            socket_connect_timeout=1,
            decode_responses=True,
        )

    def _wait_ping(self, node: _Node, timeout: float) -> None:
        _until(lambda: self._ask(node, "PING") is not None, timeout, f"{node.name} did not start: {node.log}")

    def _ask(self, node: _Node, *command: str) -> object:
        """The node's answer, or None while it does not answer (SENTINEL replies parsed)."""
        client = self._client(node)
        try:
            if command[0] == "SENTINEL":
                return getattr(client, "sentinel_" + command[1].lower().replace("-", "_"))(*command[2:])
            return client.execute_command(*command)
        except redis.RedisError:
            return None
        finally:
            client.close()

    def _replication(self, node: _Node) -> dict[str, object]:
        """INFO replication as a dict; empty while the node does not answer."""
        info = self._ask(node, "INFO", "replication")
        return info if isinstance(info, dict) else {}

    def master_port(self) -> int | None:
        """The master's port as the first answering sentinel reports it."""
        for s in self.sentinels:
            addr = self._ask(s, "SENTINEL", "GET-MASTER-ADDR-BY-NAME", self.master_name)
            if isinstance(addr, (list, tuple)) and len(addr) == 2:
                return int(addr[1])
        return None

    def master(self) -> _Node:
        port = self.master_port()
        for node in self.nodes:
            if node.port == port:
                return node
        raise LookupError("no sentinel names a known master")

    def _ready(self) -> bool:
        replica_up = any(
            self._replication(n).get("master_link_status") == "up" for n in self.nodes if n.name == "replica"
        )
        if not replica_up:
            return False
        for s in self.sentinels:  # every sentinel knows the other two and the replica
            state = self._ask(s, "SENTINEL", "MASTER", self.master_name)
            if not isinstance(state, dict):
                return False
            others, replicas = int(state.get("num-other-sentinels", 0)), int(state.get("num-slaves", 0))
            if others < SENTINELS - 1 or replicas < 1:
                return False
        return True

    def wait_ready(self, timeout: float = 30.0) -> None:
        """Until the replica is in sync and each sentinel sees the replica and both others."""
        _until(self._ready, timeout, f"the sentinels did not settle; logs under {self.root}")

    def kill_master(self) -> int:
        """SIGKILL the current master; returns its port."""
        node = self.master()
        node.stop(kill=True)
        return node.port

    def wait_failover(self, old_port: int, timeout: float = 30.0) -> int:
        """Until the sentinels name another master that answers as one; returns its port."""

        def promoted() -> bool:
            port = self.master_port()
            if port is None or port == old_port:
                return False
            node = next(n for n in self.nodes if n.port == port)
            return self._replication(node).get("role") == "master"

        _until(promoted, timeout, f"no replica was promoted; logs under {self.root}")
        port = self.master_port()
        assert port is not None
        return port


def _until(check: object, timeout: float, what: str) -> None:
    assert callable(check)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if check():
            return
        time.sleep(0.1)
    raise RuntimeError(what)


__all__ = ["MASTER_NAME", "RedisHA"]

if __name__ == "__main__":  # pragma: no cover - manual use: prints the settings, Ctrl-C stops all
    with RedisHA(Path(os.environ.get("DATA_DIR", "var/ha"))) as ha:
        print("\n".join(f"{k}={v}" for k, v in ha.env.items()), flush=True)
        try:
            while True:
                time.sleep(1)
        except KeyboardInterrupt:
            pass
