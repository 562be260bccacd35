"""gateway/framing.py's FrameReader against wsproto, the reference, on the same bytes.

Three kinds of proof: property tests (random messages, fragments, control frames and random
frames breaking the rules, cut at random points, decode as wsproto's server decodes them), an
Autobahn-style table (the cases of the Autobahn suite's sections 1-7 and 9 that apply to a
server's reader, each expected to end as wsproto ends it), and random bytes, which only ever
produce a close, with the reader's memory bounded by its message size cap.
"""
from __future__ import annotations

import struct
from dataclasses import dataclass
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from wsproto.events import BytesMessage, CloseConnection, Message, Ping, Pong, TextMessage

from poolgate.gateway import framing
from poolgate.gateway.framing import FrameReader
from tests.gateway.fakes import client_pair

FAST = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
MASK = b"\x37\xfa\x21\x3d"
T, B, C, CL, PI, PO = (framing.OP_TEXT, framing.OP_BINARY, framing.OP_CONT, framing.OP_CLOSE,
                       framing.OP_PING, framing.OP_PONG)


def frame(op: int, payload: bytes = b"", fin: bool = True, rsv: int = 0, mask: bool = True,
          length: str = "min") -> bytes:
    """A client frame, built by hand so it may break any rule: ``length`` "min" encodes the
    payload's length minimally, "16" or "64" in 2 or 8 bytes whatever it is."""
    n = len(payload)
    b0 = (0x80 if fin else 0) | rsv << 4 | op
    m = 0x80 if mask else 0
    if length == "16" or (length == "min" and 126 <= n < 65536):
        head = struct.pack("!BBH", b0, m | 126, n)
    elif length == "64" or (length == "min" and n >= 65536):
        head = struct.pack("!BBQ", b0, m | 127, n)
    else:
        head = bytes((b0, m | n))
    if not mask:
        return head + payload
    return head + MASK + framing.unmask(payload, MASK)


def close_payload(code: int, reason: bytes = b"") -> bytes:
    return code.to_bytes(2, "big") + reason


@dataclass
class Outcome:
    messages: list[str | bytes]
    close_code: int | None  # the client's close, or the code the connection failed with
    pings: list[bytes]  # payloads of the pings answered


def by_wsproto(chunks: list[bytes]) -> Outcome:
    """What wsproto's server makes of the chunks: its messages (fragments joined) and the code
    of the CloseConnection it reports (the client's or, on a ParseFailed, its own)."""
    _, server = client_pair()
    out = Outcome([], None, [])
    texts: list[str] = []
    binaries: list[bytes] = []
    for chunk in chunks:
        server.receive_data(chunk)
        for e in server.events():
            if isinstance(e, TextMessage):
                texts.append(e.data)
                if e.message_finished:
                    out.messages.append("".join(texts))
                    texts = []
            elif isinstance(e, BytesMessage):
                binaries.append(bytes(e.data))
                if e.message_finished:
                    out.messages.append(b"".join(binaries))
                    binaries = []
            elif isinstance(e, Ping):
                out.pings.append(e.payload)
            elif isinstance(e, CloseConnection):
                out.close_code = e.code
                return out
    return out


def by_poolgate(chunks: list[bytes], max_message_size: int = framing.MAX_MESSAGE_SIZE
                ) -> Outcome:
    """What FrameReader makes of the chunks; its replies are read back by a wsproto client
    (pongs must carry the ping's payload, a close must echo the client's code)."""
    reader = FrameReader(max_message_size)
    out = Outcome([], None, [])
    replies: list[bytes] = []
    for chunk in chunks:
        messages, r = reader.feed(chunk)
        out.messages += messages
        replies += r
    out.close_code = reader.close_code
    client, _ = client_pair()
    client.receive_data(b"".join(replies))
    closes = []
    for e in client.events():
        if isinstance(e, Pong):
            out.pings.append(e.payload)
        elif isinstance(e, CloseConnection):
            closes.append(e.code)
    if reader.close_code is not None:  # exactly one close, last, with the right code
        assert closes == [reader.close_code] and replies[-1][0] == 0x88
    else:
        assert closes == []
    return out


def split(data: bytes, cuts: list[int]) -> list[bytes]:
    points = sorted({c % (len(data) + 1) for c in cuts})
    return [data[a:b] for a, b in zip([0, *points], [*points, len(data)])]


# -- property tests ---------------------------------------------------------------------

