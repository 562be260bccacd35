"""The yarn launcher against tests/yarn_rm.py's ResourceManager: real kernels, no gateway."""
from __future__ import annotations

import dataclasses
import signal
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psutil
import pytest

from poolgate.workers.config import PoolConfig, build
from poolgate.workers.errors import BackendUnavailable, ConfigError, LaunchRejected, LaunchTimeout
from poolgate.workers.launchers.yarn import YarnLauncher
from poolgate.workers.launchers.yarn_builders import YarnOptions
from poolgate.workers.launchers.yarn_client import RMClient, rm_errors
from poolgate.workers.protocol import KernelHandle, LaunchRequest
from tests.conftest import RUN_ID
from tests.yarn_rm import FakeResourceManager

ARGV = ("python", "-m", "ipykernel_launcher", "-f", "{connection_file}")
ROOT = str(Path(__file__).resolve().parents[3])


@pytest.fixture
def rm(tmp_path: Path) -> Iterator[FakeResourceManager]:
    server = FakeResourceManager(tmp_path / "rm", queues={"default": 4, "full": 0}).start()
    yield server
    server.close()


def launcher(rm_url: str, tmp_path: Path, **kw: Any) -> YarnLauncher:
    opts = {"rm_address": rm_url, "response_address": "127.0.0.1", "response_bind": "127.0.0.1",
            "python": sys.executable, "kernel_launcher": f"{sys.executable} -m "
            "poolgate.kernel_launcher", "env": {"PYTHONPATH": ROOT, "POOLGATE_TEST_RUN": RUN_ID},
            "poll_interval": 0.2, **kw}
    pool = PoolConfig(name="yarn", launcher="yarn", options=opts)
    return YarnLauncher(pool, build(YarnOptions, opts, "pools.yarn.options"), str(tmp_path))


def request(argv: tuple[str, ...] = ARGV, timeout: float = 30.0) -> LaunchRequest:
    return LaunchRequest(kernel_id=str(uuid.uuid4()), pool="yarn", spec_name="py", argv=argv,
                         env={"KERNEL_USERNAME": "alice"}, user="alice", launch_timeout=timeout)


def run(yl: YarnLauncher, req: LaunchRequest) -> tuple[KernelHandle, list[KernelHandle]]:
    seen: list[KernelHandle] = []
    try:
        for h in yl.launch(req):
            seen.append(h)
    except BaseException:
        if seen:
            yl.stop(seen[-1], grace=2)
        raise
    return seen[-1], seen


def test_launch_signal_stop(rm: FakeResourceManager, tmp_path: Path) -> None:
    yl = launcher(rm.url, tmp_path)
    try:
        handle, seen = run(yl, request())
        app = rm.apps[handle.data["app_id"]]
        assert seen[0].data["app_id"] == app.id and handle.connection is not None
        assert app.history[:5] == ["NEW", "NEW_SAVING", "SUBMITTED", "ACCEPTED", "RUNNING"]
        assert app.tags == ["poolgate", f"poolgate.kernel_id:{handle.kernel_id}",
                            "poolgate.pool:yarn"]
        assert app.user == "dr.who" and app.app_type == "POOLGATE"
        assert app.env["KERNEL_USERNAME"] == "alice"
        assert yl.poll(handle) is None
        kernel = psutil.Process(handle.data["pid"])
        yl.send_signal(handle, signal.SIGINT)  # ipykernel survives an interrupt
        time.sleep(0.5)
        assert kernel.is_running() and yl.poll(handle) is None
        yl.stop(handle, grace=5)
        assert app.state == "KILLED" and app.final_status == "KILLED"
        assert not kernel.is_running() or kernel.status() == psutil.STATUS_ZOMBIE
        assert rm.live() == []
        yl.stop(handle)  # idempotent
    finally:
        yl.close()


