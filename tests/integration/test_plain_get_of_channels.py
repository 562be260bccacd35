"""A plain GET of a kernel's WebSocket route (curl, a browser tab) is a 400 that says what the
route is, not werkzeug's "The browser (or proxy) sent a request that this server could not
understand" (werkzeug's routing refuses it before any view or hook that knows the kernel)."""
from __future__ import annotations

from tests.conftest import Stack


def test_a_plain_get_of_channels_says_it_is_a_websocket(redis_stack: Stack) -> None:
    gw = redis_stack.gw
    kid = gw.start()["id"]
    try:
        r = gw.get(f"/api/kernels/{kid}/channels")
        assert r.status_code == 400 and r.json()["reason"] == "bad_request"
        assert r.json()["message"].startswith(f"/api/kernels/{kid}/channels is a WebSocket: "), \
            r.text
        ch = gw.channel(kid)  # a real WebSocket client is served as before
        assert ch.execute("1+1").result == "2"
        ch.close()
    finally:
        gw.shutdown(kid)
