"""GET /api/swagger.yaml and /api/swagger.json: poolgate's OpenAPI description.

Rule: the description is one file, ``gateway/openapi.yaml`` (package data); both routes serve
it, with ``servers`` set to the gateway's base URL. tests/gateway/test_openapi.py keeps its
paths and methods equal to the app's routes.
"""
from __future__ import annotations

import functools
from pathlib import Path
from typing import Any

import yaml
from flask import Blueprint, Response, jsonify, request

bp = Blueprint("swagger", __name__)
SPEC = Path(__file__).resolve().parent.parent / "openapi.yaml"


@functools.lru_cache(maxsize=1)
def description() -> dict[str, Any]:
    """The OpenAPI description as loaded from its file."""
    with SPEC.open(encoding="utf-8") as f:
        return yaml.safe_load(f)  # type: ignore[no-any-return]


def _served() -> dict[str, Any]:
    return {**description(), "servers": [{"url": request.script_root + bp_prefix()}]}


def bp_prefix() -> str:
    """The base URL the blueprint is mounted under ("" at the root)."""
    rule = request.url_rule.rule if request.url_rule is not None else ""
    return rule[: rule.rfind("/api/swagger")] if "/api/swagger" in rule else ""


@bp.get("/api/swagger.yaml")
def swagger_yaml() -> Any:
    text = yaml.safe_dump(_served(), sort_keys=False, allow_unicode=True)
    return Response(text, mimetype="application/yaml")


@bp.get("/api/swagger.json")
def swagger_json() -> Any:
    return jsonify(_served())
