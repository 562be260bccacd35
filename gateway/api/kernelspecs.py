"""GET /api/kernelspecs[/<name>] and the spec's files (logos) under /kernelspecs/<name>/."""
from __future__ import annotations

import mimetypes
from pathlib import Path
from typing import Any

from flask import Blueprint, jsonify, request, send_file

from ...workers.errors import UnknownKernelSpec, cut
from ..access import refusal
from ..state import state
from . import user

bp = Blueprint("kernelspecs", __name__)


def _visible(name: str) -> dict[str, Any]:
    """The kernelspecs ``name`` may start (gateway/access.py); all for the anonymous user
    without ``?user=``, as before users existed."""
    config = state().config
    out = {}
    for spec_name, spec in sorted(config.kernelspecs.items()):
        pool = config.pools[spec.pool]
        if pool.kernelspecs and spec_name not in pool.kernelspecs:
            continue
        if (name or not user().admin) and refusal(spec, pool, name):
            continue
        out[spec_name] = spec
    return out


def _caller() -> str:
    """Whose kernelspecs to list: the authenticated user, or ``?user=`` for the anonymous one."""
    return user().name or request.args.get("user", "")


@bp.get("/api/kernelspecs")
def list_specs() -> Any:
    config = state().config
    service = state().service
    specs = _visible(_caller())
    # A spec whose pool no worker serves (one `poolgate serve` could not start here, say)
    # cannot start: it is not offered, unless its pool waits for workers.
    served = {p for w in service.registry.workers() for p in w.get("pools", ())}
    specs = {n: s for n, s in specs.items() if not s.unserved
             and (s.pool in served or config.pools[s.pool].wait_for_workers)}
    default = config.default_kernelspec if config.default_kernelspec in specs else next(iter(specs), "")
    return jsonify({"default": default,
                    "kernelspecs": {n: s.to_model() for n, s in specs.items()}})


@bp.get("/api/kernelspecs/<name>")
def get_spec(name: str) -> Any:
    spec = _visible(_caller()).get(name)
    if spec is None:
        raise UnknownKernelSpec(f"no kernelspec named {cut(name)!r}")
    return jsonify(spec.to_model())


@bp.get("/kernelspecs/<name>/<path:filename>")
def spec_file(name: str, filename: str) -> Any:
    spec = _visible(_caller()).get(name)
    if spec is None:
        raise UnknownKernelSpec(f"no kernelspec named {cut(name)!r}")
    base = Path(spec.resource_dir).resolve()
    try:
        path = (base / filename).resolve()
        found = base in path.parents and path.is_file()
    except OSError:  # a name too long for the file system
        found = False
    if not found:
        raise UnknownKernelSpec(f"kernelspec {cut(name)!r} has no file {cut(filename)!r}")
    return send_file(path, mimetype=mimetypes.guess_type(path.name)[0])
