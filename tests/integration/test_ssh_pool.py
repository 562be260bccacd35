"""An ssh pool of two hosts (real sshd on 127.0.0.2 and 127.0.0.3), driven through the gateway.

The worker launches real ipykernel processes through a real paramiko launcher; the tests only
speak REST and WebSocket, and look at the machine to check where kernels run and that none is
left behind.
"""
from __future__ import annotations

import json
import socket
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import redis

from tests.client import Gateway
from tests.conftest import DB_BASE, REDIS, RUN_ID, STACKS, Stack, need_redis
from tests.sshd import SSHD, keygen, remote_kernels

ADDRESSES = {"a": "127.0.0.2", "b": "127.0.0.3"}
KERNEL_ARGV = ["python", "-m", "ipykernel_launcher", "-f", "{connection_file}"]
#: Debian's r-cran-irkernel kernelspec (/usr/share/jupyter/kernels/ir/kernel.json)
R_SPEC = Path("/usr/share/jupyter/kernels/ir/kernel.json")


class Hosts:
    """Two sshd "hosts", the user key the pool logs in with, and known_hosts for both."""

    def __init__(self, folder: Path) -> None:
        folder.mkdir(parents=True, exist_ok=True)
        self.key = keygen(folder / "id_ed25519")
        self.authorized = folder / "authorized_keys"
        self.authorized.write_text(self.key.with_suffix(".pub").read_text())
        self.sshd = {name: SSHD(folder / name, addr, self.authorized).start()
                     for name, addr in ADDRESSES.items()}
        self.known_hosts = folder / "known_hosts"
        self.known_hosts.write_text("".join(d.known_hosts_line for d in self.sshd.values()))
        self.remote_dir = str(folder / "remote")

    def pool(self, queue: str, placement: str) -> dict[str, Any]:
        return {"launcher": "ssh", "queue": queue, "heartbeat_ttl": 3.0, "launch_timeout": 60,
                "max_restarts": 2, "options": {
                    "hosts": [{"name": n, "address": d.address, "port": d.port, "max_kernels": 2}
                              for n, d in self.sshd.items()],
                    "key_file": str(self.key), "known_hosts": str(self.known_hosts),
                    "python": sys.executable, "port_range": "46000-46999",
                    "placement": placement, "remote_dir": self.remote_dir,
                    "connect_timeout": 3, "check_interval": 1, "down_for": 4}}

    def private_key_body(self) -> str:
        lines = self.key.read_text().splitlines()
        return "".join(lines[1:-1])

    def stop(self) -> None:
        for d in self.sshd.values():
            d.power_off(self.remote_dir)


@pytest.fixture(scope="module")
def hosts(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Hosts]:
    h = Hosts(tmp_path_factory.mktemp("ssh-hosts"))
    yield h
    h.stop()


