"""Run the gateway on gunicorn with threads (a production server flask-sock supports).

One process, many threads: every open WebSocket holds a thread and six descriptors besides its
own (four TCP connections to the kernel, spoken as ZMTP by gateway/zmtp.py, and a wake-up
pipe's two ends). The file-descriptor limit is raised to the hard limit. The ZMQ context's
socket cap (1023 by default, the cause of Enterprise Gateway's "too many open files" near 210
kernels) is lifted to match for the few libzmq sockets left (interrupt and shutdown messages).
"""
from __future__ import annotations

import json
import logging
import resource
import socket
from typing import Any

import zmq
from gunicorn import util as gunicorn_util
from gunicorn.app.base import BaseApplication

from ..workers.errors import cut
from . import gcpolicy
from .errors import reason_code

log = logging.getLogger(__name__)


def raise_limits() -> int:
    """Raise RLIMIT_NOFILE to its hard limit and size ZMQ's socket cap to it; returns the limit."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = hard if hard != resource.RLIM_INFINITY else 1 << 20
    if soft < target:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
            soft = target
        except (ValueError, OSError):
            pass
    zmq.Context.instance().set(zmq.MAX_SOCKETS, max(1024, min(soft, 1 << 16)))
    return soft


def write_json_error(sock: socket.socket, status: int, reason: str, message: str) -> None:
    """gunicorn's answer to a request it cannot parse (a request line over 4,094 bytes, a bad
    header...), before the app sees it: the gateway's JSON error, not gunicorn's HTML page."""
    body = json.dumps({"reason": reason_code(reason),
                       "message": cut(message, 200) or reason}).encode()
    head = (f"HTTP/1.1 {status} {reason}\r\nConnection: close\r\n"
            f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n")
    gunicorn_util.write_nonblock(sock, head.encode("latin-1") + body)


class GatewayServer(BaseApplication):  # type: ignore[misc]
    """gunicorn, configured in code, serving ``create_app(settings)``."""

    def __init__(self, settings: dict[str, Any], ip: str, port: int, threads: int,
                 tls: dict[str, Any] | None = None) -> None:
        self.settings = settings
        self.options = {
            "bind": f"{ip}:{port}",
            "workers": 1,
            "worker_class": "gthread",
            "threads": threads,
            "timeout": 0,
            "graceful_timeout": 5,
            "keepalive": 75,
            "accesslog": None,
            "loglevel": "warning",
            "worker_connections": threads * 2,  # gthread keeps alive only beyond `threads`
            **(tls or {}),  # certfile, keyfile, ca_certs + cert_reqs (poolgate/cli.py)
        }
        super().__init__()

    def load_config(self) -> None:
        for key, value in self.options.items():
            self.cfg.set(key, value)

    def load(self) -> Any:
        from .app import create_app

        raise_limits()
        app = create_app(self.settings)
        gcpolicy.install()  # full collections skip start-up's ~56,000 objects and idle sessions
        return app


def run(settings: dict[str, Any], ip: str, port: int, threads: int,
        tls: dict[str, Any] | None = None) -> None:
    gunicorn_util.write_error = write_json_error  # gunicorn's workers call it through the module
    GatewayServer(settings, ip, port, threads, tls).run()
