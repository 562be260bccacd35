"""WebSocket frames ↔ Jupyter wire messages, as Jupyter Server encodes them."""
from __future__ import annotations

import json

import pytest
from jupyter_server.services.kernels.connection.base import (
    deserialize_binary_message,
    deserialize_msg_from_ws_v1,
    serialize_binary_message,
    serialize_msg_to_ws_v1,
)

from poolgate.gateway import wire

PARTS = [json.dumps({"msg_id": "m1", "msg_type": "stream", "session": "s", "username": "u",
                     "date": "2026-01-01T00:00:00Z", "version": "5.3"}).encode(),
         b'{"msg_id":"p0"}', b"{}", b'{"name":"stdout","text":"h\\u00e9llo"}']


def test_legacy_text_frame_is_jupyter_servers_json() -> None:
    frame = wire.to_client("iopub", PARTS, [], None)
    assert frame.text
    msg = json.loads(bytes(frame))
    assert msg["channel"] == "iopub" and msg["msg_type"] == "stream" and msg["msg_id"] == "m1"
    assert msg["content"] == {"name": "stdout", "text": "héllo"}
    assert msg["parent_header"] == {"msg_id": "p0"} and msg["buffers"] == []


def test_legacy_binary_frame_matches_jupyter_server() -> None:
    frame = wire.to_client("shell", PARTS, [b"\x00\x01", b"xyz"], None)
    assert not frame.text
    msg = deserialize_binary_message(bytes(frame))
    assert msg["buffers"] == [b"\x00\x01", b"xyz"] and msg["channel"] == "shell"
    assert msg["content"]["text"] == "héllo"


def test_v1_matches_jupyter_server() -> None:
    frame = wire.to_client("iopub", PARTS, [b"buf"], wire.V1)
    channel, parts = deserialize_msg_from_ws_v1(bytes(frame))
    assert channel == "iopub" and parts == [*PARTS, b"buf"]
    back = serialize_msg_to_ws_v1(parts, "shell")
    ch, got, bufs = wire.from_client(back, wire.V1)
    assert ch == "shell" and got == PARTS and bufs == [b"buf"]


def test_client_legacy_text_and_binary() -> None:
    msg = {"header": json.loads(PARTS[0]), "parent_header": {}, "metadata": {},
           "content": {"code": "1"}, "channel": "shell"}
    ch, parts, bufs = wire.from_client(json.dumps(msg), None)
    assert ch == "shell" and json.loads(parts[3]) == {"code": "1"} and bufs == []
    ch, parts, bufs = wire.from_client(serialize_binary_message({**msg, "buffers": [b"ab"]}), None)
    assert bufs == [b"ab"] and json.loads(parts[0])["msg_id"] == "m1"


def test_message_without_channel_goes_to_shell() -> None:
    """Jupyter Server's GatewayKernelClient sends no ``channel``: Jupyter Server and
    Enterprise Gateway route such a message to shell, and so does poolgate."""
    msg = {"header": json.loads(PARTS[0]), "parent_header": {}, "metadata": {},
           "content": {"code": "1"}}
    ch, parts, _ = wire.from_client(json.dumps(msg), None)
    assert ch == "shell" and json.loads(parts[3]) == {"code": "1"}
    with pytest.raises(wire.BadFrame, match="unknown channel"):
        wire.from_client(json.dumps({**msg, "channel": "nonsense"}), None)


@pytest.mark.parametrize("frame", ["nope", "[]", '{"channel": "x", "header": {"msg_type": "a"}}',
                                   '{"channel": "shell", "header": {}}', b"\x00\x00\x00\x05junk"])
def test_bad_frames(frame: str | bytes) -> None:
    with pytest.raises(wire.BadFrame):
        wire.from_client(frame, None)


def test_v1_rejects_text() -> None:
    with pytest.raises(wire.BadFrame):
        wire.from_client("{}", wire.V1)


@pytest.mark.parametrize("content", [
    '{"code": "print(\'h\\u00e9llo \\u2603\')"}',  # non-ASCII kept as UTF-8
    '{"code": "x", "big": 123456789012345678901234567890}',  # past 64 bits: json's way
    '{"code": "x", "v": NaN}',  # Python's json reads and writes NaN
])
def test_client_content_reaches_the_kernel_as_json_reads_it(content: str) -> None:
    frame = ('{"channel": "shell", "header": {"msg_id": "m", "msg_type": "execute_request"}, '
             '"parent_header": {}, "metadata": {}, "content": ' + content + '}')
    _, parts, _ = wire.from_client(frame, None)
    assert repr(json.loads(parts[3])) == repr(json.loads(content))


