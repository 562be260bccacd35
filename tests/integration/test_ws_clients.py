"""WebSocket client libraries people use, besides the suite's own (websocket-client), each run
a cell through the gateway: aiohttp and websockets, with permessage-deflate offered (the
redis_stack's gateway accepts it, so both really get compressed frames) and without. What the
gateway sends must decode in each, and a cell's many small outputs arrive whole and in order."""
from __future__ import annotations

import asyncio
import json
import uuid
from typing import Any

import aiohttp
import pytest
import websocket
from websockets.asyncio.client import connect as websockets_connect

from tests.conftest import Stack

LINES = 300
CODE = f"for i in range({LINES}):\n    print(i, 'π', flush=True)\n6 * 7"
EXPECTED = "".join(f"{i} π\n" for i in range(LINES))


def execute_request() -> dict[str, Any]:
    return {"header": {"msg_id": uuid.uuid4().hex, "msg_type": "execute_request",
                       "username": "interop", "session": uuid.uuid4().hex, "date": "",
                       "version": "5.3"},
            "parent_header": {}, "metadata": {}, "channel": "shell", "buffers": [],
            "content": {"code": CODE, "silent": False, "store_history": False,
                        "user_expressions": {}, "allow_stdin": False, "stop_on_error": True}}


class Cell:
    """What one execute brought: stdout, the result and the reply, judged when idle came."""

    def __init__(self, msg_id: str) -> None:
        self.msg_id, self.stdout, self.result, self.reply, self.idle = msg_id, "", None, None, False

    def add(self, raw: str | bytes) -> bool:
        msg = json.loads(raw)
        if msg.get("parent_header", {}).get("msg_id") != self.msg_id:
            return False
        kind, content = msg["msg_type"], msg["content"]
        if kind == "stream":
            self.stdout += content["text"]
        elif kind == "execute_result":
            self.result = content["data"]["text/plain"]
        elif kind == "execute_reply":
            self.reply = content["status"]
        elif kind == "status" and content["execution_state"] == "idle":
            self.idle = True
        return self.idle and self.reply is not None

    def check(self) -> None:
        assert (self.stdout, self.result, self.reply) == (EXPECTED, "42", "ok")


def url(stack: Stack, kid: str) -> str:
    return stack.gw.base.replace("http", "ws", 1) + f"/api/kernels/{kid}/channels?session_id=" \
        + uuid.uuid4().hex


@pytest.fixture
def kid(redis_stack: Stack) -> Any:
    kernel_id = redis_stack.gw.start()["id"]
    yield kernel_id
    redis_stack.gw.shutdown(kernel_id)


@pytest.mark.parametrize("compress", [15, 0], ids=["deflate", "plain"])
def test_aiohttp_runs_a_cell(redis_stack: Stack, kid: str, compress: int) -> None:
    async def run() -> int:
        async with aiohttp.ClientSession() as http, \
                http.ws_connect(url(redis_stack, kid), compress=compress, max_msg_size=0) as ws:
            msg = execute_request()
            cell = Cell(msg["header"]["msg_id"])
            await ws.send_str(json.dumps(msg))
            async with asyncio.timeout(60):
                while not cell.add((await ws.receive()).data):
                    pass
            cell.check()
            return int(ws.compress)
    assert asyncio.run(run()) == compress  # what was offered was agreed (or nothing offered)


@pytest.mark.parametrize("compression", ["deflate", None], ids=["deflate", "plain"])
def test_websockets_runs_a_cell(redis_stack: Stack, kid: str, compression: str | None) -> None:
    async def run() -> list[str]:
        async with websockets_connect(url(redis_stack, kid), compression=compression,
                                      max_size=None) as ws:
            msg = execute_request()
            cell = Cell(msg["header"]["msg_id"])
            await ws.send(json.dumps(msg))
            async with asyncio.timeout(60):
                while not cell.add(await ws.recv()):
                    pass
            cell.check()
            return [e.name for e in ws.protocol.extensions]
    assert asyncio.run(run()) == (["permessage-deflate"] if compression else [])


def test_websocket_client_runs_a_cell(redis_stack: Stack, kid: str) -> None:
    ws = websocket.create_connection(url(redis_stack, kid), timeout=60)
    try:
        msg = execute_request()
        cell = Cell(msg["header"]["msg_id"])
        ws.send(json.dumps(msg))
        while not cell.add(ws.recv()):
            pass
        cell.check()
    finally:
        ws.close()
