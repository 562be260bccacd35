"""Malformed Jupyter messages on /api/kernels/<id>/channels, at the API level (issue 21; the
RFC 6455 framing has its own fuzzing in tests/gateway/test_framing*.py).

Hypothesis writes what a broken or hostile client could send: text that is not JSON, JSON that
is not an object, messages without a header or msg_type, unknown channels, unknown msg_types,
contents of any shape, a client-made "signature", garbage binary frames in the legacy and the
v1 protocols. As documented (README, WebSocket behaviour), a bad frame is dropped and logged
and the socket stays open, and a well-formed message of any type is passed on (signed by the
gateway with the kernel's key: clients never sign); after every one, the same socket still gets
a kernel_info_reply. A frame announced past the 64 MiB maximum closes that socket with 1009.
Through all of it a socket on another kernel keeps running cells.
"""
from __future__ import annotations

import json
import os
import struct
import uuid
from collections.abc import Iterator
from typing import Any

import pytest
import websocket
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from poolgate.gateway import framing, wire
from tests.client import Channel
from tests.conftest import Stack

SAFE = dict(deadline=None, database=None, suppress_health_check=list(HealthCheck))
JSONISH = st.recursive(st.none() | st.booleans() | st.integers() | st.text(max_size=20),
                       lambda inner: st.lists(inner, max_size=4) |
                       st.dictionaries(st.text(max_size=10), inner, max_size=4), max_leaves=12)
#: msg_types the kernel must not get by chance here: they would end or reset it
ENDING = {"shutdown_request", "interrupt_request", "debug_request"}


@pytest.fixture
def kernels(redis_stack: Stack) -> Iterator[tuple[str, str]]:
    gw = redis_stack.gw
    a, b = gw.start()["id"], gw.start()["id"]
    yield a, b
    gw.shutdown(a)
    gw.shutdown(b)


def header(msg_type: str = "kernel_info_request") -> dict[str, Any]:
    return {"msg_id": uuid.uuid4().hex, "msg_type": msg_type, "username": "fuzz",
            "session": uuid.uuid4().hex, "date": "2026-01-01T00:00:00Z", "version": "5.3"}


def messages() -> st.SearchStrategy[dict[str, Any]]:
    """Jupyter messages with one or more parts wrong."""
    heads = st.one_of(
        st.builds(header, st.text(min_size=1, max_size=30).filter(lambda t: t not in ENDING)),
        st.builds(header, st.sampled_from(["execute_request", "complete_request",
                                           "inspect_request", "comm_msg", "input_reply"])),
        st.fixed_dictionaries({}, optional={"msg_id": JSONISH, "msg_type": JSONISH}),
        JSONISH)
    return st.fixed_dictionaries(
        {"header": heads},
        optional={"channel": st.sampled_from(["shell", "control", "stdin", "iopub"]) |
                  st.text(max_size=12) | JSONISH,
                  "content": JSONISH, "parent_header": JSONISH, "metadata": JSONISH,
                  "signature": st.text(alphabet="0123456789abcdef", max_size=64),
                  "buffers": JSONISH})


def legacy_frames() -> st.SearchStrategy[str | bytes]:
    return st.one_of(
        st.text(max_size=300),                                       # not JSON, mostly
        JSONISH.filter(lambda v: not isinstance(v, dict)).map(json.dumps),  # not an object
        messages().map(json.dumps),
        st.binary(max_size=300),                                     # binary, not the format
        st.tuples(messages(), st.lists(st.binary(max_size=50), max_size=3)).map(
            lambda mb: wire.binary_legacy(json.dumps(mb[0]).encode(), mb[1])),
        st.tuples(st.integers(-2**31, 2**31 - 1), st.binary(max_size=100)).map(
            lambda nb: struct.pack("!i", nb[0]) + nb[1]))            # a lying buffer count


def v1_frames() -> st.SearchStrategy[str | bytes]:
    parts = st.lists(st.binary(max_size=60), min_size=0, max_size=6)
    return st.one_of(
        st.binary(max_size=300), st.text(max_size=100),
        st.tuples(st.sampled_from(["shell", "control", "stdin", "iopub", "nope", ""]), parts).map(
            lambda cp: wire.to_v1(cp[0], cp[1])),
        st.tuples(st.sampled_from(["shell", "bogus"]), messages()).map(
            lambda cm: wire.to_v1(cm[0], [json.dumps(cm[1].get("header")).encode(), b"{}", b"{}",
                                          json.dumps(cm[1].get("content")).encode()])),
        st.tuples(st.integers(0, 2**64 - 1), st.binary(max_size=100)).map(
            lambda nb: nb[0].to_bytes(8, "little") + nb[1]))         # a lying offset count


