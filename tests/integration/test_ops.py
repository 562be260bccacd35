"""Operating poolgate: /api/pools, /metrics, `poolgate status|kernels|drain`, with real workers
and kernels; every view must agree with the others and with the kernels really running."""
from __future__ import annotations

import json
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import requests
from prometheus_client.parser import text_string_to_metric_families

from tests.client import Gateway
from tests.conftest import DB_BASE, REDIS, STACKS, Stack, need_redis

Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


def metrics(gw: Gateway) -> Samples:
    """/metrics as {(sample name, sorted labels): value}."""
    r = gw.get("/metrics")
    assert r.status_code == 200 and r.headers["Content-Type"].startswith("text/plain"), r.text
    out = {}
    for family in text_string_to_metric_families(r.text):
        for s in family.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def sample(m: Samples, name: str, **labels: str) -> float:
    return m[(name, tuple(sorted(labels.items())))]


def pools(gw: Gateway) -> dict[str, dict[str, Any]]:
    r = gw.get("/api/pools")
    assert r.status_code == 200, r.text
    return {p["name"]: p for p in r.json()}


def eventually(check: Callable[[], Any], timeout: float = 20, what: str = "") -> Any:
    deadline = time.monotonic() + timeout
    last: Any = None
    while time.monotonic() < deadline:
        last = check()
        if last:
            return last
        time.sleep(0.2)
    raise AssertionError(f"timed out waiting for {what or check}: last {last!r}")


def poolgate(stack: Stack, *args: str, ok: bool = True) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run([sys.executable, "-m", "poolgate", *args, "--config", str(stack.config)],
                          env=stack.env, capture_output=True, text=True, timeout=60, cwd=stack.tmp)
    if ok:
        assert proc.returncode == 0, proc.stdout + proc.stderr
    return proc


class Launch(threading.Thread):
    """A POST /api/kernels that waits in the queue, in the background."""

    def __init__(self, gw: Gateway, name: str, env: dict[str, str]) -> None:
        super().__init__(daemon=True)
        self.gw, self.name_, self.env = gw, name, env
        self.response: requests.Response | None = None

    def run(self) -> None:
        self.response = self.gw.post("/api/kernels", json={"name": self.name_, "env": self.env})


def test_pools_api_shows_capacity_queue_and_kernels(redis_stack: Stack) -> None:
    gw = redis_stack.gw
    alice = gw.start("python3", env={"KERNEL_USERNAME": "alice"})["id"]
    bob = gw.start("tiny-py", env={"KERNEL_USERNAME": "bob"})["id"]
    waiter = Launch(gw, "tiny-py", {"KERNEL_USERNAME": "carol", "KERNEL_LAUNCH_TIMEOUT": "60"})
    waiter.start()
    try:
        tiny = eventually(lambda: pools(gw)["tiny"] if pools(gw)["tiny"]["waiting"] else None,
                          what="a launch waiting on the full tiny pool")
        queued = [k for k in gw.kernels() if k["poolgate"]["status"] == "QUEUED"]
        assert len(queued) == 1 and queued[0]["poolgate"]["queue_position"] == 1
        carol = queued[0]["id"]
        assert tiny["waiting_launches"] == [{"kernel_id": carol, "position": 1}]
        assert {k: tiny[k] for k in ("name", "launcher", "queue", "workers", "slots", "used",
                                     "free", "waiting", "running")} == {
            "name": "tiny", "launcher": "local", "queue": redis_stack.pools["tiny"]["queue"],
            "workers": 1, "slots": 1, "used": 1, "free": 0, "waiting": 1, "running": 1}
        assert tiny["worker_list"][0]["state"] == "full"
        owners = {k["id"]: (k["user"], k["status"]) for k in tiny["kernels"]}
        assert owners == {bob: ("bob", "RUNNING"), carol: ("carol", "QUEUED")}
        local = pools(gw)["local"]
        assert (local["workers"], local["slots"], local["used"], local["running"]) == (1, 4, 1, 1)
        [k] = local["kernels"]
        assert (k["id"], k["user"], k["execution_state"]) == (alice, "alice", "idle")
        assert k["age"] >= 0 and k["last_activity"] and "env" not in k
        assert gw.get("/api/pools/tiny").json()["waiting_launches"] == tiny["waiting_launches"]
        r = gw.get("/api/pools/nope")
        assert r.status_code == 404 and r.json()["reason"] == "unknown_pool"

        gw.shutdown(bob)  # the slot frees: the waiting launch starts
        waiter.join(60)
        assert waiter.response is not None and waiter.response.status_code == 201
        tiny = eventually(lambda: (p := pools(gw)["tiny"])["running"] == 1 and not p["waiting"]
                          and p, what="the waiting launch to run")
        assert [k["id"] for k in tiny["kernels"]] == [carol]
    finally:
        waiter.join(70)
        for kid in (alice, bob, *(k["id"] for k in gw.kernels())):
            gw.shutdown(kid)


