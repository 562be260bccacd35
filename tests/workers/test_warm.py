"""The warm set's choices, with a hand-written runtime and launcher (no kernels, no registry)."""
from __future__ import annotations

import threading
from typing import Any

from poolgate.workers.protocol import KernelHandle, LaunchRequest
from poolgate.workers.warm import Warm, WarmSet, resources_differ


def request(kid: str = "k1", **kw: Any) -> LaunchRequest:
    return LaunchRequest(kernel_id=kid, pool="p", spec_name="py", argv=("python",), **kw)


class FakeLauncher:
    def __init__(self) -> None:
        self.stopped: list[str] = []
        self.refuse = ""

    def warm_fits(self, warm: KernelHandle, started_for: LaunchRequest,
                  req: LaunchRequest) -> str:
        return self.refuse

    def take_over(self, warm: KernelHandle, kernel_id: str) -> KernelHandle:
        return KernelHandle(kernel_id, warm.pool, warm.host, warm.connection,
                            dict(warm.data, labelled=warm.kernel_id))

    def stop(self, handle: KernelHandle, grace: float = 5.0) -> None:
        self.stopped.append(handle.kernel_id)


class FakeRegistry:
    def __init__(self) -> None:
        self.forgotten: list[str] = []

    def forget_warm(self, worker: str, kid: str) -> None:
        self.forgotten.append(kid)


class FakeConfigPool:
    warm = {"py": 1}


class FakeConfig:
    pools = {"p": FakeConfigPool()}


class FakeRuntime:
    def __init__(self, slots: int = 4, used: int = 1) -> None:
        self.config, self.name, self.pools = FakeConfig(), "w1", ["p"]
        self.slots, self.used = slots, used
        self.registry = FakeRegistry()
        self.shutting_down = threading.Event()
        self.the_launcher = FakeLauncher()

    def launcher(self, pool: str) -> FakeLauncher:
        return self.the_launcher

    def beat(self) -> None:
        pass


def warm_set(rt: FakeRuntime) -> WarmSet:
    ws = WarmSet(rt)  # type: ignore[arg-type]
    ws.ready["p/py"] = [Warm(KernelHandle("warm-1", "p", "h", data={"pid": 7}), request("warm-1"),
                             rss=60 << 20)]
    return ws


def test_resources_that_apply_at_start_must_match() -> None:
    assert resources_differ(request(resources={"resource_dir": "/a"}),
                            request(resources={"resource_dir": "/b", "image": "x"})) == ""
    why = resources_differ(request(), request(resources={"cpus": 2.0}))
    assert why.startswith("the request asks for resources {'cpus': 2.0}; the warm kernels were "
                          "started with none")


def test_a_fitting_request_takes_the_warm_kernel_under_its_own_id() -> None:
    rt = FakeRuntime()
    ws = warm_set(rt)
    assert ws.rss() == {"p/py": 60 << 20}
    handle, note = ws.take("p", request("k1"))
    assert handle is not None and note == {"warm": True}
    assert (handle.kernel_id, handle.data) == ("k1", {"pid": 7, "labelled": "warm-1"})
    assert ws.counts() == {"p/py": 0} and rt.registry.forgotten == ["warm-1"]


def test_a_request_it_cannot_serve_starts_cold_and_leaves_the_warm_kernel() -> None:
    rt = FakeRuntime()
    ws = warm_set(rt)
    rt.the_launcher.refuse = "the request runs as 'bob'"
    assert ws.take("p", request()) == (None, {"warm": False,
                                              "cold_because": "the request runs as 'bob'"})
    assert ws.take("p", request(resources={"memory": 1})) [1]["cold_because"].startswith(
        "the request asks for resources {'memory': 1}")
    assert ws.counts() == {"p/py": 1} and not rt.the_launcher.stopped
    other = LaunchRequest(kernel_id="k2", pool="p", spec_name="r", argv=("R",))
    assert ws.take("p", other) == (None, {})  # the pool keeps no warm kernels of this spec


def test_a_cold_launch_on_a_full_worker_takes_a_warm_kernels_slot() -> None:
    rt = FakeRuntime(slots=2, used=2)  # the launch's own slot is taken: 2 kernels + 1 warm
    ws = warm_set(rt)
    assert ws.take("p", request(resources={"cpus": 1}))[0] is None
    assert rt.the_launcher.stopped == ["warm-1"] and ws.counts() == {"p/py": 0}
    assert rt.registry.forgotten == ["warm-1"]


def test_a_warm_kernel_that_fails_its_hand_over_is_stopped_and_the_launch_starts_cold() -> None:
    import socket

    from poolgate.workers.protocol import ConnectionInfo
    from poolgate.workers.warm import hand_over

    with socket.socket() as s:  # a port nothing listens on: the kernel is gone
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    conn = ConnectionInfo.from_dict({"ip": "127.0.0.1", "key": "k", "transport": "tcp",
                                     **{f"{c}_port": port for c in ("shell", "iopub", "stdin",
                                                                    "control", "hb")}})
    launcher = FakeLauncher()
    handle, note = hand_over(launcher, KernelHandle("k1", "p", connection=conn),  # type: ignore[arg-type]
                             request(), timeout=0.3)
    assert handle is None and launcher.stopped == ["k1"]
    assert note["warm"] is False and note["cold_because"].startswith(
        "the warm kernel failed its hand-over (the warm kernel did not answer)")
