"""Fixtures that start real pieces: Redis and RabbitMQ brokers, poolgate workers and gateways.

A test that cannot reach its backend fails loudly; nothing here skips. An autouse check fails
any test that leaves a kernel running, and the session ends by checking that no kernel
process started by these tests is still alive.
"""
from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psutil
import pytest
import redis
import yaml

from tests.client import Gateway

# Under pytest-xdist (setup.cfg's addopts) each worker process is a test run of its own: its
# RUN_ID (in queue names, worker names, docker labels, its kernels' environment) and its own
# Redis. The controller names the base every worker's RUN_ID starts with, so that its check at
# the end (pytest_sessionfinish) finds a kernel any worker left behind.
_WORKER = os.environ.get("PYTEST_XDIST_WORKER", "")  # "gw0", "gw1"; "" outside xdist
RUN_BASE = (os.environ.get("POOLGATE_TEST_RUN_BASE", "") if _WORKER else "") or uuid.uuid4().hex[:8]
RUN_ID = RUN_BASE + _WORKER.removeprefix("gw")
# Redis DBs: redis_stack uses BASE+1, rabbit_stack BASE+2, fresh_stack BASE+3, on a redis-server
# of this test run's own (pytest_configure), so that two runs on one machine never empty each
# other's databases. POOLGATE_TEST_REDIS names a server to use instead (its DBs get emptied).
DB_BASE = 10
REDIS = os.environ.get("POOLGATE_TEST_REDIS", "")
AMQP = "amqp://guest:guest@127.0.0.1:5672//"
HERE = Path(__file__).parent
STACKS: list[Stack] = []


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def need_redis() -> None:
    try:
        redis.Redis.from_url(REDIS).ping()
    except redis.ConnectionError as exc:
        pytest.fail(f"the test run's Redis does not answer at {REDIS} ({exc}); the tests start "
                    f"it from the redis-server on PATH (.ci/run installs it)")


def need_rabbitmq() -> None:
    try:
        with socket.create_connection(("127.0.0.1", 5672), timeout=3):
            pass
    except OSError as exc:
        pytest.fail(f"RabbitMQ is not running on 127.0.0.1:5672 ({exc}); .ci/run starts it")


def write_specs(folder: Path, extra: dict[str, Any] | None = None) -> Path:
    """Test kernelspecs: one per pool, one that fails to start, one message-mode interrupt;
    ``extra`` adds specs, or drops one where its value is None."""
    specs = {
        "tiny-py": {"argv": ["python", "-m", "ipykernel_launcher", "-f", "{connection_file}"],
                    "display_name": "tiny", "language": "python",
                    "metadata": {"poolgate": {"pool": "tiny"}}},
        "broken": {"argv": ["python", "-c", "import sys; sys.stderr.write('boom: no such module "
                            "frobnicate\\n'); sys.exit(3)", "{connection_file}"],
                   "display_name": "broken", "language": "python"},
        "msgint": {"argv": ["python", "-m", "ipykernel_launcher", "-f", "{connection_file}"],
                   "display_name": "message interrupt", "language": "python",
                   "interrupt_mode": "message"},
        "eg-local": {"argv": ["python", "-m", "ipykernel_launcher", "-f", "{connection_file}"],
                     "display_name": "EG local", "language": "python",
                     "metadata": {"process_proxy": {"class_name": "enterprise_gateway.services."
                                  "processproxies.processproxy.LocalProcessProxy"}}},
    }
    import json

    specs.update(extra or {})
    for name, spec in specs.items():
        if spec is None:
            continue
        (folder / name).mkdir(parents=True, exist_ok=True)
        (folder / name / "kernel.json").write_text(json.dumps(spec))
    return folder


