"""The kernel side of one client session, and when it is ready for the client's messages.

A session's readiness is a small state table, in the manner of h11's ``_state.py``: the table
is the documentation, and a move it does not list raises :class:`InvalidTransition`.

::

    WAITING → NUDGING   nudge: kernel_info goes out as soon as shell and iopub are up
    NUDGING → NUDGING   nudge again: nothing came on iopub yet
    NUDGING → READY     the first message on iopub after a nudge
    any     → WAITING   hold: a restart began, or the channels closed; and READY → WAITING
                        for a new process at the same place (renudge)

WAITING holds the client's frames; READY sends them (what was held first).

A kernel's XPUB takes in a subscription only when it next looks at its commands, so without
the nudge the first output of a cell could go to nobody; that is why nothing goes to the
kernel before READY.
"""
from __future__ import annotations

import collections
import enum
import hashlib
import os
import threading
import time
from typing import Any

from ...workers import jmsg
from ...workers.protocol import ConnectionInfo
from .. import wire, zmtp
from .connection import Connection

DEALERS = ("shell", "control", "stdin")
NUDGE_FIRST = 0.02  # a nudge that brought nothing on iopub is sent again after this...
NUDGE_EVERY = 0.25  # ...doubling up to this
# A kernel busy when the session connects answers a nudge on shell only after its cell (the
# request waits behind it); the control nudge answers at once. The shell nudge is sent too
# once this long has passed with nothing on iopub (a kernel that does not answer on control).
BUSY_SHELL_NUDGE = 5.0
# A nudge's own messages (its reply, then its busy and idle on iopub) are kept from the client.
# Its id is remembered until its reply came and this long after (the busy and idle trail it),
# or, for a control nudge the kernel never answered, this long after the session was ready. A
# shell nudge waits behind a running cell, however long: its id stays until it is answered.
NUDGE_TRAIL = 3.0
NUDGES_KEPT = 64  # ids remembered at most (the oldest go first)


class Readiness(enum.Enum):
    WAITING = "waiting"
    NUDGING = "nudging"
    READY = "ready"


W, N, R = Readiness.WAITING, Readiness.NUDGING, Readiness.READY
#: Each state's allowed next states.
TRANSITIONS: dict[Readiness, frozenset[Readiness]] = {
    W: frozenset({W, N}),     # hold again (channels closed twice, a restart while waiting); nudge
    N: frozenset({N, W, R}),  # nudge again; hold (restart, closed); iopub confirmed
    R: frozenset({W}),        # hold: restart, channels closed, new process (renudge)
}


class InvalidTransition(RuntimeError):
    """A move the readiness table does not allow: a bug in the pump, never the client's doing."""


def advance(current: Readiness, new: Readiness) -> Readiness:
    """``new`` if the table allows moving there from ``current``; else InvalidTransition."""
    if new not in TRANSITIONS[current]:
        raise InvalidTransition(f"session readiness cannot go from {current.value} to "
                                f"{new.value}")
    return new


