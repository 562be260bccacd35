"""The WebSocket channels as Jupyter clients use them: several clients, takeover, replay,
stdin, comms, big outputs, bad frames, both wire protocols."""
from __future__ import annotations

import json
import threading
import time
import uuid
from collections.abc import Iterator
from typing import Any

import psutil
import pytest
import redis
import websocket

from tests.client import Channel
from tests.conftest import Stack


@pytest.fixture
def kid(redis_stack: Stack) -> Iterator[str]:
    kernel_id = redis_stack.gw.start()["id"]
    yield kernel_id
    redis_stack.gw.shutdown(kernel_id)


def test_iopub_to_all_clients_replies_to_the_sender(redis_stack: Stack, kid: str) -> None:
    gw = redis_stack.gw
    a, b = gw.channel(kid), gw.channel(kid)
    for ch in (a, b):  # each socket's iopub is live once it has the kernel_info's idle
        ch.collect(ch.send("kernel_info_request", {}), timeout=30)
    res = a.execute("print('hello from a')")
    assert res.stdout == "hello from a\n" and res.status == "ok"
    seen_by_b: list[dict] = []
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and not any(
            m["msg_type"] == "stream" for m in seen_by_b):
        seen_by_b.append(b.recv(deadline - time.monotonic()))
    stream = [m for m in seen_by_b if m["msg_type"] == "stream"]
    assert stream and stream[0]["content"]["text"] == "hello from a\n"
    assert not any(m["msg_type"] == "execute_reply" for m in seen_by_b)  # replies go to a only
    assert gw.get(f"/api/kernels/{kid}").json()["connections"] == 2
    a.close()
    b.close()


def test_same_session_takes_over_at_once(redis_stack: Stack, kid: str) -> None:
    """JupyterLab opens the socket twice with one session_id; the newer one must work now.

    The older one is parked, not closed: Jupyter Server's gateway client reconnects a socket
    the gateway closes, and the two would take the session from each other every second.
    A parked socket still gets the output, and the replies to what it asks itself."""
    gw = redis_stack.gw
    first = gw.channel(kid, session="lab-session")
    t0 = time.monotonic()
    second = gw.channel(kid, session="lab-session")
    mid = second.send("execute_request", {"code": "print('hi'); 'second works'", "silent": False})
    res = second.collect(mid, timeout=10)
    assert res.result == "'second works'" and res.stdout == "hi\n"
    assert time.monotonic() - t0 < 5
    assert gw.get(f"/api/kernels/{kid}").json()["connections"] == 1
    seen = [first.recv(5) for _ in range(4)]  # busy, execute_input, stream, result; then idle
    while seen[-1]["msg_type"] != "status" or seen[-1]["content"]["execution_state"] != "idle":
        seen.append(first.recv(5))
    assert {m["parent_header"]["msg_id"] for m in seen} == {mid}
    assert "stream" in {m["msg_type"] for m in seen}
    assert not any(m["msg_type"] == "execute_reply" for m in seen)  # the reply was second's
    # What the parked socket asks is answered on the parked socket, not on the owner.
    asked = first.send("execute_request", {"code": "'from the parked socket'", "silent": False})
    assert first.collect(asked, timeout=10).result == "'from the parked socket'"
    owner_saw = [second.recv(5)]
    while owner_saw[-1]["msg_type"] != "status" or \
            owner_saw[-1]["content"]["execution_state"] != "idle":
        owner_saw.append(second.recv(5))
    assert {m["parent_header"]["msg_id"] for m in owner_saw} == {asked}  # its output, but
    assert not any(m["msg_type"] == "execute_reply" for m in owner_saw)  # not its reply
    second.close()  # the owner goes: the parked socket takes the session back
    assert first.execute("'first again'", timeout=15).result == "'first again'"
    first.close()


