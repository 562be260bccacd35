"""The worker's slot gate against a hand-written Celery consumer whose hub runs queued callbacks
in any order (Celery's ``Hub._ready`` is a set): whatever order they run in, the consumer ends
consuming exactly when the runtime says it takes launches."""
from __future__ import annotations

import itertools
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import yaml

from poolgate.workers.config import load_config
from poolgate.workers.runtime import Runtime

QUEUE = "gate-q"


class FakeTaskConsumer:
    def __init__(self) -> None:
        self.queues = {QUEUE}

    def consuming_from(self, queue: str) -> bool:
        return queue in self.queues


class FakeConsumer:
    """Celery's Consumer as the runtime uses it; ``call_soon`` only queues."""

    def __init__(self) -> None:
        self.task_consumer = FakeTaskConsumer()
        self.pending: list[Callable[[], Any]] = []

    def call_soon(self, fn: Callable[..., Any], *args: Any) -> None:
        self.pending.append(lambda: fn(*args))

    def add_task_queue(self, queue: str) -> None:
        self.task_consumer.queues.add(queue)

    def cancel_task_queue(self, queue: str) -> None:
        self.task_consumer.queues.discard(queue)


def runtime(tmp_path: Path, slots: int = 2) -> tuple[Runtime, FakeConsumer]:
    cfg = {"broker_url": "memory://", "registry_url": "redis://127.0.0.1:1/0",
           "default_pool": "local", "pools": {"local": {"launcher": "local", "queue": QUEUE,
                                                        "slots": slots}}}
    (tmp_path / "queues.yaml").write_text(yaml.safe_dump(cfg))
    rt = Runtime(load_config(tmp_path / "queues.yaml", environ={}), "w@h", [QUEUE], slots,
                 str(tmp_path / "run"))
    rt.beat = lambda: None  # type: ignore[method-assign]  # no registry here
    c = FakeConsumer()
    rt.consumer = c
    return rt, c


def outcomes(rt: Runtime, c: FakeConsumer) -> set[bool]:
    """Whether the worker consumes after the hub ran the queued callbacks, for every order they
    may run in; then they have run (in the order queued)."""
    seen = set()
    before = set(c.task_consumer.queues)
    for order in itertools.permutations(c.pending):
        c.task_consumer.queues = set(before)
        for callback in order:
            callback()
        seen.add(c.task_consumer.consuming_from(QUEUE))
    c.task_consumer.queues = set(before)
    for callback in c.pending:
        callback()
    c.pending.clear()
    return seen


def test_a_slot_taken_and_one_freed_in_one_tick_leave_the_worker_consuming(tmp_path: Path) -> None:
    rt, c = runtime(tmp_path)
    rt.take_slot()
    rt.take_slot()  # full: pause
    rt.release_slot()  # a kernel ended before the hub ran the pause
    assert rt.info()["accepting"] is True
    assert outcomes(rt, c) == {True}  # before: cancel after add left it consuming nothing


def test_a_full_worker_stops_consuming_in_any_order(tmp_path: Path) -> None:
    rt, c = runtime(tmp_path)
    rt.take_slot()
    rt.take_slot()
    rt.release_slot()
    rt.take_slot()  # full again
    assert rt.info()["accepting"] is False
    assert outcomes(rt, c) == {False}


@pytest.mark.parametrize("full", [False, True])
def test_a_drained_queue_stays_cancelled_until_resumed_and_a_slot_is_free(
        tmp_path: Path, full: bool) -> None:
    rt, c = runtime(tmp_path)
    assert rt.drain("local")["ok"] is True
    for _ in range(2 if full else 1):
        rt.take_slot()
    rt.release_slot()
    assert outcomes(rt, c) == {False}  # drained: a freed slot does not add it back
    rt.take_slot()
    rt.drain("local", on=False)
    assert outcomes(rt, c) == ({False} if full else {True})  # resumed while full: not yet
    if full:
        rt.release_slot()
        assert outcomes(rt, c) == {True}
