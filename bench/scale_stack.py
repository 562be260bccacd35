"""The processes of a scale run: two private Redis servers (registry, broker), W workers on a pool
of cheap kernels (bench/cheap/), the maintenance worker and G gateways, each a ManagedProcess.

The registry and the broker get a Redis server each, so that INFO commandstats counts one
of them alone. ``--broker amqp`` starts a private RabbitMQ node instead (``rabbitmq-server`` from
the machine's install, on free loopback ports, its own data folder and Erlang cookie, with the
management plugin enabled for it alone): its ``/api/overview`` message counts are this stack's
only, and the machine's RabbitMQ and its plugins are left alone.
"""
from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path
from typing import Any

import psutil
import redis
import requests
import yaml

from bench.procs import ManagedProcess, free_port

ROOT = str(Path(__file__).resolve().parents[1])
POOL = "cheap"
RABBIT_BINARIES = ("/usr/lib/rabbitmq/bin/rabbitmq-server", "/usr/local/sbin/rabbitmq-server",
                   "/opt/rabbitmq/sbin/rabbitmq-server")
SPEC = {"argv": ["unused", "{connection_file}"], "display_name": "cheap (scale bench)",
        "language": "python", "interrupt_mode": "message", "metadata": {"poolgate": {"pool": POOL}}}