def test_output_while_disconnected_is_replayed(redis_stack: Stack, kid: str) -> None:
    gw = redis_stack.gw
    watch = gw.channel(kid, session="watch")  # another session: it sees when the cell ends
    ch = gw.channel(kid, session="replay")
    mid = ch.send("execute_request", {"code": "import time\nfor i in range(10):\n"
                                      "    print(i, flush=True); time.sleep(0.2)", "silent": False})
    got = ""
    while not got:  # read up to the first line of output, then go away mid-cell
        msg = ch.recv()
        if msg["msg_type"] == "stream":
            got = msg["content"]["text"]
    ch.close()
    done = False  # the cell finishes while nobody of its session listens (the registry's
    while not done:  # "busy" is written only once a cell ran half a second: a stalled
        msg = watch.recv(60)  # machine can skip it, so the test does not wait for it)
        done = (msg["msg_type"] == "status" and msg["content"]["execution_state"] == "idle"
                and msg["parent_header"].get("msg_id") == mid)
    again = Channel(gw.base, kid, session="replay")
    res = again.collect(mid, timeout=20)
    assert got + res.stdout == "".join(f"{i}\n" for i in range(10))
    assert res.status == "ok"
    again.close()
    watch.close()


def test_a_flood_of_output_while_disconnected_is_all_kept(redis_stack: Stack, kid: str) -> None:
    """3000 flushed writes of 8 KB while the client is away, far past what the kernel's
    high-water mark (1000 messages) and the sockets' buffers hold: all reach it when it comes
    back (the gateway goes on reading a session that has no client)."""
    gw = redis_stack.gw
    watch = gw.channel(kid, session="watch")  # another session: it sees when the cell ends
    ch = gw.channel(kid, session="flood")
    assert ch.execute("1 + 1", timeout=30).result == "2"  # the session is up
    n, size = 3000, 8000
    mid = ch.send("execute_request", {"code": f"import sys\nfor i in range({n}):\n"
                                      f"    sys.stdout.write(f'{{i:07}}' + 'x' * {size - 8} + '\\n')\n"
                                      "    sys.stdout.flush()", "silent": False})
    ch.close()  # away before the first line
    done = False
    while not done:
        msg = watch.recv(60)
        done = (msg["msg_type"] == "status" and msg["content"]["execution_state"] == "idle"
                and msg["parent_header"].get("msg_id") == mid)
    again = Channel(gw.base, kid, session="flood")
    res = again.collect(mid, timeout=60)
    assert res.status == "ok"
    assert res.stdout == "".join(f"{i:07}" + "x" * (size - 8) + "\n" for i in range(n))
    again.close()
    watch.close()


def test_stdin_input(redis_stack: Stack, kid: str) -> None:
    ch = redis_stack.gw.channel(kid)
    res = ch.execute("name = input('who? '); print('hi', name)", stdin="poolgate")
    assert res.stdout.endswith("hi poolgate\n")
    ch.close()


def test_comms(redis_stack: Stack, kid: str) -> None:
    ch = redis_stack.gw.channel(kid)
    ch.execute("from ipykernel.comm import Comm\n"
               "def target(comm, msg):\n    comm.send({'echo': msg['content']['data']})\n"
               "get_ipython().kernel.comm_manager.register_target('echo', target)")
    cid = uuid.uuid4().hex
    ch.send("comm_open", {"comm_id": cid, "target_name": "echo", "data": {"x": 1}})
    deadline = time.monotonic() + 10
    while True:
        msg = ch.recv(deadline - time.monotonic())
        if msg["msg_type"] == "comm_msg":
            assert msg["content"]["comm_id"] == cid
            assert msg["content"]["data"] == {"echo": {"x": 1}}
            break
    info = ch.collect(ch.send("comm_info_request", {"target_name": "echo"}))
    assert cid in info.reply["comms"]
    ch.close()


