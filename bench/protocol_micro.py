"""python -m bench.protocol_micro: per-message cost of the gateway's own protocol code.

Four figures, each the best of ``--repeat`` runs, in microseconds per message:

* ws-read: FrameReader.feed on masked client frames of a Jupyter-sized JSON text message
  (600 bytes), 64 KiB at a time as Connection.read gets them;
* zmtp-in: a kernel's 7-frame Jupyter message (about 700 bytes) read by a zmtp.Peer from a
  Unix socket, as the pump does (recv and parse; the writer's side is done before timing);
* zmtp-out: Peer.send of the same message to a Unix socket that is drained after timing;
* zmtp-parse: the same inbound bytes as zmtp-in without the socket (the parser alone).

Only the standard library and wsproto (to write the client's masked frames).
"""
from __future__ import annotations

import argparse
import importlib.util
import os
import select
import socket
import tempfile
import time
from collections.abc import Callable
from types import ModuleType
from typing import Any

from wsproto import ConnectionType
from wsproto.connection import Connection
from wsproto.events import Message

from poolgate.gateway import framing, zmtp

FRAMES = [b"<IDS|MSG>", b"0" * 64, b'{"msg_id": "' + b"a" * 180 + b'"}',
          b'{"msg_id": "' + b"b" * 180 + b'"}', b"{}", b'{"data": "' + b"c" * 150 + b'"}', b""]


def best(fn: Callable[[], float], repeat: int) -> float:
    return min(fn() for _ in range(repeat))


def ws_read(n: int) -> float:
    client = Connection(ConnectionType.CLIENT)
    text = '{"header": {"msg_id": "' + "x" * 560 + '"}}'
    data = b"".join(client.send(Message(data=text)) for _ in range(n))
    reader = framing.FrameReader()
    t = time.perf_counter()
    got = 0
    for i in range(0, len(data), 65536):
        got += len(reader.feed(data[i:i + 65536])[0])
    dt = time.perf_counter() - t
    assert got == n
    return dt / n * 1e6


def kernel_side(path: str) -> tuple[zmtp.Peer, socket.socket]:
    """A Peer connected (handshake done) to a listening Unix socket we speak ZMTP on by hand."""
    srv = socket.socket(socket.AF_UNIX)
    srv.bind(path)
    srv.listen()
    peer = zmtp.Peer(f"ipc://{path}", b"DEALER", b"bench")
    conn, _ = srv.accept()
    srv.close()
    conn.sendall(zmtp.greeting() + zmtp.command(b"READY", {b"Socket-Type": b"ROUTER"}))
    while not peer.ready:
        peer.handle(select.POLLIN | (select.POLLOUT if peer.connecting or peer.wbuf else 0))
    conn.setblocking(False)
    try:
        while conn.recv(1 << 20):
            pass
    except BlockingIOError:
        pass
    return peer, conn


def wire(n: int) -> bytes:
    return b"".join(b"".join(zmtp.encode(FRAMES)) for _ in range(n))


def zmtp_in(n: int) -> float:
    with tempfile.TemporaryDirectory() as d:
        peer, conn = kernel_side(os.path.join(d, "k"))
        conn.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 1 << 22)
        peer.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 22)  # type: ignore
        data = wire(n)
        total = 0.0
        got = 0
        size = len(data) // n
        for i in range(0, len(data), 1 << 20):  # what the socket holds, then read it
            conn.setblocking(True)
            conn.sendall(data[i:i + (1 << 20)])
            whole = min(i + (1 << 20), len(data)) // size
            t = time.perf_counter()
            while got + len(peer.inbox) < whole:
                peer.handle(select.POLLIN)
            total += time.perf_counter() - t
            got += len(peer.inbox)
            peer.inbox.clear()
        assert got == n, (got, n)
        peer.close()
        conn.close()
        return total / n * 1e6


