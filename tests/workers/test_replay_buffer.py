"""The supervisor's replay buffer: bounded by message count and bytes, newest kept, handed
over as blobs a gateway decodes back into the same parts and buffers."""
from __future__ import annotations

import zmq

from poolgate.workers import jmsg
from poolgate.workers.supervisor import REPLAY_MAX_MESSAGE, SMALL_PART, ReplayBuffer, received

SIGNER = jmsg.Signer("secret")


def stream(text: str, buffers: list[bytes] | None = None) -> list[bytes]:
    parts = [jmsg.pack(jmsg.header("stream", "s")), b"{}", b"{}",
             jmsg.pack({"name": "stdout", "text": text})]
    return [b"kernel.iopub", *jmsg.frames(SIGNER, parts, buffers)]


def texts(buf: ReplayBuffer) -> list[str]:
    return [jmsg.decode_parts(b)[3].decode() for b in buf.blobs()]


def test_keeps_the_newest_messages_up_to_the_count() -> None:
    buf = ReplayBuffer(count=3, max_bytes=1e9)
    for i in range(5):
        buf.add(stream(str(i)))
    assert [t.split('"text":')[1] for t in texts(buf)] == ['"2"}', '"3"}', '"4"}']


def test_keeps_at_most_max_bytes() -> None:
    buf = ReplayBuffer(count=1000, max_bytes=10_000)
    for i in range(50):
        buf.add(stream(f"{i:04d}" + "x" * 996))
    assert buf.size <= 10_000 and buf.size == sum(sum(map(len, m)) for m in buf.messages)
    kept = texts(buf)
    assert 5 <= len(kept) < 10 and '"0049' in kept[-1]  # the newest survive


def test_too_large_messages_and_count_zero_keep_nothing() -> None:
    buf = ReplayBuffer(count=10, max_bytes=1e12)
    buf.add(stream("y" * (REPLAY_MAX_MESSAGE + 1)))
    assert not buf.messages
    off = ReplayBuffer(count=0, max_bytes=1e9)
    off.add(stream("z"))
    assert not off.messages and off.blobs() == []


def test_blobs_round_trip_parts_and_buffers() -> None:
    buf = ReplayBuffer(count=10, max_bytes=1e9)
    msg = stream("with buffers", [b"\x00\x01", b"\xff" * 10])
    buf.add(msg)
    parts = jmsg.decode_parts(buf.blobs()[0])
    assert parts == msg[3:]  # header, parent, metadata, content, then the buffers


