"""The kernel launcher's reply: its format, the listener's refusals, and the real launcher."""
from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from cryptography.fernet import Fernet

from poolgate import kernel_launcher as kl
from poolgate.workers.errors import LaunchRejected, LaunchTimeout
from poolgate.workers.launchers.reply import Expectation, ReplyListener, send_command

ROOT = Path(__file__).resolve().parents[3]


@pytest.fixture
def listener() -> Iterator[ReplyListener]:
    rl = ReplyListener("127.0.0.1", max_bytes=4096, read_timeout=1.0).start()
    yield rl
    rl.close()


def good(exp: Expectation, **extra: object) -> dict[str, object]:
    return {"token": exp.token, "kernel_id": exp.kernel_id, "ok": True, "ip": "10.0.0.7",
            "key": "k" * 32, "pid": 7, "command_port": 6000,
            **{f"{c}_port": 5000 + i for i, c in enumerate(kl.CHANNELS)}, **extra}


def send(rl: ReplyListener, data: bytes) -> str:
    with socket.create_connection(("127.0.0.1", rl.port), timeout=5) as s:
        s.sendall(data)
        try:
            return s.recv(100).decode().strip()
        except ConnectionResetError:
            return "reset"


def test_reply_line_is_magic_id_and_a_fernet_token() -> None:
    key = Fernet.generate_key()
    line = kl.reply_line("abc", key, {"ok": True, "token": "t"})
    magic, launch, token = line.rstrip(b"\n").split(b" ")
    assert (magic, launch) == (b"poolgate-reply/1", b"abc") and line.endswith(b"\n")
    assert json.loads(Fernet(key).decrypt(token)) == {"ok": True, "token": "t"}
    assert b"token" not in line  # the payload travels encrypted


def test_accepts_one_reply_and_refuses_its_replay(listener: ReplyListener) -> None:
    exp = listener.expect("kid-1", "127.0.0.1")
    assert exp.env()["POOLGATE_RESPONSE_ADDRESS"] == f"127.0.0.1:{listener.port}"
    line = kl.reply_line(exp.launch_id, exp.key, good(exp))
    assert send(listener, line) == "ok"
    reply = listener.wait(exp, time.monotonic() + 5)
    assert (reply.connection.ip, reply.connection.shell_port, reply.pid) == ("10.0.0.7", 5000, 7)
    assert send(listener, line) == "refused"
    assert listener.refused["replay"] == 1


@pytest.mark.parametrize("case", ["wrong-token", "wrong-key", "wrong-kernel", "garbage",
                                  "oversize", "unknown", "not-json", "silent"])
def test_refusals(listener: ReplyListener, case: str) -> None:
    exp = listener.expect("kid-2", "127.0.0.1")
    lines = {
        "wrong-token": kl.reply_line(exp.launch_id, exp.key, good(exp, token="guess")),
        "wrong-key": kl.reply_line(exp.launch_id, Fernet.generate_key(), good(exp)),
        "wrong-kernel": kl.reply_line(exp.launch_id, exp.key, good(exp, kernel_id="other")),
        "garbage": b"GET / HTTP/1.0\r\n\r\n",
        "oversize": b"poolgate-reply/1 " + b"x" * 10_000 + b"\n",
        "unknown": kl.reply_line("nope", exp.key, good(exp)),
        "not-json": b" ".join((kl.MAGIC, exp.launch_id.encode(),
                               Fernet(exp.key).encrypt(b"[1, 2"))) + b"\n",
        "silent": b"poolgate-reply/1 ",  # never completes its line
    }
    assert send(listener, lines[case]) in ("refused", "reset")
    assert sum(listener.refused.values()) == 1
    assert not exp.done.is_set()  # the launch still waits for its real reply
    assert send(listener, kl.reply_line(exp.launch_id, exp.key, good(exp))) == "ok"
    listener.wait(exp, time.monotonic() + 5)


