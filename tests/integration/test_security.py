"""Security (issue 21) with real gateways and workers: every route authenticates first, users
own their kernels, allow and deny lists, CORS and the WebSocket Origin check, TLS.

The JupyterHub authenticator is tested against a real JupyterHub in test_jupyterhub.py.
"""
from __future__ import annotations

import http.client
import json
import threading
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import requests
import websocket
from flask import Flask

from tests.client import Gateway
from tests.conftest import DB_BASE, REDIS, STACKS, Stack, need_redis

TOKEN = "s3cret-token"
METRICS_TOKEN = "m3trics-token"
ONE_POOL = {"specs": {"tiny-py": None}}  # a stack with the local pool only
RESTRICTED = {"argv": ["python", "-m", "ipykernel_launcher", "-f", "{connection_file}"],
              "display_name": "restricted", "language": "python",
              "metadata": {"poolgate": {"denied_users": ["mallory"]}}}
#: Every route, by method and path; {kid} is a kernel id, {sid} a session id.
ROUTES = [
    ("GET", "/"), ("GET", "/api"), ("GET", "/api/"), ("GET", "/api/kernelspecs"),
    ("GET", "/api/kernelspecs/python3"),
    ("GET", "/kernelspecs/python3/logo-64x64.png"), ("GET", "/api/kernels"),
    ("POST", "/api/kernels"), ("GET", "/api/kernels/{kid}"), ("DELETE", "/api/kernels/{kid}"),
    ("POST", "/api/kernels/{kid}/interrupt"), ("POST", "/api/kernels/{kid}/restart"),
    ("GET", "/api/sessions"), ("POST", "/api/sessions"), ("GET", "/api/sessions/{sid}"),
    ("PATCH", "/api/sessions/{sid}"), ("DELETE", "/api/sessions/{sid}"), ("GET", "/api/pools"),
    ("GET", "/api/pools/local"), ("GET", "/metrics"), ("GET", "/pools"),
    ("GET", "/no/such/route"), ("GET", "/api/kernels/{kid}/channels"),
    ("GET", "/api/swagger.yaml"), ("GET", "/api/swagger.json"),
]


def _local_pool(tag: str) -> dict[str, Any]:
    return {"local": {"launcher": "local", "queue": f"{tag}-local", "slots": 4,
                      "heartbeat_ttl": 3.0, "launch_timeout": 60}}


def _stack(tmp: Path, db: int, gateway: dict[str, Any], **kw: Any) -> Iterator[Stack]:
    need_redis()
    stack = Stack(tmp, REDIS, db=db, pools=_local_pool(f"sec{db}{uuid.uuid4().hex[:4]}"),
                  gateway=gateway, **kw)
    stack.start()
    STACKS.append(stack)
    yield stack
    STACKS.remove(stack)
    stack.stop()


@pytest.fixture(scope="module")
def token_stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    """A shared token, and a separate metrics token."""
    yield from _stack(tmp_path_factory.mktemp("token"), DB_BASE + 4,
                      {"auth_token": TOKEN, "auth": {"metrics_token": METRICS_TOKEN},
                       "allow_origin": "https://lab.example.org"}, **ONE_POOL)


@pytest.fixture(scope="module")
def header_stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    """Users named by an authenticating proxy on 127.0.0.1; the test client is the admin."""
    yield from _stack(tmp_path_factory.mktemp("header"), DB_BASE + 5,
                      {"auth": {"kind": "header", "trusted_proxies": ["127.0.0.1/32"],
                                "admin_users": ["admin"]}},
                      specs={"tiny-py": None, "restricted": RESTRICTED},
                      client={"headers": {"X-Forwarded-User": "admin"}})


def as_user(stack: Stack, name: str) -> Gateway:
    return Gateway(stack.url, headers={"X-Forwarded-User": name})


def _call(url: str, method: str, path: str, headers: dict[str, str]) -> requests.Response:
    return requests.request(method, url + path, headers=headers, timeout=30,
                            data=b'{"name": "python3"}' if method in ("POST", "PATCH") else None)


