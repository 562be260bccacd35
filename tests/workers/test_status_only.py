"""Without a replay buffer the supervisor reads only its kernel's status messages: after the
first one it narrows its iopub subscription to that message's topic, so a real ipykernel stops
sending it every output message (a second copy of all output, which cost the kernel 12-20% of
its time per small message), while busy and idle still reach it."""
from __future__ import annotations

import json
import time
from types import SimpleNamespace
from typing import Any

import pytest
import zmq
from jupyter_client.manager import start_new_kernel

from poolgate.workers import jmsg
from poolgate.workers.config import PoolConfig
from poolgate.workers.supervisor import ReplayBuffer, Supervisor, reads_status_only


def fake_supervisor(status_only: bool, keep: int = 0) -> Any:
    sup = SimpleNamespace(replay_buf=ReplayBuffer(count=keep, max_bytes=1e9), state="idle",
                          active_at=0.0, status_only=status_only, narrowed=False,
                          busy_subshells=set(), shell_probe=None)
    sup._narrow = lambda sock, topic: Supervisor._narrow(sup, sock, topic)  # type: ignore
    return sup


def types_of(frames: list[list[bytes]]) -> list[str]:
    return [json.loads(jmsg.split(f)[0][0])["msg_type"] for f in frames]


def read_all(sock: zmq.Socket[bytes], quiet: float = 0.5) -> list[list[bytes]]:
    got = []
    while sock.poll(int(quiet * 1000)):
        got.append(sock.recv_multipart())
    return got


@pytest.mark.parametrize("status_only", [True, False])
def test_a_real_kernel_sends_the_supervisor_only_status_once_narrowed(status_only: bool) -> None:
    km, kc = start_new_kernel(kernel_name="python3")
    sub = zmq.Context.instance().socket(zmq.SUB)
    try:
        sub.setsockopt(zmq.SUBSCRIBE, b"")
        sub.connect(f"tcp://{km.ip}:{km.iopub_port}")
        sup = fake_supervisor(status_only)
        deadline = time.monotonic() + 30
        while True:  # kernel_info until iopub shows its status
            assert time.monotonic() < deadline
            kc.kernel_info()
            if sub.poll(200):
                Supervisor._drain_iopub(sup, sub)  # type: ignore[arg-type]
                break
        assert sup.state == "idle" and not sup.active_at  # a kernel_info's is not activity
        assert sup.narrowed is status_only
        time.sleep(0.5)  # the new subscription reaches the kernel's XPUB
        read_all(sub)
        kc.execute_interactive("import sys\nfor i in range(300):\n    print(i, flush=True)",
                               timeout=60, output_hook=lambda msg: None)
        frames = read_all(sub)
        kinds = types_of(frames)
        if status_only:
            assert "stream" not in kinds and "execute_input" not in kinds, kinds
            assert kinds.count("status") >= 2, kinds  # busy and idle still come
        else:
            assert kinds.count("stream") >= 1, kinds  # everything, for the replay buffer
        busy_idle = [json.loads(jmsg.split(f)[0][3]).get("execution_state")
                     for f in frames if types_of([f]) == ["status"]]
        assert busy_idle[0] == "busy" and busy_idle[-1] == "idle"
    finally:
        sub.close(linger=0)
        kc.stop_channels()
        km.shutdown_kernel(now=True)


def test_a_kernel_without_topics_keeps_sending_everything() -> None:
    """A status message whose first frame is the delimiter has no topic to narrow to: the
    supervisor keeps its subscription to everything (and does not try again)."""
    ctx = zmq.Context.instance()
    pub, sub = ctx.socket(zmq.PUB), ctx.socket(zmq.SUB)
    signer = jmsg.Signer("k")
    try:
        sub.setsockopt(zmq.SUBSCRIBE, b"")
        port = pub.bind_to_random_port("tcp://127.0.0.1")
        sub.connect(f"tcp://127.0.0.1:{port}")
        while not sub.poll(50):
            pub.send(b"probe")
        sub.recv()
        sup = fake_supervisor(True)

        def msg(msg_type: str, content: dict[str, Any]) -> list[bytes]:
            parts = [jmsg.pack(jmsg.header(msg_type, "s")), b"{}", b"{}", jmsg.pack(content)]
            return jmsg.frames(signer, parts)

        pub.send_multipart(msg("status", {"execution_state": "busy"}))
        assert sub.poll(5000)
        Supervisor._drain_iopub(sup, sub)  # type: ignore[arg-type]
        assert sup.narrowed and sup.state == "busy"
        time.sleep(0.2)
        pub.send_multipart(msg("stream", {"name": "stdout", "text": "still here"}))
        assert sub.poll(5000), "a kernel without topics must still reach the supervisor"
    finally:
        pub.close(0)
        sub.close(0)


def test_only_without_replay_buffer_and_busy_culling() -> None:
    """Narrowing needs both: the replay buffer keeps every message, and culling busy kernels
    counts output as activity (as Jupyter Server does)."""
    assert reads_status_only(PoolConfig(name="p", launcher="local", replay_buffer=0))
    assert not reads_status_only(PoolConfig(name="p", launcher="local"))  # the default keeps a replay buffer
    assert not reads_status_only(PoolConfig(name="p", launcher="local", replay_buffer=0, cull_busy=True))