class Stack:
    """A gateway and workers on one broker, each a real process, sharing one Redis DB."""

    def __init__(self, tmp: Path, broker: str, db: int, slots: int = 4, ttl: float = 3.0,
                 redis_url: str = "",
                 pools: dict[str, Any] | None = None, gateway: dict[str, Any] | None = None,
                 specs: dict[str, Any] | None = None, extra: dict[str, Any] | None = None,
                 gateway_args: list[str] | None = None,
                 client: dict[str, Any] | None = None) -> None:
        """``gateway_args`` are added to ``poolgate gateway`` (TLS files); ``client`` are the
        test client's options (tests/client.py Gateway: headers, ca, cert)."""
        self.tmp = tmp
        self.db = db
        redis_url = redis_url or REDIS
        self.registry_url = f"{redis_url}/{db}"
        self.broker = broker if broker.startswith("amqp") else f"{redis_url}/{db}"
        tag = self.tag = f"t{RUN_ID}{db}"
        self.pools = pools or {
            "local": {"launcher": "local", "queue": f"{tag}-local", "slots": slots,
                      "heartbeat_ttl": ttl, "launch_timeout": 60},
            "tiny": {"launcher": "local", "queue": f"{tag}-tiny", "slots": 1,
                     "heartbeat_ttl": ttl, "launch_timeout": 60},
        }
        cfg = {"broker_url": self.broker, "registry_url": self.registry_url,
               "default_pool": "local", "kernelspec_dirs": [str(write_specs(tmp / "specs", specs))],
               "env_allowlist": ["ALLOWED_VAR"], "pools": self.pools,
               "gateway": {"control_timeout": 10, **(gateway or {})}, **(extra or {})}
        self.config = tmp / "queues.yaml"
        self.config.write_text(yaml.safe_dump(cfg))
        self.env = dict(os.environ, POOLGATE_DATA_DIR=str(tmp / "data"),
                        POOLGATE_TEST_RUN=RUN_ID, PYTHONUNBUFFERED="1")
        self.env.pop("POOLGATE_BROKER_URL", None)
        self.env.pop("POOLGATE_REGISTRY_URL", None)
        self.port = free_port()
        self.gateway_args = gateway_args or []
        self.client = client or {}
        self.scheme = "https" if "--certfile" in self.gateway_args else "http"
        self.url = f"{self.scheme}://127.0.0.1:{self.port}"
        self.workers: dict[str, subprocess.Popen[bytes]] = {}
        self.gateways: list[subprocess.Popen[bytes]] = []
        self.logs = tmp / "logs"
        self.logs.mkdir(exist_ok=True)
        self.token = (gateway or {}).get("auth_token", "")

    def _spawn(self, name: str, args: list[str]) -> subprocess.Popen[bytes]:
        log = open(self.logs / f"{name}.log", "ab")
        return subprocess.Popen([sys.executable, "-m", "poolgate", *args], env=self.env,
                                stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
                                cwd=self.tmp)

    def start(self) -> Stack:
        redis.Redis.from_url(self.registry_url).flushdb()
        try:
            for pool in self.pools:
                self.start_worker(pool)
            self.start_gateway(self.port)
        except BaseException:  # nobody gets the stack to stop: stop what did start
            self.stop()
            raise
        return self

    def start_worker(self, pool: str, wait: bool = True) -> None:
        # Worker names are unique per stack: RabbitMQ's control exchange is shared by all.
        self.workers[pool] = self._spawn(f"worker-{pool}", [
            "worker", "--config", str(self.config), "--pool", pool, "--log-level", "info",
            "--name", f"{pool}-{self.tag}@%h"])
        if wait:
            self.wait_worker(pool)

    def wait_worker(self, pool: str, timeout: float = 30) -> None:
        r = redis.Redis.from_url(self.registry_url)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for key in r.scan_iter("pg:w:*"):  # this process's heartbeat, not a killed one's
                raw = r.get(key)
                info = yaml.safe_load(raw) if raw else {}
                if pool in info.get("pools", []) and info.get("pid") == self.workers[pool].pid:
                    return
            if self.workers[pool].poll() is not None:
                break
            time.sleep(0.1)
        raise AssertionError(f"worker for {pool} did not start:\n{self.log(f'worker-{pool}')}")

    def start_gateway(self, port: int) -> Gateway:
        args = ["gateway", "--config", str(self.config), "--port", str(port), "--log-level", "info",
                *self.gateway_args]
        proc = self._spawn(f"gateway-{port}", args)
        self.gateways.append(proc)
        gw = Gateway(f"{self.scheme}://127.0.0.1:{port}", self.token, **self.client)
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            try:  # up: it answers (401 where this client is not a user)
                if gw.get("/api", timeout=1).status_code in (200, 401):
                    return gw
            except OSError:
                pass
            if proc.poll() is not None:
                break
            time.sleep(0.1)
        raise AssertionError(f"gateway did not start:\n{self.log(f'gateway-{port}')}")

    def log(self, name: str) -> str:
        path = self.logs / f"{name}.log"
        return path.read_text()[-4000:] if path.exists() else ""

    def report(self) -> str:
        """The gateway's view of its kernels and the end of each process's log, for the message
        of a failure whose cause may lie on poolgate's side."""
        try:
            view: Any = self.gw.kernels()
        except (AssertionError, OSError) as exc:
            view = f"not readable ({exc})"
        logs = "".join(f"\n--- {path.stem} log, its end:\n{self.log(path.stem)}"
                       for path in sorted(self.logs.glob("*.log")))
        return f"--- the gateway's kernels: {view}{logs}"

    @property
    def gw(self) -> Gateway:
        return Gateway(self.url, self.token, **self.client)

    def kill_worker(self, pool: str) -> None:
        proc = self.workers[pool]
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()

    def stop(self) -> None:
        for proc in [*self.gateways, *self.workers.values()]:
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        for proc in [*self.gateways, *self.workers.values()]:
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()

    def live_kernels(self) -> list[dict[str, Any]]:
        return [k for k in self.gw.kernels() if k["execution_state"] != "dead"]