@pytest.fixture(scope="module")
def ssh_stack(hosts: Hosts, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    """A gateway, an ssh-rr worker and an ssh-ll worker; kernelspecs of their own."""
    need_redis()
    tmp = tmp_path_factory.mktemp("ssh-stack")
    tag = f"t{RUN_ID}{DB_BASE + 3}"
    pools = {"local": {"launcher": "local", "queue": f"{tag}-local", "slots": 1},
             "ssh-rr": hosts.pool(f"{tag}-ssh-rr", "round-robin"),
             "ssh-ll": hosts.pool(f"{tag}-ssh-ll", "least-loaded")}
    stack = Stack(tmp, REDIS, db=DB_BASE + 3, pools=pools)
    specs = tmp / "specs"
    (specs / "tiny-py" / "kernel.json").unlink()  # routes to a pool this stack lacks
    (specs / "tiny-py").rmdir()
    env = {"POOLGATE_TEST_RUN": RUN_ID}  # the session's leak check finds these kernels too
    for name, pool, argv in (
            ("python3-ssh", "ssh-rr", KERNEL_ARGV),
            ("python3-ssh-ll", "ssh-ll", KERNEL_ARGV),
            ("ir-ssh", "ssh-rr", json.loads(R_SPEC.read_text())["argv"]
             if R_SPEC.is_file() else ["R"]),
            ("broken-ssh", "ssh-rr", ["python", "-c", "import sys; sys.stderr.write("
                                      "'boom: no module frobnicate\\n'); sys.exit(3)",
                                      "{connection_file}"])):
        (specs / name).mkdir()
        (specs / name / "kernel.json").write_text(json.dumps({
            "argv": argv, "display_name": name, "env": env,
            "language": "R" if name.startswith("ir") else "python",
            "metadata": {"poolgate": {"pool": pool}}}))
    redis.Redis.from_url(stack.registry_url).flushdb()
    stack.start_worker("ssh-rr")
    stack.start_worker("ssh-ll")
    stack.start_gateway(stack.port)
    STACKS.append(stack)
    yield stack
    stack.stop()
    STACKS.remove(stack)


@pytest.fixture(autouse=True)
def no_remote_kernel_left(hosts: Hosts) -> Iterator[None]:
    """After every test, no kernel process started through sshd may still run."""
    yield
    deadline = time.monotonic() + 10
    while remote_kernels(hosts.remote_dir) and time.monotonic() < deadline:
        time.sleep(0.2)
    left = remote_kernels(hosts.remote_dir)
    for p in left:
        p.kill()
    assert not left, f"remote kernel processes left: {[p.cmdline() for p in left]}"


def host_of(gw: Gateway, kid: str) -> str:
    return str(gw.get(f"/api/kernels/{kid}").json()["poolgate"]["host"])


def where(gw: Gateway, kid: str) -> tuple[str, int]:
    """The address of the sshd that started the kernel, and its pid, as the kernel says."""
    ch = gw.channel(kid)
    try:
        res = ch.execute("import os; print(os.environ['SSH_CONNECTION'].split()[2], os.getpid())")
        assert res.status == "ok", res
        addr, pid = res.stdout.split()
        return addr, int(pid)
    finally:
        ch.close()


def start_many(gw: Gateway, spec: str, n: int) -> list[str]:
    kids: list[str] = []
    try:
        for _ in range(n):
            kids.append(gw.start(spec)["id"])
    except BaseException:  # a failed start: the kernels started before it must not outlive it
        for kid in kids:
            gw.shutdown(kid)
        raise
    return kids


def test_round_robin_places_in_order_runs_code_and_queues_when_full(ssh_stack: Stack) -> None:
    gw = ssh_stack.gw
    kids = start_many(gw, "python3-ssh", 4)
    try:
        assert [host_of(gw, k) for k in kids] == ["a", "b", "a", "b"]
        for kid, name in zip(kids, ["a", "b", "a", "b"]):
            assert where(gw, kid)[0] == ADDRESSES[name]
        ch = gw.channel(kids[1])
        assert ch.execute("6*7").result == "42"
        ch.close()
        # Both hosts are full (2 kernels each): the next launch waits in the queue.
        r = gw.post("/api/kernels", json={"name": "python3-ssh",
                                          "env": {"KERNEL_LAUNCH_TIMEOUT": "3"}})
        assert r.status_code == 503, r.text
        assert "'ssh-rr'" in r.json()["message"] and "4 slots" in r.json()["message"]
    finally:
        for kid in kids:
            gw.shutdown(kid)
    remote = Path(ssh_stack.pools["ssh-rr"]["options"]["remote_dir"])
    assert not any(remote.glob("*/connection.json"))  # every remote connection file removed


def test_a_launch_no_host_takes_says_why_and_is_not_listed(ssh_stack: Stack) -> None:
    """A second worker takes the launch while both hosts are full: the client's error names
    the hosts and why (the worker gives up when the client does), and the launch is gone
    from the kernel list, not kept there as dead."""
    import os
    import re
    import signal

    gw = ssh_stack.gw
    kids = start_many(gw, "python3-ssh", 4)
    second = ssh_stack._spawn("worker-ssh-rr-second", [
        "worker", "--config", str(ssh_stack.config), "--pool", "ssh-rr", "--log-level", "info",
        "--name", f"ssh-rr-second-{ssh_stack.tag}@%h"])
    try:
        deadline = time.monotonic() + 30
        while gw.get("/api/pools/ssh-rr").json()["workers"] < 2:
            assert time.monotonic() < deadline and second.poll() is None, "no second worker"
            time.sleep(0.2)
        r = gw.post("/api/kernels", json={"name": "python3-ssh",
                                          "env": {"KERNEL_LAUNCH_TIMEOUT": "4"}})
        assert r.status_code == 503, r.text
        message = r.json()["message"]
        assert "no host of pool ssh-rr could take" in message, message
        assert "a: full (2 of 2 kernels)" in message and "b: full (2 of 2 kernels)" in message
        [kid] = re.findall(r"kernel ([0-9a-f-]{36})", message)[:1]
        assert kid not in kids and kid not in [k["id"] for k in gw.kernels()]
        assert gw.get(f"/api/kernels/{kid}").status_code == 404
    finally:
        os.killpg(second.pid, signal.SIGTERM)
        second.wait(30)
        for kid in kids:
            gw.shutdown(kid)


def test_interrupt_and_restart_in_place(ssh_stack: Stack) -> None:
    gw = ssh_stack.gw
    kid = gw.start("python3-ssh")["id"]
    try:
        host = host_of(gw, kid)
        addr, pid = where(gw, kid)
        ch = gw.channel(kid)
        mid = ch.start_cell()  # returns once the cell runs
        assert gw.post(f"/api/kernels/{kid}/interrupt").status_code == 204
        res = ch.collect(mid, timeout=20)
        assert res.error and res.error["ename"] == "KeyboardInterrupt"
        assert ch.execute("x = 5; x").result == "5"
        r = gw.post(f"/api/kernels/{kid}/restart")
        assert r.status_code == 200, r.text
        assert r.json()["poolgate"]["host"] == host
        res = ch.execute("'x' in dir()", timeout=30)
        assert res.result == "False"
        ch.close()
        new_addr, new_pid = where(gw, kid)
        assert new_addr == addr and new_pid != pid
        assert not [p for p in remote_kernels(kid) if p.pid == pid]
    finally:
        gw.shutdown(kid)


def shown(res: Any) -> str:
    """What a cell showed as text (IRkernel sends display_data, not execute_result)."""
    for m in res.messages:
        if m["msg_type"] in ("execute_result", "display_data"):
            return str(m["content"]["data"].get("text/plain", ""))
    return ""


def test_r_kernel_runs_interrupts_restarts_and_stops(ssh_stack: Stack, hosts: Hosts) -> None:
    """Debian's IRkernel spec, unchanged, on an ssh host: code, an interrupt of a long call,
    a restart in place (a new R process on the same host), and a shutdown that leaves no R
    process (the autouse check)."""
    if not R_SPEC.is_file():
        pytest.fail(f"no {R_SPEC}; .ci/run installs r-cran-irkernel")
    gw = ssh_stack.gw
    kid = gw.start("ir-ssh")["id"]
    try:
        host = host_of(gw, kid)
        ch = gw.channel(kid)
        res = ch.execute("cat(strsplit(Sys.getenv('SSH_CONNECTION'), ' ')[[1]][3], "
                         "Sys.getpid(), '\\n')", timeout=60)
        addr, pid = res.stdout.split()
        assert addr == ADDRESSES[host]
        assert shown(ch.execute("6 * 7")) == "[1] 42"
        mid = ch.send("execute_request", {"code": "Sys.sleep(60)", "silent": False})
        time.sleep(1.5)
        t0 = time.monotonic()
        assert gw.post(f"/api/kernels/{kid}/interrupt").status_code == 204
        ch.collect(mid, timeout=20)
        assert time.monotonic() - t0 < 20
        assert shown(ch.execute("x <- 5; x")) == "[1] 5"
        r = gw.post(f"/api/kernels/{kid}/restart")
        assert r.status_code == 200, r.text
        assert r.json()["poolgate"]["host"] == host
        assert shown(ch.execute("exists('x')", timeout=60)) == "[1] FALSE"
        new_pid = ch.execute("cat(Sys.getpid())").stdout.strip()
        assert new_pid != pid
        assert not [p for p in remote_kernels(hosts.remote_dir) if str(p.pid) == pid]
        ch.close()
    finally:
        gw.shutdown(kid)


def test_least_loaded_fills_the_emptiest_host(ssh_stack: Stack) -> None:
    gw = ssh_stack.gw
    k1, k2, k3 = start_many(gw, "python3-ssh-ll", 3)
    try:
        assert [host_of(gw, k) for k in (k1, k2, k3)] == ["a", "b", "a"]
        gw.shutdown(k1)
        gw.shutdown(k3)
        k4 = gw.start("python3-ssh-ll")["id"]  # a has none, b has one: round-robin says b
        assert host_of(gw, k4) == "a"
        assert where(gw, k4)[0] == ADDRESSES["a"]
        gw.shutdown(k4)
    finally:
        for kid in (k1, k2, k3):
            gw.shutdown(kid)


def test_launch_failure_names_the_kernel_output(ssh_stack: Stack) -> None:
    r = ssh_stack.gw.post("/api/kernels", json={"name": "broken-ssh"})
    assert r.status_code == 500, r.text
    assert "boom: no module frobnicate" in r.json()["message"]
    assert ssh_stack.live_kernels() == []


def test_a_port_taken_on_the_host_is_replaced(hosts: Hosts, tmp_path: Path,
                                             monkeypatch: pytest.MonkeyPatch) -> None:
    """Kernel ports are picked here for a host we cannot see into; when one is taken there, the
    kernel starts again on fresh ports. A kernel whose iopub port was taken does not exit
    (ipykernel 7 hangs closing the sockets it had bound), so its log is what tells."""
    from poolgate.workers import launchers
    from poolgate.workers.config import PoolConfig
    from poolgate.workers.launchers import ssh
    from poolgate.workers.protocol import LaunchRequest
    from poolgate.workers.registry import Registry

    squatters = []
    while not squatters:  # one port bound on both hosts' addresses
        first = socket.socket()
        first.bind((ADDRESSES["a"], 0))
        try:
            second = socket.socket()
            second.bind((ADDRESSES["b"], first.getsockname()[1]))
        except OSError:
            first.close()
            continue
        squatters = [first, second]
    for s in squatters:
        s.listen()
    taken = squatters[0].getsockname()[1]
    real, calls = ssh.pick_ports, []

    def iopub_taken_first(port_range: tuple[int, int], **kw: Any) -> list[int]:
        ports = real(port_range, **kw)
        if not calls:
            ports[1] = taken  # CHANNELS: shell, iopub, ...
        calls.append(ports)
        return ports

    monkeypatch.setattr(ssh, "pick_ports", iopub_taken_first)
    raw = hosts.pool("unused", "round-robin")
    pool = PoolConfig(name=f"ssh-clash-{RUN_ID}", launcher="ssh", queue="unused",
                      options=raw["options"])
    launcher = launchers.create(pool, str(tmp_path))
    launcher.attach(Registry(f"{REDIS}/{DB_BASE + 3}"))
    req = LaunchRequest(f"clash-{RUN_ID}", pool.name, "python3-ssh", tuple(KERNEL_ARGV),
                        launch_timeout=20)
    try:
        handle = list(launcher.launch(req))[-1]
        assert len(calls) == 2 and handle.connection is not None
        assert handle.connection.iopub_port == calls[1][1] != taken
        assert launcher.poll(handle) is None
        launcher.stop(handle, grace=0)
    finally:
        for s in squatters:
            s.close()


def test_private_key_never_reaches_registry_or_logs(ssh_stack: Stack, hosts: Hosts) -> None:
    gw = ssh_stack.gw
    kid = gw.start("python3-ssh", env={"KERNEL_USERNAME": "alice"})["id"]
    try:
        ch = gw.channel(kid)
        res = ch.execute("import getpass; print(getpass.getuser())")
        ch.close()
        assert res.stdout.strip() == hosts.sshd["a"].user  # no impersonation in this pool
    finally:
        gw.shutdown(kid)
    secret = hosts.private_key_body()
    r = redis.Redis.from_url(ssh_stack.registry_url)
    for key in r.scan_iter("*"):
        assert secret[:40] not in stored(r, key), key
    for log in ssh_stack.logs.iterdir():
        assert secret[:40] not in log.read_text(errors="replace"), log
    assert "does not select the remote user" in ssh_stack.log("worker-ssh-rr")


def stored(r: redis.Redis, key: bytes) -> str:
    """Everything a registry key holds, as text."""
    kind = r.type(key)
    if kind == b"string":
        return repr(r.get(key))
    if kind == b"hash":
        return repr(r.hgetall(key))
    if kind == b"set":
        return repr(r.smembers(key))
    if kind == b"list":
        return repr(r.lrange(key, 0, -1))
    return repr(r.zrange(key, 0, -1)) if kind == b"zset" else ""


def wait_dead(gw: Gateway, kid: str, timeout: float = 30) -> dict[str, Any]:
    return gw.wait_state(kid, "dead", timeout)


def test_stopped_sshd_moves_new_kernels_and_its_kernels_die(ssh_stack: Stack,
                                                            hosts: Hosts) -> None:
    gw = ssh_stack.gw
    ka, kb = start_many(gw, "python3-ssh", 2)
    kids = [ka, kb]
    try:
        placed = {host_of(gw, ka): ka, host_of(gw, kb): kb}
        assert set(placed) == {"a", "b"}
        hosts.sshd["a"].stop()  # the daemon only: its sessions and kernels go on
        model = wait_dead(gw, placed["a"])
        assert "host a (127.0.0.2:" in model["poolgate"]["reason"], model
        new = gw.start("python3-ssh")["id"]
        kids.append(new)
        assert host_of(gw, new) == "b" and where(gw, new)[0] == ADDRESSES["b"]
        assert where(gw, placed["b"])[0] == ADDRESSES["b"]  # the other host's kernel still runs
        assert not remote_kernels(placed["a"])  # killed through the session that survived
    finally:
        for kid in kids:
            gw.shutdown(kid)
        hosts.sshd["a"].start()
    time.sleep(4.5)  # down_for: the host is back in placement
    kid = gw.start("python3-ssh")["id"]
    gw.shutdown(kid)


def test_lost_host_is_skipped_and_its_kernels_are_reported_dead(ssh_stack: Stack,
                                                               hosts: Hosts) -> None:
    gw = ssh_stack.gw
    kids = start_many(gw, "python3-ssh", 2)
    try:
        on = {host_of(gw, k): k for k in kids}
        assert set(on) == {"a", "b"}
        t0 = time.monotonic()
        hosts.sshd["b"].power_off(hosts.remote_dir)
        model = wait_dead(gw, on["b"], timeout=20)
        assert time.monotonic() - t0 < 15
        assert "host b (127.0.0.3:" in model["poolgate"]["reason"], model
        news = start_many(gw, "python3-ssh", 1)
        kids += news
        assert host_of(gw, news[0]) == "a"
        ch = gw.channel(on["a"])
        assert ch.execute("1+1").result == "2"
        ch.close()
        # a is full now (2 of 2) and b is down: the launch fails at once (503: no host can
        # take it), naming both hosts.
        r = gw.post("/api/kernels", json={"name": "python3-ssh"})
        assert r.status_code == 503 and r.json()["reason"] == "backend_unavailable", r.text
        msg = r.json()["message"]
        assert "a: full (2 of 2 kernels)" in msg and ("b: down" in msg or "host b (" in msg), msg
    finally:
        for kid in kids:
            gw.shutdown(kid)
        hosts.sshd["b"].start()


def test_unknown_host_key_is_refused(ssh_stack: Stack, hosts: Hosts, tmp_path: Path) -> None:
    """A host whose key is not in known_hosts never gets a kernel (no silent auto-accept)."""
    from poolgate.workers.config import build
    from poolgate.workers.errors import BackendUnavailable
    from poolgate.workers.launchers.ssh import HostLink
    from poolgate.workers.launchers.ssh_builders import SSHOptions

    empty = tmp_path / "known_hosts"
    empty.write_text("")
    opts = build(SSHOptions, {**ssh_stack.pools["ssh-rr"]["options"],
                              "known_hosts": str(empty)}, "options")
    link = HostLink(opts.hosts[0], hosts.sshd["a"].user, opts, "ssh-rr")
    with pytest.raises(BackendUnavailable) as info:
        link.run("true")
    assert "is not in" in info.value.message and "known_hosts" in info.value.message
    a, b = hosts.sshd["a"], hosts.sshd["b"]
    empty.write_text(b.known_hosts_line.replace(f"[{b.address}]:{b.port}",
                                                f"[{a.address}]:{a.port}"))
    with pytest.raises(BackendUnavailable) as info:  # a's address now claims b's key
        HostLink(opts.hosts[0], a.user, opts, "ssh-rr").run("true")
    assert "host key does not match known_hosts" in info.value.message
    empty.write_text("")
    trusting = build(SSHOptions, {**ssh_stack.pools["ssh-rr"]["options"], "known_hosts": str(empty),
                                  "auto_add_host_keys": True}, "options")
    assert HostLink(trusting.hosts[0], hosts.sshd["a"].user, trusting, "ssh-rr").run(
        "echo ok").out == "ok\n"
