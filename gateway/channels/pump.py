"""The pump: one thread per client WebSocket moves frames between it and the kernel.

:class:`Pump` runs in the WebSocket handler's thread for as long as its connection owns the
session (gateway/channels/bridge.py hands the session over): one poll over the client's socket,
the kernel's ZMTP connections (gateway/zmtp.py) and the session's wake-up pipe, in both
directions. Only the pump touches them, so sends are serialised, and a message crossing the
gateway wakes one thread, not two.

* Frames from the client wait in the session (``held``) until it is READY
  (gateway/channels/session.py), then go to the kernel in order.
* Frames to the client go out in batches (:class:`Outbox`), and are recorded as delivered (for
  a replay by another gateway, gateway/channels/replay.py) only once written.
* Replies go back to the connection that asked, even one parked since; output goes to every
  connection of the session.
"""
from __future__ import annotations

import logging
import select
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import redis
from simple_websocket import ConnectionClosed

from ...workers import jmsg
from ...workers.reconcile import SILENT_STATES
from .. import wire, zmtp
from . import replay
from .connection import Connection
from .session import KernelSession

if TYPE_CHECKING:
    from ..kernels import KernelService

log = logging.getLogger(__name__)
STARTING_STATUS_EVERY = 10.0
LIVENESS_EVERY = 5.0
IDLE_WAKE = 5.0  # longest an idle pump sleeps (it wakes at once for anything it must do)
SILENT_NAMES = frozenset(s.value for s in SILENT_STATES)  # states whose heartbeat is checked
BATCH_BYTES = 65536  # a frame this big is sent at once, not held for the rest of the batch
# After relaying small stream output, wait this long before looking again, so that what the
# kernel prints next comes in a batch: one wake-up, poll, read and write for many messages, not
# for each (issue 24). Big frames, and anything that is not stream output, go on at once.
STREAM_LINGER = 0.001


class Outbox:
    """Frames from the kernel for the session's owner, sent together; what they were is
    recorded for other gateways (``last_iopub``, ``replied``) only once they are sent, so a
    gateway dying with frames still here never counts them as delivered."""

    def __init__(self, conn: Connection, sess: KernelSession) -> None:
        self.conn, self.sess = conn, sess
        self.frames: list[wire.Frame] = []
        self.marks: list[tuple[str, dict[str, Any], str]] = []

    def add(self, frame: wire.Frame, channel: str, head: dict[str, Any], pid: str) -> None:
        self.frames.append(frame)
        self.marks.append((channel, head, pid))

    def flush(self) -> None:
        if not self.frames:
            return
        frames, marks, self.frames, self.marks = self.frames, self.marks, [], []
        sess = self.sess

        def written() -> None:
            for channel, head, pid in marks:
                sess.delivered(channel, head, pid)

        self.conn.send_many(frames, written)  # raises if the client went: nothing delivered


