"""The gpu launcher without a gateway: discovery (a labelled fake nvidia-smi on PATH, the worker's
CUDA_VISIBLE_DEVICES, a configured list), the allocator's slot accounting and order, resource
admission and enforcement, and real kernels that get their own GPUs and keep them."""
from __future__ import annotations

import os
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psutil
import pytest

from poolgate.workers.config import KernelSpec, PoolConfig, build
from poolgate.workers.errors import BadRequest, ConfigError, LaunchRejected
from poolgate.workers.gpus import GPU, GPUAllocator, discover, parse_nvidia_smi, parse_visible_devices
from poolgate.workers.launchers.gpu import GPULauncher
from poolgate.workers.launchers.gpu_builders import GPUOptions, build_gpu_env, slots_for
from poolgate.workers.protocol import KernelHandle, LaunchRequest
from poolgate.workers.resources import (
    Confiner,
    Limits,
    admit,
    build_cgroup_files,
    own_cgroup,
    parse_cpus,
    parse_memory,
    shown,
)

SMI_ROWS = ["0, GPU-11111111-aaaa, FAKE-LABEL-A100, 40960 MiB",
            "1, GPU-22222222-bbbb, FAKE-LABEL-H100, 81559 MiB"]


def fake_nvidia_smi(folder: Path, rows: list[str] | None = None, rc: int = 0) -> Path:
    """An executable ``nvidia-smi`` in ``folder`` that answers poolgate's query with ``rows``."""
    folder.mkdir(parents=True, exist_ok=True)
    script = folder / "nvidia-smi"
    body = "\n".join(rows if rows is not None else SMI_ROWS)
    script.write_text(
        "#!/bin/sh\n"
        'case "$*" in *--query-gpu=index,uuid,name,memory.total*) ;; '
        '*) echo "unexpected arguments: $*" >&2; exit 9;; esac\n'
        f"cat <<'EOF'\n{body}\nEOF\nexit {rc}\n")
    script.chmod(0o755)
    return folder


def env_with(folder: Path | None, **extra: str) -> dict[str, str]:
    path = f"{folder}:/usr/bin:/bin" if folder else "/usr/bin:/bin"
    return {"PATH": path, **extra}


# -- discovery -------------------------------------------------------------------------------


def test_parse_nvidia_smi() -> None:
    assert parse_nvidia_smi("\n".join(SMI_ROWS) + "\n") == (
        GPU("0", "GPU-11111111-aaaa", "FAKE-LABEL-A100", 40960),
        GPU("1", "GPU-22222222-bbbb", "FAKE-LABEL-H100", 81559),
    )
    assert parse_nvidia_smi("3, GPU-x, Tesla T4, 15360\n") == (GPU("3", "GPU-x", "Tesla T4", 15360),)
    assert parse_nvidia_smi("No devices were found\n") == ()
    with pytest.raises(ConfigError, match="cannot read"):
        parse_nvidia_smi("NVIDIA-SMI has failed because it couldn't communicate with the driver")


def test_parse_visible_devices() -> None:
    assert [g.id for g in parse_visible_devices("0,2")] == ["0", "2"]
    assert [g.id for g in parse_visible_devices("1, -1, 2")] == ["1"]  # as CUDA reads it
    assert parse_visible_devices("") == () and parse_visible_devices("-1") == ()
    assert parse_visible_devices("GPU-abc,MIG-def") == (GPU("GPU-abc", "GPU-abc"), GPU("MIG-def", "MIG-def"))


def test_discovery_with_a_labelled_fake_nvidia_smi(tmp_path: Path) -> None:
    found = discover("nvidia-smi", (), env_with(fake_nvidia_smi(tmp_path)))
    assert found.source == "nvidia-smi"
    assert [(g.id, g.name) for g in found.gpus] == [("0", "FAKE-LABEL-A100"), ("1", "FAKE-LABEL-H100")]
    assert found.describe() == "2 GPUs via nvidia-smi: 0 (FAKE-LABEL-A100), 1 (FAKE-LABEL-H100)"


