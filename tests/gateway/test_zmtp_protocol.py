"""gateway/zmtp_protocol.py's Connection with no socket: the handshake table pair by pair,
PING answered with PONG, the caps, random split points, and random bytes (only ZmtpError,
with bounded memory). Against real libzmq sockets: tests/gateway/test_zmtp.py."""
from __future__ import annotations

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from poolgate.gateway.zmtp_protocol import (
    COMMAND,
    LONG,
    MORE,
    Connection,
    State,
    ZmtpError,
    command,
    command_frame,
    encode,
    frame_head,
    greeting,
)

FAST = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
S = State
ROUTER_READY = command(b"READY", {b"Socket-Type": b"ROUTER"})
PUB_READY = command(b"READY", {b"socket-type": b"XPUB"})  # names are case-insensitive


def wire(*messages: list[bytes]) -> bytes:
    return b"".join(b"".join(encode(m)) for m in messages)


def open_dealer(**caps: int) -> Connection:
    c = Connection(b"DEALER", b"me", **caps)
    assert c.receive_data(greeting() + ROUTER_READY) == [] and c.state is S.OPEN
    return c


# What each input is, and the state each (state, input) pair leads to: None fails the
# connection. Written out in full, so that a pair added to or dropped from the table shows.
INPUTS = {
    "greeting": greeting(),
    "READY": ROUTER_READY,
    "ERROR": command_frame(b"ERROR", b"\x06denied"),
    "PING": command_frame(b"PING", b"\x00\x0actx"),
    "PONG": command_frame(b"PONG", b"ctx"),
    "unknown command": command_frame(b"SOMETHING-NEW", b"data"),
    "message": wire([b"a", b"b"]),
}
EXPECTED: dict[tuple[State, str], State | None] = {
    (S.GREETING, "greeting"): S.HANDSHAKE,
    (S.GREETING, "READY"): None,
    (S.GREETING, "ERROR"): None,
    (S.GREETING, "PING"): None,
    (S.GREETING, "PONG"): None,
    (S.GREETING, "unknown command"): None,
    (S.GREETING, "message"): None,
    (S.HANDSHAKE, "greeting"): None,
    (S.HANDSHAKE, "READY"): S.OPEN,
    (S.HANDSHAKE, "ERROR"): None,
    (S.HANDSHAKE, "PING"): None,
    (S.HANDSHAKE, "PONG"): None,
    (S.HANDSHAKE, "unknown command"): None,
    (S.HANDSHAKE, "message"): None,
    (S.OPEN, "greeting"): None,
    (S.OPEN, "READY"): None,
    (S.OPEN, "ERROR"): None,
    (S.OPEN, "PING"): S.OPEN,
    (S.OPEN, "PONG"): S.OPEN,
    (S.OPEN, "unknown command"): S.OPEN,
    (S.OPEN, "message"): S.OPEN,
}
REACH = {S.GREETING: b"", S.HANDSHAKE: greeting(), S.OPEN: greeting() + ROUTER_READY}


@pytest.mark.parametrize("state, what", list(EXPECTED))
def test_every_pair_of_the_handshake_table(state: State, what: str) -> None:
    c = Connection(b"DEALER", b"me")
    c.receive_data(REACH[state])
    assert c.state is state
    c.outgoing.clear()
    expected = EXPECTED[(state, what)]
    if expected is None:
        with pytest.raises(ZmtpError):
            c.receive_data(INPUTS[what])
        assert c.state is S.FAILED
        with pytest.raises(ZmtpError):  # a failed connection takes nothing more
            c.receive_data(wire([b"x"]))
    else:
        got = c.receive_data(INPUTS[what])
        assert c.state is expected
        assert got == ([[b"a", b"b"]] if what == "message" else [])
        assert c.outgoing == ([command_frame(b"PONG", b"ctx")] if what == "PING" else [])


def test_the_table_covers_every_state_the_connection_can_take_input_in() -> None:
    assert {s for s, _ in EXPECTED} == set(S) - {S.FAILED}


def test_start_announces_the_socket_type_and_identity() -> None:
    assert Connection(b"DEALER", b"id-1").start() == greeting() + command(
        b"READY", {b"Socket-Type": b"DEALER", b"Identity": b"id-1"})
    assert Connection(b"SUB").start() == greeting() + command(b"READY", {b"Socket-Type": b"SUB"})
    with pytest.raises(ValueError):
        Connection(b"ROUTER")