class Debugger:
    """JupyterLab's debugger panel on one channel: Debug Adapter Protocol requests in
    ``debug_request`` messages on control; what else comes meanwhile is kept in ``seen``."""

    def __init__(self, ch: Channel) -> None:
        self.ch, self.seq = ch, 0
        self.seen: list[dict[str, Any]] = []

    def request(self, command: str, **arguments: Any) -> dict[str, Any]:
        self.seq += 1
        mid = self.ch.send("debug_request", {"type": "request", "seq": self.seq,
                                              "command": command, "arguments": arguments},
                           channel="control")
        reply = self.wait(lambda m: m["msg_type"] == "debug_reply"
                          and m["parent_header"].get("msg_id") == mid, command)
        assert reply["content"]["success"], reply["content"]
        return reply["content"]  # type: ignore[no-any-return]

    def wait(self, match: Any, what: str, timeout: float = 30) -> dict[str, Any]:
        """The first message, seen or to come, that ``match``es."""
        deadline = time.monotonic() + timeout
        i = 0
        while True:
            for msg in self.seen[i:]:
                if match(msg):
                    return msg
            i = len(self.seen)
            left = deadline - time.monotonic()
            assert left > 0, f"no {what} within {timeout} s: {[m['msg_type'] for m in self.seen]}"
            self.seen.append(self.ch.recv(left))


def test_the_debugger_stops_at_a_breakpoint_and_shows_the_frame(redis_stack: Stack,
                                                                kid: str) -> None:
    """What JupyterLab's debugger does on a poolgate kernel (forked from a template: debugpy
    must work in the child): start it, set a breakpoint in a cell, run the cell, see it stop
    on the line with the frame's variables, continue to the cell's end, stop debugging."""
    ch = redis_stack.gw.channel(kid)
    info = ch.collect(ch.send("kernel_info_request", {}))
    assert "debugger" in info.reply["supported_features"]  # JupyterLab's cue to offer it
    dbg = Debugger(ch)
    dbg.request("initialize", clientID="jupyterlab", adapterID="python", pathFormat="path",
                linesStartAt1=True, columnsStartAt1=True)
    dbg.request("attach")
    assert dbg.request("debugInfo")["body"]["isStarted"]
    code = "a = 40\nb = a + 2\nprint('b is', b)\n"
    path = dbg.request("dumpCell", code=code)["body"]["sourcePath"]
    placed = dbg.request("setBreakpoints", source={"path": path}, breakpoints=[{"line": 2}],
                         sourceModified=False)["body"]["breakpoints"]
    assert [(b["verified"], b["line"]) for b in placed] == [(True, 2)]
    dbg.request("configurationDone")
    cell = ch.send("execute_request", {"code": code, "silent": False, "store_history": True,
                                       "user_expressions": {}, "allow_stdin": False})
    stopped = dbg.wait(lambda m: m["msg_type"] == "debug_event"
                       and m["content"]["event"] == "stopped", "stopped event")
    thread = stopped["content"]["body"]["threadId"]
    frame = dbg.request("stackTrace", threadId=thread)["body"]["stackFrames"][0]
    assert (frame["line"], frame["source"]["path"]) == (2, path)
    scopes = dbg.request("scopes", frameId=frame["id"])["body"]["scopes"]
    local = next(s for s in scopes if s["name"] == "Locals")
    names = {v["name"]: v["value"] for v in dbg.request(
        "variables", variablesReference=local["variablesReference"])["body"]["variables"]}
    assert names.get("a") == "40" and "b" not in names, names  # stopped before line 2 ran
    dbg.request("continue", threadId=thread)
    dbg.wait(lambda m: m["msg_type"] == "status" and m["parent_header"].get("msg_id") == cell
             and m["content"]["execution_state"] == "idle", "the cell's idle")  # after its output
    printed = [m["content"]["text"] for m in dbg.seen if m["msg_type"] == "stream"
               and m["parent_header"].get("msg_id") == cell]
    assert "".join(printed) == "b is 42\n"
    dbg.request("disconnect", restart=False, terminateDebuggee=True)
    assert ch.execute("b * 2").result == "84"  # the kernel runs on, undebugged
    ch.close()


