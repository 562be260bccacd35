"""Where the CPU and the waiting went while the parallel scenario's loops ran (Linux only).

``--parallel-sched 1``: the per-thread counters of /proc/PID/task/TID/schedstat (time on a CPU,
time runnable but waiting for one, times run) and /status (voluntary and involuntary context
switches), read for every process of the bench's tree (the client, the target's processes,
the floor's kernels) as the timed loop begins and as it ends. The difference, per round trip,
by kind of process and thread name: which process pays for a round trip, how long its threads
waited in the run queue, and how many times each was woken (voluntary switches) or preempted
(involuntary). A kernel's Python threads all show as its interpreter's name except those that
name themselves (libzmq's I/O threads: ZMQbg/IO).
"""

from __future__ import annotations

import collections
import os
from dataclasses import dataclass

import psutil

from bench.procs import is_kernel, tree_of
from bench.scenarios import server_tree
from bench.targets.base import Target

COLUMNS = ("cpu_ms", "wait_ms", "runs", "woken", "preempted")


@dataclass(frozen=True)
class Counters:
    kind: str
    thread: str
    cpu_ns: int
    wait_ns: int
    runs: int
    voluntary: int
    involuntary: int


def kind_of(proc: psutil.Process, gateway_pids: set[int]) -> str:
    if proc.pid == os.getpid():
        return "client"
    if is_kernel(proc):
        return "kernel"
    if proc.pid in gateway_pids:
        return "gateway"
    try:
        name, argv = proc.name(), proc.cmdline()
    except psutil.Error:
        return "?"
    if name.startswith("python"):  # its script or module and subcommand: poolgate worker
        words = [w for w in argv[1:] if not w.startswith("-") and not w.isdigit()][:2]
        return " ".join(os.path.basename(w) for w in words) or name
    return name


def _switches(status: str, name: str) -> int:
    for line in status.splitlines():
        if line.startswith(name + ":"):
            return int(line.split()[1])
    return 0


def snapshot(target: Target | None) -> dict[tuple[int, int], Counters]:
    """Every thread of the bench's process tree now: (pid, tid) -> its counters; the
    target's gateway processes are of kind "gateway"."""
    procs = tree_of(os.getpid())
    gateway_pids = {p.pid for p in server_tree(target)
                    if not is_kernel(p) and target.is_gateway_process(p)} if target else set()
    out: dict[tuple[int, int], Counters] = {}
    for proc in procs:
        kind = kind_of(proc, gateway_pids)
        try:
            tids = os.listdir(f"/proc/{proc.pid}/task")
        except OSError:
            continue
        for tid in tids:
            base = f"/proc/{proc.pid}/task/{tid}"
            try:
                with open(f"{base}/schedstat") as f:
                    cpu, wait, runs = (int(x) for x in f.read().split()[:3])
                with open(f"{base}/comm") as f:
                    thread = f.read().strip()
                with open(f"{base}/status") as f:
                    status = f.read()
            except (OSError, ValueError):
                continue
            out[(proc.pid, int(tid))] = Counters(
                kind, thread, cpu, wait, runs, _switches(status, "voluntary_ctxt_switches"),
                _switches(status, "nonvoluntary_ctxt_switches"))
    return out


def per_round_trip(before: dict[tuple[int, int], Counters],
                   after: dict[tuple[int, int], Counters],
                   trips: int) -> dict[tuple[str, str], dict[str, float]]:
    """(kind, thread name) -> each of COLUMNS per round trip, over the threads alive at both
    reads; rows whose threads ran nothing are left out."""
    sums: dict[tuple[str, str], list[int]] = collections.defaultdict(lambda: [0] * 6)
    for key, b in after.items():
        a = before.get(key)
        if a is None:
            continue
        row = sums[(b.kind, b.thread)]
        row[0] += 1
        for i, (x, y) in enumerate(((a.cpu_ns, b.cpu_ns), (a.wait_ns, b.wait_ns),
                                    (a.runs, b.runs), (a.voluntary, b.voluntary),
                                    (a.involuntary, b.involuntary)), start=1):
            row[i] += y - x
    n = max(1, trips)
    return {key: {"threads": row[0], "cpu_ms": row[1] / 1e6 / n, "wait_ms": row[2] / 1e6 / n,
                  "runs": row[3] / n, "woken": row[4] / n, "preempted": row[5] / n}
            for key, row in sums.items() if row[1] > 0}


def lines(rows: dict[tuple[str, str], dict[str, float]]) -> list[str]:
    """The rows as a table, most CPU first."""
    head = f"{'process / thread':32} {'threads':>7} " + " ".join(f"{c:>9}" for c in COLUMNS)
    out = [head + "   (per round trip)"]
    for (kind, thread), row in sorted(rows.items(), key=lambda kv: -kv[1]["cpu_ms"]):
        out.append(f"{(kind + ' / ' + thread)[:32]:32} {row['threads']:7.0f} "
                   + " ".join(f"{row[c]:9.3f}" for c in COLUMNS))
    return out


def totals(rows: dict[tuple[str, str], dict[str, float]]) -> dict[str, float]:
    """CPU and run-queue wait per round trip summed by kind: kernel, gateway, client, other."""
    out: dict[str, float] = collections.defaultdict(float)
    for (kind, _), row in rows.items():
        group = kind if kind in ("kernel", "gateway", "client") else "other"
        out[f"{group}_cpu_ms"] += row["cpu_ms"]
        out[f"{group}_wait_ms"] += row["wait_ms"]
    return dict(out)
