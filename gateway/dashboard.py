"""GET /pools: a small live dashboard of the pools, rendered on the server.

Rule: the page shows exactly what ``/api/pools`` returns (the same builders, one reading of
the registry per request). A few lines of JavaScript fetch ``pools?fragment=1`` every couple of
seconds and swap the pools in place, so the server stays the only renderer.
"""
from __future__ import annotations

from typing import Any

from flask import Blueprint, render_template, request

from .api.pools import snapshot
from .state import state

bp = Blueprint("dashboard", __name__, template_folder="templates")
REFRESH_SECONDS = 2.0


def duration(seconds: Any) -> str:
    """Seconds as a person reads them: 42s, 3m 05s, 2h 07m, 4d 02h; '' when unknown."""
    if seconds is None:
        return ""
    s = int(max(0.0, float(seconds)))
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m {s % 60:02d}s"
    if s < 86400:
        return f"{s // 3600}h {s % 3600 // 60:02d}m"
    return f"{s // 86400}d {s % 86400 // 3600:02d}h"


def totals(pools: list[dict[str, Any]]) -> dict[str, int]:
    """The sums shown above the pools."""
    keys = ("workers", "slots", "used", "running", "waiting", "failures_total")
    return {k: sum(int(p[k]) for p in pools) for k in keys}


@bp.app_template_filter("duration")
def _duration_filter(seconds: Any) -> str:
    return duration(seconds)


@bp.get("/pools")
def page() -> Any:
    pools = snapshot(state().config, state().registry)
    template = "pools_fragment.html" if request.args.get("fragment") else "pools.html"
    return render_template(template, pools=pools, totals=totals(pools),
                           refresh=REFRESH_SECONDS)
