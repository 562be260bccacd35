"""poolgate.lab, the Jupyter Server extension that turns off Nagle's algorithm on kernel WebSockets."""
from __future__ import annotations

import asyncio
import json
import logging
import socket
import subprocess
import sys
import threading
import zipfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import websocket
from tornado.httpserver import HTTPServer
from tornado.web import Application
from tornado.websocket import WebSocketHandler

from poolgate import lab

ROOT = Path(__file__).resolve().parents[1]


def nodelay_of(handler: WebSocketHandler) -> int:
    stream = handler.ws_connection.stream  # type: ignore[union-attr]
    return int(stream.socket.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY))


class Plain(WebSocketHandler):
    seen: list[int] = []

    async def open(self, *args: Any) -> None:  # async, as Jupyter Server's own open is
        self.seen.append(nodelay_of(self))
        self.write_message("opened")


class Patched(Plain):
    seen: list[int] = []

    async def open(self, *args: Any) -> None:
        self.seen.append(nodelay_of(self))
        self.write_message("opened")


@pytest.fixture
def server() -> Iterator[int]:
    """A real tornado server with both handlers, on an event loop of its own."""
    ready, box = threading.Event(), {}

    async def serve() -> None:
        sock = socket.socket()
        sock.bind(("127.0.0.1", 0))
        sock.listen()
        sock.setblocking(False)
        http = HTTPServer(Application([("/plain", Plain), ("/patched", Patched)]))
        http.add_sockets([sock])
        box["port"], box["stop"] = sock.getsockname()[1], asyncio.Event()
        box["loop"] = asyncio.get_running_loop()
        ready.set()
        await box["stop"].wait()
        http.stop()

    t = threading.Thread(target=lambda: asyncio.run(serve()), daemon=True)
    t.start()
    assert ready.wait(10)
    yield box["port"]
    box["loop"].call_soon_threadsafe(box["stop"].set)
    t.join(10)


def test_a_patched_handler_sends_without_delay(server: int) -> None:
    lab.nodelay_on_open(Patched)
    lab.nodelay_on_open(Patched)  # twice is once
    for path in ("plain", "patched"):
        ws = websocket.create_connection(f"ws://127.0.0.1:{server}/{path}", timeout=10)
        assert ws.recv() == "opened"  # the handler's own open still runs, and is awaited
        ws.close()
    assert Plain.seen == [0]  # tornado's default: Nagle on (the ~40 ms per cell)
    assert Patched.seen == [1]


def test_the_extension_patches_jupyter_servers_kernel_websockets() -> None:
    from jupyter_server.services.kernels.websocket import KernelWebsocketHandler

    class App:
        log = logging.getLogger("test")

    from jupyter_server.gateway.handlers import WebSocketChannelsHandler

    assert lab._jupyter_server_extension_points() == [{"module": "poolgate.lab"}]
    lab._load_jupyter_server_extension(App())
    assert getattr(KernelWebsocketHandler.open, lab.PATCHED, False)  # Jupyter Server 2's
    assert getattr(WebSocketChannelsHandler.open, lab.PATCHED, False)  # its gateway's legacy one


def test_installing_poolgate_enables_the_extension(tmp_path: Path) -> None:
    """The wheel puts the config that enables poolgate.lab where Jupyter Server reads it."""
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", "-w", str(tmp_path),
                    str(ROOT)], check=True, capture_output=True)
    wheel = next(tmp_path.glob("poolgate-*.whl"))
    with zipfile.ZipFile(wheel) as z:
        name = next(n for n in z.namelist()
                    if n.endswith("data/etc/jupyter/jupyter_server_config.d/poolgate.json"))
        config = json.loads(z.read(name))
        assert "poolgate/lab.py" in z.namelist()
    assert config == {"ServerApp": {"jpserver_extensions": {"poolgate.lab": True}}}