def test_a_subshell_runs_a_cell_while_the_main_shell_is_busy(redis_stack: Stack,
                                                            kid: str) -> None:
    """Kernel subshells (JEP 91) through the gateway, as JupyterLab 4.4+ uses them for widgets'
    comms: the kernel offers them, a control request makes one, and a cell sent to it with
    its subshell_id runs while the main shell is still busy with another."""
    ch = redis_stack.gw.channel(kid)
    info = ch.collect(ch.send("kernel_info_request", {}), timeout=30).reply
    assert "kernel subshells" in info["supported_features"]
    busy = ch.start_cell()  # prints, then runs for a minute
    made = ch.collect(ch.send("create_subshell_request", {}, channel="control"), timeout=30)
    assert made.reply["status"] == "ok"
    mid = uuid.uuid4().hex
    ch.ws.send(json.dumps({
        "header": {"msg_id": mid, "msg_type": "execute_request", "username": "test",
                   "session": ch.session, "date": "2026-01-01T00:00:00Z", "version": "5.5",
                   "subshell_id": made.reply["subshell_id"]},
        "parent_header": {}, "metadata": {}, "channel": "shell", "buffers": [],
        "content": {"code": "import threading; print(threading.current_thread().name)",
                    "silent": False}}))
    res = ch.collect(mid, timeout=30)
    assert res.status == "ok" and res.stdout.startswith("subshell-")
    assert not any(m.get("parent_header", {}).get("msg_id") == busy
                   and m["msg_type"] == "execute_reply" for m in ch.other)  # still running
    ch.close()


def test_a_subshell_deleted_mid_cell_leaves_the_kernel_idle(redis_stack: Stack, kid: str) -> None:
    """A subshell console closed while its cell runs: JupyterLab deletes the subshell. The
    kernel must not stay busy in /api/kernels afterwards (busy kernels are never culled by
    default), and iopub does not say which subshell a delete removed. ipykernel (7.4) answers
    the delete only once the subshell's cell has ended, and publishes that cell's idle first,
    which ends the subshell's busy in the worker's view."""
    gw = redis_stack.gw
    ch = gw.channel(kid)
    made = ch.collect(ch.send("create_subshell_request", {}, channel="control"), timeout=30)
    subshell = made.reply["subshell_id"]
    ch.send("execute_request", {"code": "import time; time.sleep(3)", "silent": False},
            subshell=subshell)  # silent: only its statuses say it runs
    gw.wait_state(kid, "busy")
    gone = ch.collect(ch.send("delete_subshell_request", {"subshell_id": subshell},
                              channel="control"), timeout=30)
    assert gone.reply["status"] == "ok"
    gw.wait_state(kid, "idle", timeout=5)
    assert ch.execute("1+1", timeout=30).result == "2"
    ch.close()


def test_a_second_client_gets_only_what_it_asked_for(redis_stack: Stack, kid: str) -> None:
    """A client that connects while another's cell has just begun (before the registry shows
    the kernel busy) is ready at once through the gateway's nudge on control; the nudge on
    shell waits behind the cell and is answered when it ends, seconds later. That answer (a
    kernel_info_reply and its busy/idle) is the gateway's: the client sees only the cell's
    output, which goes to every client, and the answers to its own requests."""
    gw = redis_stack.gw
    a = gw.channel(kid)
    a.execute("1+1", timeout=30)
    cell = a.send("execute_request", {"code": "import time; time.sleep(5)", "silent": False})
    time.sleep(0.02)
    b = gw.channel(kid)
    mine = b.send("execute_request", {"code": "2+2", "silent": False})
    seen: list[dict] = []
    ends = {("iopub", "status", "idle"), ("shell", "execute_reply", "")}  # in either order:
    deadline = time.monotonic() + 20  # no order holds between channels
    while ends and time.monotonic() < deadline:
        seen.append(b.recv(deadline - time.monotonic()))
        if seen[-1]["parent_header"].get("msg_id") == mine:
            ends.discard((seen[-1]["channel"], seen[-1]["msg_type"],
                          seen[-1]["content"].get("execution_state", "")))
    assert not ends, seen
    with pytest.raises(websocket.WebSocketTimeoutException):
        print("after the client's own reply and idle:", b.recv(1.5))  # a late nudge's answer?
    parents = {m["parent_header"].get("msg_id") for m in seen}
    assert parents <= {cell, mine}, [(m["msg_type"], m["parent_header"]) for m in seen]
    assert [m["msg_type"] for m in seen if m["channel"] == "shell"] == ["execute_reply"]
    a.close()
    b.close()


