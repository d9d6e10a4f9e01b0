"""Real servers for tests and benchmarks, started on free loopback ports."""

from __future__ import annotations

import os
import random
import shutil
import socket
import subprocess
import time
import urllib.request
from pathlib import Path


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def free_cluster_port() -> int:
    """A free port p with p + 10000 free too (a Redis Cluster node's bus port), p at most 55535."""
    rng = random.Random()
    for _ in range(200):
        port = rng.randint(20000, 55535)
        try:
            with socket.socket() as a, socket.socket() as b:
                a.bind(("127.0.0.1", port))
                b.bind(("127.0.0.1", port + 10000))
            return port
        except OSError:
            continue
    raise RuntimeError("no free port pair for a Redis Cluster node")


class RedisServer:
    """`redis-server` with AOF persistence in `workdir`; a context manager."""

    def __init__(self, workdir: Path, password: str | None = None, fsync: str = "always",
                 extra: tuple[str, ...] = (), port: int | None = None) -> None:
        """`password`: the server requires it (`requirepass`), as the shipped deployments do; `fsync`: AOF's
        `appendfsync`; `extra`: more server options."""
        binary = shutil.which("redis-server")
        if binary is None:
            raise RuntimeError("redis-server is not installed (apt-get install redis-server)")
        self.port = port or free_port()
        self.url = f"redis://127.0.0.1:{self.port}/0"
        self.args = [binary, "--port", str(self.port), "--bind", "127.0.0.1", "--dir", str(workdir),
                     "--appendonly", "yes", "--appendfsync", fsync, "--save", "", "--protected-mode", "no", *extra]
        self.password = password
        if password is not None:
            self.args += ["--requirepass", password]
        self.proc: subprocess.Popen | None = None

    def __enter__(self) -> RedisServer:
        self.proc = subprocess.Popen(self.args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=0.5) as sock:
                    auth = f"AUTH {self.password}\r\n".encode() if self.password is not None else b""
                    sock.sendall(auth + b"PING\r\n")
                    reply = b""
                    while b"+PONG" not in reply and b"-" not in reply and (chunk := sock.recv(64)):
                        reply += chunk
                    if b"+PONG" in reply:
                        return self
            except OSError:
                time.sleep(0.05)
        self.__exit__()
        raise RuntimeError(f"redis-server did not start on port {self.port}")

    def __exit__(self, *exc: object) -> None:
        if self.proc is not None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()


class RedisCluster:
    """A Redis Cluster of `nodes` masters (no replicas) on loopback ports, its slots spread by `redis-cli
    --cluster create`; a context manager whose `url` is `redis+cluster://` at its first node."""

    def __init__(self, workdir: Path, nodes: int = 3) -> None:
        self.servers = []
        for i in range(nodes):
            folder = workdir / f"node-{i}"
            folder.mkdir(parents=True, exist_ok=True)
            self.servers.append(RedisServer(folder, fsync="no", port=free_cluster_port(),
                                            extra=("--cluster-enabled", "yes", "--cluster-config-file", "nodes.conf")))
        self.url = f"redis+cluster://127.0.0.1:{self.servers[0].port}"

    def __enter__(self) -> RedisCluster:
        try:
            for server in self.servers:
                server.__enter__()
            subprocess.run(["redis-cli", "--cluster", "create", *(f"127.0.0.1:{s.port}" for s in self.servers),
                            "--cluster-replicas", "0", "--cluster-yes"], check=True, capture_output=True, timeout=60)
            deadline = time.monotonic() + 60
            while not all(self._state_ok(s.port) for s in self.servers):
                if time.monotonic() > deadline:
                    raise RuntimeError("the Redis Cluster did not reach cluster_state:ok")
                time.sleep(0.2)
        except BaseException:
            self.__exit__()
            raise
        return self

    @staticmethod
    def _state_ok(port: int) -> bool:
        info = subprocess.run(["redis-cli", "-p", str(port), "cluster", "info"], capture_output=True, text=True,
                              check=False, timeout=30).stdout
        return "cluster_state:ok" in info

    def __exit__(self, *exc: object) -> None:
        for server in self.servers:
            server.__exit__()