def test_queue_without_room_is_killed_at_the_timeout_with_diagnostics(
        rm: FakeResourceManager, tmp_path: Path) -> None:
    yl = launcher(rm.url, tmp_path, queue="full")
    try:
        t0 = time.monotonic()
        with pytest.raises(LaunchTimeout) as info:
            run(yl, request(timeout=3))
        assert time.monotonic() - t0 < 8
        assert "which was ACCEPTED: [" in info.value.message
        assert "Queue's AM resource limit exceeded" in info.value.message
        assert [a.state for a in rm.apps.values()] == ["KILLED"]
    finally:
        yl.close()


def test_an_am_that_dies_fails_with_its_final_status(rm: FakeResourceManager,
                                                     tmp_path: Path) -> None:
    yl = launcher(rm.url, tmp_path)
    try:  # the "kernel" kills its kernel launcher: nobody replies, the container exits 137
        with pytest.raises(LaunchRejected) as info:
            run(yl, request(argv=("bash", "-c", "kill -9 $PPID; sleep 30")))
        msg = info.value.message
        assert "ended FAILED (final status FAILED)" in msg and "exitCode: 137" in msg
        with pytest.raises(LaunchRejected, match="the kernel launcher reports"):
            run(yl, request(argv=("bash", "-c", "echo no such module >&2; exit 3")))
        # Registered before the kernel started, its AM unregistered FAILED with the reason.
        last = max(rm.apps.values(), key=lambda a: a.id)
        assert rm.am is not None
        fin = rm.am.wait_for(lambda e: e.get("attempt") == last.attempt
                             and e["event"] == "finish")
        assert fin["final_status"] == "FAILED"
        assert "exited with status 3 while starting" in fin["diagnostics"]
        assert "no such module" in fin["diagnostics"]
        with pytest.raises(LaunchRejected, match="unknown queue: nope"):
            yl2 = launcher(rm.url, tmp_path, queue="nope")
            try:
                run(yl2, request())
            finally:
                yl2.close()
        assert rm.live() == []
    finally:
        yl.close()


def test_standby_and_unreachable_rms_fail_over(rm: FakeResourceManager, tmp_path: Path) -> None:
    standby = FakeResourceManager(tmp_path / "rm2", active=rm).start()
    dead = FakeResourceManager(tmp_path / "rm3")  # never started: its port refuses
    dead.server.server_close()
    try:
        for first in (standby.url, dead.url):
            yl = launcher(first, tmp_path, alternate_rm_address=rm.url)
            try:
                handle, _ = run(yl, request())
                assert handle.data["app_id"] in rm.apps and yl.rm.addresses[0] == rm.url
                yl.stop(handle)
            finally:
                yl.close()
        assert standby.requests and all(m != "GET" or "apps" in p for m, p in standby.requests)
        assert not standby.apps and rm.live() == []
        yl = launcher(dead.url, tmp_path, alternate_rm_address=standby.url)
        with pytest.raises(BackendUnavailable, match="no active ResourceManager: .*ConnectionError"
                                                      ".*standby \\(redirects to http"):
            run(yl, request())
        yl.close()
    finally:
        standby.close()


def test_rm_errors_map_remote_exceptions(rm: FakeResourceManager) -> None:
    client = RMClient(build(YarnOptions, {"rm_address": rm.url}, "o"))
    app_id = client.new_application({})["application-id"]
    with pytest.raises(LaunchRejected, match="the ResourceManager refused \\(BadRequestException:"
                                             " .*bad submission"):
        with rm_errors("kernel x"):
            client.submit({"nope": 1}, {})
    client.submit({"application-id": app_id, "am-container-spec": {"commands": {
        "command": "sleep 30"}}, "resource": {"memory": 1, "vCores": 1}}, {})
    with pytest.raises(LaunchRejected, match="BadRequestException: Only 'KILLED' is allowed"):
        with rm_errors("kernel x"):
            client.call("PUT", f"/ws/v1/cluster/apps/{app_id}/state", {}, {"state": "RUNNING"})
    with pytest.raises(LaunchRejected, match="is already present! Cannot add a duplicate!"):
        with rm_errors("kernel x"):
            client.submit({"application-id": app_id, "am-container-spec": {"commands": {
                "command": "true"}}, "resource": {"memory": 1, "vCores": 1}}, {})
    assert client.app("application_1_0001", {}) is None  # a 404 NotFoundException
    assert client.kill("application_1_0001", {}) == ""
    deadline = time.monotonic() + 10
    while client.kill(app_id, {}) != "KILLED" and time.monotonic() < deadline:
        time.sleep(0.1)
    # `sleep` never registers as the AM: launched, and still ACCEPTED, as a real RM has it
    assert rm.apps[app_id].history[-2:] == ["ACCEPTED", "KILLED"]
    client.close()


