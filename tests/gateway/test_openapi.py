"""gateway/openapi.yaml is true to the app: its paths and methods are the app's routes, both
ways, and both swagger routes serve it (under a base URL too)."""
from __future__ import annotations

import contextlib
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from flask import Flask

from poolgate.gateway.api import swagger
from tests.conftest import DB_BASE, REDIS, need_redis

METHODS = {"get", "post", "put", "patch", "delete"}


@contextlib.contextmanager
def _app(tmp_path: Path, base: str = "") -> Iterator[Flask]:
    """The app, its background threads stopped after the test."""
    from poolgate.gateway.app import create_app
    from poolgate.gateway.state import state

    need_redis()
    cfg = tmp_path / "queues.yaml"
    cfg.write_text(yaml.safe_dump({
        "broker_url": "memory://", "registry_url": f"{REDIS}/{DB_BASE + 29}",
        "gateway": {"auth_token": "t", "base_url": base},
        "pools": {"local": {"launcher": "local", "slots": 1}}}))
    app = create_app({"CONFIG_PATH": str(cfg)})
    try:
        yield app
    finally:
        state(app).close()


def app_routes(app: Flask, base: str = "") -> set[tuple[str, str]]:
    """(method, path) of every rule, in OpenAPI's spelling: <conv:name> becomes {name}."""
    out = set()
    for rule in app.url_map.iter_rules():
        path = re.sub(r"<(?:[^:<>]+:)?([^<>]+)>", r"{\1}", rule.rule)
        path = path[len(base):] or "/" if base and path.startswith(base) else path
        out |= {(m.lower(), path) for m in rule.methods or () if m.lower() in METHODS}
    return out


def spec_routes(spec: dict[str, Any]) -> set[tuple[str, str]]:
    return {(m, path) for path, item in spec["paths"].items() for m in item if m in METHODS}


def test_the_description_has_every_route_and_no_other(tmp_path: Path) -> None:
    with _app(tmp_path) as app:
        routes = app_routes(app)
    spec = swagger.description()
    assert routes - spec_routes(spec) == set(), "routes missing from gateway/openapi.yaml"
    assert spec_routes(spec) - routes == set(), "gateway/openapi.yaml has routes the app lacks"


def test_path_parameters_are_declared(tmp_path: Path) -> None:
    """Each {name} in a path is a declared path parameter of each of its operations."""
    spec = swagger.description()
    params = spec["components"]["parameters"]
    for path, item in spec["paths"].items():
        for method, op in ((m, o) for m, o in item.items() if m in METHODS):
            declared = {(params[p["$ref"].rsplit("/", 1)[1]] if "$ref" in p else p)["name"]
                        for p in [*item.get("parameters", []), *op.get("parameters", [])]}
            assert set(re.findall(r"{(\w+)}", path)) <= declared, (method, path)


@pytest.mark.parametrize("base", ["", "/prefix"])
def test_both_routes_serve_the_description(tmp_path: Path, base: str) -> None:
    with _app(tmp_path, base) as app:
        client = app.test_client()
        auth = {"Authorization": "token t"}
        as_json = client.get(f"{base}/api/swagger.json", headers=auth)
        as_yaml = client.get(f"{base}/api/swagger.yaml", headers=auth)
        assert as_json.status_code == as_yaml.status_code == 200
        assert as_yaml.mimetype == "application/yaml"
        assert as_json.json == yaml.safe_load(as_yaml.data)
        assert as_json.json["paths"] == swagger.description()["paths"]
        assert as_json.json["servers"] == [{"url": base}]
        assert client.get(f"{base}/api/swagger.json").status_code == 401  # it needs credentials too