def test_metrics_agree_with_pools_api_and_count_websocket_traffic(redis_stack: Stack) -> None:
    gw = redis_stack.gw
    before = metrics(gw)
    kids = [gw.start("python3", env={"KERNEL_USERNAME": "alice"})["id"],
            gw.start("tiny-py", env={"KERNEL_USERNAME": "carol"})["id"]]
    # a launch the client follows itself (?wait=false) is counted as well
    r = gw.post("/api/kernels?wait=false", json={"name": "python3"})
    assert r.status_code == 202
    kids.append(r.json()["id"])
    gw.wait_state(kids[-1], "idle")
    try:
        ch = gw.channel(kids[0])
        assert ch.execute("print('x' * 1000)").stdout.strip() == "x" * 1000
        m, api = metrics(gw), pools(gw)
        for name, p in api.items():
            assert sample(m, "poolgate_kernels", pool=name, state="running") == p["running"]
            assert sample(m, "poolgate_launches_waiting", pool=name) == p["waiting"] == 0
            assert sample(m, "poolgate_pool_workers", pool=name) == p["workers"] == 1
            assert sample(m, "poolgate_pool_slots", pool=name) == p["slots"]
            assert sample(m, "poolgate_pool_slots_used", pool=name) == p["used"]
            assert sample(m, "poolgate_pool_slots_free", pool=name) == p["free"]
        assert (api["local"]["running"], api["tiny"]["running"]) == (2, 1)
        assert sample(m, "poolgate_websocket_connections") == 1
        sent = sample(m, "poolgate_websocket_messages_total", channel="shell",
                      direction="client_to_kernel")
        assert sent >= 1 + sample(before, "poolgate_websocket_messages_total", channel="shell",
                                  direction="client_to_kernel")
        assert sample(m, "poolgate_websocket_messages_total", channel="iopub",
                      direction="kernel_to_client") >= 3  # busy, stream, idle
        assert sample(m, "poolgate_websocket_bytes_total", channel="iopub",
                      direction="kernel_to_client") > 1000
        for name, n in (("local", 2), ("tiny", 1)):  # each launch once, once RUNNING is heard
            was = sample(before, "poolgate_launch_start_seconds_count", pool=name)
            deadline = time.monotonic() + 20
            while (count := sample(metrics(gw), "poolgate_launch_start_seconds_count",
                                   pool=name)) != n + was and time.monotonic() < deadline:
                time.sleep(0.2)
            assert count == n + was, f"launches observed on {name}: {count}, expected {was} + {n}"
            m = metrics(gw)
            assert sample(m, "poolgate_launch_queue_seconds_count", pool=name) == count
            assert 0 < sample(m, "poolgate_launch_start_seconds_sum", pool=name) < 60 * count
        assert sample(m, "poolgate_launch_start_seconds_bucket", pool="local", le="600.0") == \
            sample(m, "poolgate_launch_start_seconds_count", pool="local")
        ch.close()
        eventually(lambda: sample(metrics(gw), "poolgate_websocket_connections") == 0,
                   what="the WebSocket to be counted closed")
    finally:
        for kid in kids:
            gw.shutdown(kid)
    m = metrics(gw)
    assert sample(m, "poolgate_kernels", pool="local", state="running") == 0