def test_kerberos_without_its_library_names_the_extra(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "requests_gssapi", None)
    monkeypatch.setitem(sys.modules, "requests_kerberos", None)
    with pytest.raises(ConfigError, match="pip install 'poolgate\\[yarn-kerberos\\]'"):
        RMClient(build(YarnOptions, {"rm_address": "http://rm:8088", "auth": "kerberos"}, "o"))


def test_kerberos_uses_spnego(monkeypatch: pytest.MonkeyPatch) -> None:
    import types

    fake = types.ModuleType("requests_gssapi")

    class HTTPSPNEGOAuth:
        def __init__(self, mutual_authentication: int) -> None:
            self.mutual = mutual_authentication

    fake.HTTPSPNEGOAuth, fake.OPTIONAL = HTTPSPNEGOAuth, 2  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "requests_gssapi", fake)
    client = RMClient(build(YarnOptions, {"rm_address": "http://rm:8088", "auth": "kerberos",
                                          "impersonation": True}, "o"))
    assert isinstance(client.session.auth, HTTPSPNEGOAuth) and client.session.auth.mutual == 2


def test_redelivered_launch_kills_what_the_first_left(rm: FakeResourceManager,
                                                      tmp_path: Path) -> None:
    """A second launch of one kernel id (a redelivered task, another worker) finds the first's
    application by its tag and kills it, so one kernel never has two applications."""
    yl = launcher(rm.url, tmp_path)
    other = launcher(rm.url, tmp_path)  # a worker that knows nothing of the first launch
    try:
        req = request()
        first, _ = run(yl, req)
        second, _ = run(other, req)
        apps = {a.id: a for a in rm.apps.values()}
        deadline = time.monotonic() + 5  # the kill is asked for, not waited on, at launch
        while apps[first.data["app_id"]].state != "KILLED" and time.monotonic() < deadline:
            time.sleep(0.1)
        assert apps[first.data["app_id"]].state == "KILLED"
        assert apps[second.data["app_id"]].state == "RUNNING"
        other.stop(KernelHandle(req.kernel_id, "yarn"))  # no app id: found by the tag
        assert rm.live() == []
    finally:
        yl.close()
        other.close()