def test_discovery_order_and_reasons(tmp_path: Path) -> None:
    smi = fake_nvidia_smi(tmp_path / "bin")
    assert [g.id for g in discover("auto", ("7",), env_with(smi)).gpus] == ["7"]  # list first
    assert [g.id for g in discover("auto", (), env_with(smi, CUDA_VISIBLE_DEVICES="1")).gpus] == ["1"]
    hidden = discover("auto", (), env_with(smi, CUDA_VISIBLE_DEVICES=""))
    assert hidden.gpus == () and "hides every GPU" in hidden.why
    assert [g.id for g in discover("auto", (), env_with(smi)).gpus] == ["0", "1"]
    none = discover("auto", (), env_with(None))
    assert none.gpus == () and "nvidia-smi is not on PATH" in none.why
    broken = discover("nvidia-smi", (), env_with(fake_nvidia_smi(tmp_path / "b", ["driver gone"], rc=6)))
    assert broken.gpus == () and "exited with code 6" in broken.why
    assert "not set" in discover("env", (), env_with(smi)).why
    with pytest.raises(ConfigError, match="listed once"):
        discover("list", ("0", "0"), {})


# -- slot accounting -----------------------------------------------------------------------


def test_two_kernels_never_share_a_gpu_and_a_third_waits_its_turn() -> None:
    gpus = GPUAllocator([GPU("0"), GPU("1")])
    assert [g.id for g in gpus.acquire("k1", 1) or ()] == ["0"]
    assert [g.id for g in gpus.acquire("k2", 1) or ()] == ["1"]
    assert gpus.acquire("k3", 1) is None and gpus.acquire("k4", 1) is None
    assert gpus.waiting() == ["k3", "k4"] and gpus.free() == 0
    assert gpus.release("k2") == ("1",)
    assert gpus.acquire("k4", 1) is None  # k3 is first in line
    assert [g.id for g in gpus.acquire("k3", 1) or ()] == ["1"]
    gpus.release("k1")
    assert [g.id for g in gpus.acquire("k4", 1) or ()] == ["0"]
    assert gpus.holders() == {"k3": ("1",), "k4": ("0",)}
    assert gpus.release("k9") == () and gpus.release("k3") == ("1",) and gpus.release("k3") == ()


def test_a_freed_gpu_goes_to_the_next_in_line_in_order() -> None:
    gpus = GPUAllocator([GPU("0"), GPU("1")])
    gpus.acquire("a", 1)
    gpus.acquire("b", 1)
    got: list[tuple[str, str]] = []
    lock = threading.Lock()

    def wait(owner: str) -> None:
        ids = gpus.acquire(owner, 1, timeout=20)
        with lock:
            got.append((owner, ids[0].id if ids else "timeout"))

    threads = []
    for owner in ("c", "d", "e"):
        threads.append(threading.Thread(target=wait, args=(owner,)))
        threads[-1].start()
        deadline = time.monotonic() + 5
        while owner not in gpus.waiting() and time.monotonic() < deadline:
            time.sleep(0.01)
    assert gpus.waiting() == ["c", "d", "e"]
    for freed in ("b", "a", "c"):
        gpus.release(freed)
        deadline = time.monotonic() + 5
        n = len(got)
        while len(got) == n and time.monotonic() < deadline:
            time.sleep(0.01)
    for t in threads:
        t.join(5)
    assert got == [("c", "1"), ("d", "0"), ("e", "1")]


def test_a_two_gpu_request_at_the_head_of_the_line_is_not_overtaken() -> None:
    gpus = GPUAllocator([GPU("0"), GPU("1")])
    gpus.acquire("one", 1)
    assert gpus.acquire("pair", 2) is None
    assert gpus.acquire("small", 1) is None  # a GPU is free, but "pair" came first
    gpus.release("one")
    assert [g.id for g in gpus.acquire("pair", 2) or ()] == ["0", "1"]
    with pytest.raises(ValueError, match="this worker has 2"):
        gpus.acquire("huge", 3)


def test_sharing_and_restart_preference() -> None:
    gpus = GPUAllocator([GPU("0"), GPU("1")], per_gpu=2)
    assert gpus.capacity == 4
    assert [g.id for g in gpus.acquire("a", 2) or ()] == ["0", "1"]  # distinct GPUs
    assert [g.id for g in gpus.acquire("b", 1) or ()] == ["0"]
    assert [g.id for g in gpus.acquire("c", 1) or ()] == ["1"]  # the least used
    assert gpus.acquire("d", 1) is None
    gpus.release("c")
    gpus.release("b")
    assert gpus.acquire("c", 1) is None  # "d" waits ahead of it
    assert [g.id for g in gpus.acquire("d", 1) or ()] == ["0"]
    assert [g.id for g in gpus.acquire("c", 1, prefer=("1",)) or ()] == ["1"]
    assert gpus.load() == {"0": 2, "1": 2}


