"""The /pools dashboard in real headless Chromium (Debian's `chromium`), driven through the
DevTools protocol: its numbers match /api/pools, it updates live, and its screenshot at a
laptop's 1366x768 shows the page."""
from __future__ import annotations

import json
import shutil
import struct
import zlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.browser import Browser
from tests.conftest import Stack
from tests.integration.test_ops import Launch, eventually, pools

READ_DOM = """JSON.stringify({
  refreshed: Number(document.body.dataset.refreshed || 0),
  status: document.getElementById("status").textContent,
  pools: Array.from(document.querySelectorAll("section.pool")).map(function (s) {
    var stat = {};
    s.querySelectorAll("[data-stat]").forEach(function (e) {
      stat[e.dataset.stat] = Number(e.textContent); });
    return {name: s.dataset.pool, stat: stat,
      kernels: Array.from(s.querySelectorAll("tr[data-kernel]")).map(function (r) {
        return [r.dataset.kernel, r.querySelector("[data-field=user]").textContent]; }),
      workers: Array.from(s.querySelectorAll("tr[data-worker]")).map(function (r) {
        return r.dataset.worker; }),
      waiting: Array.from(s.querySelectorAll("[data-waiting]")).map(function (e) {
        return e.dataset.waiting; })};
  }),
  width: window.innerWidth, overflowX: document.documentElement.scrollWidth > window.innerWidth
})"""


def read_dom(browser: Browser) -> dict[str, Any]:
    return json.loads(browser.evaluate(READ_DOM))  # type: ignore[no-any-return]


@pytest.fixture
def browser(tmp_path: Path) -> Iterator[Browser]:
    b = Browser(tmp_path / "chromium-profile")
    try:
        yield b
    finally:
        b.close()
        shutil.rmtree(tmp_path / "chromium-profile", ignore_errors=True)


def png_facts(data: bytes) -> tuple[int, int, int]:
    """(width, height, distinct byte values in the image data) of a PNG."""
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    width, height = struct.unpack(">II", data[16:24])
    pos, idat = 8, b""
    while pos < len(data):
        length, kind = struct.unpack(">I4s", data[pos:pos + 8])
        if kind == b"IDAT":
            idat += data[pos + 8:pos + 8 + length]
        pos += 12 + length
    return width, height, len(set(zlib.decompress(idat)))


def expected(api: dict[str, dict[str, Any]]) -> dict[str, Any]:
    return {name: {"stat": {"workers": p["workers"], "used": p["used"], "slots": p["slots"],
                            "running": p["running"], "waiting": p["waiting"],
                            "failures": p["failures_total"]},
                   "kernels": sorted([k["id"], k["user"] or "anonymous"] for k in p["kernels"]),
                   "workers": [w["name"] for w in p["worker_list"]],
                   "waiting": [w["kernel_id"] for w in p["waiting_launches"]]}
            for name, p in api.items()}


def shown(dom: dict[str, Any]) -> dict[str, Any]:
    return {p["name"]: {"stat": p["stat"], "kernels": sorted(p["kernels"]),
                        "workers": p["workers"], "waiting": p["waiting"]} for p in dom["pools"]}


def test_dashboard_matches_the_api_and_is_readable(redis_stack: Stack, browser: Browser,
                                                   tmp_path: Path) -> None:
    gw = redis_stack.gw
    kids = [gw.start("python3", env={"KERNEL_USERNAME": "alice"})["id"],
            gw.start("python3", env={"KERNEL_USERNAME": "bob"})["id"],
            gw.start("tiny-py", env={"KERNEL_USERNAME": "carol"})["id"]]
    waiter = Launch(gw, "tiny-py", {"KERNEL_USERNAME": "dave", "KERNEL_LAUNCH_TIMEOUT": "60"})
    waiter.start()
    try:
        eventually(lambda: pools(gw)["tiny"]["waiting"] == 1, what="a waiting launch")
        browser.open(redis_stack.url + "/pools")
        dom = eventually(lambda: (d := read_dom(browser))["refreshed"] >= 1 and d,
                         what="the page's script to refresh it")
        api = pools(gw)
        assert shown(dom) == expected(api)
        assert dom["status"].startswith("updated") and not dom["overflowX"]
        assert (api["local"]["running"], api["tiny"]["running"],
                api["tiny"]["waiting"]) == (2, 1, 1)
        png = browser.screenshot(tmp_path / "pools.png")
        assert shown(read_dom(browser)) == expected(pools(gw))  # what the screenshot shows
        width, height, distinct = png_facts(png)
        assert (width, height) == (1366, 768) and distinct > 50, (width, height, distinct)
    finally:
        gw.shutdown(kids[2])
        waiter.join(70)
        for kid in kids + [k["id"] for k in gw.kernels()]:
            gw.shutdown(kid)


def test_dashboard_updates_live(redis_stack: Stack, browser: Browser) -> None:
    gw = redis_stack.gw
    browser.open(redis_stack.url + "/pools")
    eventually(lambda: read_dom(browser)["refreshed"] >= 1, what="the first refresh")
    assert shown(read_dom(browser))["local"]["stat"]["running"] == 0
    kid = gw.start("python3", env={"KERNEL_USERNAME": "erin"})["id"]
    try:
        dom = eventually(lambda: (d := shown(read_dom(browser)))["local"]["stat"]["running"] == 1 and d,
                         timeout=15, what="the new kernel on the open page")
        assert dom["local"]["kernels"] == [[kid, "erin"]]
    finally:
        gw.shutdown(kid)
    eventually(lambda: shown(read_dom(browser))["local"]["kernels"] == [], timeout=15,
               what="the kernel to leave the open page")
    # the page says so when the gateway stops answering, and keeps the last numbers
    browser.evaluate("window.fetch = function () { return Promise.reject(new Error('down')); }")
    eventually(lambda: "cannot reach" in read_dom(browser)["status"], timeout=15,
               what="the page to notice the gateway is unreachable")