def test_spark_submit_mode_submits_through_spark_submit_and_finds_the_app_by_tag(
        rm: FakeResourceManager, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """``submit: spark-submit``: the worker runs spark-submit (tests/fake_spark_submit.py stands
    in for Spark's client, which needs Hadoop RPC), finds the application by the kernel's tag,
    gets the kernel launcher's reply from the driver container, and kills it on stop."""
    from poolgate.workers.errors import BadRequest

    monkeypatch.setenv("FAKE_RM_URL", rm.url)
    fake = f"{sys.executable} {ROOT}/tests/fake_spark_submit.py"
    yl = launcher(rm.url, tmp_path, submit="spark-submit", spark_submit=fake)
    kid = str(uuid.uuid4())
    req = LaunchRequest(kernel_id=kid, pool="yarn", spec_name="spark", argv=ARGV, user="alice",
                        env={"KERNEL_USERNAME": "alice", "KERNEL_EXTRA_SPARK_OPTS":
                             "--executor-memory 2g --num-executors 3"}, launch_timeout=30)
    try:
        handle, seen = run(yl, req)
        app = rm.apps[handle.data["app_id"]]
        assert seen[0].data["app_id"] == app.id and handle.connection is not None
        assert app.app_type == "SPARK" and app.name == f"poolgate-{kid}"
        assert app.tags == ["poolgate", f"poolgate.kernel_id:{kid}", "poolgate.pool:yarn"]
        assert app.env["KERNEL_ID"] == kid and app.env["POOLGATE_RESPONSE_KEY"]
        assert yl.poll(handle) is None
        yl.stop(handle, grace=5)
        assert app.state == "KILLED" and rm.live() == []
        bad = dataclasses.replace(req, kernel_id=str(uuid.uuid4()),
                                  env={"KERNEL_EXTRA_SPARK_OPTS": "--queue prod"})
        with pytest.raises(BadRequest, match="--queue is not an option a client may set"):
            run(yl, bad)
    finally:
        yl.close()
    broken = launcher(rm.url, tmp_path, submit="spark-submit", spark_submit=(
        "bash -c 'echo Exception in thread main: no HADOOP_CONF_DIR >&2; exit 1' --"))
    try:
        with pytest.raises(LaunchRejected, match="(?s)status 1:.*no HADOOP_CONF_DIR"):
            run(broken, dataclasses.replace(req, kernel_id=str(uuid.uuid4())))
    finally:
        broken.close()
    assert len(rm.apps) == 1


# -- the kernel launcher as the application's ApplicationMaster (real Hadoop RPC) ------------

#: A kernel that listens on its five ports until ``flag`` appears, then exits with its content.
FLAG_KERNEL = (
    "python", "-c", "import json, os, socket, sys, time\n"
    "c = json.load(open(sys.argv[1]))\n"
    "held = [socket.create_server((c['ip'], c[n + '_port'])) for n in "
    "('shell', 'iopub', 'stdin', 'control', 'hb')]\n"
    "while not os.path.exists(sys.argv[2]):\n    time.sleep(0.05)\n"
    "sys.exit(int(open(sys.argv[2]).read()))", "{connection_file}")


def am_launcher(rm: FakeResourceManager, tmp_path: Path, heartbeat: float = 0.2) -> YarnLauncher:
    return launcher(rm.url, tmp_path, env={"PYTHONPATH": ROOT, "POOLGATE_TEST_RUN": RUN_ID,
                                           "POOLGATE_AM_HEARTBEAT": str(heartbeat)})


def wait_until(check: Any, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, "condition not met in time"
        time.sleep(0.05)


def death_of(yl: YarnLauncher, handle: KernelHandle) -> str:
    """What the launcher's poll says once it sees the kernel gone (it caches a poll briefly)."""
    said: list[str | None] = [None]

    def dead() -> bool:
        said[0] = yl.poll(handle)
        return said[0] is not None

    wait_until(dead)
    return str(said[0])


def test_the_kernel_launcher_is_the_applications_am(rm: FakeResourceManager,
                                                    tmp_path: Path) -> None:
    """ACCEPTED until the kernel launcher registers over Hadoop RPC, RUNNING while it
    heartbeats, then FINISHED with the final status it unregisters with: SUCCEEDED for a
    kernel that exits 0, FAILED with the exit status and output for one that does not."""
    assert rm.am is not None
    yl = am_launcher(rm, tmp_path)
    try:
        for code, final in (("0", "SUCCEEDED"), ("3", "FAILED")):
            flag = tmp_path / f"exit-{code}"
            handle, _ = run(yl, request(argv=(*FLAG_KERNEL, str(flag))))
            app = rm.apps[handle.data["app_id"]]
            assert app.history[3:5] == ["ACCEPTED", "RUNNING"]
            assert app.env["POOLGATE_YARN_AM"] == "1"
            reg = rm.am.of(app.attempt, "register")
            assert [(e["host"], e["rpc_port"]) for e in reg] == [(handle.connection.ip, "-1")]
            wait_until(lambda: len(rm.am.of(app.attempt, "allocate")) >= 3)  # heartbeats
            assert app.state == "RUNNING" and yl.poll(handle) is None
            flag.write_text(code)
            wait_until(lambda: app.state in ("FINISHED", "FAILED", "KILLED"))
            assert (app.state, app.final_status) == ("FINISHED", final)
            why = death_of(yl, handle)
            assert f"ended FINISHED (final status {final})" in why
            assert f"kernel {handle.kernel_id} exited with status {code}" in why
            finish = rm.am.of(app.attempt, "finish")
            assert [e["final_status"] for e in finish] == [final]
            yl.stop(handle, grace=2)  # a FINISHED application: nothing left to kill
            assert app.history[-1] == "FINISHED"
        wait_until(lambda: rm.live() == [])  # the AM containers exit after unregistering
    finally:
        yl.close()


def test_a_refused_registration_fails_the_launch_with_the_reason(rm: FakeResourceManager,
                                                                  tmp_path: Path) -> None:
    """A token the RM does not accept fails the launch at once with Hadoop's reason, rather
    than leaving a kernel that the RM kills when the attempt expires."""
    assert rm.am is not None
    rm.forge_tokens = True
    yl = am_launcher(rm, tmp_path)
    try:
        t0 = time.monotonic()
        with pytest.raises(LaunchRejected) as info:
            run(yl, request())
        assert time.monotonic() - t0 < 20
        msg = info.value.message
        assert "registering as the YARN ApplicationMaster failed" in msg, msg
        assert "SaslException" in msg and "DIGEST-MD5" in msg, msg
        (app,) = rm.apps.values()
        assert rm.am.of(app.attempt, "register") == []
        wait_until(lambda: app.state in ("FAILED", "KILLED"))  # its AM exited, or the stop
        assert "ACCEPTED" in app.history and "RUNNING" not in app.history
        assert rm.live() == []
    finally:
        yl.close()


def test_an_am_that_stops_heartbeating_expires(tmp_path: Path) -> None:
    """The RM's liveness monitor: heartbeats keep an attempt alive past the expiry interval;
    an AM that stops them (here SIGSTOP) is expired, its application FAILED with the RM's
    diagnostics, its container killed, and the launcher's poll reports the kernel dead."""
    rm = FakeResourceManager(tmp_path / "rm", am_expiry=2.0).start()
    yl = am_launcher(rm, tmp_path, heartbeat=0.2)
    kernel_pid = 0
    try:
        handle, _ = run(yl, request())
        kernel_pid = int(handle.data["pid"])
        app = rm.apps[handle.data["app_id"]]
        assert rm.am is not None and app.proc is not None
        registered = rm.am.of(app.attempt, "register")[0]["t"]
        wait_until(lambda: any(e["t"] > registered + 3.0
                               for e in rm.am.of(app.attempt, "allocate")))
        assert app.state == "RUNNING"  # well past the 2 s expiry: the heartbeats count
        am = [p for p in psutil.Process(app.proc.pid).children(recursive=True)
              if "poolgate.kernel_launcher" in " ".join(p.cmdline())]
        assert len(am) == 1
        am[0].suspend()
        wait_until(lambda: app.state == "FAILED", timeout=20)
        assert "ApplicationMaster for attempt" in app.diagnostics
        assert "timed out" in app.diagnostics
        wait_until(lambda: not am[0].is_running() or am[0].status() == psutil.STATUS_ZOMBIE)
        why = death_of(yl, handle)
        assert "ended FAILED" in why and "timed out" in why
    finally:
        if kernel_pid:  # the kernel runs in a session of its own: the NodeManager's kill of
            try:        # its stopped launcher leaves it (docs/yarn.md, known gaps)
                psutil.Process(kernel_pid).kill()
            except psutil.NoSuchProcess:
                pass
        yl.close()
        rm.close()


def test_am_shutdown_from_the_rm_ends_the_kernel(rm: FakeResourceManager,
                                                 tmp_path: Path) -> None:
    assert rm.am is not None
    yl = am_launcher(rm, tmp_path)
    try:
        handle, _ = run(yl, request())
        app = rm.apps[handle.data["app_id"]]
        kernel = psutil.Process(handle.data["pid"])
        rm.am.order(app.attempt, "SHUTDOWN")
        wait_until(lambda: not kernel.is_running() or kernel.status() == psutil.STATUS_ZOMBIE)
        wait_until(lambda: app.state == "FAILED")  # it ended without unregistering
        assert rm.am.of(app.attempt, "finish") == []
        assert "ended FAILED" in death_of(yl, handle)
        yl.stop(handle, grace=2)
        assert rm.live() == []
    finally:
        yl.close()