def test_late_reply_is_refused_and_a_silent_launch_times_out(listener: ReplyListener) -> None:
    exp = listener.expect("kid-3", "127.0.0.1")
    with pytest.raises(LaunchTimeout, match="no reply"):
        listener.wait(exp, time.monotonic() + 0.3)
    assert send(listener, kl.reply_line(exp.launch_id, exp.key, good(exp))) == "refused"
    assert listener.refused["late"] == 1


def test_an_expired_token_is_refused(listener: ReplyListener) -> None:
    exp = listener.expect("kid-4", "127.0.0.1")
    old = Fernet(exp.key).encrypt_at_time(json.dumps(good(exp)).encode(), int(time.time()) - 3600)
    assert send(listener, b" ".join((kl.MAGIC, exp.launch_id.encode(), old)) + b"\n") == "refused"


def test_error_reply_raises_with_the_kernel_output(listener: ReplyListener) -> None:
    exp = listener.expect("kid-5", "127.0.0.1")
    send(listener, kl.reply_line(exp.launch_id, exp.key, {
        "token": exp.token, "kernel_id": "kid-5", "ok": False,
        "error": "the kernel exited with status 3 while starting", "output": "boom\n"}))
    with pytest.raises(LaunchRejected, match="(?s)exited with status 3.*boom"):
        listener.wait(exp, time.monotonic() + 5)


def test_died_ends_the_wait(listener: ReplyListener) -> None:
    exp = listener.expect("kid-6", "127.0.0.1")
    with pytest.raises(LaunchRejected, match="container exited"):
        listener.wait(exp, time.monotonic() + 30, died=lambda: "container exited (137)")


def run_launcher(exp: Expectation, argv: list[str]) -> subprocess.Popen[bytes]:
    env = {**os.environ, **exp.env(), "PYTHONPATH": str(ROOT)}
    # no --ip: the address on the route to the listener (127.0.0.1), where the kernel binds
    return subprocess.Popen([sys.executable, "-m", "poolgate.kernel_launcher", "--", *argv],
                            env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT)


def test_real_launcher_starts_a_kernel_and_obeys_commands(listener: ReplyListener) -> None:
    exp = listener.expect("kid-real", "127.0.0.1")
    proc = run_launcher(exp, [sys.executable, "-m", "ipykernel_launcher", "-f",
                              "{connection_file}"])
    try:
        reply = listener.wait(exp, time.monotonic() + 60, died=lambda: (
            None if proc.poll() is None else f"launcher exited {proc.returncode}"))
        conn = reply.connection
        assert conn.ip == "127.0.0.1"
        socket.create_connection((conn.ip, conn.shell_port), timeout=2).close()
        # a forged command is refused; a sealed one is obeyed
        assert send_command("127.0.0.1", reply.command_port, "wrong-key", "kid-real",
                            signal.SIGTERM) == "refused"
        assert proc.poll() is None
        assert send_command("127.0.0.1", reply.command_port, conn.key, "kid-real",
                            signal.SIGTERM) == "ok"
        assert proc.wait(20) in (0, 128 + signal.SIGTERM, -signal.SIGTERM)
        out = proc.stdout.read().decode() if proc.stdout else ""
        assert "POOLGATE_RESPONSE_KEY" not in out and "exited with status" in out
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


# A kernel whose first start finds a port taken (as ipykernel says it), then starts for real;
# it keeps the connection file of each start.
CLASH_ONCE = """
import json, os, shutil, sys, time
cfile, tries = sys.argv[1], sys.argv[2]
n = len(os.listdir(tries))
shutil.copy(cfile, os.path.join(tries, str(n)))
if n == 0:
    sys.stderr.write("zmq.error.ZMQError: Address already in use (addr='tcp://127.0.0.1:1')\\n")
    sys.stderr.flush()
    time.sleep(60)
os.execv(sys.executable, [sys.executable, "-m", "ipykernel_launcher", "-f", cfile])
"""