def test_a_sub_subscribes_once_the_publisher_is_ready_and_not_to_a_dealer() -> None:
    sub = Connection(b"SUB")
    sub.receive_data(greeting())
    assert sub.outgoing == []
    sub.receive_data(PUB_READY)
    assert sub.outgoing == [bytes((0, 1)), b"\x01"]  # one frame: 0x01, subscribe to all
    with pytest.raises(ZmtpError, match="cannot talk"):
        Connection(b"SUB").receive_data(greeting() + ROUTER_READY)


def test_ping_gets_a_pong_with_its_context_and_send_waits_for_the_handshake() -> None:
    c = Connection(b"DEALER", b"me")
    with pytest.raises(ZmtpError):
        c.send([b"too early"])
    c.receive_data(greeting() + ROUTER_READY + command_frame(b"PING", b"\x00\x64" + b"c" * 20))
    assert c.outgoing == [command_frame(b"PONG", b"c" * 16)]  # RFC 37: at most 16 bytes
    assert c.send([b"a", b"b" * 300]) == [b"\x01\x01", b"a", frame_head(300, 0), b"b" * 300]
    with pytest.raises(ZmtpError, match="TTL"):
        c.receive_data(command_frame(b"PING", b"\x00"))


@pytest.mark.parametrize("data, match", [
    (b"GET / HTTP/1.1\r\n", "not a ZMTP peer"),
    (b"\xff" + bytes(8) + b"\x01", "not a ZMTP peer"),  # ZMTP 1.0's signature
    (greeting()[:10] + b"\x02" + greeting()[11:], "ZMTP 3"),
    (greeting()[:12] + b"CURVE".ljust(20, b"\0") + greeting()[32:], "NULL"),
    (greeting() + command_frame(b"READY", b"\x0bSocket-Type\x00\x00"), "cut short"),
    (greeting() + command_frame(b"READY", b"\x0bSocket-Type\x00\x00\x00\x09ROUTER"), "cut short"),
    (greeting() + bytes((COMMAND, 1, 9)), "cut short in its name"),
    (greeting() + bytes((COMMAND, 0)), "cut short in its name"),
    (greeting() + ROUTER_READY + bytes((COMMAND | MORE,)) + ROUTER_READY[1:], "MORE"),
    (greeting() + ROUTER_READY + bytes((0x08, 1, 0)), "reserved"),
    (greeting() + ROUTER_READY + command_frame(b"ERROR", b"\x05nope!"), "refused: nope!"),
])
def test_what_is_not_zmtp_3_fails_the_connection(data: bytes, match: str) -> None:
    with pytest.raises(ZmtpError, match=match):
        Connection(b"DEALER").receive_data(data)


def test_messages_completed_before_an_error_come_with_it() -> None:
    c = open_dealer()
    with pytest.raises(ZmtpError) as info:
        c.receive_data(wire([b"one"], [b"two", b"2"]) + bytes((0x08, 0)))
    assert info.value.messages == [[b"one"], [b"two", b"2"]]


def test_a_frame_over_max_frame_fails_from_its_header_alone() -> None:
    c = open_dealer(max_frame=1000)
    with pytest.raises(ZmtpError, match="frame of 1001 bytes"):
        c.receive_data(frame_head(1001, 0))
    c = open_dealer()
    with pytest.raises(ZmtpError):  # a length of 2^63 and more: not waited for
        c.receive_data(bytes((LONG,)) + b"\xff" * 8)


def test_a_message_over_max_message_fails_from_the_header_that_passes_it() -> None:
    c = open_dealer(max_frame=1000, max_message=2500)
    assert c.receive_data(wire([b"x" * 1000, b"y" * 1000, b"z" * 500])) == [
        [b"x" * 1000, b"y" * 1000, b"z" * 500]]  # exactly the cap
    assert c.receive_data(wire([b"x" * 1000, b"y" * 1000, b"z"])[:2018]) == []
    with pytest.raises(ZmtpError, match="over 2500 bytes"):
        c.receive_data(frame_head(501, 0))


def test_a_message_of_too_many_frames_fails() -> None:
    c = open_dealer(max_frames=10)
    assert len(c.receive_data(wire([b"."] * 10))[0]) == 10
    with pytest.raises(ZmtpError, match="over 10 frames"):
        c.receive_data(wire([b"."] * 12)[:-2])


