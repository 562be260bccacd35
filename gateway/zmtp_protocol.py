"""ZMTP 3.0 (RFC 23, NULL security) for one DEALER or SUB end, with no I/O: bytes in, whole
messages out; messages in, bytes out (as h11 does HTTP/1.1).

The module's rule: nothing here touches a socket or a clock, and whatever bytes it is fed,
:meth:`Connection.receive_data` returns messages or raises :class:`ZmtpError`. Memory is
bounded: a frame over ``max_frame`` bytes, or a message whose long frames (256 bytes and up)
pass ``max_message``, fails from the frame's header, before it is buffered; a message of more
than ``max_frames`` frames fails at the end of the call that passed it. So a connection holds
at most ``max_message + 255 * max_frames`` bytes of a message, the frame being received (up to
``max_frame``) and one call's data. Counting
short frames one by one, in the parser's inner loop, cost 3% of its time (bench.protocol_micro).
The socket, the reconnecting and the queueing live in gateway/zmtp.py's Peer.

The handshake is the table :data:`HANDSHAKE`: what may come in each :class:`State` and the
state it leads to; anything else fails the connection. We announce version 3.0, so that a
libzmq publisher takes our subscription as a message (0x01 + topic), yet answer the PING
command of ZMTP 3.1 (RFC 37) with a PONG: libzmq sends PINGs to a 3.0 peer too when the
kernel's socket has ZMQ_HEARTBEAT_IVL set, and drops a peer that sends nothing back in time.
"""
from __future__ import annotations

import enum
import struct

SIGNATURE = b"\xff" + b"\0" * 8 + b"\x7f"
GREETING_SIZE = 64
MORE, LONG, COMMAND = 0x01, 0x02, 0x04
# The peer socket types each of ours may talk to (RFC 28, RFC 29).
PEERS = {b"DEALER": (b"ROUTER", b"DEALER"), b"SUB": (b"PUB", b"XPUB")}
MAX_FRAME = MAX_MESSAGE = 1 << 30  # a kernel's output can be large; a corrupt length is not
MAX_FRAMES = 1 << 16  # frames in one message (a Jupyter message has 6 and its buffers)
_LONG_HEAD = struct.Struct("!BQ")
_U32 = struct.Struct("!I")


class ZmtpError(ValueError):
    """The peer does not speak ZMTP 3 as this end does; the connection is dropped.

    ``messages``: those completed by the same :meth:`Connection.receive_data` before the error.
    """

    messages: list[list[bytes]] = []


class State(enum.Enum):
    GREETING = "greeting"  # waiting for the peer's 64-byte greeting
    HANDSHAKE = "handshake"  # greeted: waiting for its READY
    OPEN = "open"  # messages flow both ways
    FAILED = "failed"  # a ZmtpError was raised: the connection must be dropped


GREETED, MESSAGE, OTHER = b"<greeting>", b"<message>", b"<other command>"
#: (state, what came) → the next state. What came: the greeting, a message, or a command by
#: name (OTHER: a command this end does not know, from a later ZMTP). A pair that is not here
#: fails the connection: a message or PING before READY, a second READY, an ERROR anywhere.
#: (OPEN, MESSAGE) is the parser's fast path, taken without a look here.
HANDSHAKE: dict[tuple[State, bytes], State] = {
    (State.GREETING, GREETED): State.HANDSHAKE,
    (State.HANDSHAKE, b"READY"): State.OPEN,
    (State.OPEN, MESSAGE): State.OPEN,
    (State.OPEN, b"PING"): State.OPEN,  # answered with a PONG
    (State.OPEN, b"PONG"): State.OPEN,
    (State.OPEN, OTHER): State.OPEN,  # ignored
}
_KNOWN = {name for _, name in HANDSHAKE} | {b"ERROR"}


def greeting() -> bytes:
    """Our greeting: version 3.0 (so a libzmq peer takes subscriptions as messages), NULL."""
    return SIGNATURE + b"\x03\x00" + b"NULL".ljust(20, b"\0") + b"\0" + b"\0" * 31


def frame_head(size: int, flags: int) -> bytes:
    if size < 256:
        return bytes((flags, size))
    return _LONG_HEAD.pack(flags | LONG, size)


def command_frame(name: bytes, data: bytes = b"") -> bytes:
    """A command frame: ``name`` then ``data`` (RFC 23, RFC 37)."""
    body = bytes((len(name),)) + name + data
    return frame_head(len(body), COMMAND) + body


def command(name: bytes, props: dict[bytes, bytes]) -> bytes:
    """A command frame whose data are properties (READY's metadata)."""
    return command_frame(name, b"".join(
        bytes((len(k),)) + k + _U32.pack(len(v)) + v for k, v in props.items()))


def parse_command(body: bytes) -> tuple[bytes, bytes]:
    """(name, data) of a command frame's body."""
    if not body or body[0] > len(body) - 1:
        raise ZmtpError("a command frame cut short in its name")
    return body[1:1 + body[0]], body[1 + body[0]:]


