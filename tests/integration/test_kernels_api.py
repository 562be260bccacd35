"""The REST API as Jupyter Server's gateway client and Enterprise Gateway's clients use it,
on a Redis broker and on a RabbitMQ broker, with real workers and real ipykernel kernels."""
from __future__ import annotations

import json
import re
import socket
import time
import uuid
from typing import Any

import psutil
import pytest
import redis

from tests.conftest import Stack


def test_api_version_and_kernelspecs(stack: Stack) -> None:
    gw = stack.gw
    assert "version" in gw.get("/api").json()
    specs = gw.get("/api/kernelspecs").json()
    assert specs["default"] == "python3"
    py = specs["kernelspecs"]["python3"]
    assert py["name"] == "python3" and py["spec"]["language"] == "python"
    assert set(py) == {"name", "spec", "resources"}
    assert gw.get("/api/kernelspecs/python3").json()["spec"]["argv"][0] == "python"
    logo = gw.get(py["resources"]["logo-64x64"])
    assert logo.status_code == 200 and logo.content[:4] == b"\x89PNG"
    for path in ("/api/kernelspecs/nope", "/kernelspecs/nope/logo-64x64.png",
                 "/kernelspecs/python3/../../etc/passwd"):
        r = gw.get(path)
        assert r.status_code == 404, path


def test_kernel_lifecycle(stack: Stack) -> None:
    gw = stack.gw
    r = gw.post("/api/kernels", json={"name": "python3"})
    assert r.status_code == 201
    model = r.json()
    kid = model["id"]
    try:
        assert r.headers["Location"] == f"/api/kernels/{kid}"
        assert set(model) >= {"id", "name", "last_activity", "execution_state", "connections"}
        assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{6}Z", model["last_activity"])
        assert model["execution_state"] == "idle" and model["connections"] == 0
        assert kid in [k["id"] for k in gw.kernels()]
        ch = gw.channel(kid)
        res = ch.execute("import os; print(os.environ['KERNEL_ID']); 6*7")
        assert res.status == "ok" and res.stdout.strip() == kid and res.result == "42"
        assert gw.get(f"/api/kernels/{kid}").json()["connections"] == 1
        ch.close()
    finally:
        assert gw.delete(f"/api/kernels/{kid}").status_code == 204
    for method, path in (("get", ""), ("delete", ""), ("post", "/interrupt"), ("post", "/restart")):
        r = getattr(gw, method)(f"/api/kernels/{kid}{path}")
        assert r.status_code == 404, (method, path, r.text)
        assert set(r.json()) == {"reason", "message"}
    assert kid not in [k["id"] for k in gw.kernels()]


def gateway_redis_clients(stack: Stack, r: redis.Redis) -> list[dict[str, Any]]:
    """The registry's view of the connections the stack's first gateway holds."""
    top = psutil.Process(stack.gateways[0].pid)
    registry_port = r.connection_pool.connection_kwargs["port"]
    ports = {c.laddr.port for p in (top, *top.children(recursive=True))
             for c in p.net_connections("tcp") if c.raddr and c.raddr.port == registry_port}
    return [c for c in r.client_list() if int(c["addr"].rsplit(":", 1)[1]) in ports]


def test_a_launch_leaves_no_result_subscription_and_its_result_is_still_stored(
        stack: Stack) -> None:
    """Celery's send_task subscribes the sender to the task's result channel. The gateway
    never reads it: redis-py then kept every channel name (twice) and the unread replies
    piled up on the connection, one lot per launch, for the gateway's whole life. The
    result is still stored, for Celery's own tools (``celery result``, AsyncResult)."""
    r = redis.Redis.from_url(stack.registry_url)
    kids = [stack.gw.start()["id"] for _ in range(2)]
    try:
        for kid in kids:
            ch = stack.gw.channel(kid)
            assert ch.execute("1").status == "ok"
            ch.close()
        clients = gateway_redis_clients(stack, r)
        assert clients, "the gateway's registry connections were not found"
        # the gateway's own event subscription is a pattern (psubscribe); Celery's are not
        assert [(c["cmd"], c["sub"]) for c in clients
                if c["cmd"] in ("subscribe", "unsubscribe") or c["sub"] != "0"] == []
    finally:
        for kid in kids:
            stack.gw.shutdown(kid)
    for kid in kids:
        key = f"celery-task-meta-{kid}"
        deadline = time.monotonic() + 20  # stored once the kernels.host task returns
        while json.loads(r.get(key) or b"{}").get("status") != "SUCCESS" \
                and time.monotonic() < deadline:  # RUNNING (track_started) until then
            time.sleep(0.1)
        assert json.loads(r.get(key) or b"{}").get("status") == "SUCCESS"