@st.composite
def client_stream(draw: st.DrawFn) -> bytes:
    """What a well-behaved client sends, written by wsproto's client: messages (text or
    binary, in 1 to 4 fragments, with pings and pongs between them), sometimes a close."""
    client, _ = client_pair()
    out = b""
    for _ in range(draw(st.integers(0, 6))):
        data: str | bytes = draw(st.one_of(st.text(max_size=300), st.binary(max_size=300)))
        n = draw(st.integers(1, 4))
        cuts = sorted(draw(st.lists(st.integers(0, len(data)), min_size=n - 1, max_size=n - 1)))
        for i, (a, b) in enumerate(zip([0, *cuts], [*cuts, len(data)])):
            piece: Message[Any] = Message(data=data[a:b], message_finished=i == n - 1)
            out += client.send(piece)
            if draw(st.integers(0, 3)) == 0:
                control = draw(st.sampled_from([Ping, Pong]))
                out += client.send(control(draw(st.binary(max_size=125))))
    if draw(st.booleans()):
        code = draw(st.one_of(st.sampled_from([1000, 1001, 1003, 1008, 1011]),
                              st.integers(3000, 4999)))
        out += client.send(CloseConnection(code=code, reason=draw(st.text(max_size=40))))
    return out


@FAST
@given(client_stream(), st.lists(st.integers(0, 1 << 16), max_size=8))
def test_what_a_client_sends_decodes_as_wsproto_decodes_it(data: bytes, cuts: list[int]) -> None:
    chunks = split(data, cuts)
    assert by_poolgate(chunks) == by_wsproto(chunks)


@FAST
@given(st.text(max_size=200), st.lists(st.integers(0, 800), max_size=6),
       st.lists(st.integers(0, 1 << 12), max_size=6))
def test_text_cut_into_fragments_inside_characters_decodes_as_in_wsproto(
        text: str, frag_cuts: list[int], cuts: list[int]) -> None:
    data = text.encode()
    pieces = split(data, frag_cuts)  # at any byte: a character may span fragments
    stream = b"".join(frame(T if i == 0 else C, piece, fin=i == len(pieces) - 1)
                      for i, piece in enumerate(pieces))
    chunks = split(stream, cuts)
    assert by_poolgate(chunks) == by_wsproto(chunks) == Outcome([text], None, [])


@st.composite
def any_frame(draw: st.DrawFn) -> bytes:
    """A frame that may break any rule RFC 6455 sets a server's reader."""
    op = draw(st.sampled_from([0, 1, 2, 8, 9, 10, 0, 1, 2, 3, 7, 11, 15]))
    if op == framing.OP_CLOSE and draw(st.booleans()):
        payload = close_payload(draw(st.one_of(
            st.integers(0, 5000), st.sampled_from([1004, 1005, 1006, 1012, 1013, 1014, 1015]))),
            draw(st.one_of(st.text(max_size=20).map(str.encode), st.binary(max_size=20))))
    elif op == framing.OP_TEXT or op == framing.OP_CONT and draw(st.booleans()):
        payload = draw(st.one_of(st.text(max_size=200).map(str.encode), st.binary(max_size=8)))
    else:
        payload = draw(st.binary(max_size=draw(st.sampled_from([1, 8, 130]))))
    rare = draw(st.integers(0, 19))  # one frame in four breaks a rule of its header
    return frame(op, payload, fin=rare != 1 and (op >= 8 or draw(st.booleans())),
                 rsv=draw(st.integers(1, 7)) if rare == 2 else 0, mask=rare != 3,
                 length=("16" if rare == 4 else "64" if rare == 5 else "min"))


@FAST
@given(st.lists(any_frame(), max_size=8), st.lists(st.integers(0, 1 << 12), max_size=6))
def test_frames_breaking_the_rules_end_as_they_end_in_wsproto(frames: list[bytes],
                                                               cuts: list[int]) -> None:
    """Same messages before it, and the same close code: 1002, 1007, or the client's."""
    chunks = split(b"".join(frames), cuts)
    mine, ref = by_poolgate(chunks), by_wsproto(chunks)
    assert (mine.messages, mine.close_code) == (ref.messages, ref.close_code)


@FAST
@given(st.binary(max_size=2000), st.lists(st.integers(0, 2000), max_size=6),
       st.sampled_from([200, 1000, 1 << 20]))
def test_random_bytes_only_ever_close_and_memory_stays_bounded(data: bytes, cuts: list[int],
                                                               cap: int) -> None:
    _fed_bounded(split(data, cuts), cap)


@FAST
@given(st.lists(any_frame(), max_size=8), st.lists(st.integers(0, 1 << 12), max_size=6),
       st.lists(st.tuples(st.integers(0, 1 << 12), st.integers(0, 255)), max_size=4))
def test_frames_with_bytes_changed_only_ever_close_and_stay_bounded(
        frames: list[bytes], cuts: list[int], flips: list[tuple[int, int]]) -> None:
    data = bytearray(b"".join(frames))
    for at, value in flips:
        if data:
            data[at % len(data)] = value
    _fed_bounded(split(bytes(data), cuts), 300)