def test_slots_follow_the_gpus(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    assert slots_for(2, 1, 1) == 2 and slots_for(4, 1, 2) == 2 and slots_for(1, 1, 2) == 0
    assert slots_for(2, 2, 1) == 4
    monkeypatch.setenv("PATH", env_with(fake_nvidia_smi(tmp_path))["PATH"])
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    options = build(GPUOptions, {}, "options")
    assert GPULauncher.default_slots(options) == 2 and GPULauncher.runs_here(options) is None
    pairs = build(GPUOptions, {"max_gpus_per_kernel": 2}, "options")
    assert GPULauncher.default_slots(pairs) == 1
    assert GPULauncher.default_slots(build(GPUOptions, {"gpus": ["a", "b", "c"]}, "o")) == 3
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")
    assert GPULauncher.default_slots(options) == 0
    assert "hides every GPU" in (GPULauncher.runs_here(options) or "")


def test_gpu_options_are_checked() -> None:
    for bad, match in (({"discover": "magic"}, "discover"), ({"discover": "list"}, "needs the list"),
                       ({"gpus_per_kernel": 2}, "gpus_per_kernel"),
                       ({"max_gpus_per_kernel": 0}, "max_gpus_per_kernel")):
        with pytest.raises(ConfigError, match=match):
            build(GPUOptions, bad, "options")


def test_build_gpu_env() -> None:
    two = (GPU("0"), GPU("3"))
    assert build_gpu_env(two, "nvidia-smi") == {"CUDA_VISIBLE_DEVICES": "0,3",
                                                "NVIDIA_VISIBLE_DEVICES": "0,3",
                                                "CUDA_DEVICE_ORDER": "PCI_BUS_ID"}
    assert build_gpu_env((GPU("GPU-x"),), "list") == {"CUDA_VISIBLE_DEVICES": "GPU-x",
                                                      "NVIDIA_VISIBLE_DEVICES": "GPU-x"}
    assert build_gpu_env((), "env") == {"CUDA_VISIBLE_DEVICES": "", "NVIDIA_VISIBLE_DEVICES": "void"}


def test_a_gpu_worker_without_gpus_refuses_to_start(tmp_path: Path) -> None:
    cfg = tmp_path / "queues.yaml"
    cfg.write_text("pools:\n  local: {launcher: local}\n  gpu: {launcher: gpu}\n")
    env = {k: v for k, v in os.environ.items() if k != "CUDA_VISIBLE_DEVICES"}
    env["PATH"] = os.pathsep.join(p for p in env["PATH"].split(os.pathsep)
                                  if not (Path(p) / "nvidia-smi").exists())
    done = subprocess.run([sys.executable, "-m", "poolgate", "worker", "--config", str(cfg),
                           "--pool", "gpu"], env=env, capture_output=True, text=True, timeout=60)
    assert done.returncode == 2, done.stdout + done.stderr
    assert "pool 'gpu'" in done.stderr and "nvidia-smi is not on PATH" in done.stderr
    assert "does not start" in done.stderr


# -- resources: admission ------------------------------------------------------------------


def test_quantities() -> None:
    assert parse_memory("512Mi", "m") == 512 * 2**20 and parse_memory("2G", "m") == 2 * 10**9
    assert parse_memory("1.5GiB", "m") == 3 * 2**29 and parse_memory(1024, "m") == 1024
    assert parse_cpus("500m", "c") == 0.5 and parse_cpus("2", "c") == 2.0
    for bad in ("lots", "-1", "0", "2 Gigs"):
        with pytest.raises(ValueError, match="expected memory"):
            parse_memory(bad, "env.KERNEL_MEMORY")
    with pytest.raises(ValueError, match="expected a number of CPUs"):
        parse_cpus("0", "c")


def _pool(launcher: str = "gpu", **options: Any) -> PoolConfig:
    return PoolConfig(name="gpu" if launcher == "gpu" else "local", launcher=launcher,
                      options=options)


def _spec(**resources: Any) -> KernelSpec:
    return KernelSpec(name="s", resource_dir="/nowhere", argv=("python",), display_name="s",
                      language="python", env={}, interrupt_mode="signal", pool="gpu",
                      metadata={"poolgate": {"pool": "gpu", "resources": resources}})


def test_admission_within_the_pools_limits() -> None:
    pool = _pool(max_gpus_per_kernel=2, max_cpus_per_kernel=4, max_memory_per_kernel="8Gi")
    assert admit(pool, _spec(gpus=1, memory="1Gi"), {}) == {"gpus": 1, "memory": 2**30}
    assert admit(pool, _spec(gpus=1), {"KERNEL_GPUS": "2", "KERNEL_CPUS": "1.5",
                                       "KERNEL_IMAGE": "img"}) == {
        "gpus": 2, "cpus": 1.5, "image": "img"}
    with pytest.raises(BadRequest, match=r"env.KERNEL_GPUS: 3 is more than pool 'gpu' allows one "
                                         r"kernel \(max_gpus_per_kernel: 2\)"):
        admit(pool, _spec(), {"KERNEL_GPUS": "3"})
    with pytest.raises(BadRequest, match=r"KERNEL_MEMORY: 16Gi is more .* 8Gi"):
        admit(pool, _spec(), {"KERNEL_MEMORY": "16Gi"})
    with pytest.raises(BadRequest, match="whole number of GPUs"):
        admit(pool, _spec(), {"KERNEL_GPUS": "two"})
    with pytest.raises(BadRequest, match="has no GPUs"):
        admit(_pool("local"), _spec(), {"KERNEL_GPUS": "1"})
    with pytest.raises(ConfigError, match=r"kernelspecs.s.metadata.poolgate.resources.gpus"):
        admit(pool, _spec(gpus=5), {})
    assert admit(_pool("local"), _spec(), {"KERNEL_MEMORY": "64Gi"}) == {"memory": 64 * 2**30}


def test_model_shows_resources_and_gpus() -> None:
    request = {"resources": {"gpus": 1, "resource_dir": "/x", "memory": 5}}
    assert shown(request, {"data": {"gpus": ["1"], "pid": 3}}) == {
        "resources": {"gpus": 1, "memory": 5}, "gpus": ["1"]}
    assert shown({"resources": {"resource_dir": "/x"}}, {}) == {}


# -- resources: enforcement ----------------------------------------------------------------


def test_own_cgroup() -> None:
    mountinfo = ("30 25 0:26 / /sys/fs/cgroup rw,nosuid shared:4 - cgroup2 cgroup2 rw\n"
                 "31 25 0:27 / /proc rw - proc proc rw\n")
    assert own_cgroup("0::/user.slice/w.service\n", mountinfo) == Path("/sys/fs/cgroup/user.slice/w.service")
    assert own_cgroup("4:memory:/x\n", mountinfo) is None
    assert own_cgroup("0::/\n", "1 2 3 / /proc rw - proc proc rw\n") is None


def test_cgroup_plan_when_the_controllers_are_delegated(tmp_path: Path) -> None:
    parent = tmp_path / "poolgate"
    (parent / "worker").mkdir(parents=True)
    (parent / "cgroup.subtree_control").write_text("cpu memory pids\n")
    held = Confiner(parent / "worker").plan("k1", Limits(cpus=1.5, memory=2**30))
    child = parent / "poolgate-k1"
    assert (child / "memory.max").read_text() == str(2**30)
    assert (child / "cpu.max").read_text() == "150000 100000"
    assert held.prefix == (sys.executable, "-m", "poolgate.workers.resources", "--cgroup", str(child), "--")
    assert held.data == {"limits": {"via": "cgroup", "cgroup": str(child), "cpus": 1.5,
                                    "memory": 2**30}}
    assert build_cgroup_files(Limits(memory=5)) == {"memory.max": "5"}


def test_rlimit_plan_without_a_cgroup(tmp_path: Path) -> None:
    confiner = Confiner(tmp_path)  # no cgroup.subtree_control: no controllers
    held = confiner.plan("k1", Limits(cpus=1, memory=300 * 2**20))
    cpu = held.data["limits"]["cpuset"]
    assert held.prefix == (sys.executable, "-m", "poolgate.workers.resources", "--memory",
                           str(300 * 2**20), "--cpus", str(cpu[0]), "--")
    assert held.data == {"limits": {"via": "rlimit", "cpus": 1.0, "memory": 300 * 2**20,
                                    "cpuset": cpu}}
    assert confiner.plan("k2", Limits()).prefix == ()
    with pytest.raises(LaunchRejected, match="asks for 999 CPUs"):
        confiner.plan("k3", Limits(cpus=999))


def test_the_wrapper_applies_the_limits(tmp_path: Path) -> None:
    code = ("import os, resource\nprint(resource.getrlimit(resource.RLIMIT_DATA)[0], "
            "sorted(os.sched_getaffinity(0)))\ntry:\n    b = bytearray(400 * 2**20)\n"
            "    print('allocated')\nexcept MemoryError:\n    print('MemoryError')\n")
    cg = tmp_path / "cg"
    cg.mkdir()
    cmd = [sys.executable, "-m", "poolgate.workers.resources", "--cgroup", str(cg), "--memory",
           str(200 * 2**20), "--cpus", "0", "--", sys.executable, "-c", code]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=60)
    assert done.stdout.split("\n")[:2] == [f"{200 * 2**20} [0]", "MemoryError"], done.stderr
    assert (cg / "cgroup.procs").read_text().isdigit()