def _ws_status(url: str, kid: str, headers: dict[str, str]) -> tuple[int, bytes]:
    sent = [f"{k}: {v}" for k, v in headers.items()]
    with pytest.raises(websocket.WebSocketBadStatusException) as info:
        websocket.create_connection(url.replace("http", "ws", 1) + f"/api/kernels/{kid}/channels",
                                    header=sent, timeout=10)
    return info.value.status_code, info.value.resp_body or b""


def assert_all_refused(url: str, headers: dict[str, str], live_kid: str, sid: str) -> None:
    """Every route answers 401 with JSON and no data, the same for a live kernel and an
    unknown one, the WebSocket included."""
    for method, path in ROUTES:
        answers = []
        for kid in (live_kid, str(uuid.uuid4())):
            r = _call(url, method, path.format(kid=kid, sid=sid), headers)
            assert r.status_code == 401, (method, path, r.status_code, r.text)
            body = r.json()
            assert set(body) == {"reason", "message"} and body["reason"] == "unauthorized"
            assert r.headers["WWW-Authenticate"] == 'Bearer realm="poolgate"'
            assert kid not in r.text
            answers.append(r.text)
        assert answers[0] == answers[1], (method, path)
    live = _ws_status(url, live_kid, headers)
    unknown = _ws_status(url, str(uuid.uuid4()), headers)
    assert live[0] == unknown[0] == 401
    assert json.loads(live[1]) == json.loads(unknown[1])


def test_routes_list_is_every_route_of_the_app(token_stack: Stack) -> None:
    """ROUTES covers every rule the app has, so a route added later is tested above too; and
    every rule, with any method, answers 401 to a client without the token (Flask's test
    client on the same app, same config)."""
    from poolgate.gateway.app import create_app
    from poolgate.gateway.state import state

    before = set(threading.enumerate())
    app = create_app({"CONFIG_PATH": str(token_stack.config)})
    try:
        every_rule_needs_the_token(app)
    finally:  # its threads would go on beating and counting for the stack's cluster
        state(app).close()
        started = set(threading.enumerate()) - before
        for thread in started:
            thread.join(10)
        assert [t.name for t in started if t.is_alive()] == []


def every_rule_needs_the_token(app: Flask) -> None:
    rules = {(m, r.rule.replace("<kernel_id>", "{kid}").replace("<sid>", "{sid}")
              .replace("<name>", "python3").replace("<path:filename>", "logo-64x64.png")
              .replace("/api/pools/python3", "/api/pools/local"))
             for r in app.url_map.iter_rules() for m in r.methods or ()
             if m not in ("HEAD", "OPTIONS")}
    assert rules - set(ROUTES) == set()
    client = app.test_client()
    for method, path in sorted(rules):
        r = client.open(path.format(kid=uuid.uuid4(), sid=uuid.uuid4()), method=method)
        assert r.status_code == 401 and r.json and r.json["reason"] == "unauthorized", (method, path)


def test_token_every_route_needs_the_token(token_stack: Stack) -> None:
    gw = token_stack.gw
    kid = gw.start()["id"]
    sid = gw.post("/api/sessions", json={"path": "a.ipynb", "kernel": {"id": kid}}).json()["id"]
    try:
        for headers in ({}, {"Authorization": "token wrong"}, {"Authorization": "bearer wrong"},
                        {"Authorization": f"basic {TOKEN}"}):
            assert_all_refused(token_stack.url, headers, kid, sid)
        assert _call(token_stack.url, "GET", "/api/kernels?token=wrong", {}).status_code == 401
        # the right token, as a header of either scheme or as ?token=
        for headers, query in (({"Authorization": f"Bearer {TOKEN}"}, ""), ({}, f"?token={TOKEN}")):
            r = _call(token_stack.url, "GET", f"/api/kernels{query}", headers)
            assert r.status_code == 200 and kid in r.text
        # the shared token's anonymous user sees everything, operator pages included
        for path in ("/api/pools", "/metrics", "/pools"):
            assert gw.get(path).status_code == 200, path
    finally:
        gw.delete(f"/api/sessions/{sid}")
        gw.shutdown(kid)


