"""The gateway's ZMTP 3.0 peer (gateway/zmtp.py) against real libzmq sockets of the kinds a
kernel binds: ROUTER (shell, control, stdin) and XPUB or PUB (iopub), over TCP and IPC, with
ZMQ heartbeats on, and random messages (hypothesis) both ways."""
from __future__ import annotations

import select
import shutil
import socket
import tempfile
import threading
import time
from collections.abc import Callable, Iterator

import pytest
import zmq
import zmq.utils.monitor
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from poolgate.gateway import zmtp


def drive(peers: list[zmtp.Peer], until: Callable[[], bool], timeout: float = 10.0) -> None:
    """Poll the peers as the pump does until ``until()``."""
    end = time.monotonic() + timeout
    while not until():
        assert time.monotonic() < end, "timed out"
        poller, by_fd = select.poll(), {}
        for p in peers:
            if p.sock is not None:
                poller.register(p.fileno(), p.wanted())
                by_fd[p.fileno()] = p
        for fd, ev in poller.poll(20):
            by_fd[fd].handle(ev)
        for p in peers:
            p.tick(time.monotonic())


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture
def ctx() -> Iterator[zmq.Context[zmq.Socket[bytes]]]:
    c = zmq.Context()
    yield c
    c.destroy(linger=0)


def router(ctx: zmq.Context[zmq.Socket[bytes]], port: int) -> zmq.Socket[bytes]:
    s = ctx.socket(zmq.ROUTER)
    s.linger = 0
    s.setsockopt(zmq.ROUTER_HANDOVER, 1)
    s.bind(f"tcp://127.0.0.1:{port}")
    return s


def recv(sock: zmq.Socket[bytes], timeout: float = 5.0) -> list[bytes]:
    assert sock.poll(int(timeout * 1000)), "nothing came"
    return sock.recv_multipart()


def test_dealer_and_router_exchange_multipart_messages_of_every_size(ctx) -> None:
    port = free_port()
    r = router(ctx, port)
    peer = zmtp.Peer(f"tcp://127.0.0.1:{port}", b"DEALER", b"me-1", "shell")
    sizes = [0, 1, 255, 256, 65_536, 5_000_000, 40_000_000]
    frames = [bytes([i % 251]) * n for i, n in enumerate(sizes)]
    peer.send([b"<IDS|MSG>", *frames])  # before the handshake: queued, then sent
    drive([peer], lambda: peer.ready and not peer.wbuf)
    ident, *got = recv(r)
    assert ident == b"me-1" and got == [b"<IDS|MSG>", *frames]  # the identity routes replies
    r.send_multipart([b"me-1", b"reply", *frames])
    drive([peer], lambda: bool(peer.inbox))
    assert peer.inbox.popleft() == [b"reply", *frames] and not peer.inbox
    peer.close()


def test_messages_sent_before_the_kernel_listens_go_once_it_does(ctx) -> None:
    port = free_port()
    peer = zmtp.Peer(f"tcp://127.0.0.1:{port}", b"DEALER", b"early")
    for i in range(3):
        peer.send([b"msg", str(i).encode()])
    drive([peer], lambda: peer.retry_at is not None)  # refused: a retry is planned
    r = router(ctx, port)
    drive([peer], lambda: peer.ready and not peer.wbuf)
    assert [recv(r)[1:] for _ in range(3)] == [[b"msg", b"0"], [b"msg", b"1"], [b"msg", b"2"]]
    peer.close()


def test_sub_subscribes_and_reads_a_burst_in_order(ctx) -> None:
    """20,000 messages published as fast as libzmq takes them, many per read and cut at read
    boundaries, all arrive whole and in order (the publisher keeps them all: no high-water
    mark; what the gateway does against a kernel's is tests/integration: the flood test)."""
    port = free_port()
    pub = ctx.socket(zmq.XPUB)
    pub.linger = 0
    pub.sndhwm = 0
    pub.bind(f"tcp://127.0.0.1:{port}")
    sub = zmtp.Peer(f"tcp://127.0.0.1:{port}", b"SUB", name="iopub")
    drive([sub], lambda: sub.ready)
    assert recv(pub) == [b"\x01"]  # subscribed to everything
    n = 20_000

    def publish() -> None:
        for i in range(n):
            pub.send_multipart([b"topic", b"x" * 500, str(i).encode()])

    t = threading.Thread(target=publish)
    t.start()
    got: list[list[bytes]] = []

    def take() -> bool:
        while sub.inbox:
            got.append(sub.inbox.popleft())
        return len(got) >= n

    drive([sub], take, timeout=30)
    t.join()
    assert [int(m[2]) for m in got] == list(range(n)) and got[0][:2] == [b"topic", b"x" * 500]
    sub.close()


