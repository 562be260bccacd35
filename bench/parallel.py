"""The parallel scenario: the round trip's tail while many kernels are busy at once.

Rule: the round trip is the execute scenario's (`1+1` until execute_reply and status idle for
that request); only the load differs. For each N in `--parallel`, N kernels each run `1+1` in
a loop, one request in flight per kernel, for `--parallel-seconds`; p50 and p99 over every
round trip of every kernel (the first few of each kernel are warm-up and not counted).

With `--parallel-sched 1` the closed loop also reports, per round trip, the CPU time and the
run-queue wait of the kernels, the gateway, the client and the rest, and a table by thread
(bench/schedstat.py).

With `--parallel-rate R` the same kernels then run paced, open-loop: together they are sent R
requests a second (each kernel its share, on a phase of its own), so every target gets the same
offered load, whatever its own speed; a closed loop gives the faster target more load. Each
round trip counts from the moment its request was due, not sent, so a target that falls behind
shows the wait (no coordinated omission).
"""

from __future__ import annotations

import asyncio
import time

from bench import schedstat
from bench.client import KernelConnection
from bench.config import Sizes
from bench.progress import say
from bench.scenarios import Metrics, close_all, percentile, run_code, start_many
from bench.targets.base import Target

WARM_UP = 5  # unmeasured round trips per kernel before the clock starts


async def timed_loop(conn: KernelConnection, start: float, deadline: float, timeout: float,
                     out: list[tuple[float, float]]) -> None:
    """Round trips until `deadline`; those begun after `start` go to `out` as (begun, s)."""
    while (begun := time.perf_counter()) < deadline:
        seconds = await run_code(conn, "1+1", timeout)
        if begun >= start:
            out.append((begun, seconds))


async def paced_loop(conn: KernelConnection, first: float, every: float, deadline: float,
                     timeout: float, out: list[float]) -> None:
    """Requests due at first, first + every, ... until `deadline`; seconds from due to done."""
    due = first
    while due < deadline:
        if (wait := due - time.perf_counter()) > 0:
            await asyncio.sleep(wait)
        sent = time.perf_counter()
        seconds = await run_code(conn, "1+1", timeout)
        out.append(sent + seconds - due)
        due += every


async def watch_sched(target: Target, start: float, deadline: float) -> tuple[
        dict[tuple[int, int], schedstat.Counters], dict[tuple[int, int], schedstat.Counters]]:
    """The bench tree's thread counters as the timed loop begins and as it ends (read in a
    thread of their own, not on the loop that times round trips)."""
    await asyncio.sleep(max(0.0, start - time.perf_counter()))
    before = await asyncio.to_thread(schedstat.snapshot, target)
    await asyncio.sleep(max(0.0, deadline - time.perf_counter()))
    return before, await asyncio.to_thread(schedstat.snapshot, target)


def fairness(per_kernel: list[list[tuple[float, float]]]) -> list[str]:
    """Whether the slow round trips are some kernels' (unfair) or everyone's by turns: each
    kernel's round trips and p50, and which kernels the slowest 1% came from."""
    trips = sorted(((s, i, b) for i, mine in enumerate(per_kernel) for b, s in mine),
                   reverse=True)
    if not trips:
        return []
    slowest = trips[:max(1, len(trips) // 100)]
    together = sum(any(j != i and b2 < b + s and b < b2 + s2 for s2, j, b2 in slowest)
                   for s, i, b in slowest)
    counts = [len(m) for m in per_kernel]
    p50s = sorted(percentile([1000 * s for _, s in m], 50) for m in per_kernel if m)
    share = [0] * len(per_kernel)
    for _, i, _ in slowest:
        share[i] += 1
    return [f"round trips per kernel {min(counts)}–{max(counts)}, p50 per kernel "
            f"{p50s[0]:.1f}–{p50s[-1]:.1f} ms; the slowest 1% ({len(slowest)}) by kernel: "
            f"{sorted(share, reverse=True)}, {together} of them overlapping another kernel's"]


async def scenario_parallel(target: Target, sizes: Sizes) -> Metrics:
    """N kernels each run `1+1` round trips in a loop at once; p50 and p99 per N (ms)."""
    out: Metrics = {}
    for k in sizes.parallel:
        ready, failed = await start_many(target, k, sizes)
        try:
            if not ready:
                raise RuntimeError("no kernel started")
            for _ in range(WARM_UP):
                await asyncio.gather(*(run_code(c, "1+1", sizes.exec_timeout) for _, c, _ in ready))
            per_kernel: list[list[tuple[float, float]]] = [[] for _ in ready]
            start = time.perf_counter() + 0.5  # the loops are in step by then
            deadline = start + sizes.parallel_seconds
            watch = asyncio.create_task(
                watch_sched(target, start, deadline)) if sizes.parallel_sched else None
            await asyncio.gather(*(timed_loop(c, start, deadline, sizes.exec_timeout, mine)
                                   for (_, c, _), mine in zip(ready, per_kernel)))
            trips = [t for mine in per_kernel for t in mine]
            if watch is not None:
                rows = schedstat.per_round_trip(*await watch, len(trips))
                for line in schedstat.lines(rows):
                    say(f"{target.name}: {line}")
                out.update({f"parallel.k{k}.{name}": value
                            for name, value in schedstat.totals(rows).items()})
            paced: list[float] = []
            if sizes.parallel_rate > 0:
                every = len(ready) / sizes.parallel_rate
                start = time.perf_counter() + 0.5
                await asyncio.gather(*(paced_loop(c, start + every * i / len(ready), every,
                                                  start + sizes.parallel_seconds,
                                                  sizes.exec_timeout, paced)
                                       for i, (_, c, _) in enumerate(ready)))
        finally:
            await close_all(target, ready)
        if paced:
            pms = [1000 * s for s in paced]
            out[f"parallel.k{k}.paced_p50_ms"] = percentile(pms, 50)
            out[f"parallel.k{k}.paced_p99_ms"] = percentile(pms, 99)
            say(f"{target.name}: {len(ready)} kernels paced at {sizes.parallel_rate:g}/s: "
                f"{len(pms)} round trips, p50 {percentile(pms, 50):.2f} ms, "
                f"p99 {percentile(pms, 99):.2f} ms")
        ms = [1000 * s for _, s in trips]
        for line in fairness(per_kernel):
            say(f"{target.name}: {len(ready)} kernels: {line}")
        out[f"parallel.k{k}.p50_ms"] = percentile(ms, 50)
        out[f"parallel.k{k}.p99_ms"] = percentile(ms, 99)
        out[f"parallel.k{k}.failures"] = float(failed)
        say(f"{target.name}: {len(ready)} kernels in parallel: {len(ms)} round trips, "
            f"p50 {percentile(ms, 50):.2f} ms, p99 {percentile(ms, 99):.2f} ms, "
            f"max {max(ms):.1f} ms")
        await asyncio.sleep(1.0)
    return out