def _fed_bounded(chunks: list[bytes], cap: int) -> None:
    """feed never raises; what the reader holds stays within its cap (one frame being read:
    a header of up to 14 bytes and what the message still has room for)."""
    reader = FrameReader(cap)
    for chunk in chunks:
        reader.feed(chunk)  # never raises
        held = sum(map(len, reader.fragments)) + sum(len(t.encode()) for t in reader.texts)
        assert held <= reader.fragments_size <= cap
        assert len(reader.buf) <= 14 + max(125, cap - reader.fragments_size)
        if reader.close_code is not None:
            assert not reader.buf and reader.feed(b"\x81") == ([], [])


# -- the Autobahn-style table -----------------------------------------------------------

def fragments(op: int, *parts: bytes) -> bytes:
    last = len(parts) - 1
    return b"".join(frame(op if i == 0 else framing.OP_CONT, p, fin=i == last)
                    for i, p in enumerate(parts))


HELLO = "Hello-µ@ßöäüàá-UTF-8!!".encode()
CASES: dict[str, bytes] = {
    # 1: text and binary messages of every length encoding
    **{f"1.1 text of {n}": frame(T, b"*" * n) for n in (0, 125, 126, 127, 128, 65535, 65536)},
    **{f"1.2 binary of {n}": frame(B, b"\xfe" * n) for n in (0, 125, 126, 65535, 65536)},
    "1.3 a length in 2 bytes that fits in 1": frame(T, b"x" * 5, length="16"),
    "1.3 a length in 8 bytes that fits in 2": frame(B, b"x" * 300, length="64"),
    "1.3 an 8-byte length with its top bit set": struct.pack("!BBQ", 0x82, 0xFF, 1 << 63) + MASK,
    # 2: pings and pongs
    "2.1 ping, empty": frame(PI),
    "2.2 ping of 125 bytes": frame(PI, bytes(range(125))),
    "2.3 ping of 126 bytes": frame(PI, b"x" * 126),
    "2.4 ping with binary payload": frame(PI, b"\x00\xff\xfe\xfd\xfc\xfb\x00\xff"),
    "2.5 unsolicited pong": frame(PO, b"unsolicited") + frame(T, b"after"),
    "2.6 a fragmented ping": frame(PI, b"a", fin=False) + frame(C, b"b"),
    "2.7 ten pings": frame(PI, b"x") * 10,
    # 3: reserved bits
    **{f"3.{r} RSV={r} on a text": frame(T, b"x", rsv=r) for r in range(1, 8)},
    "3.8 RSV on a ping": frame(PI, b"x", rsv=4),
    "3.9 RSV after a good frame": frame(T, b"ok") + frame(B, b"x", rsv=2),
    # 4: reserved opcodes
    **{f"4.{op} opcode {op}": frame(op, b"x") for op in (3, 4, 5, 6, 7, 11, 12, 13, 14, 15)},
    # 5: fragmentation
    "5.1 ping fragmented into 2": frame(PI, b"a", fin=False) + frame(C, b"b"),
    "5.2 pong fragmented into 2": frame(PO, b"a", fin=False) + frame(C, b"b"),
    "5.3 text in 2 fragments": fragments(T, b"frag", b"ment"),
    "5.4 text in 5, one empty": fragments(T, b"a", b"", b"b", b"c", b"d"),
    "5.5 binary in 3": fragments(B, b"\x00", b"\x01", b"\x02"),
    "5.6 a ping between fragments": (frame(T, b"frag", fin=False) + frame(PI, b"hi")
                                     + frame(C, b"ment")),
    "5.7 a pong between fragments": (frame(B, b"a", fin=False) + frame(PO) + frame(C, b"b")),
    "5.8 a close between fragments": (frame(T, b"a", fin=False) + frame(CL, close_payload(1000))
                                      + frame(C, b"b")),
    "5.9 a continuation with nothing to continue": frame(C, b"x"),
    "5.10 a final continuation with nothing to continue": frame(C, b"x", fin=False),
    "5.11 a text inside a fragmented text": frame(T, b"a", fin=False) + frame(T, b"b"),
    "5.12 a binary inside a fragmented text": frame(T, b"a", fin=False) + frame(B, b"b"),
    "5.13 an unfinished text inside a fragmented one": (frame(T, b"a", fin=False)
                                                        + frame(T, b"b", fin=False)),
    "5.14 an unmasked frame": frame(T, b"x", mask=False),
    "5.15 an unmasked frame after a good one": frame(T, b"ok") + frame(B, b"x", mask=False),
    # 6: UTF-8
    "6.1 valid: hello": frame(T, HELLO),
    "6.2 valid, split inside a character": fragments(T, HELLO[:7], HELLO[7:]),
    "6.3 valid, one byte per fragment": fragments(T, *(HELLO[i:i + 1] for i in range(len(HELLO)))),
    "6.4 invalid in the first fragment": (frame(T, b"\xce\xba\xe1\xbd\xb9\xcf\x83\xce\xbc\xce"
                                                b"\xb5\xed\xa0\x80", fin=False)
                                          + frame(C, b"edited")),
    "6.5 invalid, then a ping": (frame(T, b"\xed\xa0\x80x", fin=False) + frame(PI, b"p")
                                 + frame(C, b"x")),
    "6.6 a truncated character at the end": frame(T, b"abc\xe2\x82"),
    "6.7 a truncated character across the last fragment": fragments(T, b"ab\xe2", b"\x82"),
    "6.8 an overlong slash": frame(T, b"\xc0\xaf"),
    "6.9 a surrogate half": frame(T, b"\xed\xbf\xbf"),
    "6.10 beyond U+10FFFF": frame(T, b"\xf4\x90\x80\x80"),
    "6.11 a lone continuation byte": frame(T, b"\x80"),
    "6.12 U+FFFF and U+10FFFF (valid)": frame(T, "\uffff\U0010ffff".encode()),
    "6.13 0xFE": frame(T, b"\xfe"),
    # 7: closing
    "7.1 close, empty": frame(CL),
    "7.2 close, then text": frame(CL) + frame(T, b"after"),
    "7.3 close with a 1-byte payload": frame(CL, b"\x03"),
    "7.4 close with a reason": frame(CL, close_payload(1000, b"bye")),
    "7.5 close with 123 bytes of reason": frame(CL, close_payload(1000, b"*" * 123)),
    "7.6 close with 124 bytes of reason": frame(CL, close_payload(1000, b"*" * 124)),
    "7.7 close with an invalid UTF-8 reason": frame(CL, close_payload(1000, b"\xce\xba\xe1\xbd")),
    "7.8 two closes": frame(CL, close_payload(1001)) + frame(CL, close_payload(1000)),
    "7.9 text, close, ping": frame(T, b"x") + frame(CL) + frame(PI, b"p"),
    **{f"7.10 close code {c}": frame(CL, close_payload(c))
       for c in (1000, 1001, 1002, 1003, 1007, 1008, 1009, 1010, 1011, 1012, 1013,
                 3000, 3999, 4000, 4999,  # valid
                 0, 999, 1004, 1005, 1006, 1014, 1015, 1016, 1100, 2000, 2999, 5000, 65535)},
}