def parse_properties(data: bytes) -> dict[bytes, bytes]:
    """READY's properties, names in lower case (RFC 23 says they are case-insensitive)."""
    props, pos, end = {}, 0, len(data)
    while pos < end:
        n = data[pos]
        if end - pos < 1 + n + 4:
            raise ZmtpError("a READY property cut short")
        key = data[pos + 1:pos + 1 + n]
        (size,) = _U32.unpack_from(data, pos + 1 + n)
        pos += 1 + n + 4
        if end - pos < size:
            raise ZmtpError("a READY property's value cut short")
        props[key.lower()] = data[pos:pos + size]
        pos += size
    return props


def encode(frames: list[bytes]) -> list[bytes]:
    """The wire parts of one message: a head before each frame (for one sendmsg)."""
    out: list[bytes] = []
    last = len(frames) - 1
    for i, f in enumerate(frames):
        out.append(frame_head(len(f), MORE if i < last else 0))
        out.append(f)
    return out


class Connection:
    """The protocol state of one connection: a DEALER (``identity`` announced) or a SUB
    (subscribed to everything once the peer is ready).

    :meth:`start` gives the bytes that open the connection, :meth:`receive_data` takes what
    came and returns the whole messages in it, :meth:`send` encodes one. Bytes this end owes
    the peer in answer (the subscription after READY, a PONG for each PING) collect in
    :attr:`outgoing`; the owner writes and clears them after each :meth:`receive_data`.
    """

    def __init__(self, kind: bytes, identity: bytes = b"", *, max_frame: int = MAX_FRAME,
                 max_message: int = MAX_MESSAGE, max_frames: int = MAX_FRAMES) -> None:
        if kind not in PEERS:
            raise ValueError(f"unsupported socket type {kind!r}")
        if max_frame < 255 or max_message < max_frame or max_frames < 1:
            raise ValueError("max_frame must be >= 255 and max_message >= max_frame")
        self.kind, self.identity = kind, identity
        self.max_frame, self.max_message, self.max_frames = max_frame, max_message, max_frames
        self.state = State.GREETING
        self.outgoing: list[bytes] = []
        self.rbuf = bytearray()  # bytes of a header, command or greeting not yet whole
        self.need = 0  # how long rbuf must grow before it is parsed again
        # The body of a long message frame not yet whole, as the chunks that came: joined once
        # when the last one comes (a kernel's 50 MB of output is copied once, not three times)
        self.body: list[bytes] = []
        self.body_flags = 0
        self.body_left = 0  # bytes of it still to come
        self.parts: list[bytes] = []  # frames of the message being received
        # Bytes the message being received may still take in long frames (256 bytes and more,
        # counted from their header); its short frames are bounded by max_frames.
        self.room = max_message

    def start(self) -> bytes:
        """What this end says first: its greeting and its READY."""
        props = {b"Socket-Type": self.kind}
        if self.kind == b"DEALER":
            props[b"Identity"] = self.identity
        return greeting() + command(b"READY", props)

    def send(self, frames: list[bytes]) -> list[bytes]:
        """The wire parts of one message (after the handshake: Peer queues what comes before)."""
        if self.state is not State.OPEN:
            raise ZmtpError(f"cannot send while the connection is {self.state.value}")
        return encode(frames)

    def receive_data(self, data: bytes) -> list[list[bytes]]:
        """The whole messages completed by ``data`` (what the socket gave), each a list of
        frames; commands are handled here. Raises ZmtpError, and nothing else, on bad input."""
        if self.state is State.FAILED:
            raise ZmtpError("the connection has failed")
        messages: list[list[bytes]] = []
        pos = 0
        buf = self.rbuf
        if self.body_left:  # (then rbuf is empty: the body began where the data ended)
            try:
                pos = self._take_body(data, messages)
            except ZmtpError as exc:
                self._failed(exc, messages)
                raise
            if pos == len(data):
                return messages
        elif buf:
            buf += data
            if len(buf) < self.need:  # the frame begun is not whole yet: parse it once it is
                return []
            data = bytes(buf)
            buf.clear()
        try:
            used = self._parse(data, messages, pos)
        except ZmtpError as exc:
            self._failed(exc, messages)
            raise
        except (IndexError, struct.error, ValueError) as exc:  # not expected: a bug, yet the
            error = ZmtpError(f"malformed input ({exc!r})")  # promise is ZmtpError
            self._failed(error, messages)
            raise error from exc
        if used < len(data):
            buf += memoryview(data)[used:]
        return messages

    @property
    def held(self) -> int:
        """Bytes held of frames not yet whole."""
        return len(self.rbuf) + sum(map(len, self.body))

    def _failed(self, exc: ZmtpError, messages: list[list[bytes]]) -> None:
        self.state, self.parts, exc.messages = State.FAILED, [], messages
        self.rbuf.clear()
        self.body, self.body_left = [], 0

    def _take_body(self, data: bytes, messages: list[list[bytes]]) -> int:
        """Add what ``data`` holds of the long frame being received; once it is whole, take
        it as :meth:`_parse` takes a frame. Returns how many bytes of ``data`` were used."""
        n = self.body_left
        if len(data) < n:
            self.body.append(data)
            self.body_left -= len(data)
            return len(data)
        self.body.append(data[:n])  # all of data, not copied, when the frame ends with it
        body = b"".join(self.body)
        self.body, self.body_left = [], 0
        self.parts.append(body)
        if not self.body_flags & MORE:
            messages.append(self.parts)
            self.parts, self.room = [], self.max_message
        elif len(self.parts) > self.max_frames:
            raise ZmtpError(f"a message of over {self.max_frames} frames")
        return n

    def _parse(self, data: bytes, messages: list[list[bytes]], pos: int = 0) -> int:
        """Take whole frames from ``data`` (from ``pos`` on) into ``messages``; return how far
        ``data`` was used, and set ``need`` to how many bytes the rest must reach before a
        frame can be taken from it (or begin the body of a long frame that is not whole)."""
        end = len(data)
        self.need = 0
        if self.state is State.GREETING:
            if end < GREETING_SIZE:
                check_greeting(data)
                self.need = GREETING_SIZE
                return 0
            self._greeted(data[:GREETING_SIZE])
            pos = GREETING_SIZE
        is_open = self.state is State.OPEN
        parts, room = self.parts, self.room
        while pos < end:
            flags = data[pos]
            if flags & LONG:
                if end - pos < 9:
                    break
                size = int.from_bytes(data[pos + 1:pos + 9], "big")
                start = pos + 9
                if size > self.max_frame:
                    raise ZmtpError(f"a frame of {size} bytes (at most {self.max_frame})")
                if not flags & COMMAND:  # counted from its header, before it is buffered
                    room -= size
                    if room < 0:
                        raise ZmtpError(f"a message over {self.max_message} bytes")
            else:
                if end - pos < 2:
                    break
                size = data[pos + 1]
                start = pos + 2
            if end - start < size:
                if is_open and flags & 0xFC == 0 and size > 255:  # a long message frame
                    self.body, self.body_flags = [data[start:]], flags
                    self.body_left = size - (end - start)
                    pos = end  # its size was counted against room from its header
                    break
                self.need = start + size - pos
                if flags & LONG and not flags & COMMAND:
                    room += size  # counted again when the frame is whole
                break
            body = data[start:start + size]
            pos = start + size
            if flags & 0xFC or not is_open:  # a command, reserved bits, or not open yet
                self._other(flags, body)
                is_open = self.state is State.OPEN
                continue
            parts.append(body)
            if not flags & MORE:
                messages.append(parts)
                parts, room = [], self.max_message
        # Frames are counted here, not one by one: a message completed within one call is
        # bounded by that call's data, one still being received by max_frames.
        if len(parts) > self.max_frames:
            raise ZmtpError(f"a message of over {self.max_frames} frames")
        self.parts, self.room = parts, room
        return pos

    def _greeted(self, data: bytes) -> None:
        check_greeting(data)
        if data[10] < 3:
            raise ZmtpError("the peer does not speak ZMTP 3")
        if data[12:32].rstrip(b"\0") != b"NULL":
            raise ZmtpError("the peer asks for a security mechanism other than NULL")
        self._event(GREETED)

    def _event(self, what: bytes) -> None:
        """Move to the state the table gives for ``what`` in this one, or fail."""
        nxt = HANDSHAKE.get((self.state, what if what in _KNOWN else OTHER))
        if nxt is None:
            raise ZmtpError(f"{what.decode(errors='replace')!r} is not expected while the "
                            f"connection is {self.state.value}")
        self.state = nxt

    def _other(self, flags: int, body: bytes) -> None:
        """A frame off the fast path: a command, reserved flags, a message before READY."""
        if flags & 0xF8:
            raise ZmtpError(f"reserved frame flags {flags:#x}")
        if not flags & COMMAND:
            self._event(MESSAGE)  # not open: fails
            return
        if flags & MORE:
            raise ZmtpError("a command frame with the MORE flag")
        name, data = parse_command(body)
        if name == b"ERROR":
            reason = data[1:1 + data[0]] if data else b""
            raise ZmtpError(f"the peer refused: {reason.decode(errors='replace')}")
        self._event(name)
        if name == b"READY":
            kind = parse_properties(data).get(b"socket-type", b"")
            if kind not in PEERS[self.kind]:
                raise ZmtpError(f"a {self.kind.decode()} cannot talk to a "
                                f"{kind.decode(errors='replace')!r}")
            if self.kind == b"SUB":  # ZMTP 3.0: a subscription is a message, 0x01 then the topic
                self.outgoing += encode([b"\x01"])
        elif name == b"PING":  # TTL (2 bytes), then a context of up to 16 to send back
            if len(data) < 2:
                raise ZmtpError("a PING without its TTL")
            self.outgoing.append(command_frame(b"PONG", data[2:18]))


def check_greeting(data: bytes) -> None:
    """Raise ZmtpError as soon as (the start of) a greeting is not ZMTP 3's signature."""
    if data[:1] and data[0] != 0xFF or len(data) >= 10 and data[9] != 0x7F:
        raise ZmtpError("not a ZMTP peer")
