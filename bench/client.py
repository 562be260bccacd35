"""Talk to one kernel the same way over any transport: kernel_info and execute.

Rule: scenarios only use `KernelConnection`; a `Transport` moves message dicts (Jupyter
message format, plus a "channel" key) either over ZMQ (floor) or over one gateway WebSocket
in the legacy JSON protocol (one text frame per message).
"""

from __future__ import annotations

import abc
import asyncio
import json
import time
import uuid
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import aiohttp
import zmq
from jupyter_client.asynchronous.client import AsyncKernelClient

Msg = dict[str, Any]


class TransportClosed(ConnectionError):
    """The WebSocket or ZMQ connection ended while a reply was awaited."""


class Transport(abc.ABC):
    """Sends requests on a channel and yields every incoming message, in order."""

    @abc.abstractmethod
    async def send(self, channel: str, msg_type: str, content: dict[str, Any]) -> str:
        """Send a request and return its msg_id."""

    @abc.abstractmethod
    async def recv(self) -> Msg:
        """The next message from the kernel, shell or iopub, with its "channel" key set."""

    @abc.abstractmethod
    async def close(self) -> None:
        """Close the connection; idempotent."""


class WebSocketTransport(Transport):
    """The gateway's /api/kernels/<id>/channels WebSocket, legacy JSON protocol."""

    def __init__(self, ws: aiohttp.ClientWebSocketResponse, session_id: str) -> None:
        self.ws = ws
        self.session_id = session_id

    async def send(self, channel: str, msg_type: str, content: dict[str, Any]) -> str:
        msg_id = uuid.uuid4().hex
        header = {
            "msg_id": msg_id, "msg_type": msg_type, "session": self.session_id,
            "username": "bench", "date": datetime.now(UTC).isoformat(),
            "version": "5.3",
        }
        frame = {"channel": channel, "header": header, "parent_header": {},
                 "metadata": {}, "content": content, "buffers": []}
        await self.ws.send_str(json.dumps(frame))
        return msg_id

    async def recv(self) -> Msg:
        while True:
            frame = await self.ws.receive()
            if frame.type == aiohttp.WSMsgType.TEXT:
                msg: Msg = json.loads(frame.data)
                return msg
            if frame.type in (aiohttp.WSMsgType.CLOSE, aiohttp.WSMsgType.CLOSING,
                              aiohttp.WSMsgType.CLOSED, aiohttp.WSMsgType.ERROR):
                raise TransportClosed(f"websocket closed: {frame.type.name} {frame.extra}")
            # binary frames (buffers) carry no stdout: skip them

    async def close(self) -> None:
        await self.ws.close()


class ZmqTransport(Transport):
    """A jupyter_client AsyncKernelClient; shell and iopub merged into one queue."""

    def __init__(self, kc: AsyncKernelClient) -> None:
        self.kc = kc
        self.queue: asyncio.Queue[Msg | Exception] = asyncio.Queue()
        self.readers = [asyncio.create_task(self._pump("shell")),
                        asyncio.create_task(self._pump("iopub"))]

    async def _pump(self, channel: str) -> None:
        get = self.kc.get_shell_msg if channel == "shell" else self.kc.get_iopub_msg
        try:
            while True:
                msg: Msg = await get(timeout=None)
                msg["channel"] = channel
                self.queue.put_nowait(msg)
        except zmq.ZMQError as exc:  # socket closed under us (context destroyed at stop)
            self.queue.put_nowait(TransportClosed(f"{channel}: {exc}"))

    async def send(self, channel: str, msg_type: str, content: dict[str, Any]) -> str:
        """Send a shell request (the only channel the scenarios send on) without blocking:
        jupyter_client's own send() blocks the event loop once the socket's queue is full
        (a kernel that died at start never reads it)."""
        msg = self.kc.session.msg(msg_type, content)
        sock: zmq.Socket[Any] = zmq.Socket.shadow(self.kc.shell_channel.socket.underlying)
        try:
            sock.send_multipart(self.kc.session.serialize(msg), flags=zmq.NOBLOCK)
        except zmq.Again as exc:
            raise TransportClosed("shell queue full: the kernel is not reading") from exc
        return str(msg["header"]["msg_id"])

    async def recv(self) -> Msg:
        item = await self.queue.get()
        if isinstance(item, Exception):
            raise item
        return item

    async def close(self) -> None:
        for task in self.readers:
            task.cancel()
        await asyncio.gather(*self.readers, return_exceptions=True)
        self.kc.stop_channels()


@dataclass
class ExecResult:
    """What one execute_request produced."""

    seconds: float
    status: str
    stdout_bytes: int
    complete: bool  # both execute_reply and status idle arrived before the timeout