def test_five_megabyte_output_intact(redis_stack: Stack, kid: str) -> None:
    ch = redis_stack.gw.channel(kid)
    res = ch.execute("import hashlib\ns = ''.join(chr(65 + i % 26) for i in range(5_000_000))\n"
                     "print(hashlib.sha256(s.encode()).hexdigest())\ns", timeout=120)
    import hashlib

    digest, value = res.stdout.strip(), res.result
    assert len(value) == 5_000_002  # the repr's quotes
    assert hashlib.sha256(value[1:-1].encode()).hexdigest() == digest
    ch.close()


def _deflate_client(stack: Stack, kid: str) -> tuple[bool, str, list[str]]:
    """Run a cell printing small, medium (16-bit length) and large (64-bit length) output as a
    client offering permessage-deflate (as browsers do); return whether the gateway accepted
    the offer, the stdout and the message types of the cell, in order."""
    import socket
    from urllib.parse import urlsplit

    from wsproto import ConnectionType, WSConnection
    from wsproto.events import AcceptConnection, Message, Ping, Request, TextMessage
    from wsproto.extensions import PerMessageDeflate

    url = urlsplit(stack.gw.base)
    sock = socket.create_connection((url.hostname, url.port), timeout=60)
    ws = WSConnection(ConnectionType.CLIENT)
    session = uuid.uuid4().hex
    sock.sendall(ws.send(Request(host=url.netloc, target=f"/api/kernels/{kid}/channels"
                                 f"?session_id={session}", extensions=[PerMessageDeflate()])))
    mid = uuid.uuid4().hex
    code = "for n in (10, 1000, 300_000): print('x' * n, flush=True)"
    request = json.dumps({
        "header": {"msg_id": mid, "msg_type": "execute_request", "username": "t",
                   "session": session, "date": "2026-01-01T00:00:00Z", "version": "5.3"},
        "parent_header": {}, "metadata": {}, "channel": "shell", "buffers": [],
        "content": {"code": code, "silent": False, "store_history": False,
                    "user_expressions": {}, "allow_stdin": False}})
    accepted, text, kinds, partial, idle = None, "", [], "", False
    try:
        while True:
            data = sock.recv(65536)
            assert data, "the gateway closed the socket"
            ws.receive_data(data)
            for event in ws.events():
                if isinstance(event, AcceptConnection):
                    accepted = event
                    sock.sendall(ws.send(Message(data=request)))
                elif isinstance(event, TextMessage):
                    partial += event.data
                    if not event.message_finished:
                        continue
                    msg, partial = json.loads(partial), ""
                    if msg["parent_header"].get("msg_id") != mid:
                        continue
                    kinds.append(msg["msg_type"])
                    if msg["msg_type"] == "stream":
                        text += msg["content"]["text"]
                    if msg["content"].get("execution_state") == "idle":
                        idle = True
                elif isinstance(event, Ping):
                    sock.sendall(ws.send(event.response()))
            # execute_reply (shell) and idle (iopub) come on two sockets: either may be last
            if "execute_reply" in kinds and idle:
                break
    finally:
        sock.close()
    assert accepted is not None
    deflate = any(isinstance(e, PerMessageDeflate) and e.enabled() for e in accepted.extensions)
    return deflate, text, kinds


CELL_OUTPUT = "".join("x" * n + "\n" for n in (10, 1000, 300_000))


def test_compressed_websocket_when_the_gateway_allows_it(redis_stack: Stack, kid: str) -> None:
    """With ``ws_compression: true`` a client offering permessage-deflate gets it: frames are
    compressed (by wsproto), and messages of every length arrive whole and in order."""
    deflate, text, kinds = _deflate_client(redis_stack, kid)
    assert deflate
    assert text == CELL_OUTPUT
    assert kinds[0] == "status" and "execute_reply" in kinds