def test_binary_legacy_frame_that_is_not_utf8_is_a_bad_frame() -> None:
    body = b'{"channel": "shell", "header": {"msg_type": "a\xff"}}'
    frame = (1).to_bytes(4, "big") + (8).to_bytes(4, "big") + body
    with pytest.raises(wire.BadFrame):
        wire.from_client(frame, None)


BIG = b'{"name":"stdout","text":"' + b"x" * wire.JOIN_UNDER + b'"}'


@pytest.mark.parametrize("protocol,buffers", [(None, []), (None, [b"\x00buf"]), (wire.V1, [])])
def test_long_content_is_written_from_the_kernels_bytes_not_copied(
        protocol: str | None, buffers: list[bytes]) -> None:
    """A kernel's megabytes of output go to the socket as the bytes it sent (one sendmsg of
    the pieces), with no joined copy of the whole frame; Jupyter Server reads the frame."""
    frame = wire.to_client("iopub", [*PARTS[:3], BIG], buffers, protocol)
    assert any(piece is BIG for piece in frame.pieces)
    assert len(frame) == len(bytes(frame))
    if protocol == wire.V1:
        msg_list = deserialize_msg_from_ws_v1(bytes(frame))[1]
        assert msg_list == [*PARTS[:3], BIG]
        return
    msg = json.loads(bytes(frame)) if frame.text else deserialize_binary_message(bytes(frame))
    assert msg["content"]["text"] == "x" * wire.JOIN_UNDER and msg["channel"] == "iopub"
    assert frame.text == (not buffers) and msg["buffers"] == buffers


def test_text_frame_is_utf8_with_what_is_not_replaced() -> None:
    content = b'{"name":"stdout","text":"h\xc3\xa9 \xed\xa0\x80"}'  # é, then a lone surrogate
    frame = wire.to_client("iopub", [*PARTS[:3], content], [], None)
    assert frame.text
    assert json.loads(bytes(frame))["content"]["text"] == "hé " + b"\xed\xa0\x80".decode(errors="replace")


@pytest.mark.parametrize("deflate", [False, True])
@pytest.mark.parametrize("content", [PARTS[3], BIG])
def test_connection_sends_text_frames_as_text_and_binary_as_binary(deflate: bool,
                                                                   content: bytes) -> None:
    """Both ways of framing: written here (no extension) and by wsproto (permessage-deflate,
    as browsers ask), seen by a wsproto client; short frames and long ones (in pieces)."""
    import socket

    from wsproto.events import BytesMessage, TextMessage

    from poolgate.gateway.channels.connection import Connection
    from tests.gateway.fakes import FakeWs, client_pair

    client, server = client_pair(deflate)
    a, b = socket.socketpair()

    conn = Connection(FakeWs(a, server))
    assert conn.plain is not deflate
    parts = [*PARTS[:3], content]
    text = wire.to_client("iopub", parts, [], None)
    binary = wire.to_client("shell", parts, [b"\x00buf"], None)
    conn.send_many([text, binary], block=True)
    a.close()
    data = b""
    while chunk := b.recv(65536):
        data += chunk
    b.close()
    client.receive_data(data)
    got = [e for e in client.events() if isinstance(e, TextMessage | BytesMessage)]
    want = json.loads(content)["text"]
    assert isinstance(got[0], TextMessage) and json.loads(got[0].data)["content"]["text"] == want
    assert isinstance(got[1], BytesMessage)
    msg = deserialize_binary_message(bytes(got[1].data))
    assert msg["buffers"] == [b"\x00buf"] and msg["content"]["text"] == want


@pytest.mark.parametrize("channel", [["shell"], {"a": 1}, 3, True])
def test_a_channel_that_is_not_a_string_is_a_bad_frame(channel: object) -> None:
    """Found by tests/integration/test_ws_fuzz.py: a list as channel raised TypeError
    (unhashable) and ended the socket instead of being dropped."""
    frame = json.dumps({"channel": channel, "header": {"msg_type": "kernel_info_request"}})
    with pytest.raises(wire.BadFrame, match="unknown channel"):
        wire.from_client(frame, None)