def test_supervisor_reads_iopub_state_and_says_when_more_waits(monkeypatch) -> None:  # type: ignore[no-untyped-def]
    """The supervisor's read of its kernel's iopub: the last status wins, ipykernel's first
    "starting" counts as idle (the kernel runs; "starting" in the API means still launching),
    every message lands in the replay buffer, and a read that stopped at IOPUB_READ_MAX says
    more is waiting (the next read then comes at once, not a batch later)."""
    from types import SimpleNamespace

    import zmq

    from poolgate.workers import supervisor

    def status(state: str, parent: dict[str, str] | None = None) -> list[bytes]:
        parts = [jmsg.pack(jmsg.header("status", "s")), jmsg.pack(parent or {}), b"{}",
                 jmsg.pack({"execution_state": state})]
        return [b"kernel.status", *jmsg.frames(SIGNER, parts)]

    ctx = zmq.Context.instance()
    pub, sub = ctx.socket(zmq.PUB), ctx.socket(zmq.SUB)
    pub.bind("inproc://drain-test")
    sub.setsockopt(zmq.SUBSCRIBE, b"")
    sub.connect("inproc://drain-test")
    while True:  # the subscription is live once a probe gets through (PUB drops until then)
        pub.send(b"probe")
        if sub.poll(100):
            sub.recv()
            break
    sup = SimpleNamespace(replay_buf=ReplayBuffer(count=100, max_bytes=1e9), state="idle",
                          active_at=0.0, status_only=False, narrowed=False, busy_subshells=set(),
                          shell_probe=None)
    drain = supervisor.Supervisor._drain_iopub
    try:
        pub.send_multipart(status("starting"))
        assert sub.poll(5000)  # inproc: sent is delivered; the drain reads what is there
        assert drain(sup, sub) is False and sup.state == "idle" and sup.active_at > 0
        for state in ("busy", "idle", "busy"):
            pub.send_multipart(status(state))
        pub.send_multipart(stream("out"))
        assert sub.poll(5000)  # inproc: sent is delivered; the drain reads what is there
        assert drain(sup, sub) is False and sup.state == "busy"
        assert len(sup.replay_buf.messages) == 5
        monkeypatch.setattr(supervisor, "IOPUB_READ_MAX", 3)
        for _ in range(4):
            pub.send_multipart(stream("more"))
        assert sub.poll(5000)  # inproc: sent is delivered; the drain reads what is there
        assert drain(sup, sub) is True   # 3 read, one left
        assert drain(sup, sub) is False  # the last one
        assert len(sup.replay_buf.messages) == 9
        # The kernel is busy with a cell. What ipykernel answers beside it (on control) says
        # nothing of it, and is not activity (a tab's connection asks for kernel_info)...
        sup.active_at = 0.0
        for state in ("busy", "idle"):
            pub.send_multipart(status(state, {"msg_type": "kernel_info_request"}))
        assert sub.poll(5000)
        assert drain(sup, sub) is False and sup.state == "busy" and sup.active_at == 0.0
        # ...and a subshell's request is the subshell's: the kernel is busy while either runs.
        sub_cell = {"msg_type": "execute_request", "subshell_id": "s1"}
        pub.send_multipart(status("busy", sub_cell))
        pub.send_multipart(status("idle", {"msg_type": "execute_request"}))  # the main cell's
        assert sub.poll(5000)
        assert drain(sup, sub) is False and sup.state == "idle" and sup.busy_subshells == {"s1"}
        assert supervisor.Supervisor.shown_state.fget(sup) == "busy"  # type: ignore[attr-defined]
        pub.send_multipart(status("idle", sub_cell))
        assert sub.poll(5000)
        assert drain(sup, sub) is False and sup.busy_subshells == set()
        assert supervisor.Supervisor.shown_state.fget(sup) == "idle"  # type: ignore[attr-defined]
    finally:
        pub.close(linger=0)
        sub.close(linger=0)


def test_big_parts_kept_without_a_copy_are_handed_over_whole() -> None:
    """The supervisor keeps big parts as views of the messages libzmq received; they count
    their real size and come out of the buffer byte for byte."""
    ctx = zmq.Context()
    pub, sub = ctx.socket(zmq.PUB), ctx.socket(zmq.SUB)
    try:
        sub.setsockopt(zmq.SUBSCRIBE, b"")
        port = pub.bind_to_random_port("tcp://127.0.0.1")
        sub.connect(f"tcp://127.0.0.1:{port}")
        big, small = "é" * (SMALL_PART + 10), "small"
        buf = ReplayBuffer(count=10, max_bytes=1e9)
        sent = [stream(big, [b"\x00" * (SMALL_PART * 2)]), stream(small)]
        while not sub.poll(50):  # a PUB drops what it sends before the subscription lands
            pub.send_multipart(stream("hello"))
        sub.recv_multipart()
        for msg in sent:
            pub.send_multipart(msg)
        got = []
        while len(got) < 2:
            frames = sub.recv_multipart(copy=False)
            parts = received(frames)
            if b"hello" in bytes(parts[-1]):
                continue
            got.append(parts)
            buf.add(parts)
        assert any(isinstance(p, memoryview) for p in got[0])
        assert buf.size == sum(sum(map(len, m)) for m in sent)
        out = [jmsg.decode_parts(b) for b in buf.blobs()]
        assert out[0][3] == sent[0][6] and out[0][4] == b"\x00" * (SMALL_PART * 2)
        assert out[1][3] == jmsg.pack({"name": "stdout", "text": small})
    finally:
        pub.close(0)
        sub.close(0)
        ctx.term()