def test_failures_are_counted_by_pool_and_reason(redis_stack: Stack) -> None:
    gw = redis_stack.gw
    key = ("poolgate_kernel_failures_total", (("pool", "local"), ("reason", "launch_failed")))
    before = metrics(gw)[key]
    r = gw.post("/api/kernels", json={"name": "broken", "env": {"KERNEL_USERNAME": "dave"}})
    assert r.status_code == 500 and "boom" in r.json()["message"]
    eventually(lambda: metrics(gw)[key] == before + 1, what="the failure to be counted")
    local = pools(gw)["local"]
    latest = local["recent_failures"][0]
    assert latest["kind"] == "launch_failed" and latest["user"] == "dave"
    assert latest["kernel_id"] in r.json()["message"]
    assert local["failures_by_kind"]["launch_failed"] == before + 1
    # counted once for the cluster, however many gateways listen
    second = redis_stack.start_gateway(port=_port())
    try:
        assert metrics(second)[key] == before + 1
    finally:
        proc = redis_stack.gateways.pop()
        proc.terminate()
        proc.wait(30)


def _port() -> int:
    from tests.conftest import free_port

    return free_port()


def test_status_and_kernels_commands_agree_with_the_api(redis_stack: Stack) -> None:
    gw = redis_stack.gw
    kids = [gw.start("python3", env={"KERNEL_USERNAME": "alice"})["id"],
            gw.start("tiny-py", env={"KERNEL_USERNAME": "bob"})["id"]]
    try:
        status = json.loads(poolgate(redis_stack, "status", "--json").stdout)
        api = pools(gw)
        keys = ("workers", "slots", "used", "free", "waiting", "running")
        assert {p["name"]: [p[k] for k in keys] for p in status} == \
            {n: [p[k] for k in keys] for n, p in api.items()}
        listed = json.loads(poolgate(redis_stack, "kernels", "--json").stdout)
        assert {(k["id"], k["pool"], k["user"]) for k in listed} == \
            {(kids[0], "local", "alice"), (kids[1], "tiny", "bob")}
        assert all(k["status"] == "RUNNING" and k["age"] >= 0 for k in listed)
        text = poolgate(redis_stack, "status").stdout
        assert text.startswith("POOL ") and "local-" in text and "tiny-" in text
        assert "2 kernels (2 running, 0 waiting)" in text
        ktext = poolgate(redis_stack, "kernels", "--pool", "tiny").stdout
        assert kids[1] in ktext and kids[0] not in ktext and "bob" in ktext
        bad = poolgate(redis_stack, "kernels", "--pool", "nope", ok=False)
        assert bad.returncode == 2 and "no pool named 'nope'" in bad.stderr
    finally:
        for kid in kids:
            gw.shutdown(kid)


def test_drain_stops_new_launches_until_resumed(fresh_stack: Stack) -> None:
    gw = fresh_stack.gw
    kid = gw.start("tiny-py", env={"KERNEL_USERNAME": "alice"})["id"]  # the only tiny slot
    try:
        out = poolgate(fresh_stack, "drain", "tiny", "--json")
        [(worker, reply)] = json.loads(out.stdout)["workers"].items()
        assert worker.startswith("tiny-") and reply["ok"] and reply["draining"]
        tiny = pools(gw)["tiny"]
        assert tiny["worker_list"][0]["state"] == "draining" and tiny["free"] == 0
        assert gw.get(f"/api/kernels/{kid}").json()["execution_state"] == "idle"  # untouched
        gw.shutdown(kid)  # the slot frees, but a drained worker must not take launches again
        eventually(lambda: pools(gw)["tiny"]["used"] == 0, what="the slot to free")
        r = gw.post("/api/kernels", json={"name": "tiny-py", "env": {"KERNEL_LAUNCH_TIMEOUT": "4"}})
        assert r.status_code == 503 and "waited 4s in the queue" in r.json()["message"], r.text
        assert "its 1 worker is draining" in r.json()["message"]  # says why, and what to do
        assert "poolgate drain tiny --resume" in r.json()["message"]
        assert pools(gw)["tiny"]["waiting"] == 0  # the timed-out launch was withdrawn
        text = poolgate(fresh_stack, "drain", "tiny", "--resume").stdout
        assert "resumed" in text
        assert pools(gw)["tiny"]["worker_list"][0]["state"] == "accepting"
        kid = gw.start("tiny-py")["id"]
        bad = poolgate(fresh_stack, "drain", "tiny", "no-such-worker", ok=False)
        assert bad.returncode == 2 and "no single live worker" in bad.stderr
    finally:
        gw.shutdown(kid)


