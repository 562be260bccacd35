"""poolgate as a JupyterHub service, against a real JupyterHub (DummyAuthenticator, with
configurable-http-proxy): Hub API tokens name the user, a Hub admin is a poolgate admin, a token
without the required scope or a revoked one is refused (the latter within cache_seconds)."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import requests
import websocket

from tests.client import Gateway
from tests.conftest import DB_BASE, REDIS, STACKS, Stack, free_port, need_redis, requires

ADMIN_SERVICE_TOKEN = uuid.uuid4().hex  # a Hub service with the admin role makes users' tokens
SCOPE = "access:services!service=poolgate"
CACHE = 2.0

HUB_CONFIG = """
c = get_config()
c.JupyterHub.ip = "127.0.0.1"
c.JupyterHub.port = {port}
c.JupyterHub.hub_ip = "127.0.0.1"
c.JupyterHub.hub_port = {hub_port}
c.ConfigurableHTTPProxy.api_url = "http://127.0.0.1:{proxy_api}"
c.JupyterHub.authenticator_class = "dummy"
c.Authenticator.allowed_users = {{"alice", "bob"}}
c.Authenticator.admin_users = {{"hubadmin"}}
c.JupyterHub.db_url = "sqlite:///{folder}/hub.sqlite"
c.JupyterHub.cookie_secret_file = "{folder}/cookie_secret"
c.JupyterHub.pid_file = "{folder}/hub.pid"
c.JupyterHub.services = [{{"name": "test-admin", "api_token": "{admin_token}"}},
                         {{"name": "poolgate"}}]
