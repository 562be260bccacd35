"""What the launchers of remote kernels (docker, docker-swarm, kubernetes, yarn) share: one reply
listener per pool, a poll that asks the backend at most every few seconds, and signals sent
through the kernel launcher's command port.

Rule: nothing here knows a backend; each launcher passes a function that asks its own.
"""
from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable

from ..errors import BackendUnavailable, LaunchError
from ..protocol import KernelHandle
from .reply import ReplyListener, send_command

log = logging.getLogger(__name__)


class SharedReplies:
    """The worker's one reply listener for a pool's kernel launchers, opened on first use (or
    by the launcher's prepare(), so that a port clash shows at start-up)."""

    def __init__(self, bind: str, port: int) -> None:
        self.bind, self.port = bind, port
        self._listener: ReplyListener | None = None
        self._lock = threading.Lock()

    def get(self) -> ReplyListener:
        with self._lock:
            if self._listener is None:
                self._listener = ReplyListener(self.bind, self.port).start()
            return self._listener

    def close(self) -> None:
        if self._listener is not None:
            self._listener.close()


class PollCache:
    """Answers poll() from the backend's last answer for ``interval`` seconds while the kernel
    lives; an ended kernel is asked again at once (its reason does not change)."""

    def __init__(self, interval: float) -> None:
        self.interval = interval
        self._polled: dict[str, tuple[float, str | None]] = {}

    def poll(self, kid: str, ask: Callable[[], str | None]) -> str | None:
        """None while the kernel lives, else why it ended. ``ask`` raises poolgate's errors: a
        backend that is down (BackendUnavailable) says nothing about the kernel."""
        now = time.monotonic()
        at, why = self._polled.get(kid, (0.0, None))
        if now - at < self.interval and why is None:
            return None
        try:
            why = ask()
        except BackendUnavailable as exc:
            log.warning("Kernel %s: %s", kid, exc.message)
            why = None
        except LaunchError as exc:
            why = exc.message
        self._polled[kid] = (now, why)
        return why

    def forget(self, kid: str) -> None:
        self._polled.pop(kid, None)


def signal_through_launcher(handle: KernelHandle, signum: int) -> None:
    """Send ``signum`` through the kernel launcher's command port: it works wherever the
    resource manager put the kernel."""
    conn, port = handle.connection, int(handle.data.get("command_port") or 0)
    if conn is None or not port:
        return
    answer = send_command(conn.ip, port, conn.key, handle.kernel_id, signum)
    if answer != "ok":
        log.warning("Kernel %s: signal %d not delivered by its kernel launcher (%s)",
                    handle.kernel_id, signum, answer)