@pytest.fixture(scope="session")
def redis_stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    need_redis()
    # ws_compression on: the browser-like test of permessage-deflate (off by default: the
    # rabbit_stack's gateway shows that the offer is declined)
    stack = Stack(tmp_path_factory.mktemp("redis-stack"), REDIS, db=DB_BASE + 1,
                  gateway={"ws_compression": True}).start()
    STACKS.append(stack)
    yield stack
    stack.stop()


@pytest.fixture(scope="session")
def rabbit_stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    need_redis()
    need_rabbitmq()
    stack = Stack(tmp_path_factory.mktemp("rabbit-stack"), AMQP, db=DB_BASE + 2).start()
    STACKS.append(stack)
    yield stack
    stack.stop()


@pytest.fixture(params=["redis", "rabbitmq"])
def stack(request: pytest.FixtureRequest) -> Stack:
    """The same test on a Redis broker and on a RabbitMQ broker."""
    return request.getfixturevalue("redis_stack" if request.param == "redis" else "rabbit_stack")


@pytest.fixture
def fresh_stack(tmp_path: Path) -> Iterator[Stack]:
    """A stack of its own, for tests that kill or restart its processes."""
    need_redis()
    stack = Stack(tmp_path, REDIS, db=DB_BASE + 3).start()
    STACKS.append(stack)
    yield stack
    stack.stop()
    STACKS.remove(stack)


@pytest.fixture(autouse=True)
def no_kernel_left() -> Iterator[None]:
    """Fail a test that leaves a live kernel behind (and clean it up)."""
    yield
    for stack in list(STACKS):
        if any(p.poll() is not None for p in stack.gateways[:1]):
            continue
        try:
            left = stack.live_kernels()
        except OSError:
            continue
        for k in left:
            stack.gw.shutdown(k["id"])
        assert not left, f"the test left kernels running: {left}"


def kernel_processes(every_worker: bool = False) -> list[psutil.Process]:
    """The kernel processes started by this run (their environment carries RUN_ID), or by
    any worker of this xdist run (``every_worker``)."""
    found = []
    for p in psutil.process_iter(["cmdline", "environ"]):
        try:
            run = (p.info.get("environ") or {}).get("POOLGATE_TEST_RUN", "")
            ours = run.startswith(RUN_BASE) if every_worker else run == RUN_ID
            if ours and "ipykernel_launcher" in " ".join(
                    p.info.get("cmdline") or []):
                found.append(p)
        except psutil.Error:
            continue
    return found


def _xdist_controller(config: pytest.Config) -> bool:
    """Whether this process hands the tests to xdist workers (and runs none itself)."""
    return not _WORKER and bool(getattr(config.option, "numprocesses", None))


def pytest_configure(config: pytest.Config) -> None:
    """The test run's own Redis (the machine's redis-server binary, on a free port)."""
    global REDIS
    if _xdist_controller(config):
        os.environ["POOLGATE_TEST_RUN_BASE"] = RUN_BASE  # the workers start after this
        return
    if REDIS:
        return
    import tempfile

    server = PrivateRedis(Path(tempfile.mkdtemp(prefix="poolgate-test-redis-")))
    server.start()
    REDIS = f"redis://127.0.0.1:{server.port}"
    config.stash[_RUN_REDIS] = server


def pytest_unconfigure(config: pytest.Config) -> None:
    server = config.stash.get(_RUN_REDIS, None)
    if server is not None and server.proc is not None:
        import logging

        logging.disable(logging.CRITICAL)  # the in-process apps' threads lose their registry now
        server.kill()
        shutil.rmtree(server.folder, ignore_errors=True)


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    """No kernel process started by these tests may outlive them. Under xdist the controller
    checks, once every worker is done: a worker's own exit status does not reach it."""
    if _WORKER:
        return
    time.sleep(0.5)
    left = kernel_processes(every_worker=True)
    described = []
    for p in left:
        try:
            described.append(f"{p.pid} (KERNEL_ID={p.environ().get('KERNEL_ID')}, "
                             f"{' '.join(p.cmdline())[-80:]})")
        except psutil.Error:
            described.append(str(p.pid))
        p.kill()
    if left:
        print(f"\nLEAK: {len(left)} kernel processes outlived the tests: {described}")
        session.exitstatus = 1