def test_real_launcher_starts_again_on_fresh_ports_when_one_was_taken(
        listener: ReplyListener, tmp_path: Path) -> None:
    """A free port picked for the kernel can be taken by another process before the kernel
    binds it. The launcher then starts the kernel again on fresh ports (it picked them), and
    the worker gets the second start's ports, not an error."""
    exp = listener.expect("kid-clash", "127.0.0.1")
    tries = tmp_path / "tries"
    tries.mkdir()
    proc = run_launcher(exp, [sys.executable, "-c", CLASH_ONCE, "{connection_file}", str(tries)])
    try:
        reply = listener.wait(exp, time.monotonic() + 60, died=lambda: (
            None if proc.poll() is None else f"launcher exited {proc.returncode}"))
        assert sorted(os.listdir(tries)) == ["0", "1"]  # started twice
        second = json.loads((tries / "1").read_text())  # its connection file, ports picked anew
        ports = [f"{c}_port" for c in kl.CHANNELS]
        assert [reply.connection.to_dict()[p] for p in ports] == [second[p] for p in ports]
        socket.create_connection(("127.0.0.1", reply.connection.shell_port), timeout=2).close()
        assert send_command("127.0.0.1", reply.command_port, reply.connection.key, "kid-clash",
                            signal.SIGTERM) == "ok"
        assert proc.wait(20) in (0, 128 + signal.SIGTERM, -signal.SIGTERM)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_real_launcher_reports_a_kernel_that_dies(listener: ReplyListener) -> None:
    exp = listener.expect("kid-dead", "127.0.0.1")
    proc = run_launcher(exp, [sys.executable, "-c", "import sys; sys.stderr.write("
                              "'boom: no module frobnicate\\n'); sys.exit(3)"])
    with pytest.raises(LaunchRejected, match="(?s)status 3.*frobnicate"):
        listener.wait(exp, time.monotonic() + 30)
    assert proc.wait(10) == 3


def test_real_launcher_reports_a_missing_program(listener: ReplyListener) -> None:
    exp = listener.expect("kid-argv", "127.0.0.1")
    proc = run_launcher(exp, ["/no/such/kernel", "{connection_file}"])
    with pytest.raises(LaunchRejected, match="could not start '/no/such/kernel'"):
        listener.wait(exp, time.monotonic() + 30)
    assert proc.wait(10) == 3


def test_kernel_does_not_see_the_response_secrets(listener: ReplyListener,
                                                  tmp_path: Path) -> None:
    exp = listener.expect("kid-env", "127.0.0.1")
    out = tmp_path / "env.json"
    code = (f"import json, os, sys; json.dump(dict(os.environ), open({str(out)!r}, 'w')); "
            "sys.exit(5)")
    proc = run_launcher(exp, [sys.executable, "-c", code])
    with pytest.raises(LaunchRejected):
        listener.wait(exp, time.monotonic() + 30)
    proc.wait(10)
    seen = json.loads(out.read_text())
    assert seen["POOLGATE_KERNEL_ID"] == "kid-env"
    assert not {k for k in seen if k in kl.SECRET_ENV}


def test_a_flood_of_connections_is_refused_without_blocking_the_launch() -> None:
    rl = ReplyListener("127.0.0.1", read_timeout=2.0, max_open=2).start()
    idle = [socket.create_connection(("127.0.0.1", rl.port)) for _ in range(2)]
    try:
        time.sleep(0.2)
        exp = rl.expect("kid-flood", "127.0.0.1")
        assert send(rl, kl.reply_line(exp.launch_id, exp.key, good(exp))) in ("", "reset")
        assert rl.refused["busy"] >= 1
        for s in idle:
            s.close()
        time.sleep(0.3)
        assert send(rl, kl.reply_line(exp.launch_id, exp.key, good(exp))) == "ok"
    finally:
        rl.close()