# -- real kernels --------------------------------------------------------------------------


@pytest.fixture
def launcher(tmp_path: Path) -> Iterator[GPULauncher]:
    pool = PoolConfig(name="gpu", launcher="gpu",
                      options={"gpus": ["7", "9"], "max_gpus_per_kernel": 2})
    gl = GPULauncher(pool, build(GPUOptions, dict(pool.options), "o"), str(tmp_path / "run"))
    yield gl
    for kid in list(gl.gpus.holders()):
        gl.stop(KernelHandle(kid, "gpu"), grace=0)


def _request(kid: str, **resources: Any) -> LaunchRequest:
    argv = ("python", "-m", "ipykernel_launcher", "-f", "{connection_file}")
    return LaunchRequest(kernel_id=kid, pool="gpu", spec_name="gpu-py", argv=argv,
                         launch_timeout=60, resources=resources)


def _run(gl: GPULauncher, req: LaunchRequest, previous: KernelHandle | None = None) -> KernelHandle:
    handle = None
    for handle in gl.launch(req, previous):  # noqa: B007 - the last one handed out
        pass
    assert handle is not None and handle.connection is not None
    return handle


def _env(handle: KernelHandle) -> dict[str, str]:
    return psutil.Process(int(handle.data["pid"])).environ()


def test_kernels_get_their_own_gpus_and_a_third_waits(launcher: GPULauncher) -> None:
    a = _run(launcher, _request("a"))
    b = _run(launcher, _request("b"))
    try:
        assert {_env(a)["CUDA_VISIBLE_DEVICES"], _env(b)["CUDA_VISIBLE_DEVICES"]} == {"7", "9"}
        assert _env(a)["NVIDIA_VISIBLE_DEVICES"] == _env(a)["CUDA_VISIBLE_DEVICES"] == a.data["gpus"][0]
        waiting = launcher.launch(_request("c"))
        first = next(waiting)
        assert first.data == {"waiting_for_gpus": 1} and first.connection is None
        launcher.stop(a, grace=0)
        c = None
        for c in waiting:  # noqa: B007 - the last one handed out
            pass
        assert c is not None and c.data["gpus"] == a.data["gpus"]
        assert _env(c)["CUDA_VISIBLE_DEVICES"] == a.data["gpus"][0]
        launcher.stop(c, grace=0)
    finally:
        launcher.stop(b, grace=0)
    assert launcher.gpus.holders() == {} and launcher.gpus.waiting() == []