class Stack:
    """Everything one scale run starts, in ``folder``."""

    def __init__(self, folder: Path, kernels: int, workers: int, gateways: int, broker: str,
                 slots: int | None = None) -> None:
        """``slots`` per worker: by default room for ``kernels`` and 16 more per worker."""
        self.folder, self.workers_n, self.gateways_n = folder, workers, gateways
        self.slots = slots or -(-kernels // workers) + 16
        self.threads = kernels + 128  # one gateway thread per open WebSocket, and room for REST
        self.broker_kind = broker
        self.gc_watch = False  # log the gateways' and workers' long collections (scale_gcwatch)
        self.redis: dict[str, ManagedProcess] = {}
        self.ports: dict[str, int] = {}
        self.workers: list[ManagedProcess] = []
        self.gateways: list[ManagedProcess] = []
        self.urls: list[str] = []
        self.others: list[ManagedProcess] = []
        self.env = dict(os.environ, PYTHONUNBUFFERED="1", POOLGATE_DATA_DIR=str(folder / "data"),
                        PYTHONPATH=os.pathsep.join(filter(None, [ROOT, os.environ.get("PYTHONPATH")])))
        for k in ("POOLGATE_BROKER_URL", "POOLGATE_REGISTRY_URL"):
            self.env.pop(k, None)

    # -- start ---------------------------------------------------------------------------

    def _redis(self, name: str) -> str:
        port = free_port()
        proc = ManagedProcess(f"redis-{name}", ["redis-server", "--port", str(port), "--bind",
                                                "127.0.0.1", "--save", "", "--appendonly", "no",
                                                "--maxclients", "30000", "--dir", str(self.folder)],
                              self.env, self.folder / f"redis-{name}.log")
        proc.start()
        client = redis.Redis(port=port)
        deadline = time.monotonic() + 20
        while True:
            try:
                client.ping()
                break
            except redis.ConnectionError:
                if time.monotonic() > deadline or proc.exited() is not None:
                    raise RuntimeError(f"redis-server did not start: {proc.log_tail()}") from None
                time.sleep(0.05)
        self.redis[name], self.ports[name] = proc, port
        return f"redis://127.0.0.1:{port}/0"

    def _rabbit(self) -> str:
        """A private RabbitMQ node with the management plugin; returns its AMQP URL."""
        base = self.folder / "rabbit"
        for sub in ("mnesia", "log"):
            (base / sub).mkdir(parents=True, exist_ok=True)
        amqp, http, dist = free_port(), free_port(), free_port()
        (base / "enabled_plugins").write_text("[rabbitmq_management].\n")
        (base / "rabbitmq.conf").write_text(
            f"listeners.tcp.default = 127.0.0.1:{amqp}\nmanagement.tcp.ip = 127.0.0.1\n"
            f"management.tcp.port = {http}\ncollect_statistics_interval = 1000\n")
        (base / "advanced.config").write_text("[].\n")
        env = dict(self.env, HOME=str(base), RABBITMQ_NODENAME=f"pgscale{dist}@localhost",
                   RABBITMQ_DIST_PORT=str(dist), RABBITMQ_MNESIA_BASE=str(base / "mnesia"),
                   RABBITMQ_LOG_BASE=str(base / "log"),
                   RABBITMQ_ENABLED_PLUGINS_FILE=str(base / "enabled_plugins"),
                   RABBITMQ_CONFIG_FILE=str(base / "rabbitmq"),
                   RABBITMQ_ADVANCED_CONFIG_FILE=str(base / "advanced.config"),
                   RABBITMQ_PID_FILE=str(base / "pid"))
        # the packaged /usr/sbin wrapper switches to the rabbitmq user; the real script does not
        binary = next((b for b in RABBIT_BINARIES if os.path.exists(b)), None)
        if binary is None:
            raise RuntimeError(f"--broker amqp needs rabbitmq-server (looked in {RABBIT_BINARIES})")
        proc = ManagedProcess("rabbit", [binary], env, self.folder / "rabbit.log")
        proc.start()
        self.ports["rabbit_http"] = http
        deadline = time.monotonic() + 90
        while not self._answers_overview():
            if time.monotonic() > deadline or proc.exited() is not None:
                raise RuntimeError(f"rabbitmq-server did not start: {proc.log_tail()}")
            time.sleep(0.5)
        self.redis["rabbit"] = proc
        return f"amqp://guest:guest@127.0.0.1:{amqp}//"

    def _answers_overview(self) -> bool:
        try:
            return self.rabbit_overview() is not None
        except requests.RequestException:
            return False

    def _config(self) -> Path:
        registry = self._redis("registry")
        broker = self._redis("broker") if self.broker_kind == "redis" else self._rabbit()
        specs = self.folder / "specs" / POOL
        specs.mkdir(parents=True, exist_ok=True)
        (specs / "kernel.json").write_text(json.dumps(SPEC))
        tag = f"scale{os.getpid()}{self.folder.name}"
        cfg = {"broker_url": broker, "registry_url": registry, "default_pool": POOL,
               "default_kernelspec": POOL, "kernelspec_dirs": [str(specs.parent)],
               "pools": {POOL: {"launcher": "bench.cheap.launcher:CheapLauncher",
                                "queue": f"{tag}-{POOL}", "slots": self.slots,
                                "launch_timeout": 300, "max_launch_timeout": 600},
                         # the packaged python3 kernelspec routes to "local": no worker serves it
                         "local": {"launcher": "local", "queue": f"{tag}-local", "slots": 1}}}
        path = self.folder / "queues.yaml"
        path.write_text(yaml.safe_dump(cfg))
        return path

    def _poolgate(self, name: str, *args: str) -> ManagedProcess:
        env = self.env
        if self.gc_watch and name.startswith(("gateway", "worker")):  # long collections logged
            env = dict(env, POOLGATE_BENCH_GCLOG=str(self.folder / f"gc-{name}.log"),
                       PYTHONPATH=os.pathsep.join([str(Path(ROOT) / "bench" / "scale_gcwatch"),
                                                   env["PYTHONPATH"]]))
        proc = ManagedProcess(name, [sys.executable, "-m", "poolgate", *args], env,
                              self.folder / f"{name}.log", cwd=self.folder)
        proc.start()
        return proc

    def start(self) -> None:
        config = str(self._config())
        for i in range(self.workers_n):
            self.workers.append(self._poolgate(
                f"worker-{i}", "worker", "--config", config, "--pool", POOL, "--slots",
                str(self.slots), "--name", f"{POOL}-{i}@%h", "--log-level", "warning"))
        self.others.append(self._poolgate("maintenance", "maintenance", "--config", config,
                                          "--log-level", "warning"))
        for i in range(self.gateways_n):
            port = free_port()
            self.gateways.append(self._poolgate(
                f"gateway-{i}", "gateway", "--config", config, "--port", str(port), "--threads",
                str(self.threads), "--log-level", "warning"))
            self.urls.append(f"http://127.0.0.1:{port}")
        self._wait_ready()

    def _wait_ready(self, timeout: float = 120) -> None:
        deadline = time.monotonic() + timeout
        reg = self.registry()
        while time.monotonic() < deadline:
            for proc in [*self.workers, *self.gateways, *self.others]:
                if proc.exited() is not None:
                    raise RuntimeError(f"{proc.name} exited: {proc.log_tail()}")
            workers = [yaml.safe_load(reg.get(k) or b"{}") for k in reg.scan_iter("pg:w:*")]
            up = sum(1 for w in workers if POOL in (w or {}).get("pools", []))
            if up >= self.workers_n and all(self._answers(u) for u in self.urls):
                return
            time.sleep(0.2)
        raise RuntimeError("the stack did not get ready in time")

    @staticmethod
    def _answers(url: str) -> bool:
        try:
            return requests.get(f"{url}/api", timeout=1).status_code == 200
        except requests.RequestException:
            return False

    # -- measure -------------------------------------------------------------------------

    def registry(self) -> redis.Redis:
        return redis.Redis(port=self.ports["registry"])

    def broker(self) -> redis.Redis | None:
        return redis.Redis(port=self.ports["broker"]) if "broker" in self.ports else None

    def rabbit_overview(self) -> dict[str, Any] | None:
        """The private RabbitMQ node's /api/overview (None without one)."""
        if "rabbit_http" not in self.ports:
            return None
        r = requests.get(f"http://127.0.0.1:{self.ports['rabbit_http']}/api/overview",
                         auth=("guest", "guest"), timeout=10)
        return dict(r.json()) if r.status_code == 200 else None

    @staticmethod
    def _procs(group: list[ManagedProcess]) -> list[psutil.Process]:
        return [p for m in group for p in m.tree()]

    def gateway_procs(self) -> list[psutil.Process]:
        return self._procs(self.gateways)

    def worker_procs(self) -> list[psutil.Process]:
        """The workers proper, without their kernel-host children."""
        return [p for p in self._procs(self.workers) if not _is_host(p)]

    def host_procs(self) -> list[psutil.Process]:
        return [p for p in self._procs(self.workers) if _is_host(p)]

    def gc_log(self) -> list[dict[str, Any]]:
        """Each collection logged so far (``gc_watch``): wall time, process, generation, ms,
        and the objects collected, tracked and frozen (bench/scale_gcwatch)."""
        out = []
        for log in sorted(self.folder.glob("gc-*.log")):
            for line in log.read_text().splitlines():
                t, _pid, gen, ms, *rest = line.split()
                fields = {k: int(v) for k, v in (item.split("=", 1) for item in rest)}
                out.append({"time": float(t), "process": log.stem[3:], "gen": int(gen[3:]),
                            "ms": float(ms.removesuffix("ms")), **fields})
        return out

    def gc_pauses(self) -> list[tuple[float, str, float]]:
        """(wall time, process, ms) of each long collection logged so far (``gc_watch``)."""
        return [(c["time"], f"{c['process']} gen{c['gen']}", c["ms"]) for c in self.gc_log()]

    def broker_procs(self) -> list[psutil.Process]:
        """The broker's server (Redis, or the private RabbitMQ node's Erlang VM)."""
        return self._procs([p for k, p in self.redis.items() if k in ("broker", "rabbit")])

    def maintenance_procs(self) -> list[psutil.Process]:
        return self._procs(self.others)

    def stop(self) -> None:
        for proc in [*self.gateways, *self.others, *self.workers, *self.redis.values()]:
            proc.stop(grace=20.0)


def _is_host(proc: psutil.Process) -> bool:
    try:
        return "bench.cheap.host" in " ".join(proc.cmdline())
    except psutil.Error:
        return False


def usage(procs: list[psutil.Process]) -> dict[str, Any]:
    """RSS (bytes), open fds, threads and CPU seconds summed over ``procs``."""
    out = {"rss": 0, "fds": 0, "threads": 0, "cpu": 0.0}
    for p in procs:
        try:
            with p.oneshot():
                out["rss"] += p.memory_info().rss
                out["fds"] += p.num_fds()
                out["threads"] += p.num_threads()
                t = p.cpu_times()
                out["cpu"] += t.user + t.system
        except psutil.Error:
            continue
    return out