LONG = "q" * 3000  # under the request line's limit (gunicorn's 4094, a 414 past it)


@pytest.mark.parametrize("method,path,status", [
    ("get", f"/api/kernels/{LONG}", 404), ("delete", f"/api/kernels/{LONG}", 404),
    ("post", f"/api/kernels/{LONG}/interrupt", 404), ("get", f"/api/kernels/{LONG}/channels", 400),
    ("get", f"/api/sessions/{LONG}", 404), ("get", f"/api/pools/{LONG}", 404),
    ("get", f"/api/kernelspecs/{LONG}", 404), ("get", f"/kernelspecs/python3/{LONG}", 404)])
def test_a_long_name_or_id_is_a_short_json_error(redis_stack: Stack, method: str, path: str,
                                                 status: int) -> None:
    """Kilobytes of id in a URL get a 4xx whose message does not echo them whole (and a
    file name too long for the file system is a 404, not a 500)."""
    r = getattr(redis_stack.gw, method)(path)
    assert r.status_code == status, r.text[:200]
    assert set(r.json()) == {"reason", "message"} and len(r.json()["message"]) < 400


@pytest.mark.parametrize("request_bytes,status", [
    (b"GET /api/kernels/" + b"q" * 5000 + b" HTTP/1.1\r\nHost: x\r\n\r\n", 414),
    (b"NOT A REQUEST LINE\r\n\r\n", 400),
    (b"GET /api HTTP/1.1\r\nHost: x\r\nBad Header\r\n\r\n", 400)])
def test_a_request_the_server_cannot_parse_gets_a_json_error(
        redis_stack: Stack, request_bytes: bytes, status: int) -> None:
    """gunicorn answers these before the app sees them; the answer is still the API's JSON."""
    with socket.create_connection(("127.0.0.1", redis_stack.port), timeout=10) as sock:
        sock.sendall(request_bytes)
        reply = b""
        while chunk := sock.recv(65536):
            reply += chunk
    head, _, body = reply.partition(b"\r\n\r\n")
    assert head.split(b" ")[1] == str(status).encode(), head
    assert b"content-type: application/json" in head.lower(), head
    data = json.loads(body)
    assert set(data) == {"reason", "message"} and data["message"], data


def test_websocket_to_unknown_kernel_is_404(stack: Stack) -> None:
    import websocket

    with pytest.raises(websocket.WebSocketBadStatusException) as info:
        stack.gw.channel(str(uuid.uuid4()))
    assert info.value.status_code == 404


BAD_BODIES = [
    ("not json", b"{nope", {}),
    ("array", b"[1, 2]", {}),
    ("env not an object", b'{"name": "python3", "env": ["A"]}', {}),
    ("env value not a string", b'{"name": "python3", "env": {"KERNEL_X": 1}}', {}),
    ("env value too long", ('{"name": "python3", "env": {"KERNEL_X": "' + "x" * 5000 + '"}}').encode(), {}),
    ("unknown kernelspec", b'{"name": "no-such-spec"}', {}),
    ("unknown kernelspec, 5000 characters", ('{"name": "' + "y" * 5000 + '"}').encode(), {}),
    ("launch timeout not a number", b'{"env": {"KERNEL_LAUNCH_TIMEOUT": "soon"}}', {}),
    ("kernel id not a uuid", b'{"env": {"KERNEL_ID": "abc"}}', {}),
]
# README, "The API": an unknown spec is a 404; every other bad body a 400.
BAD_BODY_STATUS = {"unknown kernelspec": (404, "unknown_kernelspec"),
                   "unknown kernelspec, 5000 characters": (404, "unknown_kernelspec")}


@pytest.mark.parametrize("label,body,headers", BAD_BODIES, ids=[b[0] for b in BAD_BODIES])
def test_bad_input_is_a_json_4xx_and_starts_nothing(redis_stack: Stack, label: str, body: bytes,
                                                    headers: dict[str, str]) -> None:
    gw = redis_stack.gw
    before = gw.kernels()
    r = gw.post("/api/kernels", data=body, headers={"Content-Type": "application/json", **headers})
    status, reason = BAD_BODY_STATUS.get(label, (400, "bad_request"))
    assert r.status_code == status, (r.status_code, r.text)
    data = r.json()
    assert set(data) == {"reason", "message"} and data["message"]
    assert data["reason"] == reason, data
    assert len(data["message"]) < 400, "what the client sent is not echoed back whole"
    assert gw.kernels() == before