class KernelConnection:
    """kernel_info and execute over a Transport; ignores messages for other requests."""

    def __init__(self, transport: Transport) -> None:
        self.transport = transport

    async def kernel_info(self, timeout: float, nudge: float = 0.1) -> float:
        """Wait until the kernel answers kernel_info AND its IOPub reaches us; return seconds.

        A ZMQ SUB socket subscribes asynchronously, so a reply on shell does not mean IOPub
        output will arrive: like jupyter_server's "nudge", once the kernel has replied,
        resend kernel_info_request every `nudge` s until an IOPub message for one of them
        has come too. (Only after a reply: a kernel still starting would queue them all.)
        Gateways nudge before they forward anything, so through them no resend is needed.
        """
        t0 = time.perf_counter()
        loop = asyncio.get_running_loop()
        sent = {await self.transport.send("shell", "kernel_info_request", {})}
        replied = iopub = False
        nudge_at: float | None = None
        async with asyncio.timeout(timeout):
            while not (replied and iopub):
                try:
                    async with asyncio.timeout_at(nudge_at):
                        msg = await self.transport.recv()
                except TimeoutError:
                    sent.add(await self.transport.send("shell", "kernel_info_request", {}))
                    nudge_at = loop.time() + nudge
                    continue
                if msg.get("parent_header", {}).get("msg_id") not in sent:
                    continue
                if msg["header"]["msg_type"] == "kernel_info_reply":
                    replied = True
                    nudge_at = nudge_at or loop.time() + nudge
                elif msg.get("channel") == "iopub":
                    iopub = True
        return time.perf_counter() - t0

    async def execute(self, code: str, timeout: float) -> ExecResult:
        """Run `code`; wait for execute_reply and status idle; count stdout characters.

        On timeout it returns what arrived, with complete=False (the caller should not reuse
        the connection: late messages for this request may still come).
        """
        t0 = time.perf_counter()
        msg_id = await self.transport.send("shell", "execute_request", {
            "code": code, "silent": False, "store_history": False,
            "user_expressions": {}, "allow_stdin": False, "stop_on_error": True})
        status, stdout, replied, idle = "", 0, False, False
        try:
            async with asyncio.timeout(timeout):
                while not (replied and idle):
                    msg = await self.transport.recv()
                    if msg.get("parent_header", {}).get("msg_id") != msg_id:
                        continue
                    kind = msg["header"]["msg_type"]
                    content = msg.get("content", {})
                    if kind == "stream" and content.get("name") == "stdout":
                        stdout += len(content.get("text", ""))
                    elif kind == "execute_reply":
                        status, replied = str(content.get("status")), True
                    elif kind == "status" and content.get("execution_state") == "idle":
                        idle = True
        except TimeoutError:
            pass
        return ExecResult(time.perf_counter() - t0, status, stdout, replied and idle)

    async def close(self) -> None:
        await self.transport.close()


class SyncWebSocketConnection:
    """The same execute over a gateway WebSocket with the synchronous websocket-client library
    (a second client beside aiohttp), legacy JSON protocol; run it in a thread.

    ``skip_utf8_validation``: websocket-client otherwise checks every text message in pure
    Python (about a microsecond a byte without the optional wsaccel), which would measure the
    client; the text is still validated by decoding it to str."""

    def __init__(self, url: str, headers: dict[str, str], session_id: str,
                 timeout: float) -> None:
        import websocket  # websocket-client: imported here, only the iopub scenario needs it

        self.session_id = session_id
        self.ws = websocket.create_connection(
            url, header=[f"{k}: {v}" for k, v in headers.items()], timeout=timeout,
            skip_utf8_validation=True, enable_multithread=False)

    def execute(self, code: str, timeout: float) -> ExecResult:
        """As KernelConnection.execute: execute_reply and status idle; stdout characters."""
        import websocket

        t0 = time.perf_counter()
        msg_id = uuid.uuid4().hex
        header = {"msg_id": msg_id, "msg_type": "execute_request", "session": self.session_id,
                  "username": "bench", "date": datetime.now(UTC).isoformat(), "version": "5.3"}
        content = {"code": code, "silent": False, "store_history": False,
                   "user_expressions": {}, "allow_stdin": False, "stop_on_error": True}
        self.ws.send(json.dumps({"channel": "shell", "header": header, "parent_header": {},
                                 "metadata": {}, "content": content, "buffers": []}))
        status, stdout, replied, idle = "", 0, False, False
        deadline = t0 + timeout
        recv, loads = self.ws.recv, json.loads
        try:
            while not (replied and idle) and time.perf_counter() < deadline:
                data = recv()
                if not isinstance(data, str):
                    continue  # binary frames (buffers) carry no stdout
                msg = loads(data)
                if msg.get("parent_header", {}).get("msg_id") != msg_id:
                    continue
                kind = msg["header"]["msg_type"]
                body = msg.get("content", {})
                if kind == "stream" and body.get("name") == "stdout":
                    stdout += len(body.get("text", ""))
                elif kind == "execute_reply":
                    status, replied = str(body.get("status")), True
                elif kind == "status" and body.get("execution_state") == "idle":
                    idle = True
        except websocket.WebSocketTimeoutException:
            pass
        return ExecResult(time.perf_counter() - t0, status, stdout, replied and idle)

    def close(self) -> None:
        self.ws.close()
