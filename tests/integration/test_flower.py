"""Flower, started by `poolgate flower` against the stack's broker, shows kernels as readable
tasks (read-only), and agrees with /api/pools, /metrics and `poolgate status`."""
from __future__ import annotations

import ast
import json
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from typing import Any

import pytest
import requests

from tests.conftest import Stack, free_port
from tests.integration.test_ops import eventually, metrics, poolgate, pools, sample


class Flower:
    """A `poolgate flower` process and its HTTP API."""

    def __init__(self, stack: Stack) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = stack.logs / "flower.log"
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "poolgate", "flower", "--config", str(stack.config),
             "--port", str(self.port)],
            env=stack.env, stdout=open(self.log, "ab"), stderr=subprocess.STDOUT,
            start_new_session=True, cwd=stack.tmp)

    def get(self, path: str) -> Any:
        r = requests.get(self.url + path, timeout=30)
        assert r.status_code == 200, r.text
        return r.json()

    def wait_workers(self, names: set[str], timeout: float = 60) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                break
            try:
                workers = self.get("/api/workers?refresh=1")
                if names <= set(workers):
                    return workers  # type: ignore[no-any-return]
            except (OSError, AssertionError):
                pass
            time.sleep(0.5)
        raise AssertionError(f"Flower never listed {names}:\n{self.log.read_text()[-3000:]}")

    def task(self, kid: str) -> dict[str, Any] | None:
        return self.get("/api/tasks").get(kid)  # type: ignore[no-any-return]

    def stop(self) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
        self.proc.wait(30)


@pytest.fixture(scope="module")
def flower(redis_stack: Stack) -> Iterator[Flower]:
    fl = Flower(redis_stack)
    try:
        fl.wait_workers(set(worker_names(redis_stack)))
        yield fl
    finally:
        fl.stop()


def worker_names(stack: Stack) -> list[str]:
    return [w["name"] for p in pools(stack.gw).values() for w in p["worker_list"]]


def kwargs_of(task: dict[str, Any]) -> dict[str, Any]:
    return ast.literal_eval(task["kwargs"])  # type: ignore[no-any-return]


def test_a_kernel_is_a_readable_task_in_flower(redis_stack: Stack, flower: Flower) -> None:
    gw = redis_stack.gw
    kid = gw.start("python3", env={"KERNEL_USERNAME": "alice", "KERNEL_TOKEN": "hunter2"})["id"]
    try:
        task = eventually(lambda: (t := flower.task(kid)) and t["state"] == "RUNNING" and t,
                          what="Flower to show the kernel RUNNING")
        assert task["name"] == "kernels.host"
        assert kwargs_of(task) == {"kernel_id": kid, "pool": "local", "kernelspec": "python3",
                                   "user": "alice"}
        assert "hunter2" not in json.dumps(task)
        assert re.fullmatch(r"local-[^@]+@.+", task["worker"])
        info = flower.get(f"/api/task/info/{kid}")
        assert info["state"] == "RUNNING"
        assert info["routing_key"] == redis_stack.pools["local"]["queue"]
        # read-only: control requests are refused, and the kernel keeps running
        r = requests.post(f"{flower.url}/api/task/revoke/{kid}?terminate=true", timeout=30)
        assert r.status_code == 403 and "read-only" in r.json()["message"]
        assert gw.get(f"/api/kernels/{kid}").json()["execution_state"] == "idle"
    finally:
        gw.shutdown(kid)
    task = eventually(lambda: (t := flower.task(kid)) and t["state"] == "SUCCESS" and t,
                      what="Flower to show the kernel's task SUCCESS")
    result = ast.literal_eval(task["result"])
    assert result["status"] == "STOPPED" and result["reason"] == "shut down"
    assert result["kernel_id"] == kid and result["pool"] == "local"


def test_workers_group_by_pool_in_flower(redis_stack: Stack, flower: Flower) -> None:
    workers = flower.get("/api/workers")
    for name in worker_names(redis_stack):
        pool = name.split("-", 1)[0]
        assert name in workers and pool in ("local", "tiny")
        queues = [q["name"] for q in workers[name]["active_queues"]]
        assert queues == [redis_stack.pools[pool]["queue"]]


def test_flower_metrics_pools_and_status_agree(redis_stack: Stack, flower: Flower) -> None:
    gw = redis_stack.gw
    kids = [gw.start("python3", env={"KERNEL_USERNAME": "alice"})["id"],
            gw.start("python3", env={"KERNEL_USERNAME": "bob"})["id"],
            gw.start("tiny-py", env={"KERNEL_USERNAME": "carol"})["id"]]
    try:
        def running_in_flower() -> dict[str, set[tuple[str, str]]] | None:
            out: dict[str, set[tuple[str, str]]] = {"local": set(), "tiny": set()}
            for kid, t in flower.get("/api/tasks?state=RUNNING").items():
                kw = kwargs_of(t)
                out[kw["pool"]].add((kid, kw["user"]))
            return out if sum(map(len, out.values())) == 3 else None

        in_flower = eventually(running_in_flower, what="Flower to show three RUNNING kernels")
        api, m = pools(gw), metrics(gw)
        status = {p["name"]: p
                  for p in json.loads(poolgate(redis_stack, "status", "--json").stdout)}
        live = {k["id"] for k in redis_stack.live_kernels()}
        assert live == set(kids)
        for name in ("local", "tiny"):
            from_api = {(k["id"], k["user"]) for k in api[name]["kernels"]
                        if k["status"] == "RUNNING"}
            assert from_api == in_flower[name]
            assert len(from_api) == api[name]["running"] == status[name]["running"] == \
                sample(m, "poolgate_kernels", pool=name, state="running")
            assert api[name]["workers"] == status[name]["workers"] == \
                sample(m, "poolgate_pool_workers", pool=name) == \
                len([w for w in flower.get("/api/workers") if w.startswith(name + "-")])
            assert api[name]["used"] == status[name]["used"] == len(from_api)
    finally:
        for kid in kids:
            gw.shutdown(kid)