class RayCluster:
    """A Ray cluster of `len(cpus)` nodes on this machine (`ray start --head`, then `ray start --address` for
    each other node), node i with `cpus[i]` CPUs and a custom resource `node-i`; a context manager whose `address`
    is the head's 127.0.0.1:port. `ray stop` at the end stops every Ray process of this machine: run it where no
    other Ray is running."""

    def __init__(self, cpus: tuple[int, ...] = (1, 1)) -> None:
        self.cpus = cpus
        self.port = free_port()
        self.address = f"127.0.0.1:{self.port}"

    def _ray(self, *args: str) -> None:
        env = {**os.environ, "RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO": "0", "RAY_USAGE_STATS_ENABLED": "0"}
        done = subprocess.run(["ray", *args], capture_output=True, text=True, timeout=180, env=env, check=False)
        if done.returncode != 0:
            raise RuntimeError(f"ray {' '.join(args)} failed:\n{done.stdout[-2000:]}\n{done.stderr[-2000:]}")

    def __enter__(self) -> RayCluster:
        try:
            for i, cpus in enumerate(self.cpus):
                where = ["--head", f"--port={self.port}", "--include-dashboard=false"] if i == 0 else \
                    [f"--address={self.address}"]
                self._ray("start", *where, f"--num-cpus={cpus}", "--num-gpus=0", f"--resources={{\"node-{i}\": 1}}",
                          "--node-ip-address=127.0.0.1", "--disable-usage-stats")
        except BaseException:
            self.__exit__()
            raise
        return self

    def client_actor_nodes(self) -> set[str]:
        """The nodes a simulation's ClientApp actors lived on, from the GCS's actor table (kept after they end)."""
        import ray
        from ray._private import state  # the GCS actor table; the public state API needs the dashboard

        ray.init(address=self.address, logging_level="WARNING")
        try:
            return {a["Address"]["NodeID"] for a in state.actors().values() if "ClientAppActor" in a["ActorClassName"]}
        finally:
            ray.shutdown()

    def __exit__(self, *exc: object) -> None:
        subprocess.run(["ray", "stop", "--force"], capture_output=True, timeout=120, check=False)


def simulate_on_two_ray_nodes(work: Path) -> tuple[list[int], set[str]]:
    """A short simulation (2 clients, 2 versions) on a two-node RayCluster of one CPU a node, a whole CPU an
    actor, so that the two ClientApp actors can only run one on each node: (its versions, the actors' nodes).
    Used by tests/test_ray_cluster.py and bench_scale's `ray` part."""
    from edgefed.common.config import EdgefedConfig
    from edgefed.simulations.prepare import prepare
    from edgefed.simulations.runner import run_federation
    from edgefed.simulations.synthetic import SyntheticSpec

    cfg = EdgefedConfig(out_dir=str(work / "runs"), run_id="on-ray", max_versions=2, buffer_size=2, local_epochs=1,
                        min_clients=2, seed=4)
    spec = SyntheticSpec(num_clips=24, width=64, height=48, fps=6, duration_s=1.0, shots=1, seed=4)
    data = prepare(work / "data", cfg, num_clients=2, alpha=10.0, synthetic=spec)
    with RayCluster(cpus=(1, 1)) as cluster:
        run = run_federation(cfg.replace(data_dir=str(data.layout.root)), num_clients=2, ray_address=cluster.address,
                             client_cpus=1.0)
        nodes = cluster.client_actor_nodes()
    return [v["version"] for v in run.read_metrics()], nodes


def scrape(port: int, timeout: float = 30.0) -> dict[tuple[str, tuple], float]:
    """A Prometheus endpoint's samples: (name, labels other than federation/device) -> value."""
    from prometheus_client.parser import text_string_to_metric_families

    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=timeout).read().decode()
    return {(s.name, tuple(sorted((k, v) for k, v in s.labels.items() if k not in ("federation", "device")))): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}