def test_restart_keeps_the_gpus_and_stop_frees_them(launcher: GPULauncher) -> None:
    pair = _run(launcher, _request("p", gpus=2))
    assert _env(pair)["CUDA_VISIBLE_DEVICES"] == "7,9"
    launcher.stop(pair, grace=0)
    one = _run(launcher, _request("one"))
    launcher.stop(one, grace=0)
    one = _run(launcher, _request("one", gpus=1), previous=KernelHandle("one", "gpu", data={"gpus": ["9"]}))
    assert one.data["gpus"] == ["9"]  # a restart keeps its GPU when it is free
    launcher.stop(one, grace=0)
    assert launcher.gpus.holders() == {}
    with pytest.raises(LaunchRejected, match="allows 2"):
        _run(launcher, _request("x", gpus=3))
    assert launcher.gpus.holders() == {}


def test_a_failed_launch_frees_its_gpus(launcher: GPULauncher) -> None:
    req = _request("bad")
    req = LaunchRequest(**{**req.__dict__, "argv": ("/no/such/kernel", "{connection_file}")})
    with pytest.raises(LaunchRejected, match="cannot run"):
        _run(launcher, req)
    assert launcher.gpus.holders() == {}


def test_cpus_and_memory_of_a_gpu_kernel_are_enforced(launcher: GPULauncher) -> None:
    handle = _run(launcher, _request("lim", memory=512 * 2**20, cpus=1))
    try:
        proc = psutil.Process(int(handle.data["pid"]))
        limits = handle.data["limits"]
        if limits["via"] == "rlimit":
            assert proc.rlimit(psutil.RLIMIT_DATA) == (512 * 2**20, 512 * 2**20)
            assert proc.cpu_affinity() == limits["cpuset"] and len(limits["cpuset"]) == 1
        else:
            assert Path(limits["cgroup"], "memory.max").read_text().strip() == str(512 * 2**20)
        assert _env(handle)["CUDA_VISIBLE_DEVICES"] in ("7", "9")
    finally:
        launcher.stop(handle, grace=0)
