"""The pool's launch lock under concurrent launches on one gateway (issue 24)."""
from __future__ import annotations

import threading
import time

import redis

from poolgate.workers.registry import Registry
from tests.conftest import PrivateRedis

THREADS = 20
HOLD = 0.05  # what a holder does meanwhile: write the record and send the task


def test_concurrent_launches_of_one_process_do_not_poll_the_registry_and_take_turns(
        private_redis: PrivateRedis) -> None:
    """20 threads of one gateway take the lock in turn, and only one of them at a time polls
    Redis for it: before, each waiter sent SET NX every 2 ms (some 10,000 commands here)."""
    reg = Registry(f"redis://127.0.0.1:{private_redis.port}/0")
    client = redis.Redis(port=private_redis.port)
    inside, most, errors = [0], [0], []
    guard = threading.Lock()

    def launch() -> None:
        try:
            with reg.launch_lock("p"):
                with guard:
                    inside[0] += 1
                    most[0] = max(most[0], inside[0])
                time.sleep(HOLD)  # the holder's work, not a synchronisation
                with guard:
                    inside[0] -= 1
        except Exception as exc:  # reported below: a thread's exception is otherwise lost
            errors.append(exc)

    before = int(client.info("commandstats").get("cmdstat_set", {}).get("calls", 0))
    threads = [threading.Thread(target=launch) for _ in range(THREADS)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    sets = int(client.info("commandstats")["cmdstat_set"]["calls"]) - before
    assert errors == [] and most[0] == 1
    assert sets <= THREADS * 2, f"{sets} SET commands for {THREADS} launches"