def test_post_without_content_type_is_read_as_json(redis_stack: Stack) -> None:
    gw = redis_stack.gw
    r = gw.post("/api/kernels", data=b'{"name": "python3"}', headers={"Content-Type": ""})
    assert r.status_code == 201, r.text
    gw.shutdown(r.json()["id"])
    r = gw.post("/api/kernels", data=b"")
    assert r.status_code == 201, r.text  # an empty body starts the default kernelspec
    assert r.json()["name"] == "python3"
    gw.shutdown(r.json()["id"])


def test_env_reaches_the_kernel(stack: Stack, tmp_path: object) -> None:
    gw = stack.gw
    wd = str(stack.tmp)
    model = gw.start(env={"KERNEL_USERNAME": "alice", "KERNEL_WORKING_DIR": wd,
                          "ALLOWED_VAR": "yes", "SECRET_THING": "no", "PATH_EXTRA": "x"})
    try:
        ch = gw.channel(model["id"])
        res = ch.execute("import os; print(os.environ.get('KERNEL_USERNAME'), "
                         "os.environ.get('ALLOWED_VAR'), os.environ.get('SECRET_THING'), "
                         "os.getcwd())")
        assert res.stdout.split() == ["alice", "yes", "None", wd]
        ch.close()
    finally:
        gw.shutdown(model["id"])


def test_interrupt_stops_a_running_cell(stack: Stack) -> None:
    gw = stack.gw
    kid = gw.start()["id"]
    try:
        ch = gw.channel(kid)
        mid = ch.start_cell()  # returns once the cell runs
        assert gw.post(f"/api/kernels/{kid}/interrupt").status_code == 204
        res = ch.collect(mid, timeout=20)
        assert res.status == "error" and res.error and res.error["ename"] == "KeyboardInterrupt"
        assert ch.execute("1+1").result == "2"
        ch.close()
    finally:
        gw.shutdown(kid)


def test_message_mode_interrupt(redis_stack: Stack) -> None:
    gw = redis_stack.gw
    kid = gw.start("msgint")["id"]
    try:
        ch = gw.channel(kid)
        mid = ch.start_cell()  # returns once the cell runs
        assert gw.post(f"/api/kernels/{kid}/interrupt").status_code == 204
        res = ch.collect(mid, timeout=20)
        assert res.error and res.error["ename"] == "KeyboardInterrupt"
        ch.close()
    finally:
        gw.shutdown(kid)


def test_restart_keeps_socket_and_loses_state(stack: Stack) -> None:
    """A restart the client asked for sends no `restarting` status (JupyterLab shows "the
    kernel appears to have died" for one, as for Jupyter Server's restarter): the socket stays
    open, a request sent during the restart is held and answered by the new kernel, and the
    session hears the new kernel's `idle`."""
    import threading

    gw = stack.gw
    kid = gw.start()["id"]
    try:
        ch = gw.channel(kid)
        assert ch.execute("x = 5; x").result == "5"
        answer: dict[str, Any] = {}
        restart = threading.Thread(target=lambda: answer.update(
            r=gw.post(f"/api/kernels/{kid}/restart")))
        restart.start()
        while gw.get(f"/api/kernels/{kid}").json()["poolgate"]["status"] == "RUNNING" \
                and restart.is_alive():
            time.sleep(0.01)
        held = ch.send("execute_request", {"code": "'x' in dir()", "silent": False})
        restart.join(30)
        r = answer["r"]
        assert r.status_code == 200 and r.json()["id"] == kid
        res = ch.collect(held, timeout=30)
        assert res.result == "False"  # the held request ran in the new kernel
        states = [m["content"]["execution_state"] for m in ch.other
                  if m["msg_type"] == "status" and not m["parent_header"]]
        assert "restarting" not in states and "idle" in states
        res = ch.execute("print('after'); 'x' in dir()")
        assert res.stdout == "after\n" and res.result == "False"
        ch.close()
    finally:
        gw.shutdown(kid)