class KernelSession:
    """The kernel side of one client session on one kernel: its channels (gateway/zmtp.py)."""

    def __init__(self, kid: str, session_id: str, gateway: str = "") -> None:
        self.kid = kid
        self.session_id = session_id
        self.gateway = gateway  # this gateway's instance id: part of the ZMQ identity
        self.sockets: dict[str, zmtp.Peer] = {}
        self.epoch = 0  # counts changes of ``sockets``: the pump polls a new set
        self.conn_info: ConnectionInfo | None = None
        self.signer: jmsg.Signer | None = None
        self.generation = -1
        self.owner: Connection | None = None
        self.released = threading.Event()
        self.released.set()
        # Frames from clients, with the connection that sent them (None: the owner).
        self.inbox: collections.deque[tuple[Connection | None, str | bytes]] = collections.deque()
        self.parked: list[Connection] = []  # replaced connections still open (Bridge._park)
        self.senders: dict[str, Connection] = {}  # the connection each request came from
        self.events: collections.deque[dict[str, Any]] = collections.deque()
        self.held: list[tuple[str, list[bytes], list[bytes]]] = []
        self.readiness = Readiness.WAITING
        # What the client was told, not readiness: a restart after a death was announced, so
        # the kernel's coming back is announced too (Pump._became_ready).
        self.restarted = False
        # Nudges out: msg_id -> (channel, when it is forgotten; inf until answered).
        self.nudges: dict[str, tuple[str, float]] = {}
        self.nudge_sent = 0.0  # 0: none sent to this kernel process yet
        self.nudge_every = NUDGE_FIRST
        self.shell_nudge_from = 0.0  # monotonic time from which nudges go on shell too
        self.detached_at: float | None = None
        self.kept_bytes = 0  # read by the keeper since the client went (Bridge._keep_once)
        self.gone = False
        self.resume: dict[str, Any] | None = None  # what another gateway delivered, to replay
        self.replayed: set[str] = set()
        # Cells a lost gateway sent for this session whose reply went to it: rebuilt from their
        # iopub here (execute_request id -> parent header, execution_count, error).
        self.orphans: dict[str, dict[str, Any]] = {}
        self.last_iopub: str | None = None
        # Requests whose reply the client got and whose status idle it did not yet: all a replay
        # needs (an idle it got lies before the replay's start); usually one or none.
        self.replied: collections.deque[str] = collections.deque(maxlen=16)
        self.seen_dirty = False  # what the client got changed since it was last recorded
        self.keep_lock = threading.Lock()  # held by Bridge._keep while it reads the channels
        self._r, self._w = os.pipe()
        os.set_blocking(self._r, False)
        os.set_blocking(self._w, False)
        # close() and wake() under one lock: a wake from a thread that picked this session
        # just before it was dropped must not write to its pipe's number once that is closed
        # (the number may be a kernel connection by then, and the byte would corrupt it)
        self._pipe_lock = threading.Lock()

    def wake(self) -> None:
        with self._pipe_lock:
            if self._w < 0:
                return
            try:
                os.write(self._w, b"x")
            except (BlockingIOError, OSError):
                pass

    def drain_wake(self) -> None:
        try:
            while os.read(self._r, 4096):
                pass
        except (BlockingIOError, OSError):
            pass

    # -- ZMQ sockets ----------------------------------------------------------------------

    def connect(self, info: ConnectionInfo, generation: int) -> None:
        self.close_sockets()
        # One per gateway and session: two replicas holding one session (a client that moved, a
        # socket Jupyter Server left open) must not share an identity, or the kernel's ROUTER
        # hands it to the last to connect and the other's requests go unanswered. Replies a lost
        # gateway's requests get are rebuilt from iopub (``orphans``).
        ident = hashlib.sha1(f"{self.kid}:{self.session_id}:{self.gateway}".encode()
                             ).hexdigest().encode()
        for ch in DEALERS:
            self.sockets[ch] = zmtp.Peer(info.url(ch), b"DEALER", ident, ch)
        self.sockets["iopub"] = zmtp.Peer(info.url("iopub"), b"SUB", name="iopub")
        self.epoch += 1
        self.conn_info = info
        self.signer = jmsg.Signer(info.key, info.signature_scheme)
        self.generation = generation
        self.renudge()

    @property
    def ready(self) -> bool:
        """iopub is confirmed: client frames go straight to the kernel."""
        return self.readiness is Readiness.READY

    @property
    def nudging(self) -> bool:
        """A kernel_info nudge is out (or due) and nothing has come on iopub yet."""
        return self.readiness is Readiness.NUDGING

    def advance(self, new: Readiness) -> None:
        """Move to ``new``; InvalidTransition if the table does not allow it."""
        self.readiness = advance(self.readiness, new)

    def hold(self) -> None:
        """Client frames wait from now on (a restart began, or the channels closed)."""
        self.advance(Readiness.WAITING)

    def became_ready(self) -> bool:
        """The first message on iopub after a nudge: True if that made the session ready
        (False when it was not waiting for one)."""
        if self.readiness is not Readiness.NUDGING:
            return False
        self.advance(Readiness.READY)
        trail = time.monotonic() + NUDGE_TRAIL
        for msg_id, (channel, when) in list(self.nudges.items()):
            if channel != "shell" and when > trail:
                self._remember(msg_id, channel, trail)
        return True

    def renudge(self) -> None:
        """A new kernel process (or new channels): its iopub must be confirmed again."""
        if self.readiness is Readiness.READY:
            self.hold()
        self.nudges.clear()
        self.nudge_sent = 0.0
        self.nudge_every = NUDGE_FIRST
        self.shell_nudge_from = 0.0

    def close_sockets(self) -> None:
        for s in self.sockets.values():
            s.close()
        self.sockets.clear()
        self.epoch += 1
        self.hold()

    def close(self) -> None:
        self.close_sockets()
        with self._pipe_lock:
            for fd in (self._r, self._w):
                if fd < 0:
                    continue  # closed already
                try:
                    os.close(fd)
                except OSError:
                    pass
            self._r = self._w = -1  # a second close() closes nothing (see wake())

    def nudge(self, busy: bool = False) -> None:
        """Ask for kernel_info so the first iopub message proves the subscription is live.

        Sent once the shell and iopub connections are both up (asked earlier, the kernel may
        answer before it has our subscription), and again while nothing came on iopub: soon at
        first, then less often. The kernel's XPUB takes a new subscription in only when it
        next looks at its commands, which may be after it published its answer; a warm kernel
        answers within a millisecond, and waiting a full NUDGE_EVERY for the second try made
        its hand-over take 0.28 s instead of 0.03 s.

        It goes on control as well as shell: ipykernel answers kernel_info on its control
        thread while a cell runs, so a client that connects to a busy kernel (a second tab,
        JupyterLab's subshell console) is not held until the cell ends. ``busy`` (the
        registry's execution state when the session connected): the shell nudge, which would
        wait behind the cell and be answered after the session stopped looking for it, waits
        BUSY_SHELL_NUDGE first."""
        self.advance(Readiness.NUDGING)
        shell, iopub = self.sockets.get("shell"), self.sockets.get("iopub")
        if shell is None or iopub is None or not (shell.ready and iopub.ready):
            return  # the pump asks again after the handshakes
        assert self.signer is not None
        now = time.monotonic()
        if busy:
            self.shell_nudge_from = now + BUSY_SHELL_NUDGE
        if self.nudge_sent:
            self.nudge_every = min(self.nudge_every * 2, NUDGE_EVERY)
        control = self.sockets.get("control")
        for channel, peer in (("control", control),
                              ("shell", shell if now >= self.shell_nudge_from else None)):
            if peer is not None and peer.ready:
                msg_id, frames = jmsg.build(self.signer, "kernel_info_request", {},
                                            self.session_id)
                self._remember(msg_id, channel, float("inf"))
                peer.send(frames)
        self.nudge_sent = now

    def nudge_due(self, now: float) -> bool:
        return self.nudging and (not self.nudge_sent or now - self.nudge_sent > self.nudge_every)

    def _remember(self, msg_id: str, channel: str, forget_at: float) -> None:
        self.nudges.pop(msg_id, None)
        self.nudges[msg_id] = (channel, forget_at)
        while len(self.nudges) > NUDGES_KEPT:
            del self.nudges[next(iter(self.nudges))]

    def is_nudge(self, channel: str, parts: list[bytes]) -> bool:
        """Whether a message from the kernel answers one of this session's nudges (it is
        not the client's). Most messages answer none: their parent header is searched for the
        ids as bytes before it is parsed. A nudge's reply starts its NUDGE_TRAIL."""
        if not self.nudges:
            return False
        now = time.monotonic()
        for sent, (_, when) in list(self.nudges.items()):  # a few at most
            if when <= now:
                del self.nudges[sent]
        parent = parts[1]
        if not any(m.encode() in parent for m in self.nudges):
            return False
        msg_id = wire.json_part(parent).get("msg_id")
        if msg_id not in self.nudges:
            return False
        sent_on, when = self.nudges[msg_id]
        if channel == sent_on and when == float("inf"):
            self._remember(msg_id, sent_on, now + NUDGE_TRAIL)
        return True

    def delivered(self, channel: str, head: dict[str, Any], pid: str) -> None:
        """A message reached the client: an execute's reply, or iopub up to ``head``; an idle
        for a replied request ends what a replay must know of it."""
        if channel == "iopub":
            self.last_iopub = head.get("msg_id")
            if pid and pid in self.replied:
                self.replied.remove(pid)
        elif channel == "shell":
            self.replied.append(pid)
        else:
            return
        self.seen_dirty = True

    def to_kernel(self, channel: str, parts: list[bytes], buffers: list[bytes]) -> None:
        assert self.signer is not None
        self.sockets[channel].send(jmsg.frames(self.signer, parts, buffers))
