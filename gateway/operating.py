"""Wires the operator's views into a gateway app: /api/pools, /metrics and the /pools page.

Called once by ``create_app``; it also starts the thread that tallies failures and culls
(``gateway/tally.py``). The root page leads to the dashboard unless another route owns it.
"""
from __future__ import annotations

from flask import Flask, g, redirect, request, url_for

from ..workers import logs
from . import dashboard, metrics
from .api import pools
from .state import state
from .tally import TallyListener


def install(app: Flask, prefix: str | None) -> None:
    """Register the blueprints under ``prefix`` and connect the metrics hooks."""
    shared = state(app)
    m = metrics.install(shared)
    for bp in (pools.bp, metrics.bp, dashboard.bp):
        app.register_blueprint(bp, url_prefix=prefix)
    app.before_request(_log_context)
    shared.tally = TallyListener(shared.registry, on_launch=m.launched)
    shared.tally.start()
    root = (prefix or "") + "/"
    if not any(rule.rule == root for rule in app.url_map.iter_rules()):
        app.add_url_rule(root, "root_page", lambda: redirect(url_for("dashboard.page")))


def _log_context() -> None:
    """Each request starts its log lines afresh (threads are reused), with its kernel id."""
    logs.clear()
    user = g.get("user")  # set by gateway/auth.py, which runs first
    if user is not None and user.name:
        logs.bind(user=user.name)
    kid = (request.view_args or {}).get("kernel_id")
    if kid:
        logs.bind(kernel_id=str(kid))
