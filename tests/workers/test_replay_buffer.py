"""The supervisor's replay buffer: bounded by message count and bytes, newest kept, handed
over as blobs a gateway decodes back into the same parts and buffers."""
from __future__ import annotations

from workers import jmsg
from workers.supervisor import REPLAY_MAX_MESSAGE, ReplayBuffer

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
