"""A client WebSocket's output (Connection): the pump never blocks on a client that reads
slowly, what waits goes out whole and in order, and counts as delivered only once written."""
from __future__ import annotations

import socket
import threading
from collections.abc import Iterator
from typing import Any

import pytest
from wsproto import WSConnection
from wsproto.events import BytesMessage, Message, Ping, Pong, TextMessage

from poolgate.gateway import wire
from poolgate.gateway.channels.connection import Connection
from tests.gateway.fakes import FakeWs, client_pair


@pytest.fixture
def pair() -> Iterator[tuple[Connection, socket.socket, WSConnection]]:
    client, server = client_pair()
    a, b = socket.socketpair()
    for s in (a, b):  # small buffers: a few hundred KB fill them
        s.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 65536)
        s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 65536)
    yield Connection(FakeWs(a, server)), b, client
    a.close()
    b.close()


def read_all(conn: Connection, b: socket.socket, client: WSConnection) -> list[Any]:
    """Read as the client would, flushing the gateway's side as the pump would on POLLOUT."""
    events: list[Any] = []
    b.settimeout(0.2)
    while True:
        conn.flush()
        try:
            data = b.recv(1 << 20)
        except TimeoutError:
            if not conn.pending:
                return events
            continue
        client.receive_data(data)
        events += [e for e in client.events()]


def test_a_client_that_reads_nothing_does_not_block_the_pump(pair: Any) -> None:
    conn, b, client = pair
    done: list[int] = []
    frames = [wire.Frame((('{"n": %d, "x": "%s"}' % (i, "y" * 100_000)).encode(),), text=True)
              for i in range(40)]
    for i, frame in enumerate(frames):  # 4 MB, far beyond the socket's buffers: returns at once
        conn.send_many([frame], lambda i=i: done.append(i))
    assert conn.pending and len(done) < 40  # waiting, so not counted as delivered
    events = read_all(conn, b, client)
    texts = "".join(e.data for e in events if isinstance(e, TextMessage))
    assert texts == "".join(bytes(f).decode() for f in frames)  # whole, in order
    assert done == list(range(40)) and not conn.pending


def test_a_pong_waits_behind_a_half_written_frame(pair: Any) -> None:
    """simple-websocket's own writes (pongs, the close) go behind pending bytes, not into
    the middle of a frame."""
    conn, b, client = pair
    conn.send_many([wire.Frame((b"\x01" * 1_000_000,), text=False)])  # most of it waits
    assert conn.pending
    b.sendall(client.send(Ping(b"hi")))
    assert conn.read() == []
    events = read_all(conn, b, client)
    assert [type(e) for e in events if not isinstance(e, BytesMessage)] == [Pong]
    assert isinstance(events[-1], Pong)
    assert b"".join(e.data for e in events if isinstance(e, BytesMessage)) == b"\x01" * 1_000_000


def test_a_blocking_send_waits_for_a_reader(pair: Any) -> None:
    """A parked connection's frames are sent by another session's pump: it waits for them."""
    conn, b, client = pair
    got = bytearray()

    def reader() -> None:
        while len(got) < 2_000_000:
            got.extend(b.recv(1 << 20))

    t = threading.Thread(target=reader)
    t.start()
    conn.send(wire.Frame((b"\x02" * 2_000_000,), text=False), block=True)
    assert not conn.pending
    t.join(10)
    client.receive_data(bytes(got))
    assert [len(e.data) for e in client.events() if isinstance(e, Message)] == [2_000_000]
