"""create_app stores the app's shared objects once, as one AppState (gateway/state.py), and every
view reads them from there: the config the app loaded, and the metrics the bridge reports to."""
from __future__ import annotations

from flask import Flask

from poolgate.gateway.app import create_app
from poolgate.gateway.metrics import GatewayMetrics
from poolgate.gateway.state import AppState, state
from tests.conftest import Stack


def test_views_read_the_one_state(redis_stack: Stack) -> None:
    app = create_app({"CONFIG_PATH": str(redis_stack.config)})
    shared = state(app)
    try:
        check(app, shared)
    finally:  # its listener threads would go on claiming the stack's launches for this process
        shared.close()


def check(app: Flask, shared: AppState) -> None:
    assert isinstance(shared, AppState)
    assert shared.service.config is shared.config and shared.service.registry is shared.registry
    assert isinstance(shared.metrics, GatewayMetrics) and shared.bridge.metrics is shared.metrics
    assert shared.tally is not None
    with app.app_context():
        assert state() is shared
    client = app.test_client()
    r = client.get("/api/pools")
    assert r.status_code == 200 and {p["name"] for p in r.get_json()} == set(shared.config.pools)
    r = client.get("/api/kernelspecs")
    assert r.status_code == 200 and r.get_json()["default"] == shared.config.default_kernelspec
    metrics = client.get("/metrics")
    assert metrics.status_code == 200 and b"poolgate_launch_queue_seconds" in metrics.data
