"""The docker and docker-swarm launchers against a hand-written fake engine (no daemon).

The fake keeps its state on itself and plays the kernel launcher: a container it starts sends
the reply (or does not) through the worker's real reply listener.
"""
from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from typing import Any

import docker.errors
import pytest

from poolgate.kernel_launcher import CHANNELS, reply_line
from poolgate.workers.config import PoolConfig
from poolgate.workers.errors import BackendUnavailable, LaunchRejected
from poolgate.workers.launchers import create
from poolgate.workers.launchers.docker_common import EngineLauncher
from poolgate.workers.protocol import KernelHandle, LaunchRequest

KID = "6b1d2c3e-0000-4000-8000-000000000001"


class FakeContainer:
    def __init__(self, engine: FakeEngine, name: str, labels: dict[str, str],
                 env: dict[str, str]) -> None:
        self.engine, self.name, self.labels, self.env = engine, name, labels, env
        engine.made += 1
        self.id = f"c{engine.made}-{name}"
        self.state: dict[str, Any] = {"Status": "created", "Running": False, "ExitCode": 0}
        self.signals: list[Any] = []

    @property
    def attrs(self) -> dict[str, Any]:
        return {"State": self.state}

    @property
    def status(self) -> str:
        return str(self.state["Status"])

    def start(self) -> None:
        self.state.update(Status="running", Running=True)
        threading.Thread(target=self.engine.behave, args=(self,), daemon=True).start()

    def exit(self, code: int) -> None:
        self.state.update(Status="exited", Running=False, ExitCode=code)

    def kill(self, signal: Any = None) -> None:
        self.signals.append(signal)

    def stop(self, timeout: int = 10) -> None:
        self.exit(143)

    def remove(self, force: bool = False) -> None:
        self.engine.containers.pop(self.id, None)

    def logs(self, tail: int = 40) -> bytes:
        return b"kernel said goodbye\n"


class FakeCollection:
    def __init__(self, engine: FakeEngine) -> None:
        self.engine = engine

    def create(self, **spec: Any) -> FakeContainer:
        if self.engine.missing_image:
            raise docker.errors.ImageNotFound(f"No such image: {spec['image']}")
        c = FakeContainer(self.engine, spec["name"], spec["labels"], spec["environment"])
        self.engine.containers[c.id] = c
        self.engine.created.append(spec)
        return c

    def get(self, ref: str) -> FakeContainer:
        if self.engine.down:
            raise docker.errors.DockerException("connection refused")
        for c in self.engine.containers.values():
            if ref in (c.id, c.name):
                return c
        raise docker.errors.NotFound(ref)

    def list(self, all: bool = False, filters: dict[str, str] | None = None
             ) -> list[FakeContainer]:
        key, _, value = (filters or {}).get("label", "").partition("=")
        return [c for c in self.engine.containers.values()
                if c.labels.get(key) == value and (all or c.status == "running")]


class FakeEngine:
    """What DockerLauncher uses of docker.DockerClient. ``reply``: what a started container
    does: "ok" (replies), "exit" (exits 3 without a word), "silent"."""

    def __init__(self, reply: str = "ok") -> None:
        self.reply = reply
        self.containers: dict[str, FakeContainer] = {}
        self.created: list[dict[str, Any]] = []
        self.containers_api = FakeCollection(self)
        self.made = 0
        self.missing_image = False
        self.down = False

    def behave(self, c: FakeContainer) -> None:
        if self.reply == "exit":
            c.exit(3)
            return
        if self.reply == "silent":
            return
        from poolgate.kernel_launcher import send_reply

        env = c.env
        payload = {"token": env["POOLGATE_RESPONSE_TOKEN"], "kernel_id": env["KERNEL_ID"],
                   "ok": True, "ip": "10.1.2.3", "key": "kk", "pid": 9, "command_port": 7000,
                   **{f"{ch}_port": 6000 + i for i, ch in enumerate(CHANNELS)}}
        send_reply(env["POOLGATE_RESPONSE_ADDRESS"],
                   reply_line(env["POOLGATE_LAUNCH_ID"], env["POOLGATE_RESPONSE_KEY"], payload),
                   time.monotonic() + 5)

    def close(self) -> None:
        pass


@pytest.fixture
def launcher() -> Iterator[tuple[EngineLauncher, FakeEngine]]:
    pool = PoolConfig(name="d", launcher="docker", options={
        "image": "img:1", "response_address": "127.0.0.1", "response_bind": "127.0.0.1"})
    engine = FakeEngine()
    launcher = create(pool, "/tmp")
    assert isinstance(launcher, EngineLauncher)
    launcher._client = type("Client", (), {"containers": engine.containers_api,
                                           "close": lambda self: None})()
    yield launcher, engine
    launcher.close()