def test_a_frame_arriving_in_many_pieces_is_held_once() -> None:
    c = open_dealer()
    data = wire([b"a" * 100_000, b"tail"])
    got: list[list[bytes]] = []
    for i in range(0, len(data), 1000):
        got += c.receive_data(data[i:i + 1000])
        assert c.held < 100_009  # the frame being received, no more
    assert got == [[b"a" * 100_000, b"tail"]]
    assert not c.held


def test_a_long_frame_costs_the_reads_and_one_copy_at_most() -> None:
    """A kernel's large output (10 MB in 256 KiB reads, as gateway/zmtp.py reads): its body is
    the reads, joined once. Beyond the reads, the parser's peak is the frame once (it was
    twice: a buffer grown read by read, then its copy, from which the frame was cut)."""
    import tracemalloc

    c = open_dealer()
    body = b"b" * 10_000_000
    data = wire([b"head", body, b"tail"])
    reads = [data[i:i + (1 << 18)] for i in range(0, len(data), 1 << 18)]
    del data
    tracemalloc.start()
    try:
        got = [m for r in reads for m in c.receive_data(r)]
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert got == [[b"head", body, b"tail"]] and not c.held
    assert peak < 1.3 * len(body), peak  # the reads were made before tracing began


# -- property tests ---------------------------------------------------------------------

frames_ = st.one_of(st.binary(max_size=300),
                    st.sampled_from([0, 255, 256, 65535, 65536, 300_000]).map(lambda n: b"f" * n))
messages_ = st.lists(st.lists(frames_, min_size=1, max_size=6), max_size=8)


@FAST
@given(messages_, st.lists(st.integers(0, 1 << 20), max_size=10), st.booleans())
def test_random_messages_cut_anywhere_come_out_whole_and_in_order(
        messages: list[list[bytes]], cuts: list[int], pings: bool) -> None:
    data = greeting() + ROUTER_READY
    for m in messages:
        data += wire(m) + (command_frame(b"PING", b"\x00\x01") if pings else b"")
    points = sorted({c % (len(data) + 1) for c in cuts})
    c = Connection(b"DEALER")
    got: list[list[bytes]] = []
    for a, b in zip([0, *points], [*points, len(data)]):
        got += c.receive_data(data[a:b])
    assert got == messages and c.state is S.OPEN
    assert c.outgoing == [command_frame(b"PONG")] * (len(messages) if pings else 0)


def _bounded(c: Connection, chunks: list[bytes]) -> None:
    """Feeding raises nothing but ZmtpError, and holds no more than the caps allow."""
    for chunk in chunks:
        try:
            c.receive_data(chunk)
        except ZmtpError:
            assert c.state is S.FAILED and not c.held and not c.parts
            return
        assert c.held < max(64, 9 + c.max_frame)
        assert len(c.parts) <= c.max_frames
        assert sum(map(len, c.parts)) <= c.max_message + 255 * c.max_frames


@FAST
@given(st.binary(max_size=3000), st.lists(st.integers(0, 3000), max_size=6), st.booleans())
def test_random_bytes_raise_only_zmtp_error_with_bounded_memory(
        data: bytes, cuts: list[int], greeted: bool) -> None:
    c = Connection(b"DEALER", max_frame=300, max_message=1000, max_frames=8)
    if greeted:
        c.receive_data(greeting() + ROUTER_READY)
    points = sorted({x % (len(data) + 1) for x in cuts})
    _bounded(c, [data[a:b] for a, b in zip([0, *points], [*points, len(data)])])


@FAST
@given(messages_, st.lists(st.tuples(st.integers(0, 1 << 20), st.integers(0, 255)), max_size=4),
       st.lists(st.integers(0, 1 << 20), max_size=6))
def test_zmtp_streams_with_bytes_changed_raise_only_zmtp_error_with_bounded_memory(
        messages: list[list[bytes]], flips: list[tuple[int, int]], cuts: list[int]) -> None:
    data = bytearray(greeting() + PUB_READY + command_frame(b"PING", b"\x00\x01")
                     + wire(*messages))
    for at, value in flips:
        data[at % len(data)] = value
    points = sorted({x % (len(data) + 1) for x in cuts})
    _bounded(Connection(b"SUB", max_frame=70_000, max_message=200_000, max_frames=8),
             [bytes(data[a:b]) for a, b in zip([0, *points], [*points, len(data)])])