def test_a_restarted_kernel_is_reconnected_with_identity_and_subscription(ctx) -> None:
    """A kernel restarted at the same ports: both channels come back by themselves."""
    p1, p2 = free_port(), free_port()
    r = router(ctx, p1)
    pub = ctx.socket(zmq.XPUB)
    pub.linger = 0
    pub.bind(f"tcp://127.0.0.1:{p2}")
    dealer = zmtp.Peer(f"tcp://127.0.0.1:{p1}", b"DEALER", b"same")
    sub = zmtp.Peer(f"tcp://127.0.0.1:{p2}", b"SUB")
    drive([dealer, sub], lambda: dealer.ready and sub.ready)
    assert recv(pub) == [b"\x01"]
    r.close()
    pub.close()
    drive([dealer, sub], lambda: not dealer.ready and not sub.ready)
    r = router(ctx, p1)
    pub = ctx.socket(zmq.XPUB)
    pub.linger = 0
    pub.bind(f"tcp://127.0.0.1:{p2}")
    dealer.send([b"after"])
    drive([dealer, sub], lambda: dealer.ready and sub.ready and not dealer.wbuf)
    assert recv(r) == [b"same", b"after"] and recv(pub) == [b"\x01"]
    pub.send_multipart([b"out"])
    drive([sub], lambda: bool(sub.inbox))
    assert sub.inbox.popleft() == [b"out"] and dealer.connects == 2 and sub.connects == 2
    dealer.close()
    sub.close()


def test_a_peer_that_is_not_zmtp_or_the_wrong_kind_is_dropped_and_retried(ctx) -> None:
    http = socket.socket()
    http.bind(("127.0.0.1", 0))
    http.listen()
    peer = zmtp.Peer(f"tcp://127.0.0.1:{http.getsockname()[1]}", b"DEALER")
    conn, _ = http.accept()
    conn.sendall(b"HTTP/1.1 200 OK\r\n\r\n")
    drive([peer], lambda: peer.retry_at is not None)
    assert not peer.ready and peer.sock is None
    conn.close()
    drive([peer], lambda: peer.connects == 2)
    conn, _ = http.accept()  # the retry: a greeting, then a READY cut short in its properties
    body = b"\x05READY\x0bSocket-Type\x00\x00"
    conn.sendall(zmtp.greeting() + bytes((zmtp.COMMAND, len(body))) + body)
    drive([peer], lambda: peer.retry_at is not None)
    assert not peer.ready and peer.sock is None and peer.connects == 2
    conn.close()
    http.close()
    peer.close()

    port = free_port()
    pub = ctx.socket(zmq.PUB)  # a DEALER must not talk to a PUB
    pub.linger = 0
    pub.bind(f"tcp://127.0.0.1:{port}")
    peer = zmtp.Peer(f"tcp://127.0.0.1:{port}", b"DEALER")
    drive([peer], lambda: peer.retry_at is not None)
    assert not peer.ready
    peer.close()
    with pytest.raises(zmtp.ZmtpError):
        peer.send([b"x"])


def test_ipc_and_unknown_transports() -> None:
    assert zmtp.address("ipc:///tmp/k-1") == (socket.AF_UNIX, "/tmp/k-1")
    assert zmtp.address("tcp://[::1]:5555") == (socket.AF_INET6, ("::1", 5555))
    with pytest.raises(ValueError):
        zmtp.address("inproc://x")


# -- heartbeats and property tests against libzmq ------------------------------------------

FEW = settings(max_examples=25, deadline=None,
               suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])


@pytest.mark.parametrize("kind", [zmq.ROUTER, zmq.XPUB], ids=["ROUTER", "XPUB"])
def test_a_kernel_with_zmq_heartbeats_keeps_the_connection(ctx, kind: int) -> None:
    """libzmq sends PINGs every ZMQ_HEARTBEAT_IVL and drops a peer whose answer does not come
    within ZMQ_HEARTBEAT_TIMEOUT (it did, every 0.4 s here, before PINGs got PONGs)."""
    port = free_port()
    s = ctx.socket(kind)
    s.linger = 0
    s.setsockopt(zmq.HEARTBEAT_IVL, 100)
    s.setsockopt(zmq.HEARTBEAT_TIMEOUT, 300)
    s.bind(f"tcp://127.0.0.1:{port}")
    peer = zmtp.Peer(f"tcp://127.0.0.1:{port}", b"DEALER" if kind == zmq.ROUTER else b"SUB",
                     b"hb")
    monitor = s.get_monitor_socket(zmq.EVENT_DISCONNECTED | zmq.EVENT_ACCEPTED)
    drive([peer], lambda: peer.ready)
    end = time.monotonic() + 2.0  # five intervals plus timeouts
    drive([peer], lambda: time.monotonic() > end)
    events = []
    while monitor.poll(0):
        events.append(zmq.utils.monitor.recv_monitor_message(monitor)["event"])
    assert peer.ready and peer.connects == 1
    assert zmq.EVENT_DISCONNECTED not in events
    if kind == zmq.ROUTER:
        peer.send([b"still", b"here"])
        drive([peer], lambda: not peer.wbuf)
        assert recv(s) == [b"hb", b"still", b"here"]
    else:
        assert recv(s) == [b"\x01"]
        s.send_multipart([b"out"])
        drive([peer], lambda: bool(peer.inbox))
        assert peer.inbox.popleft() == [b"out"]
    s.disable_monitor()
    monitor.close()
    peer.close()


