"""bench.schedstat (`python -m bench --parallel-sched 1`): CPU, run-queue wait and switches per
round trip, read from /proc for every thread of the bench's process tree."""
from __future__ import annotations

import os
import subprocess
import sys
import time

from bench.schedstat import Counters, lines, per_round_trip, snapshot, totals


def test_a_busy_child_is_seen_with_its_cpu_and_this_process_as_the_client() -> None:
    child = subprocess.Popen([sys.executable, "-c",
                              "import time\nend = time.time() + 1.5\nwhile time.time() < end: pass"])
    try:
        time.sleep(0.2)
        before = snapshot(None)
        time.sleep(1.0)
        after = snapshot(None)
    finally:
        child.wait()
    assert (os.getpid(), os.getpid()) in before
    assert before[(os.getpid(), os.getpid())].kind == "client"
    spin = after[(child.pid, child.pid)].cpu_ns - before[(child.pid, child.pid)].cpu_ns
    assert 0.5e9 < spin < 1.2e9  # it ran about the second it was watched
    rows = per_round_trip(before, after, trips=10)
    main = after[(child.pid, child.pid)]
    assert main.kind not in ("client", "kernel", "gateway")
    assert 50 < rows[(main.kind, main.thread)]["cpu_ms"] < 120  # a tenth of it per "round trip"


def test_per_round_trip_divides_differences_and_groups_by_kind_and_thread() -> None:
    def c(kind: str, thread: str, cpu: int, wait: int, runs: int, vol: int, inv: int) -> Counters:
        return Counters(kind, thread, cpu, wait, runs, vol, inv)

    before = {(1, 1): c("kernel", "python3", 0, 0, 0, 0, 0),
              (1, 2): c("kernel", "IOPub", 10, 10, 1, 1, 0),
              (2, 2): c("kernel", "IOPub", 0, 0, 0, 0, 0),
              (3, 3): c("gateway", "python3", 5, 5, 5, 5, 5)}
    after = {(1, 1): c("kernel", "python3", 4_000_000, 8_000_000, 20, 10, 10),
             (1, 2): c("kernel", "IOPub", 1_000_010, 2_000_010, 5, 5, 0),
             (2, 2): c("kernel", "IOPub", 1_000_000, 0, 3, 3, 0),
             (3, 3): c("gateway", "python3", 5, 5, 5, 5, 5),  # ran nothing: left out
             (4, 4): c("kernel", "python3", 9_000_000, 0, 1, 1, 0)}  # not there before
    rows = per_round_trip(before, after, trips=2)
    assert set(rows) == {("kernel", "python3"), ("kernel", "IOPub")}
    assert rows[("kernel", "python3")] == {"threads": 1, "cpu_ms": 2.0, "wait_ms": 4.0,
                                           "runs": 10.0, "woken": 5.0, "preempted": 5.0}
    assert rows[("kernel", "IOPub")]["threads"] == 2
    assert rows[("kernel", "IOPub")]["cpu_ms"] == 1.0  # (1 + 1) ms over 2 round trips
    assert totals(rows) == {"kernel_cpu_ms": 3.0, "kernel_wait_ms": 5.0}
    table = lines(rows)
    assert table[1].startswith("kernel / python3")  # most CPU first