def zmtp_out(n: int) -> float:
    with tempfile.TemporaryDirectory() as d:
        peer, conn = kernel_side(os.path.join(d, "k"))
        total = 0.0
        batch = 1000
        for _ in range(n // batch):
            t = time.perf_counter()
            for _ in range(batch):
                peer.send(FRAMES)
            total += time.perf_counter() - t
            while peer.wbuf:
                try:
                    while conn.recv(1 << 20):
                        pass
                except BlockingIOError:
                    pass
                peer.handle(select.POLLOUT)
            try:
                while conn.recv(1 << 20):
                    pass
            except BlockingIOError:
                pass
        peer.close()
        conn.close()
        return total / n * 1e6


def zmtp_parse(n: int) -> float:
    """The parser alone: bytes in, messages out, 256 KiB at a time (READ_SIZE)."""
    data = wire(n)
    chunks = [data[i:i + zmtp.READ_SIZE] for i in range(0, len(data), zmtp.READ_SIZE)]
    conn = getattr(zmtp, "Connection", None)
    if conn is not None:  # the I/O-free connection
        c = conn(b"DEALER", b"bench")
        c.receive_data(zmtp.greeting() + zmtp.command(b"READY", {b"Socket-Type": b"ROUTER"}))
        t = time.perf_counter()
        got = 0
        for chunk in chunks:  # a list per read, as Peer._read extends its inbox with
            got += len(c.receive_data(chunk))
        dt = time.perf_counter() - t
    else:  # zmtp.py before its I/O-free Connection (2e52851): Peer's parser, fed as _read did
        with tempfile.TemporaryDirectory() as d:
            peer: Any
            peer, sock = kernel_side(os.path.join(d, "k"))
            buf = peer.rbuf
            t = time.perf_counter()
            got = 0
            for data_ in chunks:
                got += len(peer.inbox)
                peer.inbox.clear()  # as the pump empties it (a growing inbox costs GC time)
                if buf:
                    buf += data_
                    if len(buf) < peer.need:
                        continue
                    data_ = bytes(buf)
                    buf.clear()
                used = peer._parse(data_)
                if used < len(data_):
                    buf += memoryview(data_)[used:]
            dt = time.perf_counter() - t
            got += len(peer.inbox)
            peer.close()
            sock.close()
    assert got == n, (got, n)
    return dt / n * 1e6


def load(name: str, path: str) -> ModuleType:
    """A module from another checkout, loaded beside this tree's (its imports resolve here)."""
    spec = importlib.util.spec_from_file_location(name, path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def main() -> None:
    global framing, zmtp  # the bench functions read these: each variant swaps its modules in
    global framing, zmtp
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("-n", type=int, default=50_000)
    ap.add_argument("--repeat", type=int, default=7)
    ap.add_argument("--against", metavar="DIR",
                    help="also time DIR/gateway/framing.py and zmtp.py (another checkout, e.g. "
                         "git archive COMMIT gateway | tar -x -C DIR), round by round alternating "
                         "with this tree's, and print best and median of each")
    args = ap.parse_args()
    benches = [("ws-read", ws_read), ("zmtp-parse", zmtp_parse), ("zmtp-in", zmtp_in),
               ("zmtp-out", zmtp_out)]
    if not args.against:
        for name, fn in benches:
            print(f"{name:11} {best(lambda: fn(args.n), args.repeat):6.2f} us/message")
        return
    variants = {"this": (framing, zmtp),
                "against": (load("other_framing", f"{args.against}/gateway/framing.py"),
                            load("other_zmtp", f"{args.against}/gateway/zmtp.py"))}
    times: dict[tuple[str, str], list[float]] = {}
    for _ in range(args.repeat):  # round by round: the machine's speed drifts
        for tag, (framing, zmtp) in variants.items():  # noqa: B007 - the benches read them
            for name, fn in benches:
                times.setdefault((name, tag), []).append(fn(args.n))
    for name, _ in benches:
        line = f"{name:11}"
        for tag in variants:
            t = sorted(times[(name, tag)])
            line += f"  {tag}: best {t[0]:5.2f} median {t[len(t) // 2]:5.2f}"
        print(line + " us/message")


if __name__ == "__main__":
    main()
