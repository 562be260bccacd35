"""/api/kernels: list, start, read, interrupt, restart, shut down; and the channels socket."""
from __future__ import annotations

import uuid
from typing import Any

from flask import Blueprint, Response, jsonify, request
from flask_sock import Sock

from ..state import state
from . import json_body, owned, user

bp = Blueprint("kernels", __name__)


@bp.get("/api/kernels")
def list_kernels() -> Any:
    return jsonify(state().service.list(user()))


@bp.post("/api/kernels")
def start_kernel() -> Any:
    body = json_body()
    if request.args.get("wait") in ("0", "false", "no"):
        body["wait"] = False
    model = state().service.start(body, user())
    resp = jsonify(model)
    resp.status_code = 201 if model["poolgate"]["status"] == "RUNNING" else 202
    resp.headers["Location"] = request.script_root + request.path.rstrip("/") + "/" + model["id"]
    return resp


@bp.get("/api/kernels/<kernel_id>")
def get_kernel(kernel_id: str) -> Any:
    owned(kernel_id)
    service = state().service
    return jsonify(service.model(service.record(kernel_id)))


@bp.delete("/api/kernels/<kernel_id>")
def delete_kernel(kernel_id: str) -> Any:
    owned(kernel_id)
    state().service.shutdown(kernel_id)
    state().bridge.close_kernel(kernel_id)
    return Response(status=204)


@bp.post("/api/kernels/<kernel_id>/interrupt")
def interrupt_kernel(kernel_id: str) -> Any:
    owned(kernel_id)
    state().service.interrupt(kernel_id)
    return Response(status=204)


@bp.post("/api/kernels/<kernel_id>/restart")
def restart_kernel(kernel_id: str) -> Any:
    owned(kernel_id)
    bridge = state().bridge
    service = state().service
    service.record(kernel_id)  # 404 before anything is held
    bridge.restarting(kernel_id)
    try:
        return jsonify(service.restart(kernel_id))
    finally:
        bridge.restart_settled(kernel_id)


def register_channels(sock: Sock, base: str) -> None:
    """The WebSocket route; an unknown kernel (or another user's) is a 404 before the handshake.
    Its lookup runs after authentication (gateway/auth.py is the app's first before_request),
    so a caller without credentials cannot tell a live kernel id from an unknown one."""
    path = base + "/api/kernels/<kernel_id>/channels"

    @sock.route(path, endpoint="kernel_channels")  # type: ignore[untyped-decorator]
    def channels(ws: Any, kernel_id: str) -> None:
        session_id = request.args.get("session_id") or uuid.uuid4().hex
        state().bridge.serve(ws, kernel_id, session_id)

    app = sock.app
    assert app is not None

    @app.before_request  # type: ignore[untyped-decorator]
    def _known_kernel() -> None:
        if request.endpoint == "kernel_channels":
            if not state().config.gateway.ws_compression:
                # Declined as Jupyter Server and Enterprise Gateway decline it by default:
                # deflating every frame costs more CPU than a LAN saves (README, WebSocket
                # behaviour). simple-websocket accepts any offer it sees in the headers.
                request.environ.pop("HTTP_SEC_WEBSOCKET_EXTENSIONS", None)
            kid = (request.view_args or {}).get("kernel_id", "")
            owned(kid)
            state().service.record(kid)
