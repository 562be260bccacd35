"""The gateway's own WebSocket frame reader (clients without extensions), against frames a
real client library (wsproto, as a client: masked) writes."""
from __future__ import annotations

import socket
import struct

import pytest
from wsproto.events import CloseConnection, Message, Ping, Pong

from poolgate.gateway import framing
from poolgate.gateway.framing import FrameReader
from tests.gateway.fakes import FakeWs, client_pair


def feed_bytewise(reader: FrameReader, data: bytes) -> tuple[list[str | bytes], list[bytes]]:
    messages: list[str | bytes] = []
    replies: list[bytes] = []
    for i in range(len(data)):  # every split a TCP read could make
        m, r = reader.feed(data[i:i + 1])
        messages += m
        replies += r
    return messages, replies


@pytest.mark.parametrize("size", [0, 1, 125, 126, 65535, 65536, 300_000])
def test_messages_of_every_length_encoding(size: int) -> None:
    client, _ = client_pair()
    text = ("é" * size)[:size]
    binary = bytes(range(256)) * (size // 256) + bytes(size % 256)
    data = client.send(Message(data=text)) + client.send(Message(data=binary))
    reader = FrameReader()
    messages, replies = reader.feed(data)
    assert messages == [text, binary] and replies == []
    assert type(messages[0]) is str and type(messages[1]) is bytes
    assert not reader.buf


def test_fragments_and_a_ping_between_them_split_anywhere() -> None:
    client, _ = client_pair()
    data = (client.send(Message(data="{\"a\": ", message_finished=False))
            + client.send(Ping(b"are you there"))
            + client.send(Message(data="\"ü\"}", message_finished=True))
            + client.send(Message(data=b"\x00\x01", message_finished=False))
            + client.send(Message(data=b"\x02", message_finished=True)))
    messages, replies = feed_bytewise(FrameReader(), data)
    assert messages == ['{"a": "ü"}', b"\x00\x01\x02"]
    client.receive_data(b"".join(replies))
    assert [type(e) for e in client.events()] == [Pong]
    assert replies == [framing.control_frame(framing.OP_PONG, b"are you there")]


def test_pong_and_close_are_noticed_and_close_is_answered() -> None:
    client, _ = client_pair()
    reader = FrameReader()
    client.receive_data(b"")  # nothing
    data = (client.send(Pong(b"")) + client.send(Message(data="last"))
            + client.send(CloseConnection(code=4001, reason="bye"))
            + b"\x81\x85" + b"junk after the close")
    messages, replies = reader.feed(data)
    assert messages == ["last"] and reader.pong
    assert (reader.close_code, reader.close_reason) == (4001, "bye")
    client.receive_data(b"".join(replies))
    closes = [e for e in client.events() if isinstance(e, CloseConnection)]
    assert [c.code for c in closes] == [4001]  # the code echoed, as RFC 6455 asks


@pytest.mark.parametrize("frame, code", [
    (b"\x81\x02hi", 1002),  # not masked
    (b"\xc1\x80abcd", 1002),  # a reserved bit (permessage-deflate's) without the extension
    (b"\x80\x80abcd", 1002),  # a continuation with nothing to continue
    (b"\x89\xfe\x00\x7eabcd" + bytes(126), 1002),  # a ping longer than 125 bytes
    (b"\x83\x80abcd", 1002),  # an unknown opcode
    (b"\x81\x82\x00\x00\x00\x00\xc3\x28", 1007),  # text that is not UTF-8
])
def test_protocol_errors_fail_the_connection_with_the_rfcs_code(frame: bytes, code: int) -> None:
    """The connection is closed with the RFC's code; what came whole before it still counts."""
    client, _ = client_pair()
    reader = FrameReader()
    messages, replies = reader.feed(client.send(Message(data="before")) + frame
                                    + client.send(Message(data="after")))
    assert messages == ["before"] and reader.close_code == code
    client.receive_data(b"".join(replies))
    assert [e.code for e in client.events() if isinstance(e, CloseConnection)] == [code]


def test_connection_answers_a_ping_and_ends_on_close() -> None:
    """Connection.read on the plain path: what the client sent, pings answered on the socket,
    a protocol error or a close ends the connection."""
    from poolgate.gateway.channels.connection import Connection

    client, server = client_pair()
    a, b = socket.socketpair()

    conn = Connection(FakeWs(a, server))
    assert conn.plain
    b.sendall(client.send(Message(data='{"x": 1}')) + client.send(Ping(b"p"))
              + client.send(Pong(b"")))
    assert conn.read() == ['{"x": 1}'] and conn.ws.pong_received and not conn.closed
    client.receive_data(b.recv(65536))
    assert [type(e) for e in client.events()] == [Pong]
    b.sendall(client.send(CloseConnection(code=1000)))
    assert conn.read() == [] and conn.closed and not conn.ws.connected
    b.sendall(b"\x81\x02hi")  # another connection's client, unmasked
    conn2 = Connection(FakeWs(a, server))
    assert conn2.read() == [] and conn2.closed and conn2.ws.close_reason == 1002
    a.close()
    b.close()


def test_unmask_is_its_own_inverse() -> None:
    data = bytes(range(256)) * 3 + b"xyz"
    masked = framing.unmask(data, b"\x01\x80\xff\x10")
    assert masked != data and framing.unmask(masked, b"\x01\x80\xff\x10") == data
    assert [masked[i] ^ data[i] for i in range(8)] == [1, 0x80, 0xFF, 0x10] * 2


def test_control_and_close_frames_stay_within_125_bytes_and_whole_characters() -> None:
    """A long payload is cut before its length is written; a long reason at a character
    boundary (a client would fail a close whose reason is not UTF-8, with 1007)."""
    client, _ = client_pair()
    client.receive_data(framing.control_frame(framing.OP_PING, b"p" * 300)
                        + framing.close_frame(1011, "é" * 100))
    ping, close = client.events()
    assert isinstance(ping, Ping) and ping.payload == b"p" * 125
    assert isinstance(close, CloseConnection) and (close.code, close.reason) == (1011, "é" * 61)


def test_nothing_fed_after_a_close_is_kept() -> None:
    client, _ = client_pair()
    reader = FrameReader()
    late = client.send(Message(data="late")) * 1000
    reader.feed(client.send(CloseConnection(code=1000)))
    assert reader.feed(late) == ([], []) and not reader.buf


def test_send_some_stays_importable_from_framing() -> None:
    from poolgate.gateway import sockio
    assert framing.send_some is sockio.send_some


def test_connection_closes_a_client_whose_message_is_over_the_cap() -> None:
    """Connection.read on the plain path: a header announcing a message over FrameReader's
    default cap ends the connection with 1009 before any of its payload is read."""
    from poolgate.gateway.channels.connection import Connection

    client, server = client_pair()
    a, b = socket.socketpair()
    conn = Connection(FakeWs(a, server))
    b.sendall(client.send(Message(data="first"))
              + struct.pack("!BBQ", 0x82, 0xFF, framing.MAX_MESSAGE_SIZE + 1) + b"mask")
    assert conn.read() == ["first"] and conn.closed and conn.ws.close_reason == 1009
    client.receive_data(b.recv(65536))
    assert [e.code for e in client.events() if isinstance(e, CloseConnection)] == [1009]
    a.close()
    b.close()


def test_a_message_over_the_limit_closes_with_1009_before_its_bytes_arrive() -> None:
    client, _ = client_pair()
    reader = FrameReader(1000)
    ok = client.send(Message(data=b"x" * 1000))
    big = client.send(Message(data=b"y" * 5000))
    messages, replies = reader.feed(ok + big[:20])  # only the big one's header has come
    assert messages == [b"x" * 1000] and reader.close_code == framing.MESSAGE_TOO_BIG
    assert replies and replies[0][0] == 0x88 and replies[0][2:4] == (1009).to_bytes(2, "big")
    reader = FrameReader(1000)  # fragments count together; a ping between them not
    data = (client.send(Message(data=b"a" * 600, message_finished=False))
            + client.send(Ping(b"p" * 100))
            + client.send(Message(data=b"b" * 300, message_finished=True)))
    messages, _ = reader.feed(data)
    assert messages == [b"a" * 600 + b"b" * 300] and reader.close_code is None
    data = (client.send(Message(data=b"a" * 600, message_finished=False))
            + client.send(Message(data=b"b" * 600, message_finished=True)))
    messages, _ = reader.feed(data)
    assert messages == [] and reader.close_code == framing.MESSAGE_TOO_BIG
