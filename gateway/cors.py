"""CORS and the WebSocket Origin check, as Jupyter Server and Kernel Gateway offer them.

``gateway.allow_origin`` is "" (the default: no cross-origin browser access), ``*``, or origins
separated by spaces. Responses to an allowed origin carry ``Access-Control-Allow-Origin``; a
preflight (``OPTIONS``) is answered without credentials and without data. A browser WebSocket
whose ``Origin`` is neither this gateway's own nor allowed is refused (403) before the
handshake, so a page on another site cannot drive kernels with a token it found in a URL;
clients that send no ``Origin`` (every non-browser client) are not affected.
"""
from __future__ import annotations

from typing import Any
from urllib.parse import urlsplit

from flask import Flask, Response, current_app, request

from ..workers.errors import Forbidden

METHODS = "GET, POST, PATCH, DELETE, OPTIONS"
HEADERS = "Authorization, Content-Type"


def cross_allowed(origin: str, setting: str) -> bool:
    """May a page from ``origin`` call this gateway across origins?"""
    return bool(origin) and (setting.strip() == "*" or origin in setting.split())


def same_origin(origin: str, host: str) -> bool:
    return urlsplit(origin).netloc.lower() == host.lower()


def _setting() -> str:
    return str(current_app.extensions["poolgate.cors"])


def install(app: Flask, setting: str) -> None:
    """Add ``Access-Control-Allow-Origin`` to responses for allowed origins."""
    app.extensions["poolgate.cors"] = setting

    @app.after_request
    def _allow_origin(resp: Response) -> Response:
        origin = request.headers.get("Origin", "")
        if cross_allowed(origin, setting):
            resp.headers["Access-Control-Allow-Origin"] = "*" if setting.strip() == "*" else origin
            resp.headers.add("Vary", "Origin")
        return resp


def preflight() -> Any:
    """The answer to ``OPTIONS``: what a browser may send, for an allowed origin; never data."""
    resp = Response(status=204)
    resp.headers["Allow"] = METHODS
    if cross_allowed(request.headers.get("Origin", ""), _setting()):
        resp.headers["Access-Control-Allow-Methods"] = METHODS
        resp.headers["Access-Control-Allow-Headers"] = (
            request.headers.get("Access-Control-Request-Headers") or HEADERS)
        resp.headers["Access-Control-Max-Age"] = "600"
    return resp


def check_websocket_origin() -> None:
    """403 for a browser WebSocket from an origin that is neither ours nor allowed."""
    if request.endpoint != "kernel_channels":
        return
    origin = request.headers.get("Origin", "")
    if origin and not same_origin(origin, request.host) and not cross_allowed(origin, _setting()):
        raise Forbidden(f"WebSocket connections from {origin!r} are not allowed; an operator "
                        f"can add it to gateway.allow_origin")
