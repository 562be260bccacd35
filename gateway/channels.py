"""The WebSocket bridge: moves frames between clients and kernels.

One :class:`KernelSession` per (kernel, session_id) in this gateway owns the kernel channels of
that client session: ZMTP connections spoken here (gateway/zmtp.py), not libzmq sockets, so a
message crossing the gateway wakes one thread, not two. The WebSocket handler thread that owns
the session is its pump: one poll over the client's TCP socket, the kernel's TCP connections and
a wake-up pipe, in both directions. Only the pump touches them, so sends are serialised.

* Frames from the client: simple-websocket's reader thread is never started (see
  :class:`NoReaderThread`); the pump reads the socket when it is readable and parses it
  (gateway/framing.py for clients without extensions, wsproto for the others), answering pings
  and closes.
  One thread per WebSocket instead of two, and no hand-off between them on every frame.
* Frames to the client: the socket does not block the pump; what it does not take waits in the
  connection and goes out when it is writable, while the pump goes on reading the kernel (whose
  high-water mark would otherwise drop output for a slow client).
* Takeover: a new connection with the same session_id evicts the old one at once and inherits
  the sockets (JupyterLab opens the socket twice in a row).
* Replay: a session whose client went away keeps its channels for ``session_buffer_seconds``;
  one thread (:meth:`Bridge._keep`) goes on reading them meanwhile, and a reconnect with the
  same session_id gets what came, in order.
* Held messages: frames sent before the kernel is ready (or while it restarts) wait, and go out
  once the iopub subscription is confirmed by a kernel_info "nudge".
"""
from __future__ import annotations

import collections
import hashlib
import json
import logging
import os
import select
import socket
import threading
import time
import uuid
from typing import TYPE_CHECKING, Any, Callable

import redis
from simple_websocket import ConnectionClosed
from wsproto.events import Message, Ping
from wsproto.frame_protocol import CloseReason
from wsproto.utilities import LocalProtocolError

from gateway import framing, tls, wire, zmtp
from gateway.metrics import Hooks, WsStats
from workers import jmsg
from workers.protocol import ConnectionInfo
from workers.reconcile import SILENT_STATES

if TYPE_CHECKING:
    from gateway.kernels import KernelService

log = logging.getLogger(__name__)
DEALERS = ("shell", "control", "stdin")
NUDGE_FIRST = 0.02  # a nudge that brought nothing on iopub is sent again after this...
NUDGE_EVERY = 0.25  # ...doubling up to this
STARTING_STATUS_EVERY = 10.0
LIVENESS_EVERY = 5.0
IDLE_WAKE = 5.0  # longest an idle pump sleeps (it wakes at once for anything it must do)
SILENT_NAMES = frozenset(s.value for s in SILENT_STATES)  # states whose heartbeat is checked
BLOCK_SECONDS = 30.0  # a parked client that takes nothing for this long is closed
BATCH_BYTES = 65536  # a frame this big is sent at once, not held for the rest of the batch
SEEN_EVERY = 0.05  # how often what a client got is recorded for other gateways
REPLAY_WAIT = 3  # seconds a reconnected client's replay waits for the kernel's supervisor...
REPLAY_TRIES = 3  # ...each time it asks


class NoReaderThread:
    """Given to simple-websocket as its ``thread_class``: the reader thread it would start for
    every connection. Not started: the session's pump reads the socket (Connection.read)."""

    def __init__(self, target: Any = None, **_: Any) -> None:
        self.name = "poolgate-ws"

    def start(self) -> None:
        pass

    def is_alive(self) -> bool:
        return False

    def join(self, timeout: float | None = None) -> None:
        pass


def no_extensions(ws: Any) -> bool:
    """True if the client negotiated no extension (no permessage-deflate): frames can then be
    written here, without wsproto's per-message work (the gateway accepts compression only
    with ``ws_compression: true``)."""
    try:
        return not any(ext.enabled() for ext in ws.ws.connection._proto.extensions)
    except AttributeError:  # another wsproto: let it frame every message
        return False


class ClientSocket:
    """Stands in for the client's socket inside simple-websocket, whose own writes (pongs, the
    close handshake) must queue behind what the pump has pending, never cut into a frame."""

    def __init__(self, conn: Connection, sock: socket.socket) -> None:
        self._conn, self._sock = conn, sock

    def send(self, data: bytes) -> int:
        self._conn._write(data)
        return len(data)

    sendall = send

    def __getattr__(self, name: str) -> Any:
        return getattr(self._sock, name)