def test_compression_offer_declined_by_default(rabbit_stack: Stack) -> None:
    """By default the gateway declines permessage-deflate, as Jupyter Server and Enterprise
    Gateway do (compressing every frame costs more CPU than a LAN saves); the client that
    offered it still gets every message, uncompressed."""
    kid = rabbit_stack.gw.start()["id"]
    try:
        deflate, text, kinds = _deflate_client(rabbit_stack, kid)
    finally:
        rabbit_stack.gw.shutdown(kid)
    assert not deflate
    assert text == CELL_OUTPUT
    assert kinds[0] == "status" and "execute_reply" in kinds


def test_binary_buffers_round_trip(redis_stack: Stack, kid: str) -> None:
    """A comm message with a binary buffer, kernel → client, in the legacy binary frame."""
    ch = redis_stack.gw.channel(kid)
    res = ch.execute("from ipykernel.comm import Comm\nc = Comm(target_name='bin')\n"
                     "c.send({'n': 3}, buffers=[b'\\x00\\x01\\x02'])")
    msg = [m for m in res.messages if m["msg_type"] == "comm_msg"][0]
    assert msg["content"]["data"] == {"n": 3}
    assert msg["buffers"] == [b"\x00\x01\x02"]
    ch.close()


def test_bad_frames_do_not_hurt(redis_stack: Stack, kid: str) -> None:
    ch = redis_stack.gw.channel(kid)
    for junk in ("not json", "[]", json.dumps({"channel": "nope", "header": {}}),
                 json.dumps({"channel": "shell"}),
                 json.dumps({"channel": "shell", "header": {"msg_type": "x"}})):
        ch.ws.send(junk)
    ch.ws.send_binary(b"\x00\x00\x00\x09garbage")
    assert ch.execute("'still fine'").result == "'still fine'"
    ch.close()
    assert redis_stack.gw.get("/api").status_code == 200


def _v1(channel: str, parts: list[bytes]) -> bytes:
    ch = channel.encode()
    offsets = [8 * (1 + 1 + len(parts) + 1)]
    offsets.append(offsets[-1] + len(ch))
    for p in parts:
        offsets.append(offsets[-1] + len(p))
    return (len(offsets).to_bytes(8, "little") + b"".join(o.to_bytes(8, "little") for o in offsets)
            + ch + b"".join(parts))


def _un_v1(frame: bytes) -> tuple[str, list[bytes]]:
    n = int.from_bytes(frame[:8], "little")
    offs = [int.from_bytes(frame[8 * (i + 1):8 * (i + 2)], "little") for i in range(n)]
    return frame[offs[0]:offs[1]].decode(), [frame[offs[i]:offs[i + 1]] for i in range(1, n - 1)]


def test_v1_subprotocol(redis_stack: Stack, kid: str) -> None:
    url = redis_stack.url.replace("http", "ws") + f"/api/kernels/{kid}/channels?session_id=v1"
    ws = websocket.create_connection(url, subprotocols=["v1.kernel.websocket.jupyter.org"], timeout=20)
    assert ws.getsubprotocol() == "v1.kernel.websocket.jupyter.org"
    mid = uuid.uuid4().hex
    header = {"msg_id": mid, "msg_type": "execute_request", "session": "v1", "username": "t",
              "date": "2026-01-01T00:00:00Z", "version": "5.3"}
    ws.send_binary(_v1("shell", [json.dumps(header).encode(), b"{}", b"{}",
                                 json.dumps({"code": "7*6", "silent": False}).encode()]))
    result = None
    while result is None:
        channel, parts = _un_v1(ws.recv())
        if json.loads(parts[1]).get("msg_id") == mid and json.loads(parts[0])["msg_type"] == "execute_result":
            result = json.loads(parts[3])["data"]["text/plain"]
    assert result == "42"
    ws.close()


