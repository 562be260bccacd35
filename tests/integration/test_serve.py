"""`poolgate serve`: the embedded default runs everything, and Ctrl-C stops all of it."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import psutil
import pytest
import redis

from tests.client import Gateway
from tests.conftest import RUN_ID, free_port


def _children_of(folder: Path) -> list[psutil.Process]:
    out = []
    for p in psutil.process_iter(["cmdline"]):
        try:
            if str(folder) in " ".join(p.info["cmdline"] or []):
                out.append(p)
        except psutil.Error:
            continue
    return out


def serve_env(**extra: str) -> dict[str, str]:
    """The environment of a ``poolgate serve`` under test: its kernels carry this run's tag, and
    no broker or registry of the machine's overrides serve's private Redis."""
    env = dict(os.environ, POOLGATE_TEST_RUN=RUN_ID, **extra)
    for key in ("POOLGATE_BROKER_URL", "POOLGATE_REGISTRY_URL"):
        env.pop(key, None)
    return env


@pytest.fixture
def serves() -> Iterator[list[subprocess.Popen[str]]]:
    """The ``poolgate serve`` processes a test starts: those still running when it ends (an
    assertion failed before its Ctrl-C) get one, then a kill, so no serve and no kernel of a
    failed test is left on the machine."""
    procs: list[subprocess.Popen[str]] = []
    yield procs
    for proc in procs:
        if proc.poll() is None:
            proc.send_signal(signal.SIGINT)
            try:
                proc.communicate(timeout=60)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.communicate()


def test_serve_runs_kernels_and_ctrl_c_stops_everything(tmp_path: Path,
                                                        serves: list[subprocess.Popen[str]]
                                                        ) -> None:
    port = free_port()
    data = tmp_path / "data"
    env = serve_env()
    proc = subprocess.Popen(
        [sys.executable, "-m", "poolgate", "serve", "--port", str(port), "--data-dir", str(data),
         "--auth-token", "s3cret", "--base-url", "/pg", "--slots", "2"],
        cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    serves.append(proc)
    assert proc.stdout is not None
    lines = []
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        line = proc.stdout.readline()
        lines.append(line)
        if "poolgate is ready" in line or proc.poll() is not None:
            break
    assert "poolgate is ready" in lines[-1], "".join(lines)
    assert (data / "redis.sock").exists()  # the private Redis, not the machine's
    gw = Gateway(f"http://127.0.0.1:{port}/pg", token="s3cret")
    anon = Gateway(f"http://127.0.0.1:{port}/pg")
    r = anon.get("/api/kernels")
    assert r.status_code == 401 and set(r.json()) == {"reason", "message"}
    assert Gateway(f"http://127.0.0.1:{port}", "s3cret").get("/api/kernels").status_code == 404
    kid = gw.start()["id"]
    ch = gw.channel(kid)
    assert ch.execute("'embedded'").result == "'embedded'"
    # the worker runs with glibc's per-thread caches off (workers/threadcache.py); its kernels
    # get the environment it was given, and with it glibc's defaults
    assert ch.execute("'GLIBC_TUNABLES' in __import__('os').environ").result == "False"
    # the packaged spec turns off debugpy's check for frozen modules: every kernel ran it at
    # start and printed four lines of "Debugger warning" to stderr, which a client connected
    # across an auto-restart received (the check run again, as the kernel's start runs it)
    again = ch.execute("import runpy, sys; runpy.run_path(sys.modules['pydevd_file_utils']"
                       ".__file__); 1")
    assert (again.result, again.stderr) == ("1", ""), again.stderr
    ch.close()
    handle = json.loads(redis.Redis(unix_socket_path=str(data / "redis.sock"))
                        .hget(f"pg:k:{kid}", "handle"))
    kernel_pid = int(handle["data"]["pid"])
    assert psutil.pid_exists(kernel_pid)
    assert len(_children_of(data)) >= 3  # redis, worker, gateway
    proc.send_signal(signal.SIGINT)
    out, _ = proc.communicate(timeout=60)
    assert proc.returncode == 0, out
    said = ("".join(lines) + out).lower().count("no registry_secret configured")
    assert said == 1, out  # once, by serve, not by the gateway and each worker
    assert out.rstrip().endswith("poolgate: stopped"), out  # says when it is done
    assert "WARNING" not in out, out  # its kernel stopping with it is no fault to warn of
    assert not psutil.pid_exists(kernel_pid) or psutil.Process(kernel_pid).status() == "zombie"
    assert _children_of(data) == []


def test_serve_refuses_a_second_instance_on_the_same_data_dir(tmp_path: Path) -> None:
    data = tmp_path / "data"
    env = serve_env()
    first = subprocess.Popen([sys.executable, "-m", "poolgate", "serve", "--port", str(free_port()),
                              "--data-dir", str(data)], env=env, stdout=subprocess.PIPE,
                             stderr=subprocess.STDOUT, text=True)
    assert first.stdout is not None
    try:
        while "ready" not in (line := first.stdout.readline()):
            assert line, "first serve died"
        second = subprocess.run([sys.executable, "-m", "poolgate", "serve", "--port",
                                 str(free_port()), "--data-dir", str(data)], env=env,
                                capture_output=True, text=True, timeout=60)
        assert second.returncode == 2
        assert f"another poolgate serve (pid {first.pid}) is using {data}" in second.stderr
    finally:
        first.send_signal(signal.SIGINT)
        first.communicate(timeout=60)
    assert first.returncode == 0


def test_bad_config_stops_startup_with_the_path(tmp_path: Path) -> None:
    (tmp_path / "queues.yaml").write_text("pools:\n  local:\n    launcher: local\n    slotz: 3\n")
    r = subprocess.run([sys.executable, "-m", "poolgate", "gateway"], cwd=tmp_path,
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 2
    assert "pools.local.slotz: unknown key; did you mean 'slots'?" in r.stderr


def test_serve_with_json_logs_writes_only_json_lines(tmp_path: Path,
                                                     serves: list[subprocess.Popen[str]]) -> None:
    """``poolgate serve --log-format json``: its own lines (ready, stopping) are JSON log
    objects too, as its gateway's and workers' are, from start to Ctrl-C."""
    env = serve_env()
    proc = subprocess.Popen(
        [sys.executable, "-m", "poolgate", "serve", "--port", str(free_port()), "--data-dir",
         str(tmp_path / "data"), "--log-format", "json"],
        cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    serves.append(proc)
    assert proc.stdout is not None
    lines = []
    while "poolgate is ready" not in (line := proc.stdout.readline()):
        assert line, "".join(lines)
        lines.append(line)
    lines.append(line)
    proc.send_signal(signal.SIGINT)
    out, _ = proc.communicate(timeout=60)
    assert proc.returncode == 0, out
    records = []
    for text in [*lines, *out.splitlines()]:
        if text.strip():
            try:
                records.append(json.loads(text))
            except ValueError:
                raise AssertionError(f"not a JSON line: {text!r}") from None
    said = [r["message"] for r in records if r["logger"] == "poolgate.serve"]
    assert any(m.startswith("poolgate is ready at") for m in said), said
    assert said[-1] == "poolgate: stopped", said


def test_serve_answers_once_a_kernel_can_start(tmp_path: Path,
                                               serves: list[subprocess.Popen[str]]) -> None:
    """A client that waits for serve's gateway to answer (a script, a lab started beside it)
    and then asks at once gets the packaged spec offered and its kernel started, never a 503
    "no worker serves pool" from a gateway that came up before its worker. The worker is
    made slow to start (as on a loaded machine), so that a gateway not waiting for it would
    answer first; serve says what it waits for when that takes long."""
    port = free_port()
    slow = tmp_path / "slow"
    slow.mkdir()
    (slow / "sitecustomize.py").write_text(
        "import sys, time\nif sys.argv[1:2] == ['worker']:\n    time.sleep(3)\n")
    env = serve_env(PYTHONPATH=os.pathsep.join(
        [str(slow), *filter(None, [os.environ.get("PYTHONPATH")])]))
    log = tmp_path / "serve.log"
    # serve as its command runs it, but naming a worker not started within 1 s (not 30)
    run = ("import sys; from poolgate import cli, serve; serve.SLOW_WORKER = 1.0; "
           "sys.exit(cli.main(sys.argv[1:]))")
    with open(log, "w") as out:
        proc = subprocess.Popen(
            [sys.executable, "-c", run, "serve", "--port", str(port), "--data-dir",
             str(tmp_path / "data")], cwd=tmp_path, env=env, stdout=out,
            stderr=subprocess.STDOUT, text=True)
    serves.append(proc)
    gw = Gateway(f"http://127.0.0.1:{port}")
    deadline = time.monotonic() + 60
    while True:
        try:
            specs = gw.get("/api/kernelspecs", timeout=1)
            break
        except OSError:
            assert proc.poll() is None and time.monotonic() < deadline, log.read_text()
            time.sleep(0.02)
    assert specs.status_code == 200 and "python3" in specs.json()["kernelspecs"], specs.text
    r = gw.post("/api/kernels", json={"name": "python3"})
    assert r.status_code == 201, (r.text, log.read_text())
    gw.shutdown(r.json()["id"])
    proc.send_signal(signal.SIGINT)
    proc.wait(60)
    assert proc.returncode == 0, log.read_text()
    said = log.read_text()  # the wait was told, once
    assert said.count("poolgate: still waiting for the worker of pool(s) local to start") == 1, said