_RUN_REDIS = pytest.StashKey["PrivateRedis"]()


def requires(binary: str) -> str:
    path = shutil.which(binary)
    if path is None:
        pytest.fail(f"{binary} is not installed; .ci/run installs it")
    return path


class PrivateRedis:
    """A redis-server of the test's own, which it may kill and restart (empty)."""

    proc: subprocess.Popen[bytes] | None

    def __init__(self, folder: Path) -> None:
        self.port = free_port()
        self.folder = folder
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        self.proc = subprocess.Popen([requires("redis-server"), "--port", str(self.port),
                                      "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
                                      "--databases", "64",
                                      "--dir", str(self.folder)], stdout=subprocess.DEVNULL)
        client = redis.Redis(port=self.port)
        for _ in range(100):
            try:
                client.ping()
                return
            except redis.ConnectionError:
                time.sleep(0.05)
        raise AssertionError("private redis did not start")

    def kill(self) -> None:
        assert self.proc is not None
        self.proc.kill()
        self.proc.wait()


@pytest.fixture
def private_redis(tmp_path: Path) -> Iterator[PrivateRedis]:
    server = PrivateRedis(tmp_path)
    server.start()
    yield server
    if server.proc and server.proc.poll() is None:
        server.kill()




class PrivateRabbit:
    """A RabbitMQ node of the test's own (its own port, name and data), which it may kill and
    start again. The broker keeps its durable queues on disk across the restart."""

    def __init__(self, folder: Path) -> None:
        import pwd

        self.port = free_port()
        self.dist = free_port()
        self.folder = folder
        self.name = f"pgtest{RUN_ID}{self.port}@localhost"
        (folder / "mnesia").mkdir(parents=True, exist_ok=True)
        (folder / "log").mkdir(exist_ok=True)
        (folder / "enabled_plugins").write_text("[].\n")
        (folder / "rabbitmq.conf").write_text(f"listeners.tcp.default = 127.0.0.1:{self.port}\n")
        try:  # rabbitmq-server run as root drops to the rabbitmq user, which must own the files
            user = pwd.getpwnam("rabbitmq")
            for p in [folder, *folder.rglob("*")]:
                os.chown(p, user.pw_uid, user.pw_gid)
        except KeyError:
            pass
        self.proc: subprocess.Popen[bytes] | None = None
        self.url = f"amqp://guest:guest@127.0.0.1:{self.port}//"

    def start(self) -> None:
        env = dict(os.environ, RABBITMQ_NODENAME=self.name, RABBITMQ_NODE_PORT=str(self.port),
                   RABBITMQ_DIST_PORT=str(self.dist),
                   RABBITMQ_CONFIG_FILE=str(self.folder / "rabbitmq"),
                   RABBITMQ_MNESIA_BASE=str(self.folder / "mnesia"),
                   RABBITMQ_LOG_BASE=str(self.folder / "log"),
                   RABBITMQ_ENABLED_PLUGINS_FILE=str(self.folder / "enabled_plugins"))
        self.proc = subprocess.Popen([requires("rabbitmq-server")], env=env, start_new_session=True,
                                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=1):
                    time.sleep(0.5)
                    return
            except OSError:
                time.sleep(0.3)
        raise AssertionError("the test's own RabbitMQ node did not start")

    def kill(self) -> None:
        """SIGKILL the node: the Erlang VM runs as the rabbitmq user in a group of its own,
        so it is found by the node name in its environment."""
        assert self.proc is not None
        for p in psutil.process_iter(["environ"]):
            try:
                if (p.info.get("environ") or {}).get("RABBITMQ_NODENAME") == self.name:
                    p.kill()
            except psutil.Error:
                pass
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        self.proc.wait()
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=0.5).close()
                time.sleep(0.2)
            except OSError:
                return
        raise AssertionError("the test's own RabbitMQ node did not die")


@pytest.fixture
def private_rabbit() -> Iterator[PrivateRabbit]:
    import tempfile

    need_rabbitmq()  # the machine has RabbitMQ installed and running (.ci/run sees to it)
    # Not under pytest's tmp_path: the rabbitmq user, which the server runs as, cannot enter it.
    folder = Path(tempfile.mkdtemp(prefix="poolgate-rabbit-"))
    folder.chmod(0o755)
    server = PrivateRabbit(folder)
    server.start()
    yield server
    server.kill()
    shutil.rmtree(folder, ignore_errors=True)