def send(ch: Channel, frame: str | bytes) -> None:
    if isinstance(frame, bytes):
        ch.ws.send_binary(frame)
    else:
        ch.ws.send(frame)


def still_answers(ch: Channel, v1: bool = False) -> None:
    """The same socket gets the reply to a new kernel_info_request."""
    head = header()
    if v1:
        ch.ws.send_binary(wire.to_v1("shell", [json.dumps(head).encode(), b"{}", b"{}", b"{}"]))
    else:
        ch.ws.send(json.dumps({"header": head, "parent_header": {}, "metadata": {},
                               "content": {}, "channel": "shell"}))
    for _ in range(500):
        ch.ws.settimeout(20)
        frame = ch.ws.recv()
        assert frame, "the gateway closed the socket"
        if v1:
            _, parts, _ = wire.from_client(frame, wire.V1)
            parent = json.loads(parts[1])
            kind = json.loads(parts[0])["msg_type"]
        else:
            msg = json.loads(frame) if isinstance(frame, str) else {"parent_header": {}}
            parent, kind = msg["parent_header"], msg.get("msg_type")
        if parent.get("msg_id") == head["msg_id"] and kind == "kernel_info_reply":
            return
    raise AssertionError("no kernel_info_reply")


def test_malformed_legacy_messages_are_dropped_and_the_socket_lives(
        redis_stack: Stack, kernels: tuple[str, str]) -> None:
    a, b = kernels
    ch = redis_stack.gw.channel(a)
    try:
        @settings(max_examples=80, **SAFE)
        @given(frame=legacy_frames())
        def run(frame: str | bytes) -> None:
            send(ch, frame)
            still_answers(ch)

        run()
    finally:
        ch.close()
    other_kernel_runs_a_cell(redis_stack, b)


def test_malformed_v1_messages_are_dropped_and_the_socket_lives(
        redis_stack: Stack, kernels: tuple[str, str]) -> None:
    a, b = kernels
    ch = redis_stack.gw.channel(a, subprotocol=wire.V1)
    assert ch.ws.subprotocol == wire.V1
    try:
        @settings(max_examples=60, **SAFE)
        @given(frame=v1_frames())
        def run(frame: str | bytes) -> None:
            send(ch, frame)
            still_answers(ch, v1=True)

        run()
    finally:
        ch.close()
    other_kernel_runs_a_cell(redis_stack, b)


@pytest.mark.parametrize("size", [framing.MAX_MESSAGE_SIZE + 1, 2**63 - 1])
def test_a_frame_past_the_maximum_closes_that_socket_with_1009(
        redis_stack: Stack, kernels: tuple[str, str], size: int) -> None:
    a, b = kernels
    bystander = redis_stack.gw.channel(b)  # open before, on another kernel
    try:
        ch = redis_stack.gw.channel(a)
        # Only the header is sent: the gateway must refuse on the announced length.
        ch.ws.sock.sendall(bytes([0x81, 0x80 | 127]) + struct.pack("!Q", size) + os.urandom(4))
        ch.ws.settimeout(20)
        opcode, frame = ch.ws.recv_data_frame(True)
        assert opcode == websocket.ABNF.OPCODE_CLOSE
        assert struct.unpack("!H", frame.data[:2])[0] == framing.MESSAGE_TOO_BIG
        ch.ws.close()
        assert bystander.execute("print(6 * 7)").stdout == "42\n"
        again = redis_stack.gw.channel(a)  # the kernel itself is fine
        try:
            assert again.execute("print(2 + 3)").stdout == "5\n"
        finally:
            again.close()
    finally:
        bystander.close()


def other_kernel_runs_a_cell(stack: Stack, kid: str) -> None:
    ch = stack.gw.channel(kid)
    try:
        assert ch.execute("print(6 * 7)").stdout == "42\n"
    finally:
        ch.close()
