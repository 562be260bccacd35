"""GET /api: the version, as Jupyter Server answers it."""
from __future__ import annotations

from typing import Any

from flask import Blueprint, jsonify

bp = Blueprint("root", __name__)
VERSION = "0.1.0"


@bp.get("/api")
@bp.get("/api/")
def version() -> Any:
    return jsonify({"version": VERSION, "gateway": "poolgate"})