c.JupyterHub.load_roles = [
    {{"name": "admin", "services": ["test-admin"]}},
    # users may use the poolgate service (README, Security: JupyterHub)
    {{"name": "user", "scopes": ["self", "{scope}"]}},
]
"""


class Hub:
    """A JupyterHub of the test's own."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self.hub_port = free_port()
        self.api = f"http://127.0.0.1:{self.hub_port}/hub/api"
        (folder / "jupyterhub_config.py").write_text(HUB_CONFIG.format(
            port=free_port(), hub_port=self.hub_port, proxy_api=free_port(), folder=folder,
            admin_token=ADMIN_SERVICE_TOKEN, scope=SCOPE))
        self.proc = subprocess.Popen([requires("jupyterhub"), "-f", "jupyterhub_config.py"],
                                     cwd=folder, start_new_session=True,
                                     stdout=open(folder / "hub.log", "ab"),
                                     stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 90
        while time.monotonic() < deadline:
            try:
                if requests.get(self.api + "/", timeout=2).status_code == 200:
                    return
            except requests.ConnectionError:
                pass
            if self.proc.poll() is not None:
                break
            time.sleep(0.3)
        self.stop()
        log = (folder / "hub.log").read_text()[-3000:]
        raise AssertionError(f"JupyterHub did not start:\n{log}")

    def call(self, method: str, path: str, **kw: Any) -> Any:
        r = requests.request(method, self.api + path, timeout=30,
                             headers={"Authorization": f"token {ADMIN_SERVICE_TOKEN}"}, **kw)
        assert r.status_code < 300, r.text
        return r.json() if r.content else None

    def token(self, user: str, scopes: list[str] | None = None) -> tuple[str, str]:
        """A new API token of ``user``: (token, its id)."""
        body: dict[str, Any] = {"note": "poolgate test", "expires_in": 3600}
        if scopes is not None:
            body["scopes"] = scopes
        made = self.call("POST", f"/users/{user}/tokens", json=body)
        return made["token"], made["id"]

    def stop(self) -> None:
        """SIGTERM: the Hub stops its proxy, then itself."""
        try:
            os.killpg(self.proc.pid, signal.SIGTERM)
            self.proc.wait(20)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()
        except ProcessLookupError:
            pass


@pytest.fixture(scope="module")
def hub(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Hub]:
    server = Hub(tmp_path_factory.mktemp("hub"))
    yield server
    server.stop()


@pytest.fixture(scope="module")
def hub_stack(tmp_path_factory: pytest.TempPathFactory, hub: Hub) -> Iterator[Stack]:
    need_redis()
    tag = f"hub{uuid.uuid4().hex[:6]}"
    stack = Stack(tmp_path_factory.mktemp("hubstack"), REDIS, db=DB_BASE + 7,
                  pools={"local": {"launcher": "local", "queue": f"{tag}-local", "slots": 4,
                                   "heartbeat_ttl": 3.0}},
                  gateway={"auth": {"kind": "jupyterhub", "hub_api_url": hub.api,
                                    "hub_scopes": [SCOPE], "cache_seconds": CACHE}},
                  specs={"tiny-py": None})
    stack.token = hub.token("hubadmin")[0]  # the test's client, and the leak check, see all
    stack.start()
    STACKS.append(stack)
    yield stack
    STACKS.remove(stack)
    stack.stop()


def test_hub_tokens_name_the_user(hub: Hub, hub_stack: Stack) -> None:
    alice = Gateway(hub_stack.url, hub.token("alice")[0])
    bob = Gateway(hub_stack.url, hub.token("bob")[0])
    admin = hub_stack.gw
    kid = alice.start(env={"KERNEL_USERNAME": "hubadmin"})["id"]
    try:
        ch = alice.channel(kid)
        assert ch.execute("import os; print(os.environ['KERNEL_USERNAME'])").stdout == "alice\n"
        ch.close()
        assert bob.kernels() == [] and bob.get(f"/api/kernels/{kid}").status_code == 404
        with pytest.raises(websocket.WebSocketBadStatusException) as info:
            bob.channel(kid)
        assert info.value.status_code == 404
        assert bob.get("/api/pools").status_code == 403
        assert kid in [k["id"] for k in admin.kernels()]  # a Hub admin is a poolgate admin
        assert admin.get("/api/pools").status_code == 200
    finally:
        alice.shutdown(kid)


def test_tokens_the_hub_refuses(hub: Hub, hub_stack: Stack) -> None:
    narrow = hub.token("alice", scopes=["read:users:name!user=alice"])[0]  # lacks SCOPE
    for token in ("", uuid.uuid4().hex, narrow):
        r = Gateway(hub_stack.url, token).get("/api/kernels")
        assert r.status_code == 401 and set(r.json()) == {"reason", "message"}, (token, r.text)
    assert SCOPE in Gateway(hub_stack.url, narrow).get("/api/kernels").json()["message"]


def test_revoked_token_stops_working_within_the_cache_time(hub: Hub, hub_stack: Stack) -> None:
    token, token_id = hub.token("bob")
    gw = Gateway(hub_stack.url, token)
    assert gw.get("/api/kernels").status_code == 200
    hub.call("DELETE", f"/users/bob/tokens/{token_id}")
    t0 = time.monotonic()
    while gw.get("/api/kernels").status_code == 200:
        assert time.monotonic() - t0 < CACHE + 1.0, "the revoked token still works"
        time.sleep(0.1)
    assert gw.get("/api/kernels").status_code == 401


def test_single_user_server_uses_its_hub_token(hub: Hub, hub_stack: Stack,
                                               tmp_path: Path) -> None:
    """A Jupyter Server set up as README's JupyterHub section says (``--gateway-url`` and
    ``GatewayClient.auth_token`` from ``JUPYTERHUB_API_TOKEN``) runs kernels as its user."""
    from tests.client import Channel

    token = hub.token("alice")[0]
    (tmp_path / "jupyter_server_config.py").write_text(
        "import os\nc.GatewayClient.auth_token = os.environ['JUPYTERHUB_API_TOKEN']\n")
    port, js_token = free_port(), uuid.uuid4().hex
    env = dict(os.environ, JUPYTER_RUNTIME_DIR=str(tmp_path), JUPYTER_DATA_DIR=str(tmp_path),
               JUPYTER_CONFIG_DIR=str(tmp_path), JUPYTERHUB_API_TOKEN=token)
    proc = subprocess.Popen(
        [sys.executable, "-m", "jupyter_server", "--no-browser", "--allow-root", f"--port={port}",
         "--ip=127.0.0.1", f"--ServerApp.token={js_token}", f"--ServerApp.root_dir={tmp_path}",
         f"--gateway-url={hub_stack.url}", "--GatewayClient.request_timeout=120"],
        env=env, stdout=open(tmp_path / "server.log", "wb"), stderr=subprocess.STDOUT,
        start_new_session=True)
    try:
        server = Gateway(f"http://127.0.0.1:{port}", js_token)
        deadline = time.monotonic() + 60
        while True:
            try:
                if server.get("/api/kernelspecs", timeout=2).status_code == 200:
                    break
            except requests.ConnectionError:
                pass
            assert proc.poll() is None and time.monotonic() < deadline, \
                (tmp_path / "server.log").read_text()[-3000:]
            time.sleep(0.2)
        kid = server.start("python3")["id"]
        try:
            ch = Channel(server.base, kid, token=js_token)  # through the server's WebSocket
            res = ch.execute("import os; print(os.environ['KERNEL_USERNAME'])")
            assert res.stdout == "alice\n"
            ch.close()
            assert Gateway(hub_stack.url, hub.token("bob")[0]).kernels() == []
            assert kid in [k["id"] for k in Gateway(hub_stack.url, token).kernels()]
        finally:
            assert server.delete(f"/api/kernels/{kid}").status_code == 204
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(30)