class Connection:
    """One client WebSocket."""

    def __init__(self, ws: Any) -> None:
        self.ws = ws
        self.protocol = ws.subprotocol if ws.subprotocol == wire.V1 else None
        self.closed = False
        self.evicted = False
        self.next_ping = 0.0
        self._lock = threading.RLock()
        self.stats = WsStats()  # written only by the pump thread
        self.plain = no_extensions(ws)  # frames written and read here (gateway/framing.py)
        cap = getattr(ws, "max_message_size", None) or framing.MAX_MESSAGE_SIZE
        self.reader = framing.FrameReader(cap) if self.plain else None
        self.pending: list[bytes | memoryview] = []  # written when the socket takes them
        self.on_flushed: list[Callable[[], None]] = []  # run when ``pending`` is all written
        self.sock: socket.socket = tls.for_pump(getattr(ws.sock, "_sock", ws.sock))
        self.sock.setblocking(False)
        ws.sock = ClientSocket(self, self.sock)

    def send(self, frame: bytes, block: bool = False) -> None:
        self.send_many([frame], block=block)

    def send_many(self, frames: list[bytes], done: Callable[[], None] | None = None,
                  block: bool = False) -> None:
        """Send frames (from wire.to_client) in order, in as few socket writes as the kernel
        allows: a wire.Text as a text frame, other bytes as a binary one.

        The socket does not block: what it does not take now waits in ``pending`` for the
        pump (polling for POLLOUT) while the pump goes on reading the kernel, so a slow client
        never makes the kernel's high-water mark drop output. ``done`` runs once the frames
        are all written; ``block`` waits for that (for a connection another thread pumps)."""
        ws = self.ws
        with self._lock:
            if not ws.connected:
                raise ConnectionClosed(ws.close_reason, ws.close_message)
            parts = self.pending
            for frame in frames:
                text = isinstance(frame, wire.Text)
                if self.plain:
                    parts += (framing.ws_header(frame, text), frame)
                else:  # wsproto frames str as text, bytes as binary
                    parts.append(ws.ws.send(Message(data=frame.decode() if text else frame)))
            if done is not None:
                self.on_flushed.append(done)
            if not self._flush_locked() and block:
                self._drain_locked(BLOCK_SECONDS)
                if self.pending:  # the client reads nothing: let it go
                    log.info("WebSocket: a client read nothing for %ss; closing it",
                             BLOCK_SECONDS)
                    self.closed = True
                    self.abort()

    def _write(self, data: bytes) -> None:
        """A control frame: after what is pending, at once if the socket takes it."""
        with self._lock:
            self.pending.append(data)
            self._flush_locked()

    def flush(self) -> None:
        """Write what is pending as far as the socket takes it (the pump saw POLLOUT)."""
        with self._lock:
            self._flush_locked()

    def drain(self, timeout: float) -> None:
        """Wait up to ``timeout`` seconds for what is pending to go out (before closing)."""
        try:
            with self._lock:
                self._drain_locked(timeout)
        except OSError:  # the client went meanwhile
            self.closed = True

    def _drain_locked(self, timeout: float) -> None:
        end = time.monotonic() + timeout
        poller = select.poll()
        poller.register(self.fileno(), select.POLLOUT)
        while not self._flush_locked():
            left = (end - time.monotonic()) * 1000
            if left <= 0:
                return
            poller.poll(left)
            if self.closed:  # another thread ended the connection meanwhile
                return

    def _flush_locked(self) -> bool:
        """Write pending bytes until the socket would block; True when none are left."""
        if not framing.send_some(self.sock, self.pending):
            return False
        if self.on_flushed:
            done, self.on_flushed = self.on_flushed, []
            for fn in done:
                fn()
        return True

    def fileno(self) -> int:
        return int(self.sock.fileno())

    def read(self) -> list[str | bytes]:
        """Read what the client sent (the socket is readable) and return the complete frames.

        Does what simple-websocket's reader thread would: wsproto parses, pings and close
        frames are answered. Sets ``closed`` when the client went away."""
        ws = self.ws
        try:
            data = self.sock.recv(ws.receive_bytes)
        except (BlockingIOError, InterruptedError):
            return []
        except OSError:
            data = b""
        if not data:
            self.closed = True
            ws.connected = False
            return []
        if self.reader is not None:
            return self._read_plain(data)
        try:
            with self._lock:
                ws.ws.receive_data(data)
                ws.connected = ws._handle_events()
        except (LocalProtocolError, OSError):
            ws.connected = False
        messages, ws.input_buffer = ws.input_buffer, []
        if not ws.connected:
            self.closed = True
        return messages

    def _read_plain(self, data: bytes) -> list[str | bytes]:
        """read() for a client without extensions: framing.FrameReader parses, and pings and
        closes are answered as simple-websocket would."""
        ws, reader = self.ws, self.reader
        assert reader is not None
        messages, replies = reader.feed(data)
        if reader.pong:
            reader.pong = False
            ws.pong_received = True
        try:
            for reply in replies:
                self._write(reply)
        except OSError:
            reader.close_code = reader.close_code or 1006
        if reader.close_code is not None:
            if reader.close_code in (framing.PROTOCOL_ERROR, framing.INVALID_DATA,
                                     framing.MESSAGE_TOO_BIG):
                log.info("WebSocket: closing a client that broke the protocol: %s",
                         reader.close_reason)
            ws.close_reason, ws.close_message = reader.close_code, reader.close_reason
            ws.connected = False
            self.closed = True
        return messages

    def ping(self, now: float) -> None:
        """Ping the client every ``ping_interval``; close it if the last ping got no pong."""
        ws = self.ws
        if not ws.ping_interval or now < self.next_ping or self.closed or not ws.connected:
            return
        if self.next_ping and not ws.pong_received:
            log.info("WebSocket: no pong within %ss; closing it", ws.ping_interval)
            try:
                ws.close(reason=CloseReason.POLICY_VIOLATION, message="Ping/Pong timeout")
            except Exception:
                pass
            self.closed = True
            return
        ws.pong_received = False
        try:
            self._write(framing.control_frame(framing.OP_PING) if self.plain
                        else ws.ws.send(Ping()))
        except (LocalProtocolError, OSError):  # the client is closing the connection
            self.closed = True
        self.next_ping = now + ws.ping_interval

    def abort(self) -> None:
        """End the connection from another thread: its pump sees the socket close."""
        try:
            self.sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass


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
        self.ready = False
        self.nudging = False
        self.restarted = False
        self.nudges: set[str] = set()
        self.nudge_sent = 0.0  # 0: none sent to this kernel process yet
        self.nudge_every = NUDGE_FIRST
        self.detached_at: float | None = None
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

    def wake(self) -> None:
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

    def renudge(self) -> None:
        """A new kernel process (or new channels): its iopub must be confirmed again."""
        self.ready = False
        self.nudges.clear()
        self.nudge_sent = 0.0
        self.nudge_every = NUDGE_FIRST

    def close_sockets(self) -> None:
        for s in self.sockets.values():
            s.close()
        self.sockets.clear()
        self.epoch += 1
        self.ready = False
        self.nudging = False

    def close(self) -> None:
        self.close_sockets()
        for fd in (self._r, self._w):
            try:
                os.close(fd)
            except OSError:
                pass

    def nudge(self) -> None:
        """Ask for kernel_info so the first iopub message proves the subscription is live.

        Sent once the shell and iopub connections are both up (asked earlier, the kernel may
        answer before it has our subscription), and again while nothing came on iopub: soon at
        first, then less often. The kernel's XPUB takes a new subscription in only when it
        next looks at its commands, which may be after it published its answer; a warm kernel
        answers within a millisecond, and waiting a full NUDGE_EVERY for the second try made
        its hand-over take 0.28 s instead of 0.03 s."""
        self.nudging = True
        shell, iopub = self.sockets.get("shell"), self.sockets.get("iopub")
        if shell is None or iopub is None or not (shell.ready and iopub.ready):
            return  # the pump asks again after the handshakes
        assert self.signer is not None
        if self.nudge_sent:
            self.nudge_every = min(self.nudge_every * 2, NUDGE_EVERY)
        msg_id, frames = jmsg.build(self.signer, "kernel_info_request", {}, self.session_id)
        self.nudges.add(msg_id)
        shell.send(frames)
        self.nudge_sent = time.monotonic()

    def nudge_due(self, now: float) -> bool:
        return self.nudging and (not self.nudge_sent or now - self.nudge_sent > self.nudge_every)

    def is_nudge(self, parts: list[bytes]) -> bool:
        return bool(self.nudges) and wire.json_part(parts[1]).get("msg_id") in self.nudges

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


