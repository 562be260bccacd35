"""A small, independent gateway client for the tests: REST with requests, WebSocket with
websocket-client, speaking the legacy Jupyter protocol the way Jupyter Server's gateway client does.
"""
from __future__ import annotations

import json
import time
import uuid
from dataclasses import dataclass, field
from typing import Any

import requests
import websocket

#: A cell that says it is running, then runs for a minute (interrupt tests stop it).
RUNNING_CELL = "print('running', flush=True)\nimport time\nfor i in range(600): time.sleep(0.1)"


@dataclass
class Result:
    reply: dict[str, Any] = field(default_factory=dict)
    out: list[str] = field(default_factory=list)  # stream texts (a list: += on a str of many
    err: list[str] = field(default_factory=list)  # megabytes would copy it every time)
    result: str = ""
    error: dict[str, Any] | None = None
    messages: list[dict[str, Any]] = field(default_factory=list)
    idle: bool = False  # the kernel's idle status for the request arrived

    @property
    def status(self) -> str:
        return str(self.reply.get("status", ""))

    @property
    def stdout(self) -> str:
        return "".join(self.out)

    @property
    def stderr(self) -> str:
        return "".join(self.err)


class Channel:
    """One WebSocket on /api/kernels/<id>/channels."""

    def __init__(self, base: str, kid: str, session: str | None = None, token: str = "",
                 subprotocol: str | None = None, timeout: float = 30,
                 headers: dict[str, str] | None = None, sslopt: dict[str, Any] | None = None
                 ) -> None:
        self.session = session or uuid.uuid4().hex
        url = base.replace("http", "ws", 1) + f"/api/kernels/{kid}/channels?session_id={self.session}"
        sent = [f"Authorization: token {token}"] if token else []
        sent += [f"{k}: {v}" for k, v in (headers or {}).items()]
        self.ws = websocket.create_connection(url, timeout=timeout, header=sent, sslopt=sslopt,
                                              subprotocols=[subprotocol] if subprotocol else None)
        self.other: list[dict[str, Any]] = []

    def close(self) -> None:
        self.ws.close()

    def send(self, msg_type: str, content: dict[str, Any], channel: str = "shell",
             msg_id: str | None = None, subshell: str | None = None) -> str:
        """Send a message; ``msg_id`` sends one again under the same id (after a reconnect,
        JupyterLab sends what it could not send before, unchanged); ``subshell``: to that
        subshell of the kernel (JEP 91)."""
        mid = msg_id or uuid.uuid4().hex
        header = {"msg_id": mid, "msg_type": msg_type, "username": "test",
                  "session": self.session, "date": "2026-01-01T00:00:00.000000Z",
                  "version": "5.3"}
        if subshell is not None:
            header["subshell_id"] = subshell
        self.ws.send(json.dumps({
            "header": header,
            "parent_header": {}, "metadata": {}, "content": content, "channel": channel,
            "buffers": []}))
        return mid

    def recv(self, timeout: float = 30) -> dict[str, Any]:
        self.ws.settimeout(timeout)
        frame = self.ws.recv()
        if not frame:  # websocket-client's answer to a close frame
            raise websocket.WebSocketConnectionClosedException("the gateway closed the socket")
        if isinstance(frame, bytes):
            import struct
            n = struct.unpack("!I", frame[:4])[0]
            offs = struct.unpack("!" + "I" * n, frame[4:4 * (n + 1)])
            msg = json.loads(frame[offs[0]:offs[1] if n > 1 else None])
            msg["buffers"] = [frame[a:b] for a, b in zip(offs[1:], list(offs[2:]) + [len(frame)])]
            return msg
        return json.loads(frame)  # type: ignore[no-any-return]

    def start_cell(self, code: str = "", timeout: float = 30) -> str:
        """Send a cell and return its msg_id once its first output came: its code is running,
        not merely sent (what a test waits for before it interrupts or disturbs a cell). The
        cell must print first; the default one prints, then runs for a minute."""
        mid = self.send("execute_request", {"code": code or RUNNING_CELL, "silent": False})
        deadline = time.monotonic() + timeout
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError(f"cell {mid} printed nothing within {timeout}s")
            msg = self.recv(left)
            if msg.get("parent_header", {}).get("msg_id") == mid and msg["msg_type"] == "stream":
                return mid
            self.other.append(msg)

    def execute(self, code: str, timeout: float = 60, stdin: str | None = None) -> Result:
        mid = self.send("execute_request", {"code": code, "silent": False, "store_history": True,
                                            "user_expressions": {}, "allow_stdin": stdin is not None,
                                            "stop_on_error": True})
        return self.collect(mid, timeout, stdin)

    def collect(self, mid: str, timeout: float = 60, stdin: str | None = None,
                into: Result | None = None) -> Result:
        """The messages of request ``mid`` until its reply and the kernel's idle.

        ``into`` continues a collection a broken socket cut short: messages are added to it as
        they come, so what arrived before the break is kept when this call raises.
        """
        res = into if into is not None else Result()
        deadline = time.monotonic() + timeout
        while not (res.reply and res.idle):
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError(f"no reply/idle for {mid}: {res}")
            msg = self.recv(left)
            if msg.get("parent_header", {}).get("msg_id") != mid:
                self.other.append(msg)
                continue
            res.messages.append(msg)
            t, c = msg["msg_type"], msg["content"]
            if t == "stream":
                if c["name"] == "stdout":
                    res.out.append(c["text"])
                else:
                    res.err.append(c["text"])
            elif t == "execute_result":
                res.result = c["data"].get("text/plain", "")
            elif t == "error":
                res.error = c
            elif t == "input_request":
                self.ws.send(json.dumps({
                    "header": {"msg_id": uuid.uuid4().hex, "msg_type": "input_reply",
                               "username": "test", "session": self.session,
                               "date": "2026-01-01T00:00:00Z", "version": "5.3"},
                    "parent_header": msg["header"], "metadata": {},
                    "content": {"value": stdin or ""}, "channel": "stdin", "buffers": []}))
            elif t.endswith("_reply") and msg.get("channel") in ("shell", "control"):
                res.reply = c
            elif t == "status" and c["execution_state"] == "idle":
                res.idle = True
        return res