def bind(ctx: zmq.Context[zmq.Socket[bytes]], kind: int, transport: str,
         folder: str) -> tuple[zmq.Socket[bytes], str]:
    s = ctx.socket(kind)
    s.linger = 0
    s.sndhwm = s.rcvhwm = 0
    url = f"tcp://127.0.0.1:{free_port()}" if transport == "tcp" else f"ipc://{folder}/k"
    s.bind(url)
    return s, url


@pytest.fixture
def short_dir() -> Iterator[str]:
    """A folder for IPC sockets, with a path short enough for sun_path."""
    d = tempfile.mkdtemp(prefix="zmtp")
    yield d
    shutil.rmtree(d, ignore_errors=True)


frames_ = st.one_of(st.binary(max_size=300),
                    st.sampled_from([0, 255, 256, 65535, 65536, 1 << 20]).map(lambda n: b"f" * n))
messages_ = st.lists(st.lists(frames_, min_size=1, max_size=5), min_size=1, max_size=6)


@pytest.mark.parametrize("transport", ["tcp", "ipc"])
def test_random_messages_round_trip_with_a_router(ctx, short_dir: str, transport: str) -> None:
    r, url = bind(ctx, zmq.ROUTER, transport, short_dir)
    peer = zmtp.Peer(url, b"DEALER", b"dealer-1")
    drive([peer], lambda: peer.ready)

    @FEW
    @given(messages_, messages_)
    def check(out: list[list[bytes]], back: list[list[bytes]]) -> None:
        for m in out:
            peer.send(m)
        drive([peer], lambda: not peer.wbuf)
        assert [recv(r) for _ in out] == [[b"dealer-1", *m] for m in out]
        for m in back:
            r.send_multipart([b"dealer-1", *m])
        drive([peer], lambda: len(peer.inbox) >= len(back))
        assert [peer.inbox.popleft() for _ in back] == back and not peer.inbox

    check()
    assert peer.connects == 1
    peer.close()


@pytest.mark.parametrize("transport", ["tcp", "ipc"])
@pytest.mark.parametrize("kind", [zmq.XPUB, zmq.PUB], ids=["XPUB", "PUB"])
def test_random_messages_arrive_from_a_publisher(ctx, short_dir: str, transport: str,
                                                 kind: int) -> None:
    pub, url = bind(ctx, kind, transport, short_dir)
    sub = zmtp.Peer(url, b"SUB")
    drive([sub], lambda: sub.ready)
    if kind == zmq.XPUB:
        assert recv(pub) == [b"\x01"]
    else:  # a PUB says nothing when the subscription is in: publish until something arrives
        def probed() -> bool:
            pub.send(b"probe")
            return bool(sub.inbox)
        drive([sub], probed)
        time.sleep(0.05)  # the probes still on their way: read and drop them

        def drained() -> bool:
            sub.inbox.clear()
            return not select.select([sub.sock], [], [], 0.05)[0]
        drive([sub], drained)

    @FEW
    @given(messages_)
    def check(messages: list[list[bytes]]) -> None:
        for m in messages:
            pub.send_multipart(m)
        drive([sub], lambda: len(sub.inbox) >= len(messages))
        assert [sub.inbox.popleft() for _ in messages] == messages and not sub.inbox

    check()
    assert sub.connects == 1
    sub.close()


def test_a_kernel_breaking_the_caps_is_dropped_and_what_came_before_is_kept() -> None:
    """A peer (written by hand) that sends two messages, then announces a frame over the cap:
    the two are in the inbox, the connection is dropped from the header alone, and the next
    connection, to a well-behaved end, carries messages again."""
    srv = socket.socket()
    srv.bind(("127.0.0.1", 0))
    srv.listen()
    peer = zmtp.Peer(f"tcp://127.0.0.1:{srv.getsockname()[1]}", b"DEALER", b"me",
                     max_frame=1 << 20, max_message=1 << 20)
    ready = zmtp.greeting() + zmtp.command(b"READY", {b"Socket-Type": b"ROUTER"})
    conn, _ = srv.accept()
    conn.sendall(ready + b"".join(zmtp.encode([b"one"]) + zmtp.encode([b"two", b"2"]))
                 + bytes((0x02,)) + ((1 << 20) + 1).to_bytes(8, "big"))
    drive([peer], lambda: peer.retry_at is not None)
    assert list(peer.inbox) == [[b"one"], [b"two", b"2"]] and not peer.ready
    conn.close()
    drive([peer], lambda: peer.connects == 2)
    conn, _ = srv.accept()
    conn.sendall(ready + b"".join(zmtp.encode([b"x" * (1 << 20)])))
    drive([peer], lambda: len(peer.inbox) == 3)
    assert peer.inbox[2] == [b"x" * (1 << 20)] and peer.ready and peer.connects == 2
    conn.close()
    srv.close()
    peer.close()