def test_kernel_that_dies_is_restarted_under_the_same_id(stack: Stack) -> None:
    gw = stack.gw
    kid = gw.start()["id"]
    try:
        ch = gw.channel(kid)
        ch.send("execute_request", {"code": "import os; os._exit(1)", "silent": False})
        seen = []
        deadline = time.monotonic() + 20
        while "restarting" not in seen and time.monotonic() < deadline:
            msg = ch.recv(deadline - time.monotonic())
            if msg["msg_type"] == "status":
                seen.append(msg["content"]["execution_state"])
        assert "restarting" in seen
        res = ch.execute("print('alive again')", timeout=30)
        assert res.stdout == "alive again\n"
        model = gw.get(f"/api/kernels/{kid}").json()
        assert model["id"] == kid and model["execution_state"] in ("idle", "busy")
        ch.close()
    finally:
        gw.shutdown(kid)


def test_launch_failure_says_why(stack: Stack) -> None:
    gw = stack.gw
    r = gw.post("/api/kernels", json={"name": "broken"})
    assert r.status_code == 500
    assert "boom: no such module frobnicate" in r.json()["message"]
    assert stack.live_kernels() == []


def test_full_pool_queues_then_times_out_cleanly(stack: Stack) -> None:
    gw = stack.gw
    first = gw.start("tiny-py")["id"]
    try:
        t0 = time.monotonic()
        r = gw.post("/api/kernels", json={"name": "tiny-py", "env": {"KERNEL_LAUNCH_TIMEOUT": "3"}})
        assert r.status_code == 503, r.text
        assert 2.5 < time.monotonic() - t0 < 15
        msg = r.json()["message"]
        withdrawn = msg.split()[1]  # "kernel <id> waited 3s in the queue of pool 'tiny' ..."
        assert "'tiny'" in msg and "1 slots" in msg and "0 launches were ahead" in msg
        assert "KERNEL_LAUNCH_TIMEOUT" in msg
        assert [k["id"] for k in gw.kernels()] == [first]
    finally:
        gw.shutdown(first)
    # The withdrawn launch never appears later, even though its message was in the queue.
    kid = gw.start("tiny-py")["id"]
    log, deadline = stack.logs / "worker-tiny.log", time.monotonic() + 15
    while withdrawn not in log.read_text():  # its message reached the worker, which dropped it
        assert time.monotonic() < deadline, f"the worker never saw launch {withdrawn}"
        time.sleep(0.05)
    assert [k["id"] for k in gw.kernels()] == [kid]
    gw.shutdown(kid)


def test_waiting_launch_starts_when_a_slot_frees(redis_stack: Stack) -> None:
    import threading

    gw = redis_stack.gw
    first = gw.start("tiny-py")["id"]
    out: dict[str, object] = {}
    t = threading.Thread(target=lambda: out.update(r=gw.post(
        "/api/kernels", json={"name": "tiny-py"})))
    t.start()
    deadline = time.monotonic() + 30
    while not (waiting := [k for k in gw.kernels() if k["id"] != first]):  # it is queued
        assert time.monotonic() < deadline, "the second launch never appeared"
        time.sleep(0.05)
    assert len(waiting) == 1 and waiting[0]["execution_state"] == "starting"
    assert waiting[0]["poolgate"]["queue_position"] == 1
    gw.shutdown(first)
    t.join(30)
    r = out["r"]
    assert r.status_code == 201  # type: ignore[attr-defined]
    gw.shutdown(r.json()["id"])  # type: ignore[attr-defined]


def test_enterprise_gateway_kernelspec_routes_by_process_proxy(redis_stack: Stack) -> None:
    gw = redis_stack.gw
    model = gw.start("eg-local")
    try:
        assert model["poolgate"]["pool"] == "local"
    finally:
        gw.shutdown(model["id"])


def test_client_chosen_kernel_id(redis_stack: Stack) -> None:
    gw = redis_stack.gw
    kid = str(uuid.uuid4())
    assert gw.start(env={"KERNEL_ID": kid})["id"] == kid
    r = gw.post("/api/kernels", json={"env": {"KERNEL_ID": kid}})
    assert r.status_code == 400
    gw.shutdown(kid)