def test_websocket_takes_the_token_in_the_query(token_stack: Stack) -> None:
    """README: ``?token=T`` works where a client cannot set headers (a browser's WebSocket)."""
    gw = token_stack.gw
    kid = gw.start()["id"]
    base = token_stack.url.replace("http", "ws", 1) + f"/api/kernels/{kid}/channels"
    try:
        with pytest.raises(websocket.WebSocketBadStatusException) as info:
            websocket.create_connection(f"{base}?session_id=q1&token=wrong", timeout=30)
        assert info.value.status_code == 401
        ws = websocket.create_connection(f"{base}?session_id=q2&token={TOKEN}", timeout=30)
        mid = uuid.uuid4().hex
        ws.send(json.dumps({"header": {"msg_id": mid, "msg_type": "kernel_info_request",
                                       "username": "t", "session": "q2", "version": "5.3",
                                       "date": "2026-01-01T00:00:00Z"},
                            "parent_header": {}, "metadata": {}, "content": {},
                            "channel": "shell", "buffers": []}))
        while True:  # the kernel answers through the socket the query's token opened
            msg = json.loads(ws.recv())
            if msg["msg_type"] == "kernel_info_reply":
                break
        assert msg["parent_header"]["msg_id"] == mid and msg["content"]["status"] == "ok"
        ws.close()
    finally:
        gw.shutdown(kid)


def test_large_bodies_are_refused(token_stack: Stack) -> None:
    big = b'{"name": "python3", "pad": "' + b"x" * (2 << 20) + b'"}'
    r = token_stack.gw.post("/api/kernels", data=big)
    assert r.status_code == 413 and set(r.json()) == {"reason", "message"}
    assert requests.post(token_stack.url + "/api/kernels", data=big, timeout=30).status_code == 401
    assert token_stack.live_kernels() == []


def test_env_value_with_nul_is_a_400(token_stack: Stack) -> None:
    r = token_stack.gw.post("/api/kernels", json={"env": {"KERNEL_X": "a\x00b"}})
    assert r.status_code == 400 and "NUL" in r.json()["message"]
    assert token_stack.live_kernels() == []


def test_metrics_token_opens_operator_routes_only(token_stack: Stack) -> None:
    ops = Gateway(token_stack.url, METRICS_TOKEN)
    for path in ("/api/pools", "/api/pools/local", "/metrics", "/pools"):
        assert ops.get(path).status_code == 200, path
    for path in ("/api/kernels", "/api/kernelspecs", "/api/sessions", "/api"):
        assert ops.get(path).status_code == 401, path


def test_cors_and_websocket_origin(token_stack: Stack) -> None:
    url, gw = token_stack.url, token_stack.gw
    allowed, other = "https://lab.example.org", "https://evil.example.com"
    r = requests.options(url + "/api/kernels", timeout=10, headers={
        "Origin": allowed, "Access-Control-Request-Method": "POST",
        "Access-Control-Request-Headers": "authorization, content-type"})
    assert r.status_code == 204 and r.content == b""
    assert r.headers["Access-Control-Allow-Origin"] == allowed
    assert "POST" in r.headers["Access-Control-Allow-Methods"]
    assert "authorization" in r.headers["Access-Control-Allow-Headers"]
    r = requests.options(url + "/api/kernels", headers={"Origin": other}, timeout=10)
    assert "Access-Control-Allow-Origin" not in r.headers and r.content == b""
    assert gw.get("/api", headers={"Origin": allowed}).headers[
        "Access-Control-Allow-Origin"] == allowed
    assert "Access-Control-Allow-Origin" not in gw.get("/api", headers={"Origin": other}).headers
    # a 401 carries the header too, so a browser page can read why
    assert requests.get(url + "/api", headers={"Origin": allowed}, timeout=10).headers[
        "Access-Control-Allow-Origin"] == allowed
    kid = gw.start()["id"]
    try:
        auth = {"Authorization": f"token {TOKEN}"}
        status, body = _ws_status(url, kid, {**auth, "Origin": other})
        assert status == 403 and "evil.example.com" in json.loads(body)["message"]
        host = url.split("//", 1)[1]
        ws_url = url.replace("http", "ws", 1) + f"/api/kernels/{kid}/channels"
        for origin in (allowed, f"http://{host}"):  # allowed, and the gateway's own origin
            websocket.create_connection(ws_url, header=[f"Authorization: token {TOKEN}"],
                                        origin=origin, timeout=10).close()
        websocket.create_connection(ws_url, header=[f"Authorization: token {TOKEN}"],
                                    suppress_origin=True, timeout=10).close()  # not a browser
    finally:
        gw.shutdown(kid)