def request(timeout: float = 10) -> LaunchRequest:
    return LaunchRequest(kernel_id=KID, pool="d", spec_name="s",
                         argv=("python", "-m", "ipykernel_launcher", "-f", "{connection_file}"),
                         launch_timeout=timeout)


def test_launch_yields_the_container_then_the_reported_connection(
        launcher: tuple[EngineLauncher, FakeEngine]) -> None:
    lx, engine = launcher
    handles = list(lx.launch(request()))
    assert handles[0].connection is None and handles[0].data["name"] == f"poolgate-{KID}"
    last = handles[-1]
    assert last.connection is not None and last.connection.ip == "10.1.2.3"
    assert last.data["command_port"] == 7000 and last.host == "10.1.2.3"
    assert lx.poll(last) is None
    lx.stop(last)
    assert engine.containers == {}


def test_a_redelivered_launch_removes_what_the_first_left(
        launcher: tuple[EngineLauncher, FakeEngine]) -> None:
    lx, engine = launcher
    first = list(lx.launch(request()))[-1]
    old = first.data["container"]
    second = list(lx.launch(request()))[-1]
    assert old not in engine.containers and second.data["container"] in engine.containers
    lx.stop(second)


def test_a_container_that_exits_while_starting_fails_the_launch_at_once(
        launcher: tuple[EngineLauncher, FakeEngine]) -> None:
    lx, engine = launcher
    engine.reply = "exit"
    t0 = time.monotonic()
    with pytest.raises(LaunchRejected, match="exited with status 3"):
        list(lx.launch(request(timeout=30)))
    assert time.monotonic() - t0 < 5
    handle = KernelHandle(KID, "d", data={"name": f"poolgate-{KID}"})
    assert "goodbye" in lx.failure_detail(handle)
    lx.stop(handle)
    assert engine.containers == {}


def test_missing_image_is_the_engines_reason(
        launcher: tuple[EngineLauncher, FakeEngine]) -> None:
    lx, engine = launcher
    engine.missing_image = True
    with pytest.raises(LaunchRejected, match="no such image.*No such image: img:1"):
        list(lx.launch(request()))


def test_an_engine_that_does_not_answer_is_not_a_dead_kernel(
        launcher: tuple[EngineLauncher, FakeEngine]) -> None:
    lx, engine = launcher
    handle = list(lx.launch(request()))[-1]
    engine.down = True
    lx.polls.forget(handle.kernel_id)
    assert lx.poll(handle) is None
    engine.down = False
    engine.containers[handle.data["container"]].exit(137)
    lx.polls.forget(handle.kernel_id)
    assert lx.poll(handle) == "its container exited with status 137"
    lx.stop(handle)


def test_interrupt_is_a_signal_to_the_container(
        launcher: tuple[EngineLauncher, FakeEngine]) -> None:
    lx, engine = launcher
    handle = list(lx.launch(request()))[-1]
    lx.send_signal(handle, 2)
    assert engine.containers[handle.data["container"]].signals == [2]
    lx.stop(handle)


def test_stop_is_idempotent_and_finds_by_label(
        launcher: tuple[EngineLauncher, FakeEngine]) -> None:
    lx, engine = launcher
    handle = list(lx.launch(request()))[-1]
    bare = KernelHandle(KID, "d")  # a handle that never got the container's id
    lx.polls.forget(handle.kernel_id)
    assert lx.poll(bare) is None  # found by its label
    lx.send_signal(bare, 2)
    assert engine.containers[handle.data["container"]].signals == [2]
    lx.stop(bare)
    assert engine.containers == {}
    lx.stop(handle)
    lx.stop(bare)


def test_the_missing_sdk_names_the_extra(monkeypatch: pytest.MonkeyPatch) -> None:
    import builtins

    from poolgate.workers.launchers.docker_common import docker_module

    real = builtins.__import__

    def no_docker(name: str, *a: Any, **kw: Any) -> Any:
        if name == "docker":
            raise ImportError("No module named 'docker'")
        return real(name, *a, **kw)

    monkeypatch.setattr(builtins, "__import__", no_docker)
    with pytest.raises(ImportError, match=r"pip install 'poolgate\[docker\]'"):
        docker_module()


def test_engine_errors_map_to_backend_unavailable() -> None:
    from poolgate.workers.launchers.docker_common import engine_errors

    with pytest.raises(BackendUnavailable, match="unreachable"):
        with engine_errors("kernel x"):
            raise docker.errors.DockerException("Error while fetching server API version")
