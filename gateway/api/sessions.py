"""/api/sessions as Kernel Gateway serves it: a session names a path and owns a kernel."""
from __future__ import annotations

import uuid
from typing import Any

from flask import Blueprint, Response, jsonify

from ...workers.errors import BadRequest, KernelNotFound, SessionNotFound, cut
from ..access import session_visible
from ..state import state
from . import json_body, owned, user

bp = Blueprint("sessions", __name__)


def _shape(sess: dict[str, Any], kernel: dict[str, Any]) -> dict[str, Any]:
    return {"id": sess["id"], "path": sess["path"], "name": sess["name"], "type": sess["type"],
            "kernel": kernel, "notebook": {"path": sess["path"], "name": sess["name"]}}


def _model(sess: dict[str, Any]) -> dict[str, Any]:
    """The session with its kernel's model. A session whose kernel is gone (shut down, culled,
    its failure forgotten) is deleted and not found, as Jupyter Server does ("culled")."""
    service = state().service
    try:
        return _shape(sess, service.model(service.record(sess["kernel_id"])))
    except KernelNotFound as gone:
        state().registry.delete_session(sess["id"])
        raise SessionNotFound(f"session {cut(sess['id'])} not found: its kernel is gone "
                              f"({gone})") from None


def _get(sid: str) -> dict[str, Any]:
    sess = state().registry.session(sid)
    if sess is None or not session_visible(sess, user()):  # another user's is unknown too
        raise SessionNotFound(f"session {cut(sid)} not found")
    return sess


@bp.get("/api/sessions")
def list_sessions() -> Any:
    """Every session the user may see, its kernels read together (KernelService.models);
    those whose kernel is gone are deleted and left out."""
    registry = state().registry
    sessions = [s for s in registry.sessions() if session_visible(s, user())]
    kernels = state().service.models(
        list(registry.records(sorted({s["kernel_id"] for s in sessions})).values()))
    out = []
    for sess in sessions:
        kernel = kernels.get(sess["kernel_id"])
        if kernel is not None:
            out.append(_shape(sess, kernel))
        elif not registry.rebuilding():  # a lost registry's kernels are being written again
            registry.delete_session(sess["id"])
    return jsonify(out)


@bp.post("/api/sessions")
def create_session() -> Any:
    body = json_body()
    notebook = body.get("notebook") or {}
    if not isinstance(notebook, dict):
        raise BadRequest("'notebook' must be an object")
    path = body.get("path") or notebook.get("path")
    if not isinstance(path, str) or not path:
        raise BadRequest("a session needs a 'path'")
    kernel = body.get("kernel") or {}
    if not isinstance(kernel, dict):
        raise BadRequest("'kernel' must be an object")
    service = state().service
    if kernel.get("id"):
        owned(str(kernel["id"]))
        kid = service.record(str(kernel["id"])).id
    else:
        kid = service.start({"name": kernel.get("name"), "env": body.get("env")}, user())["id"]
    sess = {"id": str(uuid.uuid4()), "path": path, "name": str(body.get("name") or ""),
            "type": str(body.get("type") or "notebook"), "kernel_id": kid, "user": user().name}
    state().registry.save_session(sess["id"], sess)
    resp = jsonify(_model(sess))
    resp.status_code = 201
    resp.headers["Location"] = f"/api/sessions/{sess['id']}"
    return resp


@bp.get("/api/sessions/<sid>")
def get_session(sid: str) -> Any:
    return jsonify(_model(_get(sid)))


@bp.patch("/api/sessions/<sid>")
def update_session(sid: str) -> Any:
    sess = _get(sid)
    body = json_body()
    for key in ("path", "name", "type"):
        if key in body:
            if not isinstance(body[key], str):
                raise BadRequest(f"'{key}' must be a string")
            sess[key] = body[key]
    kernel = body.get("kernel")
    if isinstance(kernel, dict):
        if kernel.get("id"):
            owned(str(kernel["id"]))
            sess["kernel_id"] = state().service.record(str(kernel["id"])).id
        elif kernel.get("name"):
            old = sess["kernel_id"]
            sess["kernel_id"] = state().service.start({"name": kernel["name"]}, user())["id"]
            try:
                state().service.shutdown(old)
            except KernelNotFound:
                pass
    state().registry.save_session(sid, sess)
    return jsonify(_model(sess))


@bp.delete("/api/sessions/<sid>")
def delete_session(sid: str) -> Any:
    sess = _get(sid)
    try:
        state().service.shutdown(sess["kernel_id"])
        state().bridge.close_kernel(sess["kernel_id"])
    except KernelNotFound:
        pass
    state().registry.delete_session(sid)
    return Response(status=204)