def test_header_every_route_needs_the_proxy(header_stack: Stack) -> None:
    gw = header_stack.gw
    kid = gw.start()["id"]
    sid = gw.post("/api/sessions", json={"path": "a.ipynb", "kernel": {"id": kid}}).json()["id"]
    try:
        assert_all_refused(header_stack.url, {}, kid, sid)  # no user header
        # the header from an address that is not the proxy's is not believed
        conn = http.client.HTTPConnection("127.0.0.1", header_stack.port, timeout=10,
                                          source_address=("127.0.0.2", 0))
        conn.request("GET", "/api/kernels", headers={"X-Forwarded-User": "admin"})
        resp = conn.getresponse()
        assert resp.status == 401 and kid not in resp.read().decode()
        conn.close()
        assert as_user(header_stack, "bad name;rm").get("/api/kernels").status_code == 401
    finally:
        gw.delete(f"/api/sessions/{sid}")
        gw.shutdown(kid)


def test_users_see_and_drive_only_their_own_kernels(header_stack: Stack) -> None:
    alice, bob, admin = (as_user(header_stack, n) for n in ("alice", "bob", "admin"))
    model = alice.start(env={"KERNEL_USERNAME": "bob"})  # the body cannot pick the owner
    kid = model["id"]
    sid = alice.post("/api/sessions", json={"path": "a.ipynb", "kernel": {"id": kid}}).json()["id"]
    try:
        ch = alice.channel(kid)
        assert ch.execute("import os; print(os.environ['KERNEL_USERNAME'])").stdout == "alice\n"
        ch.close()
        assert [k["id"] for k in alice.kernels()] == [kid]
        assert bob.kernels() == []
        assert kid in [k["id"] for k in admin.kernels()]
        unknown = str(uuid.uuid4())
        for method, path in (("GET", ""), ("POST", "/interrupt"), ("POST", "/restart"),
                             ("DELETE", "")):
            mine = bob.s.request(method, f"{bob.base}/api/kernels/{kid}{path}", timeout=30)
            none = bob.s.request(method, f"{bob.base}/api/kernels/{unknown}{path}", timeout=30)
            assert mine.status_code == none.status_code == 404, (method, path, mine.text)
            assert mine.json()["message"].replace(kid, "K") == \
                none.json()["message"].replace(unknown, "K")
        assert bob.get("/api/sessions").json() == []
        assert bob.get(f"/api/sessions/{sid}").status_code == 404
        assert bob.delete(f"/api/sessions/{sid}").status_code == 404
        r = bob.post("/api/sessions", json={"path": "b.ipynb", "kernel": {"id": kid}})
        assert r.status_code == 404
        with pytest.raises(websocket.WebSocketBadStatusException) as info:
            bob.channel(kid)
        assert info.value.status_code == 404
        for path in ("/api/pools", "/metrics", "/pools"):  # operators only
            assert bob.get(path).status_code == 403, path
            assert admin.get(path).status_code == 200, path
        assert [s["id"] for s in admin.get("/api/sessions").json()] == [sid]
        ch = admin.channel(kid)  # an admin drives anyone's kernel
        assert ch.execute("6*7").result == "42"
        ch.close()
        assert alice.get(f"/api/kernels/{kid}").status_code == 200  # bob changed nothing
    finally:
        assert admin.delete(f"/api/sessions/{sid}").status_code == 204
    assert alice.get(f"/api/kernels/{kid}").status_code == 404


