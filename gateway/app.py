"""The Flask front end: takes requests, never starts a kernel itself.

``create_app(settings)`` only wires things together: config, registry, dispatcher, event hub,
the kernel service, the WebSocket bridge, authentication (first), the blueprints and the JSON
error handler.
"""
from __future__ import annotations

import dataclasses
import logging
import socket
from typing import Any

from flask import Flask, request
from flask_sock import Sock

from ..workers.config import Config, load_config
from ..workers.registry import Registry
from . import auth, errors, framing, operating, state
from .api import kernels, kernelspecs, root, sessions, swagger
from .channels.bridge import Bridge
from .channels.simple_ws import NoReaderThread
from .dispatch import Dispatcher
from .events import EventHub
from .kernels import KernelService
from .state import AppState

log = logging.getLogger(__name__)


def create_app(settings: dict[str, Any] | None = None) -> Flask:
    """Build the gateway app. ``settings`` may hold ``CONFIG`` (a Config) or ``CONFIG_PATH``."""
    settings = dict(settings or {})
    app = Flask(__name__, static_folder=None)
    app.config["MAX_CONTENT_LENGTH"] = 1 << 20  # REST bodies are small JSON: 413 past 1 MiB
    app.config.update(settings)
    config: Config = settings.get("CONFIG") or load_config(settings.get("CONFIG_PATH"))
    if settings.get("GATEWAY_OVERRIDES"):  # command-line options win over queues.yaml
        config = dataclasses.replace(config, gateway=dataclasses.replace(
            config.gateway, **settings["GATEWAY_OVERRIDES"]))
    registry = Registry(config.registry_url, config.registry_secret)
    registry.mark_epoch()
    registry.check_keys()  # an ERROR in the log when this gateway's secret is not the others'
    events = EventHub(registry)
    events.start()
    service = KernelService(config, registry, Dispatcher(config), events)
    bridge = Bridge(service, config.gateway.session_buffer_seconds)
    state.install(app, AppState(config=config, registry=registry, service=service, bridge=bridge))
    app.config["SOCK_SERVER_OPTIONS"] = {
        "ping_interval": config.gateway.ws_ping_interval or None,
        "subprotocols": ["v1.kernel.websocket.jupyter.org"],
        "receive_bytes": 65536,
        "max_message_size": framing.MAX_MESSAGE_SIZE,  # both paths: 1009 past it
        "thread_class": NoReaderThread,  # the session's pump reads (gateway/channels/pump.py)
    }
    app.json.sort_keys = False  # type: ignore[attr-defined]
    base = "/" + config.gateway.base_url.strip("/")
    base = "" if base == "/" else base

    auth.install(app, config)  # first: authentication runs before any other before_request
    sock = Sock(app)
    for bp in (root.bp, swagger.bp, kernelspecs.bp, kernels.bp, sessions.bp):
        app.register_blueprint(bp, url_prefix=base or None)
    kernels.register_channels(sock, base)
    errors.install(app)
    operating.install(app, base or None)  # /api/pools, /metrics, /pools (gateway/operating.py)

    @app.before_request
    def _prepare() -> None:
        raw = request.environ.get("gunicorn.socket")
        if raw is not None:  # Nagle + delayed ACK would add ~40 ms to every small message
            try:
                raw.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            except OSError:
                pass

    log.info("Gateway ready: %d pools, %d kernelspecs, registry %s", len(config.pools),
             len(config.kernelspecs), config.registry_url)
    return app
