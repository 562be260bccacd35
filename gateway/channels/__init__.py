"""The WebSocket bridge: moves frames between clients and kernels (/api/kernels/<id>/channels).

One job per module:

* ``bridge.py``: :class:`Bridge`, every session of this gateway and which connection owns it
  (takeover, parking, sessions kept without a client, the reaper);
* ``pump.py``: :class:`Pump`, the one thread per WebSocket that relays both ways;
* ``session.py``: :class:`KernelSession`, a session's kernel channels and its readiness table;
* ``connection.py``: :class:`Connection`, the WebSocket adapter (non-blocking writes, reads
  parsed here);
* ``simple_ws.py``: all that reaches into simple-websocket's internals;
* ``replay.py``: what a client gets again after its gateway died;
* ``hooks.py``: what the bridge reports (gateway/metrics.py counts it).

The names other modules use are importable from here.
"""
from .bridge import Bridge
from .connection import Connection
from .pump import Outbox, Pump
from .session import NUDGE_EVERY, NUDGE_FIRST, KernelSession
from .simple_ws import NoReaderThread

__all__ = ["Bridge", "Connection", "KernelSession", "NUDGE_EVERY", "NUDGE_FIRST",
           "NoReaderThread", "Outbox", "Pump"]