class Pump:
    """Relays between one connection and the session it owns, until either goes."""

    def __init__(self, conn: Connection, sess: KernelSession, service: KernelService,
                 gone_for_good: Callable[[str], bool]) -> None:
        self.conn, self.sess = conn, sess
        self.service = service
        self.registry = service.registry
        self.gone_for_good = gone_for_good  # Bridge.gone_for_good: is the kernel deleted?
        self.streamed = False  # stream output was relayed since the pump last looked

    def _status(self, state: str) -> None:
        conn, sess = self.conn, self.sess
        parts, bufs = wire.status_message(state, sess.session_id)
        conn.send(wire.to_client("iopub", parts, bufs, conn.protocol))

    def run(self) -> None:
        """Relay until the client goes, is evicted, or the kernel is gone."""
        conn, sess = self.conn, self.sess
        last_starting = 0.0
        last_check = time.monotonic()
        poller, polled = select.poll(), None
        kernel: dict[int, zmtp.Peer] = {}  # the kernel's channels by their socket's fd
        due: set[zmtp.Peer] = set()  # channels holding messages not yet relayed
        client = conn.fileno()
        try:
            self._sync(initial=True)
        except redis.RedisError as exc:  # the loop tries again while there are no sockets
            log.warning("Kernel %s: registry unreachable (%s)", sess.kid, exc)
        self._handle_inbox()  # frames that came while the session was being attached
        while not (conn.closed or conn.evicted or sess.gone):
            # What to poll: a channel's socket changes when it reconnects, and asks for
            # POLLOUT while it has bytes to write; so does the client's socket.
            peers = list(sess.sockets.values())
            wanted = (sess.epoch, conn.pending != [], *((p.fileno(), p.wanted()) for p in peers))
            if wanted != polled:
                if wanted[0] != (polled or (None,))[0]:  # new channels, or kept ones (_keep)
                    due = {p for p in peers if p.inbox}
                poller = select.poll()
                poller.register(sess._r, select.POLLIN)
                poller.register(client, select.POLLIN | (select.POLLOUT if conn.pending else 0))
                kernel = {}
                for p in peers:
                    if p.sock is not None:
                        kernel[p.fileno()] = p
                        poller.register(p.fileno(), p.wanted())
                polled = wanted
            if due:
                timeout = 0.0
            elif self.streamed:  # a burst of output: let the next messages gather
                self.streamed = False
                time.sleep(STREAM_LINGER)
                timeout = 0.0
            else:
                timeout = self._idle_timeout(last_check)
                retry = min((p.retry_at for p in peers if p.retry_at is not None), default=None)
                if retry is not None:
                    timeout = max(0.0, min(timeout, retry - time.monotonic()))
            for fd, ev in poller.poll(timeout * 1000):
                if fd == client:
                    if ev & select.POLLOUT:
                        conn.flush()
                    if ev & ~select.POLLOUT:
                        sess.inbox.extend((None, f) for f in conn.read())
                        self._handle_inbox()
                elif fd == sess._r:
                    sess.drain_wake()
                    self._handle_events()
                    self._handle_inbox()
                elif fd in kernel:
                    peer = kernel[fd]
                    peer.handle(ev)
                    if peer.inbox:
                        due.add(peer)
            due = self._read_kernel(due)
            now = time.monotonic()
            for p in peers:
                if p.retry_at is not None:
                    p.tick(now)
            conn.ping(now)
            if sess.nudge_due(now):
                sess.nudge()
            try:
                if not sess.sockets:
                    self._sync()
                    if now - last_starting > STARTING_STATUS_EVERY and not sess.gone:
                        last_starting = now
                        self._status("starting")
                elif now - last_check > LIVENESS_EVERY:
                    last_check = now
                    self._check_alive()
            except redis.RedisError as exc:  # a registry blip must not cut the client off
                log.warning("Kernel %s: registry unreachable (%s)", sess.kid, exc)

    def _idle_timeout(self, last_check: float) -> float:
        """How long the pump may sleep when nothing is waiting to be relayed.

        An idle session sleeps until its next liveness check or ping: everything else wakes
        the pump (frames, the session's wake pipe). Waking every second, 2,000 idle sockets
        cost a gateway about a third of a core (issue 24)."""
        conn, sess = self.conn, self.sess
        if sess.nudging:
            return sess.nudge_every if sess.nudge_sent else 1.0
        if not sess.sockets:  # waiting for the kernel to run: look again every second
            return 1.0
        now = time.monotonic()
        wake = min(IDLE_WAKE, last_check + LIVENESS_EVERY - now)
        if conn.ws.ping_interval:
            wake = min(wake, conn.next_ping - now)
        return max(0.0, wake) + 0.01  # past the moment, so the check it waits for is due

    def _check_alive(self) -> None:
        """A kernel whose worker vanished is declared dead (the event then tells the session).

        Asked every LIVENESS_EVERY for every session: the usual answer (running, beating) costs
        one round trip of two commands; only another answer reads the whole record."""
        sess = self.sess
        status, beating = self.registry.liveness(sess.kid)
        if beating and status in SILENT_NAMES:
            return
        rec = self.registry.get(sess.kid)
        if rec is None:
            sess.gone = self.gone_for_good(sess.kid)
        elif self.service.check_alive(rec) is None:
            sess.gone = True

    def _sync(self, initial: bool = False) -> None:
        """Connect (or reconnect) the session's sockets when the kernel runs at a new place."""
        sess = self.sess
        rec = self.registry.get(sess.kid)
        if rec is None:
            sess.gone = self.gone_for_good(sess.kid)
            return
        status = rec.status.value
        if status == "FAILED":
            if initial or sess.sockets:
                self._status("dead")
                sess.close_sockets()
            return
        if status != "RUNNING":
            return
        if sess.sockets and rec.generation == sess.generation:
            if not sess.ready and not sess.nudging:  # held for a restart that did not happen
                sess.nudge(busy=rec.execution_state == "busy")
            return
        info = self.registry.connection(sess.kid)
        if info is None:
            return
        if sess.sockets and info == sess.conn_info:
            sess.generation = rec.generation
            sess.renudge()  # same place, new process: confirm iopub again
        else:
            sess.connect(info, rec.generation)
        sess.nudge(busy=rec.execution_state == "busy")

    def _handle_events(self) -> None:
        sess = self.sess
        while sess.events:
            event = sess.events.popleft()
            status = event.get("status")
            if status == "DELETED" or status == "STOPPED":
                sess.gone = True
            elif status == "RESTARTING":
                # Only a restart after a death is announced, as Jupyter Server's restarter
                # does: a client that asked for one knows, and JupyterLab takes `restarting`
                # for "the kernel died" and shows a dialog.
                if not sess.restarted and not event.get("requested"):
                    self._status("restarting")
                sess.restarted = True
                sess.hold()
            elif status in ("RUNNING", "FAILED"):
                self._sync()

    def _handle_inbox(self) -> None:
        conn, sess = self.conn, self.sess
        while sess.inbox:
            src, frame = sess.inbox.popleft()
            src = src or conn
            try:
                channel, parts, buffers = wire.from_client(frame, src.protocol)
            except wire.BadFrame as exc:
                log.info("Kernel %s: dropped a bad frame from a client: %s", sess.kid, exc)
                continue
            if channel == "iopub":
                continue
            src.stats.add("client_to_kernel", channel, len(frame))
            # Who asked: the reply goes back to that connection if it has been parked since.
            if len(sess.senders) >= 1000:
                sess.senders.pop(next(iter(sess.senders)))
            sess.senders[str(wire.header_of(parts).get("msg_id", ""))] = src
            if sess.ready:
                sess.to_kernel(channel, parts, buffers)
            else:
                sess.held.append((channel, parts, buffers))

    def _read_kernel(self, due: set[zmtp.Peer]) -> set[zmtp.Peer]:
        """Relay what the ``due`` channels hold; return those that still hold more."""
        conn, sess = self.conn, self.sess
        epoch, more = sess.epoch, set()
        # iopub first: a kernel sends a request's busy and output before its reply, and a pump
        # that finds both channels holding messages (it was not scheduled while a cell ran)
        # keeps that order for the client
        for peer in sorted(due, key=lambda p: p.name != "iopub"):
            if epoch != sess.epoch:  # a reconnect replaced these channels
                return set()
            out = Outbox(conn, sess)  # for conn: sent together once the channel is drained
            try:
                self._relay(peer, out)
            finally:
                out.flush()
            if peer.inbox:
                more.add(peer)
        return more

    def _relay(self, peer: zmtp.Peer,
               out: Outbox) -> None:
        conn, sess = self.conn, self.sess
        channel, inbox = peer.name, peer.inbox
        for _ in range(64):  # then the other channels and the client get their turn
            if not inbox:
                return
            msg = inbox.popleft()
            try:
                parts, buffers = jmsg.split(msg)
            except ValueError:
                continue
            if channel == "iopub" and sess.nudging:  # what it sends goes after these
                out.flush()
            if sess.nudges and sess.is_nudge(channel, parts):
                if channel == "iopub":
                    self._became_ready()
                continue
            if channel == "iopub" and sess.nudging:
                self._became_ready()
            head = wire.header_of(parts)
            pid = ""
            if channel == "iopub" and len(parts[3]) < BATCH_BYTES \
                    and head.get("msg_type") == "stream":
                self.streamed = True
            if sess.orphans:
                replay.follow_orphan(conn, sess, channel, parts, head, out.add)
            if channel == "iopub":
                if sess.replayed and head.get("msg_id") in sess.replayed:
                    sess.replayed.discard(head.get("msg_id"))  # already sent from the buffer
                    continue
                if sess.replied and head.get("msg_type") == "status" and b"idle" in parts[3]:
                    pid = replay.parent_id(parts)
            else:
                pid = replay.parent_id(parts)
            to = conn
            if channel != "iopub" and sess.senders:  # a reply to a parked connection?
                asker = sess.senders.get(pid) if channel == "stdin" else sess.senders.pop(pid, None)
                if asker is not None and asker is not conn and not asker.closed \
                        and asker in sess.parked:
                    to = asker
            frame = wire.to_client(channel, parts, buffers, to.protocol, head)
            if to is conn:
                out.add(frame, channel, head, pid)
                if len(frame) > BATCH_BYTES or len(out.frames) >= 16:  # stream big output
                    out.flush()
            else:
                to.send(frame, block=True)
                sess.delivered(channel, head, pid)
            to.stats.add("kernel_to_client", channel, len(frame))
            if channel == "iopub" and sess.parked:
                self._to_parked(parts, buffers, head)

    def _to_parked(self, parts: list[bytes], buffers: list[bytes],
                   head: dict[str, Any]) -> None:
        """Output goes to parked connections too: each is still a client of the session."""
        sess = self.sess
        for other in list(sess.parked):
            if other.closed:
                continue
            try:
                frame = wire.to_client("iopub", parts, buffers, other.protocol, head)
                other.send(frame, block=True)
                other.stats.add("kernel_to_client", "iopub", len(frame))
            except (ConnectionClosed, OSError):
                other.closed = True

    def _became_ready(self) -> None:
        conn, sess = self.conn, self.sess
        if not sess.became_ready():
            return
        if sess.restarted:
            sess.restarted = False
            self._status("idle")
        if sess.resume is not None:
            replay.replay(conn, sess, replay.fetch_buffer(self.service, sess.kid))
        held, sess.held = sess.held, []
        for channel, parts, buffers in held:
            sess.to_kernel(channel, parts, buffers)