def test_messages_sent_during_restart_are_delivered(redis_stack: Stack, kid: str) -> None:
    gw = redis_stack.gw
    ch = gw.channel(kid)
    out: dict[str, object] = {}
    t = threading.Thread(target=lambda: out.update(r=gw.post(f"/api/kernels/{kid}/restart")))
    t.start()
    reg = redis.Redis.from_url(redis_stack.registry_url)
    deadline = time.monotonic() + 30
    while reg.hget(f"pg:k:{kid}", "status") != b"RESTARTING":  # the restart has begun
        assert time.monotonic() < deadline and t.is_alive(), "never saw the kernel RESTARTING"
        time.sleep(0.01)
    res = ch.execute("print('sent during restart')", timeout=30)
    t.join(30)
    assert out["r"].status_code == 200  # type: ignore[attr-defined]
    assert res.stdout == "sent during restart\n"
    ch.close()


def test_deleting_a_kernel_closes_its_sockets(redis_stack: Stack) -> None:
    gw = redis_stack.gw
    kid = gw.start()["id"]
    ch = gw.channel(kid)
    gw.shutdown(kid)
    with pytest.raises((websocket.WebSocketConnectionClosedException, ConnectionError)):
        for _ in range(50):
            ch.recv(5)


def test_a_slow_client_stalls_nobody_else_and_loses_nothing(redis_stack: Stack) -> None:
    """A client that stops reading while its kernel prints 30 MB holds up only its own
    socket: another kernel's client keeps running cells; the slow one then gets every byte."""
    gw = redis_stack.gw
    slow_kid, other_kid = gw.start()["id"], gw.start()["id"]
    try:
        slow, other = gw.channel(slow_kid), gw.channel(other_kid)
        lines = 30_000  # 1000-byte lines: 30 MB
        mid = slow.send("execute_request", {"code": f"import sys\nfor i in range({lines}):\n"
                                            "    sys.stdout.write('x' * 999 + '\\n')\n",
                                            "silent": False})
        time.sleep(1.0)  # the slow client reads nothing: the gateway's socket to it fills
        t0 = time.monotonic()
        for i in range(20):
            assert other.execute(f"{i} * 2", timeout=10).result == str(i * 2)
        assert time.monotonic() - t0 < 20  # not held up by the stalled socket
        res = slow.collect(mid, timeout=120)
        assert res.status == "ok" and len(res.stdout) == lines * 1000
        slow.close()
        other.close()
    finally:
        gw.shutdown(slow_kid)
        gw.shutdown(other_kid)


def test_pings_keep_answering_clients_and_close_silent_ones(tmp_path) -> None:  # type: ignore[no-untyped-def]
    """The gateway pings every ws_ping_interval: a client that answers stays connected while
    idle; one that stops answering is closed; one that closes mid-ping is let go cleanly."""
    from tests.conftest import DB_BASE, REDIS, STACKS

    stack = Stack(tmp_path, REDIS, db=DB_BASE + 3, gateway={"ws_ping_interval": 0.5},
                  specs={"tiny-py": None}).start()
    STACKS.append(stack)
    try:
        gw = stack.gw
        kid = gw.start()["id"]
        lively, silent = gw.channel(kid), gw.channel(kid)
        pings = 0
        deadline = time.monotonic() + 3.5
        while time.monotonic() < deadline:  # reading answers pings (websocket-client)
            lively.ws.settimeout(max(0.01, deadline - time.monotonic()))
            try:
                opcode, _ = lively.ws.recv_data(control_frame=True)
                pings += opcode == websocket.ABNF.OPCODE_PING
            except websocket.WebSocketTimeoutException:
                break
        assert pings >= 2  # the pump checks between polls: at most a second late
        assert lively.execute("'still here'", timeout=10).result == "'still here'"
        # the silent one never read, so it never answered: the gateway closed it
        with pytest.raises((websocket.WebSocketConnectionClosedException, ConnectionError)):
            for _ in range(20):
                silent.recv(2)
        lively.close()
        for _ in range(5):  # clients that close while pings go out do not trouble the gateway
            gw.channel(kid).close()
            time.sleep(0.3)
        fresh = gw.channel(kid)
        assert fresh.execute("'and still'", timeout=10).result == "'and still'"
        fresh.close()
        assert "Unexpected error" not in "".join(
            p.read_text() for p in (tmp_path / "logs").glob("gateway*.log"))
        gw.shutdown(kid)
    finally:
        stack.stop()
        STACKS.remove(stack)


