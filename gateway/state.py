"""The gateway app's shared objects: one :class:`AppState` per app, stored by ``create_app``
and fetched by every view with :func:`state`.

The rule of this module: views and hooks get the config, registry, kernel service and bridge
from here, and from nowhere else (no ``app.extensions`` lookups, no module globals).
"""
from __future__ import annotations

from dataclasses import dataclass, field

from flask import Flask, current_app

from ..workers.config import Config
from ..workers.registry import Registry
from .channels.bridge import Bridge
from .channels.hooks import Hooks
from .kernels import KernelService
from .tally import TallyListener

KEY = "poolgate"  # its place in app.extensions


@dataclass
class AppState:
    """What one gateway app shares between requests."""

    config: Config
    registry: Registry
    service: KernelService
    bridge: Bridge
    metrics: Hooks = field(default_factory=Hooks)  # gateway/metrics.py installs GatewayMetrics
    tally: TallyListener | None = None  # the failure and cull tally (gateway/operating.py)

    def close(self) -> None:
        """Stop the app's background threads: its event and tally listeners and the bridge's.
        A gateway process never calls it; a test that builds an app in its own process does,
        or the app would go on counting, beating and listening for the cluster it joined
        (and, once that cluster's Redis is gone, logging its reconnections into later tests).
        The listeners are waited for (a second or two)."""
        self.bridge.stop()
        self.service.events.stop(wait=5.0)
        if self.tally is not None:
            self.tally.stop(wait=5.0)


def install(app: Flask, shared: AppState) -> None:
    """Store ``shared`` as ``app``'s state; called once, by ``create_app``."""
    app.extensions[KEY] = shared


def state(app: Flask | None = None) -> AppState:
    """The state of ``app``, or of the app handling the current request."""
    shared = (current_app if app is None else app).extensions[KEY]
    assert isinstance(shared, AppState), "create_app stores the app's state (gateway/state.py)"
    return shared
