"""One JSON error handler: every error a client sees is ``{"reason", "message"}`` with a 4xx/5xx."""
from __future__ import annotations

import logging
from typing import Any

import redis
from flask import Flask, jsonify, request
from werkzeug.exceptions import HTTPException
from werkzeug.routing import WebsocketMismatch

from ..workers.errors import GatewayError, cut

log = logging.getLogger(__name__)


def reason_code(name: str) -> str:
    """An HTTP reason phrase as the ``reason`` of a JSON error: "Not Found" -> "not_found"."""
    return name.lower().replace(" ", "_")


def _reply(status: int, reason: str, message: str, **extra: Any) -> Any:
    resp = jsonify({"reason": reason, "message": message, **extra})
    resp.status_code = status
    return resp


def install(app: Flask) -> None:
    """Register the handlers on ``app``."""

    @app.errorhandler(GatewayError)
    def gateway_error(exc: GatewayError) -> Any:
        if exc.status >= 500:
            log.warning("%s: %s", exc.code, exc.message)
        return _reply(exc.status, exc.code, exc.message)

    @app.errorhandler(HTTPException)
    def http_error(exc: HTTPException) -> Any:
        if isinstance(exc, WebsocketMismatch):  # curl or a browser tab on a WebSocket route
            return _reply(400, "bad_request", f"{cut(request.path)} is a WebSocket: connect to it "
                          "with a WebSocket client (ws:// or wss://), as Jupyter clients do")
        return _reply(exc.code or 500, reason_code(exc.name or "error"), exc.description or "")

    @app.errorhandler(redis.RedisError)
    def registry_error(exc: redis.RedisError) -> Any:
        log.warning("Registry unavailable: %s", exc)
        return _reply(503, "registry_unavailable",
                      f"the kernel registry (Redis) did not answer: {exc}; try again shortly")

    @app.errorhandler(Exception)
    def unexpected(exc: Exception) -> Any:
        log.exception("Unexpected error")
        return _reply(500, "internal_error", f"{type(exc).__name__}: {exc}")