def test_sockets_follow_a_kernel_to_a_new_place(redis_stack: Stack) -> None:
    """A kernel restarted elsewhere (other ports, as a restart whose ports were taken, or on
    another host) gets the open WebSocket's messages there: the session reconnects its ZMQ
    sockets and polls the new ones. The 'new place' here is a second real kernel whose
    connection info the registry now gives for the first, announced as its supervisor would
    (RESTARTING, then RUNNING with the next generation)."""
    from poolgate.workers.registry import Registry

    gw = redis_stack.gw
    first, second = gw.start()["id"], gw.start()["id"]
    # the stack's processes encrypt keys with their data folder's secret (workers/keyring.py)
    reg = Registry(redis_stack.registry_url, (redis_stack.tmp / "data" / "secret").read_text())
    try:
        ch, other = gw.channel(first), gw.channel(second)
        assert ch.execute("where = 'first'").status == "ok"
        assert other.execute("where = 'second'").status == "ok"
        rec = reg.get(first)
        info = reg.connection(second)
        assert rec is not None and info is not None
        reg.publish(first, {"status": "RESTARTING"})
        while ch.recv(10).get("content", {}).get("execution_state") != "restarting":
            pass  # the gateway holds the session's messages from here on
        reg.set_connection(first, info, generation=rec.generation + 1)
        reg.publish(first, {"status": "RUNNING"})
        assert ch.execute("where", timeout=30).result == "'second'"
        assert ch.execute("6 * 7", timeout=30).result == "42"  # and it goes on there
        ch.close()
        other.close()
    finally:
        gw.shutdown(first)
        gw.shutdown(second)


def kernel_connections(stack: Stack) -> int:
    """The gateway's open TCP connections other than its clients' and its registry's."""
    procs = [psutil.Process(p.pid) for p in stack.gateways]
    procs += [c for p in procs for c in p.children(recursive=True)]
    redis_port = int(stack.registry_url.rsplit(":", 1)[1].split("/")[0])
    return sum(1 for p in procs for c in p.net_connections("tcp")
               if c.status == psutil.CONN_ESTABLISHED and c.raddr
               and c.laddr.port != stack.port and c.raddr.port != redis_port)


def test_closed_sessions_do_not_pile_up_and_a_dropped_one_is_still_replayed(
        redis_stack: Stack, kid: str) -> None:
    """A client that opens and closes sessions (a page reloaded, a notebook run by nbclient
    again and again) leaves one session kept per kernel, not one per close: the gateway's
    connections to the kernel stay bounded. A client whose session is no longer kept (a later
    client of the kernel went away after it) still gets the output it missed, from the kernel's
    replay buffer."""
    gw = redis_stack.gw
    ch = gw.channel(kid, session="early")
    mid = ch.send("execute_request", {"code": "import time\nfor i in range(10):\n"
                                      "    print(i, flush=True); time.sleep(0.3)", "silent": False})
    got = ""
    while not got:  # the first line, then away mid-cell
        msg = ch.recv()
        if msg["msg_type"] == "stream":
            got = msg["content"]["text"]
    ch.close()
    before = kernel_connections(redis_stack)
    for _ in range(12):  # later sessions of the same kernel, each closed in turn
        other = gw.channel(kid)
        other.send("kernel_info_request", {})
        while other.recv()["msg_type"] != "kernel_info_reply":
            pass
        other.close()
    time.sleep(0.5)
    after = kernel_connections(redis_stack)
    assert after <= before + 4, (before, after)  # one kept session's four, not twelve times that
    gw.wait_state(kid, "idle", timeout=30)
    again = Channel(gw.base, kid, session="early")
    res = again.collect(mid, timeout=30)
    assert got + res.stdout == "".join(f"{i}\n" for i in range(10))
    assert res.status == "ok"
    again.close()