def test_sessions_api(stack: Stack) -> None:
    gw = stack.gw
    r = gw.post("/api/sessions", json={"path": "a.ipynb", "type": "notebook", "name": "a",
                                       "kernel": {"name": "python3"}})
    assert r.status_code == 201, r.text
    sess = r.json()
    kid = sess["kernel"]["id"]
    assert sess["path"] == "a.ipynb" and sess["kernel"]["execution_state"] == "idle"
    assert [s["id"] for s in gw.get("/api/sessions").json()] == [sess["id"]]
    r = gw.s.patch(gw.base + f"/api/sessions/{sess['id']}", json={"path": "b.ipynb"})
    assert r.status_code == 200 and r.json()["path"] == "b.ipynb"
    assert gw.delete(f"/api/sessions/{sess['id']}").status_code == 204
    assert gw.get(f"/api/sessions/{sess['id']}").status_code == 404
    assert gw.get(f"/api/kernels/{kid}").status_code == 404
    assert gw.post("/api/sessions", json={"kernel": {"name": "python3"}}).status_code == 400
    bad = gw.post("/api/sessions", json={"notebook": 0.5, "kernel": {"name": "python3"}})
    assert bad.status_code == 400 and "notebook" in bad.json()["message"]  # found by fuzzing


def test_second_gateway_serves_the_same_kernels(redis_stack: Stack) -> None:
    from tests.conftest import free_port

    gw = redis_stack.gw
    other = redis_stack.start_gateway(free_port())
    kid = gw.start()["id"]
    try:
        assert kid in [k["id"] for k in other.kernels()]
        ch = other.channel(kid)
        assert ch.execute("'via the other gateway'").result == "'via the other gateway'"
        ch.close()
    finally:
        other.shutdown(kid)
    assert gw.get(f"/api/kernels/{kid}").status_code == 404
    proc = redis_stack.gateways.pop()
    proc.terminate()
    proc.wait(10)


def test_waiting_launch_returned_early_with_a_socket_that_works(redis_stack: Stack) -> None:
    gw = redis_stack.gw
    first = gw.start("tiny-py")["id"]
    r = gw.post("/api/kernels?wait=false", json={"name": "tiny-py"})
    assert r.status_code == 202, r.text
    model = r.json()
    kid = model["id"]
    assert model["execution_state"] == "starting" and model["poolgate"]["queue_position"] == 1
    ch = gw.channel(kid)  # accepted while the launch waits
    status = ch.recv(10)
    assert status["msg_type"] == "status" and status["content"]["execution_state"] == "starting"
    mid = ch.send("execute_request", {"code": "'sent while queued'", "silent": False})
    gw.shutdown(first)
    res = ch.collect(mid, timeout=60)
    assert res.result == "'sent while queued'"
    assert gw.get(f"/api/kernels/{kid}").json()["execution_state"] in ("idle", "busy")
    ch.close()
    gw.shutdown(kid)


def test_warm_kernels_are_handed_over(tmp_path) -> None:  # type: ignore[no-untyped-def]
    from tests.conftest import DB_BASE, REDIS, STACKS

    pools = {"local": {"launcher": "local", "queue": f"warm{tmp_path.name[-6:]}", "slots": 3,
                       "heartbeat_ttl": 3, "warm": {"python3": 1}}}
    stack = Stack(tmp_path, REDIS, db=DB_BASE + 3, pools=pools, specs={"tiny-py": None}).start()
    STACKS.append(stack)
    try:
        gw = stack.gw
        reg = redis.Redis.from_url(stack.registry_url)

        def warm_ready() -> int:
            pool = gw.get("/api/pools/local").json()
            return int(pool["warm_ready"].get("python3", 0))

        for _ in range(2):
            deadline = time.monotonic() + 30
            while warm_ready() < 1:  # the worker starts (or refills) its warm kernel
                assert time.monotonic() < deadline, "no warm kernel became ready"
                time.sleep(0.1)
            warm = {tuple(sorted(h["connection"].items() - {("key", "")}))
                    for key in reg.scan_iter("pg:warm:*")
                    for h in (json.loads(v) for v in reg.hvals(key)) if h.get("connection")}
            model = gw.start(env={"KERNEL_USERNAME": "wanda", "KERNEL_WORKING_DIR": str(tmp_path)})
            # the kernel handed over is a warm one (its host and ports), not a new process; how
            # fast that is: python -m bench --targets poolgate-warm (bench/README.md)
            conn = redis.Redis.from_url(stack.registry_url).hget(f"pg:k:{model['id']}", "conn")
            assert isinstance(conn, bytes), conn
            got = json.loads(conn)
            got.pop("key")
            assert tuple(sorted(got.items())) in warm, (got, warm)
            ch = gw.channel(model["id"])
            res = ch.execute("import os; print(os.environ['KERNEL_ID'], "
                             "os.environ['KERNEL_USERNAME'], os.getcwd())")
            assert res.stdout.split() == [model["id"], "wanda", str(tmp_path)]
            ch.close()
            gw.shutdown(model["id"])
    finally:
        stack.stop()
        STACKS.remove(stack)