def test_denied_user_gets_403_and_does_not_see_the_spec(header_stack: Stack) -> None:
    mallory, alice = as_user(header_stack, "mallory"), as_user(header_stack, "alice")
    r = mallory.post("/api/kernels", json={"name": "restricted"})
    assert r.status_code == 403 and "mallory" in r.json()["message"]
    assert "denied_users" in r.json()["message"]
    assert "restricted" not in mallory.get("/api/kernelspecs").json()["kernelspecs"]
    assert mallory.get("/api/kernelspecs/restricted").status_code == 404
    assert "restricted" in alice.get("/api/kernelspecs").json()["kernelspecs"]
    assert mallory.kernels() == []
    kid = alice.start("restricted")["id"]
    alice.shutdown(kid)


# -- TLS ------------------------------------------------------------------------------------


def make_certs(folder: Path) -> dict[str, str]:
    """A CA made here, a server certificate for 127.0.0.1 and a client certificate it signed."""
    import datetime
    import ipaddress

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    now = datetime.datetime.now(datetime.timezone.utc)
    out: dict[str, str] = {}

    def write(name: str, key: ec.EllipticCurvePrivateKey, cert: x509.Certificate) -> None:
        (folder / f"{name}.pem").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
        (folder / f"{name}.key").write_bytes(key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption()))
        out[name], out[f"{name}_key"] = str(folder / f"{name}.pem"), str(folder / f"{name}.key")

    def cert(subject: str, key: ec.EllipticCurvePrivateKey, issuer: x509.Name,
             signer: ec.EllipticCurvePrivateKey, ca: bool = False,
             san: list[x509.GeneralName] | None = None,
             usage: Any = None) -> x509.Certificate:
        b = (x509.CertificateBuilder()
             .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, subject)]))
             .issuer_name(issuer).public_key(key.public_key())
             .serial_number(x509.random_serial_number())
             .not_valid_before(now - datetime.timedelta(minutes=5))
             .not_valid_after(now + datetime.timedelta(days=1))
             .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True))
        if san:
            b = b.add_extension(x509.SubjectAlternativeName(san), critical=False)
        if usage:
            b = b.add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
        return b.sign(signer, hashes.SHA256())

    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "poolgate test CA")])
    write("ca", ca_key, cert("poolgate test CA", ca_key, ca_name, ca_key, ca=True))
    key = ec.generate_private_key(ec.SECP256R1())
    write("server", key, cert("127.0.0.1", key, ca_name, ca_key,
                              usage=ExtendedKeyUsageOID.SERVER_AUTH,
                              san=[x509.IPAddress(ipaddress.ip_address("127.0.0.1")),
                                   x509.DNSName("localhost")]))
    key = ec.generate_private_key(ec.SECP256R1())
    write("client", key, cert("alice", key, ca_name, ca_key, usage=ExtendedKeyUsageOID.CLIENT_AUTH))
    return out


@pytest.fixture(scope="module")
def certs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    return make_certs(tmp_path_factory.mktemp("certs"))


@pytest.fixture(scope="module")
def tls_stack(tmp_path_factory: pytest.TempPathFactory, certs: dict[str, str]) -> Iterator[Stack]:
    yield from _stack(tmp_path_factory.mktemp("tls"), DB_BASE + 6, {"auth_token": TOKEN},
                      gateway_args=["--certfile", certs["server"],
                                    "--keyfile", certs["server_key"]],
                      client={"ca": certs["ca"]}, **ONE_POOL)