def test_json_logs_follow_a_kernel_through_gateway_and_worker(tmp_path: Path) -> None:
    need_redis()
    stack = Stack(tmp_path, REDIS, db=DB_BASE + 3)
    stack.env["POOLGATE_LOG_FORMAT"] = "json"
    STACKS.append(stack.start())
    try:
        kid = stack.gw.start("python3", env={"KERNEL_USERNAME": "alice",
                                             "KERNEL_TOKEN": "hunter2"})["id"]
        stack.gw.shutdown(kid)
    finally:
        stack.stop()
        STACKS.remove(stack)
    lines = {}
    for name in (f"gateway-{stack.port}", "worker-local"):
        text = (stack.logs / f"{name}.log").read_text()
        assert "hunter2" not in text
        records = [json.loads(line) for line in text.splitlines() if line.startswith("{")]
        lines[name] = [r for r in records if r.get("kernel_id") == kid]
    [queued] = [r for r in lines[f"gateway-{stack.port}"] if "queued" in r["message"]]
    assert (queued["pool"], queued["user"], queued["level"]) == ("local", "alice", "INFO")
    steps = [r["message"] for r in lines["worker-local"] if r.get("user") == "alice"
             and r.get("pool") == "local"]
    assert any(m.startswith("Launching kernel") for m in steps)
    assert any(" running on " in m for m in steps)
    assert any(m.endswith("stopped: shut down") for m in steps)


def test_waiting_launches_are_served_in_the_order_shown(stack: Stack) -> None:
    """A burst of launches sent at once to a full pool is shown in line in the order the
    workers then take them (the ticket and the send to the broker are one step)."""
    gw = stack.gw
    first = gw.start("tiny-py")["id"]  # the tiny pool (1 slot) is full from here on
    burst: list[Launch] = [Launch(gw, "tiny-py", {"KERNEL_LAUNCH_TIMEOUT": "120"})
                           for _ in range(6)]
    started: list[str] = []
    try:
        for launch in burst:
            launch.start()
        shown = eventually(lambda: (w := pools(gw)["tiny"]["waiting_launches"]) and
                           len(w) == len(burst) and [x["kernel_id"] for x in w],
                           what="the whole burst waiting in line")
        running = first
        for _ in burst:  # free the slot; the next in line takes it
            gw.shutdown(running)
            running = eventually(lambda: next((k["id"] for k in gw.kernels() if k["name"] ==
                                               "tiny-py" and k["poolgate"]["status"] in
                                               ("STARTING", "RUNNING")), None),
                                 timeout=60, what="the next launch in line to start")
            started.append(running)
        assert started == shown
    finally:
        for launch in burst:
            launch.join(130)
        for kid in (first, *started, *(k["id"] for k in gw.kernels())):
            gw.shutdown(kid)


def test_a_pool_without_workers_fails_at_once_and_its_specs_are_not_offered(
        fresh_stack: Stack) -> None:
    """No live worker serves the pool: a launch fails at once with that reason (not after its
    whole timeout, advising a longer one), and the pool's kernelspecs are not listed."""
    import os
    import signal

    gw = fresh_stack.gw
    assert "tiny-py" in gw.get("/api/kernelspecs").json()["kernelspecs"]
    proc = fresh_stack.workers["tiny"]
    os.killpg(proc.pid, signal.SIGTERM)  # a clean stop: its heartbeat goes with it
    proc.wait(30)
    eventually(lambda: pools(gw)["tiny"]["workers"] == 0, what="the worker to leave the pool")
    t0 = time.monotonic()
    r = gw.post("/api/kernels", json={"name": "tiny-py"})
    assert r.status_code == 503 and time.monotonic() - t0 < 5, r.text
    assert "no worker serves pool 'tiny'" in r.json()["message"]
    assert "poolgate worker --pool tiny" in r.json()["message"]
    assert gw.kernels() == []  # nothing half-started, nothing listed
    specs = gw.get("/api/kernelspecs").json()["kernelspecs"]
    assert "tiny-py" not in specs and "python3" in specs
