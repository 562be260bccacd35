"""The bridge: all kernel sessions of this gateway process, and who owns each.

One :class:`KernelSession` per (kernel, session_id) owns the kernel channels of that client
session. :meth:`Bridge.serve` runs one client WebSocket: it attaches the connection to its
session and runs a :class:`Pump` (gateway/channels/pump.py) while the connection owns it.

* Takeover: a new connection with the same session_id evicts the old one at once and inherits
  the sockets (JupyterLab opens the socket twice in a row); the old one is parked, not closed.
* Kept sessions: a session whose client went away keeps its channels for
  ``session_buffer_seconds``; one thread (:meth:`Bridge._keep`) goes on reading them meanwhile,
  and a reconnect with the same session_id gets what came, in order. As in Jupyter Server, a
  kernel keeps one such session on a gateway, its latest client's (KEEP_PER_KERNEL), holding at
  most KEEP_MAX_BYTES: a client that comes back to a session no longer kept gets the kernel's
  replay buffer instead (below), as after a gateway's loss. Without these bounds every closed
  session of a busy kernel held four kernel connections and a copy of all its output for the
  whole window (a client opening and closing sessions on 20 busy kernels grew the gateway by
  0.25–0.55 MB a session, more as they piled up; ``python -m bench.gc_soak`` found it).
* Replay: what each client got is recorded for other gateways (gateway/channels/replay.py).
"""
from __future__ import annotations

import itertools
import logging
import select
import threading
import time
import uuid
from typing import TYPE_CHECKING, Any

import redis
from simple_websocket import ConnectionClosed

from ...workers.registry import GATEWAY_BEAT
from .. import zmtp
from . import replay
from .connection import Connection
from .hooks import Hooks
from .pump import Pump
from .session import KernelSession

if TYPE_CHECKING:
    from ..kernels import KernelService

log = logging.getLogger(__name__)
SEEN_EVERY = 0.05  # how often what a client got is recorded for other gateways
KEEP_PER_KERNEL = 1  # sessions without a client kept per kernel: the latest to lose it
KEEP_MAX_BYTES = 64 << 20  # a kept session that has read more is dropped (replay serves it)


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
        self._stopped = threading.Event()  # stop(): the threads below end
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
            older: list[KernelSession] = []
            if mine:
                sess.owner = None
                sess.detached_at = time.monotonic()
                sess.kept_bytes = 0
                self._keeping.set()
                older = sorted((s for (k, _), s in self.sessions.items()
                                if k == sess.kid and s is not sess and s.owner is None
                                and s.detached_at is not None and not s.gone),
                               key=lambda s: s.detached_at or 0.0)
                older = older[:max(0, len(older) - (KEEP_PER_KERNEL - 1))]
            sess.released.set()
        for s in older:  # the kernel's earlier clients' kept sessions: replay serves them
            self._drop(s, detached_only=True)
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

    def stop(self) -> None:
        """End the bridge's threads (a gateway process never does; an app built in a test's
        process does, so that it stops beating and reading for the cluster it joined)."""
        self._stopped.set()
        self._keeping.set()

    def _reap(self) -> None:
        while not self._stopped.is_set():
            try:  # connection counts held by a gateway without this heartbeat are stale
                self.registry.gateway_heartbeat(self.instance)
            except Exception:
                log.debug("cannot reach the registry", exc_info=True)
            if self._stopped.wait(GATEWAY_BEAT):
                return
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
                        or sess.kid not in live and self.gone_for_good(sess.kid)
                        or self._served_elsewhere(sess)):
                    self._drop(sess, detached_only=True)

    def _keep(self) -> None:
        """Read the channels of sessions that have no client, as libzmq's I/O thread did.

        A session keeps its channels for ``session_buffer_seconds`` after its client went
        (a reconnect gets what came meanwhile). Unread, the kernel's side would fill its
        socket buffers and then its high-water mark (1000 messages), past which it drops
        output; so one thread reads them all into the channels' inboxes, which the pump of
        the next client relays first."""
        while not self._stopped.is_set():
            kept = self._unattended()
            if not kept:
                self._keeping.clear()  # before the check: a detach after it sets it again
                if not self._unattended() and not self._stopped.is_set():
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
                    before = len(peer.inbox)
                    peer.handle(ev)
                    for msg in itertools.islice(reversed(peer.inbox), len(peer.inbox) - before):
                        sess.kept_bytes += sum(map(len, msg))
                lost = any(p.retry_at is not None for p in sess.sockets.values())
            if lost or sess.kept_bytes > KEEP_MAX_BYTES:
                # No reconnect without a client (the kernel restarted), or more output than a
                # session is kept for: the supervisor's replay buffer still serves a client
                # that comes back here.
                if not lost:
                    log.info("Kernel %s: session %s kept more than %d MB without a client; "
                             "dropped", sess.kid, sess.session_id, KEEP_MAX_BYTES >> 20)
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

    def gone_for_good(self, kid: str) -> bool:
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

    # -- serving one WebSocket ------------------------------------------------------------

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
            Pump(conn, sess, self.service, self.gone_for_good).run()
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

    # -- replay across gateways -----------------------------------------------------------

    def _record_seen(self) -> None:
        """Every SEEN_EVERY, tell other gateways what each client got (one pipeline for all
        sessions), in case this gateway dies: they replay from there
        (gateway/channels/replay.py)."""
        while not self._stopped.wait(SEEN_EVERY):
            with self._lock:
                dirty = [s for s in self.sessions.values() if s.seen_dirty]
            if not dirty:
                continue
            seen = replay.seen_of(dirty)
            try:
                self.registry.mark_seen_many(seen, self.buffer_seconds)
            except Exception:
                log.debug("cannot record what %d sessions saw", len(seen), exc_info=True)
