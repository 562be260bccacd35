"""Real Jupyter Server with --gateway-url pointing at poolgate, driven through its own API."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import requests

from tests.client import Channel, Gateway
from tests.conftest import Stack, free_port

TOKEN = "jstoken"


@pytest.fixture
def jupyter(redis_stack: Stack, tmp_path: object) -> Iterator[Gateway]:
    port = free_port()
    env = dict(os.environ, JUPYTER_RUNTIME_DIR=str(tmp_path), JUPYTER_DATA_DIR=str(tmp_path))
    log = open(Path(str(tmp_path)) / "jupyter-server.log", "wb")
    # poolgate.lab is enabled as a wheel install enables it (an editable one does not: the
    # config file ships as data_files; tests/test_lab.py checks the wheel).
    proc = subprocess.Popen(
        [sys.executable, "-m", "jupyter_server", "--no-browser", "--allow-root",
         f"--port={port}", "--ip=127.0.0.1", f"--ServerApp.token={TOKEN}",
         f"--ServerApp.root_dir={tmp_path}", f"--gateway-url={redis_stack.url}",
         "--GatewayClient.request_timeout=120", "--ServerApp.jpserver_extensions=poolgate.lab=True"],
        env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    log.close()
    gw = Gateway(f"http://127.0.0.1:{port}", TOKEN)
    deadline = time.monotonic() + 60
    while True:
        try:
            if gw.get("/api/kernelspecs", timeout=2).status_code == 200:
                break
        except requests.ConnectionError:
            pass
        assert proc.poll() is None and time.monotonic() < deadline, "jupyter server did not start"
        time.sleep(0.2)
    yield gw
    os.killpg(proc.pid, signal.SIGTERM)
    proc.wait(30)


def test_jupyter_server_runs_code_through_poolgate(jupyter: Gateway, redis_stack: Stack,
                                                   tmp_path: Path) -> None:
    # poolgate.lab took Nagle's algorithm off its kernel WebSockets (tests/test_lab.py)
    assert b"poolgate.lab: kernel WebSockets send without delay" in (
        tmp_path / "jupyter-server.log").read_bytes()
    specs = jupyter.get("/api/kernelspecs").json()
    assert "python3" in specs["kernelspecs"]
    model = jupyter.start("python3")
    kid = model["id"]
    try:
        assert kid in [k["id"] for k in redis_stack.gw.kernels()]  # it is poolgate's kernel
        ch = Channel(jupyter.base, kid, token=TOKEN)
        res = ch.execute("import os; print(os.environ['KERNEL_ID']); 2**10")
        assert res.stdout.strip() == kid and res.result == "1024"
        r = jupyter.post(f"/api/kernels/{kid}/restart")
        assert r.status_code == 200
        assert ch.execute("'after restart'", timeout=60).result == "'after restart'"
        ch.close()
        assert jupyter.get(f"/api/kernels/{kid}").json()["execution_state"] in ("idle", "busy")
    finally:
        assert jupyter.delete(f"/api/kernels/{kid}").status_code == 204
    assert redis_stack.gw.get(f"/api/kernels/{kid}").status_code == 404


def test_jupyter_server_sessions(jupyter: Gateway) -> None:
    r = jupyter.post("/api/sessions", json={"path": "nb.ipynb", "type": "notebook", "name": "",
                                            "kernel": {"name": "python3"}})
    assert r.status_code == 201, r.text
    sess = r.json()
    kid = sess["kernel"]["id"]
    ch = Channel(jupyter.base, kid, token=TOKEN, session="lab")
    ch2 = Channel(jupyter.base, kid, token=TOKEN, session="lab")  # JupyterLab opens twice
    # A cell longer than Jupyter Server's gateway reconnect interval (1 s): the older socket
    # must not take the session back meanwhile and steal the reply.
    res = ch2.execute("import time; time.sleep(3); 'first cell'", timeout=30)
    assert res.result == "'first cell'"
    ch.close()
    ch2.close()
    assert jupyter.delete(f"/api/sessions/{sess['id']}").status_code == 204


def test_a_gateway_error_reaches_the_client_with_its_reason(jupyter: Gateway) -> None:
    """Jupyter Server writes its gateway client's errors as "Error from Gateway: [%s] %s",
    unformatted; poolgate.lab fills them in, so JupyterLab shows poolgate's reason."""
    r = jupyter.post("/api/kernels", json={"name": "no-such-spec"})
    assert r.status_code == 404
    message = r.json()["message"]
    assert "%s" not in message and "no kernelspec named 'no-such-spec'" in message, message
