"""Many cheap test kernels in one process, so that a scale run measures the gateway, registry and
broker, not the kernels.

    python -m bench.cheap.host --control ipc:///path/to/control

Each kernel has real ZMQ sockets bound on loopback (ROUTER shell/control/stdin, PUB iopub, REP
heartbeat), checks and signs every message with its connection key, and answers like ipykernel:
status busy/idle on iopub around every request; kernel_info_request; execute_request (execute_input,
the code echoed as a stdout stream, execute_reply, with a counter); shutdown_request (the kernel
ends); interrupt_request; any other ``*_request`` gets an ``ok`` ``*_reply``. It runs no code.

The launcher (bench/cheap/launcher.py) drives the process through one ROUTER on ``--control``:
JSON requests ``{"op": "start", "id", "key"}`` (answers the five ports), ``stop``, ``live`` (the
ids of the kernels alive) and ``ping``. The process exits when its parent (the worker) goes.
Everything runs on one asyncio loop: no thread per kernel.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import resource
from pathlib import Path
from typing import Any

import zmq
import zmq.asyncio

from poolgate.workers import jmsg
from poolgate.workers.launchers.local import below_ephemeral

CHANNELS = ("shell", "iopub", "stdin", "control", "hb")
# Below the ephemeral range, as the local launcher's kernels (workers/launchers/local.py): a
# few thousand kernels' ports taken from it would be taken from every outgoing connection too
PORTS = (*(below_ephemeral() or (49152, 65536)), 1000)
KERNEL_INFO = {
    "status": "ok", "protocol_version": jmsg.PROTOCOL_VERSION, "implementation": "poolgate-cheap",
    "implementation_version": "1", "banner": "poolgate cheap test kernel: echoes code, runs none",
    "help_links": [], "language_info": {"name": "python", "version": "3", "mimetype": "text/x-python",
                                        "file_extension": ".py"},
}


class CheapKernel:
    """One kernel: its five sockets and the tasks that answer them."""

    def __init__(self, ctx: zmq.asyncio.Context, kid: str, key: str, ip: str) -> None:
        self.kid = kid
        self.signer = jmsg.Signer(key)
        self.session = jmsg.session_id()
        self.count = 0
        self.socks: dict[str, zmq.asyncio.Socket] = {}
        kinds = {"shell": zmq.ROUTER, "control": zmq.ROUTER, "stdin": zmq.ROUTER,
                 "iopub": zmq.PUB, "hb": zmq.REP}
        self.ports: dict[str, int] = {}
        for name in CHANNELS:
            sock = ctx.socket(kinds[name])
            sock.linger = 0
            self.ports[f"{name}_port"] = sock.bind_to_random_port(f"tcp://{ip}", *PORTS)
            self.socks[name] = sock
        self.tasks = [asyncio.ensure_future(self._serve(c)) for c in ("shell", "control")]
        self.tasks.append(asyncio.ensure_future(self._echo()))
        self.ended = asyncio.Event()

    def close(self) -> None:
        for task in self.tasks:
            task.cancel()
        for sock in self.socks.values():
            sock.close(linger=0)
        self.ended.set()

    def _send(self, sock: zmq.asyncio.Socket, idents: list[bytes], msg_type: str,
              content: dict[str, Any], parent: bytes) -> None:
        parts = [jmsg.pack(jmsg.header(msg_type, self.session, "kernel")), parent, b"{}",
                 jmsg.pack(content)]
        # send_multipart on a zmq.asyncio socket queues at once when it cannot block (PUB, and
        # a ROUTER, which drops for an unknown peer): the returned future needs no await
        sock.send_multipart([*idents, *jmsg.frames(self.signer, parts)])

    def _publish(self, msg_type: str, content: dict[str, Any], parent: bytes) -> None:
        topic = f"kernel.{self.kid}.{msg_type}".encode()
        self._send(self.socks["iopub"], [topic], msg_type, content, parent)

    async def _echo(self) -> None:
        hb = self.socks["hb"]
        while True:
            await hb.send_multipart(await hb.recv_multipart())

    async def _serve(self, channel: str) -> None:
        sock = self.socks[channel]
        while True:
            msg = await sock.recv_multipart()
            try:
                i = msg.index(jmsg.DELIM)
                parts = msg[i + 2:i + 6]
                if len(parts) < 4 or msg[i + 1] != self.signer.sign(parts):
                    continue  # unsigned or badly signed: ipykernel drops it too
                head, content = json.loads(parts[0]), json.loads(parts[3] or b"{}")
            except (ValueError, TypeError):
                continue
            if self._answer(sock, msg[:i], head, parts[0], content):
                return

    def _answer(self, sock: zmq.asyncio.Socket, idents: list[bytes], head: dict[str, Any],
                parent: bytes, content: dict[str, Any]) -> bool:
        """Answer one request as ipykernel would; True when the kernel has ended."""
        kind = str(head.get("msg_type", ""))
        self._publish("status", {"execution_state": "busy"}, parent)
        ended = False
        if kind == "execute_request":
            code = str(content.get("code", ""))
            if not content.get("silent"):
                self.count += 1
                self._publish("execute_input", {"code": code, "execution_count": self.count}, parent)
                if code:
                    self._publish("stream", {"name": "stdout", "text": code + "\n"}, parent)
            reply = {"status": "ok", "execution_count": self.count, "user_expressions": {},
                     "payload": []}
        elif kind == "kernel_info_request":
            reply = KERNEL_INFO
        elif kind == "shutdown_request":
            reply = {"status": "ok", "restart": bool(content.get("restart"))}
            self._publish("shutdown_reply", reply, parent)
            ended = True
        elif kind == "comm_info_request":
            reply = {"status": "ok", "comms": {}}
        else:
            reply = {"status": "ok"}
        self._send(sock, idents, kind.replace("_request", "_reply"), reply, parent)
        self._publish("status", {"execution_state": "idle"}, parent)
        if ended:  # the reply and idle leave before the sockets close (linger 0 would drop them)
            asyncio.get_running_loop().call_later(0.2, self.close)
        return ended


class Host:
    """The kernels of one process and the launcher's control socket."""

    def __init__(self, control: str, ip: str) -> None:
        self.ctx = zmq.asyncio.Context()
        soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
        self.ctx.set(zmq.MAX_SOCKETS, min(hard, 1 << 16))
        self.control = self.ctx.socket(zmq.ROUTER)
        self.control.linger = 0
        self.control.bind(control)
        self.ip = ip
        self.kernels: dict[str, CheapKernel] = {}

    def handle(self, req: dict[str, Any]) -> dict[str, Any]:
        op = req.get("op")
        kid = str(req.get("id", ""))
        if op == "start":
            old = self.kernels.pop(kid, None)
            if old is not None:  # a restart: the old sockets go first
                old.close()
            kernel = CheapKernel(self.ctx, kid, str(req["key"]), self.ip)
            self.kernels[kid] = kernel
            return {"ok": True, "ports": kernel.ports}
        if op == "stop":
            kernel = self.kernels.pop(kid, None)
            if kernel is not None:
                kernel.close()
            return {"ok": True}
        if op == "live":
            return {"ok": True, "ids": [k for k, v in self.kernels.items() if not v.ended.is_set()]}
        if op == "ping":
            return {"ok": True, "pid": os.getpid(), "kernels": len(self.kernels)}
        return {"ok": False, "error": f"unknown op {op!r}"}

    async def serve(self) -> None:
        parent = os.getppid()
        while os.getppid() == parent:  # the worker went: so do its kernels
            if not await self.control.poll(1000):
                continue
            ident, _, body = await self.control.recv_multipart()
            try:
                answer = self.handle(json.loads(body))
            except (ValueError, KeyError, zmq.ZMQError) as exc:
                answer = {"ok": False, "error": f"{type(exc).__name__}: {exc}"}
            await self.control.send_multipart([ident, b"", json.dumps(answer).encode()])
            for kid in [k for k, v in self.kernels.items() if v.ended.is_set()]:
                self.kernels.pop(kid, None)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m bench.cheap.host", description=__doc__)
    p.add_argument("--control", required=True, help="ZMQ endpoint the launcher talks to")
    p.add_argument("--ip", default="127.0.0.1", help="where kernels bind")
    args = p.parse_args(argv)
    try:
        asyncio.run(Host(args.control, args.ip).serve())
    finally:  # the launcher's close() does not run when its worker is killed
        if args.control.startswith("ipc://"):
            Path(args.control[len("ipc://"):]).unlink(missing_ok=True)


if __name__ == "__main__":
    main()
