"""A full pool that churns keeps taking launches (docs/scale.md, "A full pool on Redis stalled").

A worker cancels its consumer when its last slot fills and adds it back when one frees. Both were
commands queued to Celery's hub, which runs the callbacks of one tick in no set order; a slot
taken and one freed at once could run "add" before "cancel", and the worker then had free slots
and consumed nothing, for good: launches waited their whole timeout and got 503 while the pool
said "0 in use". Here one worker of 2 slots takes 300 launches from 30 clients, each kernel
deleted at its 201, on a real Redis broker and on RabbitMQ; every launch must be taken (a stall
shows as a 503 at the launch timeout), and afterwards the idle worker must consume its queue.
"""
from __future__ import annotations

import os
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest
import redis
import yaml

import tests.conftest as conftest
from poolgate.workers.celery_app import make_celery
from poolgate.workers.config import load_config
from tests.cheap import ROOT, SPEC
from tests.client import Gateway
from tests.conftest import STACKS, Stack

LAUNCHES, CLIENTS, SLOTS = 300, 30, 2
LAUNCH_TIMEOUT = 30  # a stalled launch is withdrawn after this: the "generous bound"


@pytest.fixture(params=["redis", "rabbitmq"])
def churn_stack(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Stack]:
    conftest.need_redis()
    if request.param == "rabbitmq":
        conftest.need_rabbitmq()
    broker = conftest.AMQP if request.param == "rabbitmq" else conftest.REDIS
    tag = f"t{conftest.RUN_ID}churn{request.param}"
    pools = {"cheap": {"launcher": "bench.cheap.launcher:CheapLauncher", "queue": tag,
                       "slots": SLOTS, "heartbeat_ttl": 3.0, "launch_timeout": LAUNCH_TIMEOUT,
                       "max_launch_timeout": LAUNCH_TIMEOUT},
             "local": {"launcher": "local", "queue": f"{tag}-local", "slots": 1}}
    specs = {"cheap": SPEC, "tiny-py": None, "broken": None, "msgint": None, "eg-local": None}
    stack = Stack(tmp_path, broker, db=conftest.DB_BASE + 23, pools=pools, specs=specs,
                  extra={"default_pool": "cheap", "default_kernelspec": "cheap"})
    stack.env["PYTHONPATH"] = os.pathsep.join(filter(None, [ROOT, os.environ.get("PYTHONPATH")]))
    redis.Redis.from_url(stack.registry_url).flushdb()
    STACKS.append(stack)
    try:
        stack.start_worker("cheap")
        stack.start_gateway(stack.port)
        yield stack
    finally:
        stack.stop()
        STACKS.remove(stack)


def worker_info(stack: Stack) -> dict[str, Any]:
    r = redis.Redis.from_url(stack.registry_url)
    for key in r.scan_iter("pg:w:*"):
        info = yaml.safe_load(r.get(key) or b"{}") or {}
        if "cheap" in info.get("pools", []):
            return dict(info)
    return {}


def test_a_churning_full_pool_takes_every_launch(churn_stack: Stack) -> None:
    stack = churn_stack
    failures: list[str] = []

    def client(n: int) -> int:
        gw = Gateway(stack.url)  # one HTTP session per client thread
        taken = 0
        for _ in range(n):
            if failures:  # stalled: the others would each wait out the timeout too
                break
            r = gw.post("/api/kernels", json={"name": "cheap"}, timeout=LAUNCH_TIMEOUT + 60)
            if r.status_code != 201:
                failures.append(f"{r.status_code} {r.text[:300]}")
                continue
            taken += 1
            gw.shutdown(r.json()["id"])
        return taken

    with ThreadPoolExecutor(CLIENTS) as pool:
        taken = sum(pool.map(client, [LAUNCHES // CLIENTS] * CLIENTS))
    assert failures == [], (f"{len(failures)} of {LAUNCHES} launches not taken, e.g. "
                            f"{failures[:2]}\n{stack.log('worker-cheap')}")
    assert taken == LAUNCHES

    # Idle again: the worker says it takes launches, and its consumer does consume the queue.
    deadline = time.monotonic() + 30
    while (info := worker_info(stack)).get("used") != 0 and time.monotonic() < deadline:
        time.sleep(0.1)
    assert (info.get("used"), info.get("accepting")) == (0, True), info
    app = make_celery(load_config(stack.config))
    queue = stack.pools["cheap"]["queue"]
    deadline = time.monotonic() + 30
    while True:
        replies = app.control.inspect(timeout=3, destination=[info["name"]]).active_queues() or {}
        consumed = [q["name"] for q in replies.get(info["name"], [])]
        if queue in consumed or time.monotonic() > deadline:
            break
    assert queue in consumed, (replies, stack.log("worker-cheap"))
