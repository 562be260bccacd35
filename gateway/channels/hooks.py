"""What the WebSocket bridge reports about itself, and to whom: :class:`Hooks`, a no-op base that
gateway/metrics.py implements, and the per-connection counters it adds up at scrape time.

The rule of this module: it imports nothing, so the bridge depends on no metrics library.
"""
from __future__ import annotations

from collections.abc import Mapping
from typing import Any


class WsStats:
    """Messages and bytes of one WebSocket, per (direction, channel); one thread writes it."""

    __slots__ = ("counts",)

    def __init__(self) -> None:
        self.counts: dict[tuple[str, str], list[int]] = {}

    def add(self, direction: str, channel: str, nbytes: int) -> None:
        c = self.counts.get((direction, channel))
        if c is None:
            self.counts[(direction, channel)] = [1, nbytes]
        else:
            c[0] += 1
            c[1] += nbytes


class Hooks:
    """What the kernel service and the WebSocket bridge report; this base ignores it all."""

    def launched(self, pool: str, timing: Mapping[str, Any]) -> None:
        """Called once per launch in the cluster (gateway/tally.py) when it is RUNNING."""

    def ws_opened(self, stats: WsStats) -> None:
        """Called by the Bridge when a client WebSocket starts being served."""

    def ws_closed(self, stats: WsStats) -> None:
        """Called by the Bridge when that WebSocket ends."""