@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("bytewise", [False, True], ids=["whole", "bytewise"])
def test_autobahn_style_cases_end_as_in_wsproto(case: str, bytewise: bool) -> None:
    data = CASES[case]
    chunks = [data[i:i + 1] for i in range(len(data))] if bytewise else [data]
    assert by_poolgate(chunks) == by_wsproto(chunks)


def test_the_valid_close_codes_are_wsprotos() -> None:
    for code in range(0, 5100):
        _, server = client_pair()
        server.receive_data(frame(CL, close_payload(code)))
        (event,) = server.events()
        assert isinstance(event, CloseConnection)
        assert framing.valid_close_code(code) == (event.code == code), code


# 9: over the size cap (where wsproto, which has none, is no reference)
@pytest.mark.parametrize("data", [
    frame(T, b"x" * 1025),  # one frame
    fragments(B, b"x" * 1000, b"x" * 25),  # the fragment that passes the cap
    fragments(T, *([b"x" * 100] * 11)),
    struct.pack("!BBQ", 0x82, 0xFF, 1 << 40) + MASK,  # a header announcing 1 TiB, alone
], ids=["frame", "second-fragment", "eleven-fragments", "header-alone"])
def test_a_message_over_the_cap_fails_with_1009_from_its_header(data: bytes) -> None:
    reader = FrameReader(1024)
    messages, replies = reader.feed(data[:-1] if len(data) > 14 else data)
    assert messages == [] and reader.close_code == framing.MESSAGE_TOO_BIG
    assert not reader.buf and reader.fragments_size == 0
    client, _ = client_pair()
    client.receive_data(b"".join(replies))
    assert [e.code for e in client.events() if isinstance(e, CloseConnection)] == [1009]


def test_a_message_of_exactly_the_cap_passes() -> None:
    reader = FrameReader(1024)
    assert reader.feed(fragments(B, b"x" * 1000, b"y" * 24) + frame(T, b"z" * 1024)) == (
        [b"x" * 1000 + b"y" * 24, "z" * 1024], [])
    assert reader.close_code is None