class Outbox:
    """Frames from the kernel for the session's owner, sent together; what they were is
    recorded for other gateways (``last_iopub``, ``replied``) only once they are sent, so a
    gateway dying with frames still here never counts them as delivered."""

    def __init__(self, conn: Connection, sess: KernelSession) -> None:
        self.conn, self.sess = conn, sess
        self.frames: list[bytes] = []
        self.marks: list[tuple[str, dict[str, Any], str]] = []

    def add(self, frame: bytes, channel: str, head: dict[str, Any], pid: str) -> None:
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


class Bridge:
    """All kernel sessions of this gateway process."""

    def __init__(self, service: KernelService, buffer_seconds: float) -> None:
        self.service = service
        self.registry = service.registry
        self.buffer_seconds = buffer_seconds
        self.metrics: Hooks = Hooks()  # gateway/metrics.py install() replaces it
        self.instance = uuid.uuid4().hex[:12]
        self.sessions: dict[tuple[str, str], KernelSession] = {}
        self._lock = threading.Lock()
        self._reaper = threading.Thread(target=self._reap, name="poolgate-sessions", daemon=True)
        self._reaper.start()
        threading.Thread(target=self._record_seen, name="poolgate-seen", daemon=True).start()
        self._keeping = threading.Event()  # set when a session loses its client
        threading.Thread(target=self._keep, name="poolgate-keep", daemon=True).start()

    # -- sessions -------------------------------------------------------------------------

    def _on_event(self, event: dict[str, Any]) -> None:
        kid = event.get("id", "")
        with self._lock:
            targets = [s for (k, _), s in self.sessions.items() if k == kid]
        for sess in targets:
            if event.get("status") == "RESTARTING" and self._drop(sess, detached_only=True):
                continue  # kept channels without a client do not follow a restart
            sess.events.append(event)
            sess.wake()

    def attach(self, kid: str, session_id: str, conn: Connection) -> KernelSession:
        """Give ``conn`` the session, evicting a connection that holds it.

        Ownership changes hands under the bridge's lock only, so two connections arriving
        together can never both own a session (nor can one clear the other's eviction)."""
        announced = False
        while True:
            with self._lock:
                sess = self.sessions.get((kid, session_id))
                if sess is None or sess.gone:
                    sess = KernelSession(kid, session_id, self.instance)
                    sess.resume = self.registry.seen(kid, session_id)  # served by a lost gateway?
                    if not any(k == kid for k, _ in self.sessions):
                        self.service.events.add(kid, self._on_event)
                    self.sessions[(kid, session_id)] = sess
                old = sess.owner
                if old is None or old is conn:
                    sess.owner = conn
                    conn.evicted = False
                    sess.released.clear()
                    sess.detached_at = None
                    break
                old.evicted = True
            if not announced:
                log.info("Kernel %s: session %s reconnected; replacing the older socket",
                         kid, session_id)
                announced = True
            sess.wake()
            if not sess.released.wait(3.0):
                log.warning("Kernel %s: the older socket of session %s did not let go; "
                            "closing it", kid, session_id)
                old.abort()
                sess.released.wait(3.0)
        with sess.keep_lock:  # the keeper is done with the session's channels (Bridge._keep)
            pass
        self.registry.add_connection(kid, f"{self.instance}:{session_id}")
        return sess

    def detach(self, sess: KernelSession, conn: Connection) -> None:
        with self._lock:
            mine = sess.owner is conn
            if mine:
                sess.owner = None
                sess.detached_at = time.monotonic()
                self._keeping.set()
            sess.released.set()
        if mine and not conn.evicted:
            try:
                self.registry.remove_connection(sess.kid, f"{self.instance}:{sess.session_id}")
            except Exception:
                log.debug("cannot update connection count", exc_info=True)

    def _drop(self, sess: KernelSession, detached_only: bool = False) -> bool:
        """Forget a session and close its channels; with ``detached_only``, only if no client
        holds it (checked under the lock that attach takes). True when it was dropped."""
        with self._lock:
            if detached_only and sess.owner is not None:
                return False
            if self.sessions.get((sess.kid, sess.session_id)) is sess:
                del self.sessions[(sess.kid, sess.session_id)]
            last = not any(k == sess.kid for k, _ in self.sessions)
            sess.gone = True
        if last:
            self.service.events.remove(sess.kid, self._on_event)
        with sess.keep_lock:
            sess.close()
        return True

    def _reap(self) -> None:
        while True:
            try:  # connection counts held by a gateway without this heartbeat are stale
                self.registry.gateway_heartbeat(self.instance, 10.0)
            except Exception:
                log.debug("cannot reach the registry", exc_info=True)
            time.sleep(2.0)
            now = time.monotonic()
            with self._lock:
                detached = [s for s in self.sessions.values()
                            if s.owner is None and s.detached_at is not None]
            if not detached:
                continue
            live = self._live_ids()  # one registry read per round, never under the lock
            for sess in detached:
                if sess.owner is None and (  # nobody took it back meanwhile
                        sess.gone or now - (sess.detached_at or now) > self.buffer_seconds
                        or sess.kid not in live and self._gone_for_good(sess.kid)
                        or self._served_elsewhere(sess)):
                    self._drop(sess, detached_only=True)

    def _keep(self) -> None:
        """Read the channels of sessions that have no client, as libzmq's I/O thread did.

        A session keeps its channels for ``session_buffer_seconds`` after its client went
        (a reconnect gets what came meanwhile). Unread, the kernel's side would fill its
        socket buffers and then its high-water mark (1000 messages), past which it drops
        output; so one thread reads them all into the channels' inboxes, which the pump of
        the next client relays first."""
        while True:
            kept = self._unattended()
            if not kept:
                self._keeping.clear()  # before the check: a detach after it sets it again
                if not self._unattended():
                    self._keeping.wait(5.0)
                continue
            try:
                self._keep_once(kept)
            except Exception:  # never let one session end the reading of all the others
                log.exception("reading sessions without a client")
                time.sleep(0.1)

    def _unattended(self) -> list[KernelSession]:
        """Sessions with channels and no client: the keeper's work list."""
        with self._lock:
            return [s for s in self.sessions.values()
                    if s.owner is None and not s.gone and s.sockets]

    def _keep_once(self, kept: list[KernelSession]) -> None:
        poller, by_fd = select.poll(), {}
        for sess in kept:
            for peer in list(sess.sockets.values()):
                if peer.sock is not None:
                    poller.register(peer.fileno(), peer.wanted())
                    by_fd[peer.fileno()] = (sess, peer)
        fired: dict[KernelSession, list[tuple[zmtp.Peer, int]]] = {}
        for fd, ev in poller.poll(100):
            sess, peer = by_fd[fd]
            fired.setdefault(sess, []).append((peer, ev))
        for sess in kept:
            with sess.keep_lock:
                if sess.owner is not None or sess.gone:  # a client came back: its pump reads
                    continue
                for peer, ev in fired.get(sess, ()):
                    peer.handle(ev)
                lost = any(p.retry_at is not None for p in sess.sockets.values())
            if lost:
                # No reconnect without a client (the kernel restarted): the supervisor's replay
                # buffer still serves a client that comes back here.
                self._drop(sess, detached_only=True)

    def _served_elsewhere(self, sess: KernelSession) -> bool:
        """The session's client came (back) through another replica after it came here: what
        these kept channels hold is not for a client here any more."""
        try:
            conns = self.registry.connections(sess.kid)
        except redis.RedisError:
            return False
        mine = f"{self.instance}:{sess.session_id}"
        since = conns.get(mine, 0.0)
        return any(c.endswith(":" + sess.session_id) and c != mine and t >= since
                   for c, t in conns.items())

    def _gone_for_good(self, kid: str) -> bool:
        """A kernel the registry does not have: deleted (its tombstone says so), or not yet
        written again after the registry lost its data (a restarted Redis)? Sessions and
        their sockets outlive the second: the kernel still runs."""
        try:
            return bool(self.registry.deleted(kid)) or not self.registry.rebuilding()
        except redis.RedisError:
            return False

    def _live_ids(self) -> set[str]:
        try:
            return set(self.registry.ids())
        except Exception:
            return {k for k, _ in list(self.sessions)}

    def restarting(self, kid: str) -> None:
        """A restart was asked through this gateway: hold its clients' messages from now on,
        so none reaches the old process while it goes (the workers' own event follows)."""
        self._on_event({"id": kid, "status": "RESTARTING", "requested": True})

    def restart_settled(self, kid: str) -> None:
        """The restart is over (done or failed): let held messages go where the kernel is."""
        self._on_event({"id": kid, "status": "RUNNING"})

    def close_kernel(self, kid: str) -> None:
        """The kernel is gone: end its sessions' sockets and close their WebSockets."""
        self._on_event({"id": kid, "status": "DELETED"})

    # -- the pump -------------------------------------------------------------------------

    def serve(self, ws: Any, kid: str, session_id: str) -> None:
        """Run one client WebSocket until it closes.

        A connection replaced by a newer one with the same session_id is parked, not closed:
        its frames still reach the kernel, and it takes the session back if the newer one
        goes away. Closing it would make Jupyter Server's gateway client reconnect it, which
        would take the session from the newer one, and so on every second or two.
        """
        conn = Connection(ws)
        conn.next_ping = time.monotonic() + (ws.ping_interval or 0)
        self.metrics.ws_opened(conn.stats)
        try:
            while True:
                sess = self.attach(kid, session_id, conn)
                self._run(conn, sess)
                if sess.gone:
                    self._drop(sess)
                if not conn.evicted or conn.closed or sess.gone or not self._park(conn, sess):
                    break
        finally:
            self.metrics.ws_closed(conn.stats)
        if not conn.closed:
            try:
                conn.ws.close(reason=1000, message="kernel shut down")
            except Exception:
                pass
            conn.drain(5.0)  # what is pending, then the close frame
        try:
            conn.sock.setblocking(True)  # as the web server left it
        except OSError:
            pass

    def _run(self, conn: Connection, sess: KernelSession) -> None:
        try:
            self._pump(conn, sess)
        except ConnectionClosed:
            conn.closed = True
        except OSError as exc:
            conn.closed = True
            log.info("Kernel %s: WebSocket ended (%s)", sess.kid, exc)
        finally:
            self.detach(sess, conn)

    def _park(self, conn: Connection, sess: KernelSession) -> bool:
        """Hold a replaced connection open until its client closes it (False) or the session
        has no client any more (True: take it back). Its frames go to the session's owner."""
        with self._lock:
            sess.parked.append(conn)
        try:
            while not sess.gone:
                poller = select.poll()
                poller.register(conn.fileno(), select.POLLIN | (select.POLLOUT if conn.pending
                                                                else 0))
                events = poller.poll(1000)
                if any(ev & select.POLLOUT for _, ev in events):
                    conn.flush()
                if any(ev & ~select.POLLOUT for _, ev in events):
                    frames = conn.read()
                    if frames:
                        sess.inbox.extend((conn, f) for f in frames)
                        sess.wake()
                    if conn.closed:
                        return False
                elif not events and sess.owner is None:
                    return True
                conn.ping(time.monotonic())
                if conn.closed:
                    return False
            return False
        finally:
            with self._lock:
                sess.parked.remove(conn)

    def _status(self, conn: Connection, sess: KernelSession, state: str) -> None:
        parts, bufs = wire.status_message(state, sess.session_id)
        conn.send(wire.to_client("iopub", parts, bufs, conn.protocol))

    def _pump(self, conn: Connection, sess: KernelSession) -> None:
        last_starting = 0.0
        last_check = time.monotonic()
        poller, polled = select.poll(), None
        kernel: dict[int, zmtp.Peer] = {}  # the kernel's channels by their socket's fd
        due: set[zmtp.Peer] = set()  # channels holding messages not yet relayed
        client = conn.fileno()
        try:
            self._sync(conn, sess, initial=True)
        except redis.RedisError as exc:  # the loop tries again while there are no sockets
            log.warning("Kernel %s: registry unreachable (%s)", sess.kid, exc)
        self._handle_inbox(conn, sess)  # frames that came while the session was being attached
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
            else:
                timeout = self._idle_timeout(conn, sess, last_check)
                retry = min((p.retry_at for p in peers if p.retry_at is not None), default=None)
                if retry is not None:
                    timeout = max(0.0, min(timeout, retry - time.monotonic()))
            for fd, ev in poller.poll(timeout * 1000):
                if fd == client:
                    if ev & select.POLLOUT:
                        conn.flush()
                    if ev & ~select.POLLOUT:
                        sess.inbox.extend((None, f) for f in conn.read())
                        self._handle_inbox(conn, sess)
                elif fd == sess._r:
                    sess.drain_wake()
                    self._handle_events(conn, sess)
                    self._handle_inbox(conn, sess)
                elif fd in kernel:
                    peer = kernel[fd]
                    peer.handle(ev)
                    if peer.inbox:
                        due.add(peer)
            due = self._read_kernel(conn, sess, due)
            now = time.monotonic()
            for p in peers:
                if p.retry_at is not None:
                    p.tick(now)
            conn.ping(now)
            if sess.nudge_due(now):
                sess.nudge()
            try:
                if not sess.sockets:
                    self._sync(conn, sess)
                    if now - last_starting > STARTING_STATUS_EVERY and not sess.gone:
                        last_starting = now
                        self._status(conn, sess, "starting")
                elif now - last_check > LIVENESS_EVERY:
                    last_check = now
                    self._check_alive(sess)
            except redis.RedisError as exc:  # a registry blip must not cut the client off
                log.warning("Kernel %s: registry unreachable (%s)", sess.kid, exc)

    @staticmethod
    def _idle_timeout(conn: Connection, sess: KernelSession, last_check: float) -> float:
        """How long the pump may sleep when nothing is waiting to be relayed.

        An idle session sleeps until its next liveness check or ping: everything else wakes
        the pump (frames, the session's wake pipe). Waking every second, 2,000 idle sockets
        cost a gateway about a third of a core (issue 24)."""
        if sess.nudging:
            return sess.nudge_every if sess.nudge_sent else 1.0
        if not sess.sockets:  # waiting for the kernel to run: look again every second
            return 1.0
        now = time.monotonic()
        wake = min(IDLE_WAKE, last_check + LIVENESS_EVERY - now)
        if conn.ws.ping_interval:
            wake = min(wake, conn.next_ping - now)
        return max(0.0, wake) + 0.01  # past the moment, so the check it waits for is due

    def _check_alive(self, sess: KernelSession) -> None:
        """A kernel whose worker vanished is declared dead (the event then tells the session).

        Asked every LIVENESS_EVERY for every session: the usual answer (running, beating) costs
        one round trip of two commands; only another answer reads the whole record."""
        status, beating = self.registry.liveness(sess.kid)
        if beating and status in SILENT_NAMES:
            return
        rec = self.registry.get(sess.kid)
        if rec is None:
            sess.gone = self._gone_for_good(sess.kid)
        elif self.service.check_alive(rec) is None:
            sess.gone = True

    def _sync(self, conn: Connection, sess: KernelSession, initial: bool = False) -> None:
        """Connect (or reconnect) the session's sockets when the kernel runs at a new place."""
        rec = self.registry.get(sess.kid)
        if rec is None:
            sess.gone = self._gone_for_good(sess.kid)
            return
        status = rec.status.value
        if status == "FAILED":
            if initial or sess.sockets:
                self._status(conn, sess, "dead")
                sess.close_sockets()
            return
        if status != "RUNNING":
            return
        if sess.sockets and rec.generation == sess.generation:
            if not sess.ready and not sess.nudging:  # held for a restart that did not happen
                sess.nudge()
            return
        info = self.registry.connection(sess.kid)
        if info is None:
            return
        if sess.sockets and info == sess.conn_info:
            sess.generation = rec.generation
            sess.renudge()  # same place, new process: confirm iopub again
        else:
            sess.connect(info, rec.generation)
        sess.nudge()

    def _handle_events(self, conn: Connection, sess: KernelSession) -> None:
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
                    self._status(conn, sess, "restarting")
                sess.restarted = True
                sess.ready = False
                sess.nudging = False
            elif status in ("RUNNING", "FAILED"):
                self._sync(conn, sess)

    def _handle_inbox(self, conn: Connection, sess: KernelSession) -> None:
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

    def _read_kernel(self, conn: Connection, sess: KernelSession,
                     due: set[zmtp.Peer]) -> set[zmtp.Peer]:
        """Relay what the ``due`` channels hold; return those that still hold more."""
        epoch, more = sess.epoch, set()
        for peer in due:
            if epoch != sess.epoch:  # a reconnect replaced these channels
                return set()
            out = Outbox(conn, sess)  # for conn: sent together once the channel is drained
            try:
                self._relay(conn, sess, peer, out)
            finally:
                out.flush()
            if peer.inbox:
                more.add(peer)
        return more

    def _relay(self, conn: Connection, sess: KernelSession, peer: zmtp.Peer,
               out: Outbox) -> None:
        channel, inbox = peer.name, peer.inbox
        for _ in range(64):  # then the other channels and the client get their turn
            if not inbox:
                return
            msg = inbox.popleft()
            try:
                parts, buffers = jmsg.split(msg)
            except ValueError:
                continue
            if sess.nudges and sess.ready and time.monotonic() > sess.nudge_sent + 3.0:
                sess.nudges.clear()
            if channel == "iopub" and sess.nudging:  # what it sends goes after these
                out.flush()
            if sess.nudges and sess.is_nudge(parts):
                if channel == "iopub":
                    self._became_ready(conn, sess)
                continue
            if channel == "iopub" and sess.nudging:
                self._became_ready(conn, sess)
            head = wire.header_of(parts)
            pid = ""
            if sess.orphans:
                self._orphan(conn, sess, channel, parts, head, out)
            if channel == "iopub":
                if sess.replayed and head.get("msg_id") in sess.replayed:
                    sess.replayed.discard(head.get("msg_id"))  # already sent from the buffer
                    continue
                if sess.replied and head.get("msg_type") == "status" and b"idle" in parts[3]:
                    pid = _parent_id(parts)
            else:
                pid = _parent_id(parts)
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
                self._to_parked(sess, parts, buffers, head)

    def _orphan(self, conn: Connection, sess: KernelSession, channel: str, parts: list[bytes],
                head: dict[str, Any], out: Outbox) -> None:
        """Follow a cell a lost gateway sent: its count and error from iopub, and at its idle
        the execute_reply the kernel sent to that gateway, rebuilt (before the idle)."""
        parent = _parent(parts)
        cell = sess.orphans.get(str(parent.get("msg_id", "")))
        if cell is None:
            return
        pid = str(parent.get("msg_id", ""))
        kind = head.get("msg_type")
        if channel != "iopub":  # its real reply came after all
            del sess.orphans[pid]
        elif kind == "execute_input":
            cell["count"] = json.loads(parts[3]).get("execution_count", 0)
        elif kind == "error":
            cell["error"] = json.loads(parts[3])
        elif kind == "status" and json.loads(parts[3]).get("execution_state") == "idle":
            del sess.orphans[pid]
            reply, bufs = _rebuilt_reply(cell["parent"], cell["count"], cell["error"])
            out.add(wire.to_client("shell", reply, bufs, conn.protocol), "shell",
                    wire.header_of(reply), pid)

    def _to_parked(self, sess: KernelSession, parts: list[bytes], buffers: list[bytes],
                   head: dict[str, Any]) -> None:
        """Output goes to parked connections too: each is still a client of the session."""
        for other in list(sess.parked):
            if other.closed:
                continue
            try:
                frame = wire.to_client("iopub", parts, buffers, other.protocol, head)
                other.send(frame, block=True)
                other.stats.add("kernel_to_client", "iopub", len(frame))
            except (ConnectionClosed, OSError):
                other.closed = True

    def _became_ready(self, conn: Connection, sess: KernelSession) -> None:
        if sess.ready or not sess.nudging:
            return
        sess.ready = True
        sess.nudging = False
        if sess.restarted:
            sess.restarted = False
            self._status(conn, sess, "idle")
        if sess.resume is not None:
            self._replay(conn, sess)
        held, sess.held = sess.held, []
        for channel, parts, buffers in held:
            sess.to_kernel(channel, parts, buffers)

    # -- replay across gateways -----------------------------------------------------------

    def _record_seen(self) -> None:
        """Every SEEN_EVERY, tell other gateways what each client got (one pipeline for all
        sessions), in case this gateway dies: they replay from there."""
        while True:
            time.sleep(SEEN_EVERY)
            with self._lock:
                dirty = [s for s in self.sessions.values() if s.seen_dirty]
            if not dirty:
                continue
            seen = {}
            for sess in dirty:
                sess.seen_dirty = False
                # list() of a deque is one C call, atomic against the pump; replied is read
                # before last_iopub because an idle leaves replied only after last_iopub moved
                # past it (delivered), so the pair never misses a reply
                replied = list(sess.replied)
                seen[(sess.kid, sess.session_id)] = {"iopub": sess.last_iopub,
                                                     "replied": replied}
            try:
                self.registry.mark_seen_many(seen, self.buffer_seconds)
            except Exception:
                log.debug("cannot record what %d sessions saw", len(seen), exc_info=True)

    def _buffered(self, kid: str) -> list[bytes]:
        """Ask the kernel's supervisor for its replay buffer (through the worker's control
        channel; it answers through the registry)."""
        rec = self.registry.get(kid)
        if rec is None or not rec.worker:
            return []
        token = uuid.uuid4().hex
        for _ in range(REPLAY_TRIES):  # the broker may be reconnecting (a restart)
            try:
                self.service.dispatch.control(rec.worker, kid, f"replay:{token}")
                blobs = self.registry.take_replay(token, REPLAY_WAIT)
            except Exception as exc:
                log.warning("Kernel %s: no replay buffer yet (%s)", kid, exc)
                time.sleep(REPLAY_WAIT)
                continue
            if blobs is not None:
                return blobs
        log.warning("Kernel %s: worker %s sent no replay buffer in %d tries", kid, rec.worker,
                    REPLAY_TRIES)
        return []

    def _replay(self, conn: Connection, sess: KernelSession) -> None:
        """The client was served by a gateway that went away: send what it missed.

        Output comes from the supervisor's buffer (``replay_buffer``); a reply the kernel sent
        while no gateway listened is rebuilt from the iopub record (execute_input, error, idle).
        """
        seen, sess.resume = sess.resume or {}, None
        msgs = [jmsg.decode_parts(b) for b in self._buffered(sess.kid)]
        heads = [wire.header_of(m) for m in msgs]
        last = seen.get("iopub")
        start = next((i + 1 for i in range(len(heads) - 1, -1, -1)
                      if heads[i].get("msg_id") == last), 0)
        replied = set(seen.get("replied") or ())
        counts: dict[str, int] = {}
        errors: dict[str, dict[str, Any]] = {}
        started: dict[str, dict[str, Any]] = {}  # this session's cells, by request id
        ended: set[str] = set()
        for i, (parts, head) in enumerate(zip(msgs, heads)):
            kind, parent = head.get("msg_type"), _parent(parts)
            pid = parent.get("msg_id", "")
            # A cell's count and error come from the whole buffer: the client may have had
            # its execute_input before the gateway died, and the reply still needs the count
            # (JupyterLab numbers the cell from it).
            if kind == "execute_input":
                counts[pid] = json.loads(parts[3]).get("execution_count", 0)
                if parent.get("session") == sess.session_id:
                    started[pid] = parent
            elif kind == "error":
                errors[pid] = json.loads(parts[3])
            elif kind == "status" and json.loads(parts[3]).get("execution_state") == "idle":
                ended.add(pid)
            if i < start:
                continue
            parts, buffers = parts[:4], parts[4:]
            sess.replayed.add(head.get("msg_id", ""))
            conn.send(wire.to_client("iopub", parts, buffers, conn.protocol, head))
            if (kind == "status" and json.loads(parts[3]).get("execution_state") == "idle"
                  and parent.get("msg_type") == "execute_request" and pid not in replied
                  and parent.get("session") == sess.session_id):
                conn.send(wire.to_client("shell", *_rebuilt_reply(parent, counts.get(pid, 0),
                                                                  errors.get(pid)), conn.protocol))
        for pid, parent in started.items():
            if pid not in ended and pid not in replied:
                sess.orphans[pid] = {"parent": parent, "count": counts.get(pid, 0),
                                     "error": errors.get(pid)}
        sess.last_iopub = heads[-1].get("msg_id") if heads else sess.last_iopub
        log.info("Kernel %s: replayed %d messages to session %s", sess.kid,
                 len(msgs) - start, sess.session_id)


def _parent(parts: list[bytes]) -> dict[str, Any]:
    return wire.json_part(parts[1])


def _parent_id(parts: list[bytes]) -> str:
    return str(_parent(parts).get("msg_id", ""))


def _rebuilt_reply(parent: dict[str, Any], count: int,
                   error: dict[str, Any] | None) -> tuple[list[bytes], list[bytes]]:
    """An execute_reply for a request whose real reply went to a gateway that died."""
    content: dict[str, Any] = {"status": "error" if error else "ok", "execution_count": count,
                               "user_expressions": {}, "payload": []}
    if error:
        content.update({k: error.get(k) for k in ("ename", "evalue", "traceback")})
    head = jmsg.header("execute_reply", parent.get("session", ""))
    return [jmsg.pack(head), jmsg.pack(parent), jmsg.pack({"poolgate": "rebuilt after a gateway "
                                                            "was lost"}), jmsg.pack(content)], []