def test_tls_https_and_wss(tls_stack: Stack, certs: dict[str, str]) -> None:
    gw = tls_stack.gw
    assert gw.base.startswith("https://")
    kid = gw.start()["id"]
    try:
        ch = gw.channel(kid)  # wss://, verified against the test's CA
        assert ch.ws.sock.version().startswith("TLS")  # type: ignore[union-attr]
        assert ch.execute("'over tls'").result == "'over tls'"
        # many TLS records each way: a 300 kB cell in, 2 MB of output out
        res = ch.execute("x = '" + "a" * 300000 + "'; print(len(x)); print('b' * 2000000)")
        assert res.stdout == "300000\n" + "b" * 2000000 + "\n"
        ch.close()
        with pytest.raises(requests.exceptions.SSLError):  # a client that does not trust it
            requests.get(tls_stack.url + "/api", timeout=10)
        with pytest.raises(requests.exceptions.ConnectionError):  # no plain http
            requests.get(tls_stack.url.replace("https", "http") + "/api", timeout=10)
    finally:
        gw.shutdown(kid)


def test_tls_client_certificates(tls_stack: Stack, certs: dict[str, str]) -> None:
    from tests.conftest import free_port

    args, client = tls_stack.gateway_args, tls_stack.client
    tls_stack.gateway_args = [*args, "--client-ca", certs["ca"]]
    tls_stack.client = {"ca": certs["ca"], "cert": (certs["client"], certs["client_key"])}
    try:
        gw = tls_stack.start_gateway(free_port())  # answers this client, with its certificate
        kid = gw.start()["id"]
        try:
            ch = gw.channel(kid)
            assert ch.execute("1+1").result == "2"
            ch.close()
            with pytest.raises((requests.exceptions.SSLError, requests.exceptions.ConnectionError)):
                Gateway(gw.base, TOKEN, ca=certs["ca"]).get("/api", timeout=10)  # no certificate
        finally:
            gw.shutdown(kid)
    finally:
        tls_stack.gateway_args, tls_stack.client = args, client
        proc = tls_stack.gateways.pop()
        proc.terminate()
        proc.wait(10)


def test_serve_with_tls_and_client_certificates(tmp_path: Path, certs: dict[str, str]) -> None:
    """``poolgate serve`` passes the TLS flags to its gateway and sees it ready over https."""
    import os
    import signal
    import subprocess
    import sys

    from tests.conftest import RUN_ID, free_port

    port = free_port()
    env = dict(os.environ, POOLGATE_TEST_RUN=RUN_ID, POOLGATE_AUTH_TOKEN=TOKEN)
    for key in ("POOLGATE_BROKER_URL", "POOLGATE_REGISTRY_URL"):
        env.pop(key, None)
    proc = subprocess.Popen(
        [sys.executable, "-m", "poolgate", "serve", "--port", str(port), "--data-dir",
         str(tmp_path / "data"), "--slots", "1", "--certfile",
         certs["server"], "--keyfile", certs["server_key"], "--client-ca", certs["ca"]],
        cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    assert proc.stdout is not None
    try:
        lines = []
        while "poolgate is ready" not in (line := proc.stdout.readline()):
            assert line, "".join(lines)
            lines.append(line)
        assert f"https://127.0.0.1:{port}/" in line
        gw = Gateway(f"https://127.0.0.1:{port}", TOKEN, ca=certs["ca"],
                     cert=(certs["client"], certs["client_key"]))
        kid = gw.start()["id"]
        ch = gw.channel(kid)
        assert ch.execute("'served over tls'").result == "'served over tls'"
        # serve gives its workers the private Redis's URL and secret, and the token; not kernels
        res = ch.execute("import os; print(sorted(k for k in os.environ if k.startswith(("
                         "'POOLGATE_BROKER', 'POOLGATE_REGISTRY', 'POOLGATE_AUTH', "
                         "'CELERY_BROKER', 'CELERY_RESULT'))))")
        assert res.stdout == "[]\n"
        ch.close()
        gw.shutdown(kid)
        with pytest.raises((requests.exceptions.SSLError, requests.exceptions.ConnectionError)):
            Gateway(gw.base, TOKEN, ca=certs["ca"]).get("/api", timeout=10)
    finally:
        proc.send_signal(signal.SIGINT)
        proc.communicate(timeout=60)
    assert proc.returncode == 0