class Gateway:
    """REST calls against one gateway."""

    def __init__(self, base: str, token: str = "", headers: dict[str, str] | None = None,
                 ca: str | None = None, cert: tuple[str, str] | None = None) -> None:
        """``headers`` go with every request and WebSocket (a proxy's user header); ``ca``
        verifies an https gateway, ``cert`` is a client certificate and its key."""
        self.base = base.rstrip("/")
        self.s = requests.Session()
        if token:
            self.s.headers["Authorization"] = f"token {token}"
        self.headers = dict(headers or {})
        self.s.headers.update(self.headers)
        if ca:  # the session's own: REQUESTS_CA_BUNDLE would win over Session.verify
            self.s.verify = ca
            self.s.trust_env = False
        if cert:
            self.s.cert = cert
        self.sslopt: dict[str, Any] | None = None
        if ca or cert:
            self.sslopt = {"ca_certs": ca, **({"certfile": cert[0], "keyfile": cert[1]}
                                              if cert else {})}
        self.token = token

    def get(self, path: str, **kw: Any) -> requests.Response:
        return self.s.get(self.base + path, timeout=kw.pop("timeout", 60), **kw)

    def post(self, path: str, **kw: Any) -> requests.Response:
        return self.s.post(self.base + path, timeout=kw.pop("timeout", 120), **kw)

    def delete(self, path: str, **kw: Any) -> requests.Response:
        return self.s.delete(self.base + path, timeout=kw.pop("timeout", 60), **kw)

    def start(self, name: str = "python3", env: dict[str, str] | None = None) -> dict[str, Any]:
        r = self.post("/api/kernels", json={"name": name, "env": env or {}})
        assert r.status_code == 201, r.text
        return r.json()  # type: ignore[no-any-return]

    def kernels(self) -> list[dict[str, Any]]:
        r = self.get("/api/kernels")
        assert r.status_code == 200, r.text
        return r.json()  # type: ignore[no-any-return]

    def shutdown(self, kid: str) -> None:
        r = self.delete(f"/api/kernels/{kid}")
        assert r.status_code in (204, 404), r.text

    def channel(self, kid: str, **kw: Any) -> Channel:
        return Channel(self.base, kid, token=self.token, headers=self.headers,
                       sslopt=self.sslopt, **kw)

    def wait_state(self, kid: str, state: str, timeout: float = 30) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        model: dict[str, Any] = {}
        while time.monotonic() < deadline:
            r = self.get(f"/api/kernels/{kid}")
            if r.status_code == 200:
                model = r.json()
                if model["execution_state"] == state:
                    return model
            time.sleep(0.2)
        raise AssertionError(f"kernel {kid} never reached {state}: {model}")

    def holds_state(self, kid: str, state: str, seconds: float, every: float = 0.25) -> None:
        """Assert that the kernel is there and in ``state`` at every look for ``seconds``
        (a negative check needs the time to pass: a busy kernel not culled, not idle)."""
        until = time.monotonic() + seconds
        while time.monotonic() < until:
            r = self.get(f"/api/kernels/{kid}")
            assert r.status_code == 200, f"kernel {kid} ended while {state}: {r.text}"
            assert r.json()["execution_state"] == state, r.text
            time.sleep(every)

    def wait_gone(self, kid: str, timeout: float = 30) -> dict[str, Any]:
        """Poll until the kernel answers 404 (culled, ended); its error body."""
        deadline = time.monotonic() + timeout
        while (r := self.get(f"/api/kernels/{kid}")).status_code == 200:
            assert time.monotonic() < deadline, f"kernel {kid} was never removed: {r.text}"
            time.sleep(0.2)
        assert r.status_code == 404, r.text
        return r.json()  # type: ignore[no-any-return]
