"""The scenarios: each runs one round against a target and returns its metrics.

Rule: a scenario shuts down what it started before returning; on an error the runner's
`target.cleanup()` ends whatever is left. Metric keys are "<scenario>.<name>"; a value of
None means not applicable to this target.
"""

from __future__ import annotations

import asyncio
import math
import statistics
import time
import uuid
from collections.abc import Awaitable, Callable
from typing import Any

import psutil

from bench.client import ExecResult, KernelConnection, SyncWebSocketConnection
from bench.config import Sizes
from bench.procs import is_kernel, rss_mb
from bench.progress import say
from bench.targets.base import KernelRef, Target

Metrics = dict[str, float | None]
Ready = tuple[KernelRef, KernelConnection, float]


def percentile(values: list[float], q: float) -> float:
    """The q-th percentile (0-100) with linear interpolation, as numpy's default."""
    ordered = sorted(values)
    pos = (len(ordered) - 1) * q / 100
    lo, hi = math.floor(pos), math.ceil(pos)
    return ordered[lo] + (ordered[hi] - ordered[lo]) * (pos - lo)


async def watch(target: Target, ref: KernelRef, wait: Awaitable[float]) -> None:
    """Await `wait`, but fail as soon as the target reports the kernel dead."""
    task = asyncio.ensure_future(wait)
    try:
        while not task.done():
            await asyncio.wait({task}, timeout=0.5)
            if not task.done() and not await target.kernel_alive(ref):
                raise RuntimeError("kernel process died")
        await task
    finally:
        task.cancel()


class StartFailed(RuntimeError):
    """A kernel did not become ready; the message names the stage it was in."""


async def ready_kernel(target: Target, timeout: float) -> Ready:
    """Start a kernel, open its connection, get kernel_info; return seconds from the request."""
    t0 = time.perf_counter()
    stage, ref, conn = "POST /api/kernels", None, None
    try:
        async with asyncio.timeout(timeout):
            ref = await target.start_kernel()
            stage = f"connect to {ref.kernel_id}"
            conn = await target.connect(ref)
            stage = f"kernel_info from {ref.kernel_id}"
            await watch(target, ref, conn.kernel_info(timeout))
    except Exception as exc:
        if conn is not None:
            await conn.close()
        reason = "timed out" if isinstance(exc, TimeoutError) else repr(exc)
        raise StartFailed(f"{stage}: {reason} after {time.perf_counter() - t0:.1f}s") from exc
    assert ref is not None and conn is not None
    return ref, conn, time.perf_counter() - t0


async def start_many(target: Target, k: int, sizes: Sizes) -> tuple[list[Ready], int]:
    """Start k kernels at once; return the ready ones and the number that failed."""
    timeout = sizes.start_timeout + 2.0 * k
    results = await asyncio.gather(*(ready_kernel(target, timeout) for _ in range(k)),
                                   return_exceptions=True)
    ready = [r for r in results if not isinstance(r, BaseException)]
    errors = [r for r in results if isinstance(r, BaseException)]
    for err in errors[:3]:
        say(f"{target.name}: a start failed: {err}"[:400])
    return ready, len(errors)


async def close_all(target: Target, ready: list[Ready]) -> None:
    await asyncio.gather(*(conn.close() for _, conn, _ in ready), return_exceptions=True)
    await target.cleanup()


async def run_code(conn: KernelConnection, code: str, timeout: float) -> float:
    """Execute `code`; raise if it did not complete and succeed; return seconds."""
    res = await conn.execute(code, timeout)
    if not res.complete or res.status != "ok":
        raise RuntimeError(f"execute {code!r}: status={res.status!r} complete={res.complete}")
    return res.seconds


def server_tree(target: Target) -> list[psutil.Process]:
    return [p for mp in target.server_processes() or [] for p in mp.tree()]


def memory_now(target: Target) -> tuple[float, float, float]:
    """MB of (the gateway process proper, everything the target runs but kernels, the whole
    tree with kernels)."""
    procs = server_tree(target)
    rest = [p for p in procs if not is_kernel(p)]
    return rss_mb([p for p in rest if target.is_gateway_process(p)]), rss_mb(rest), rss_mb(procs)


def gateway_fds(target: Target) -> tuple[float, float]:
    """Open files of the gateway processes, and the soft open-file limit of the busiest."""
    counts: list[tuple[int, int]] = []
    for p in server_tree(target):
        try:
            if not is_kernel(p) and target.is_gateway_process(p):
                counts.append((p.num_fds(), p.rlimit(psutil.RLIMIT_NOFILE)[0]))
        except psutil.Error:
            continue
    if not counts:
        return math.nan, math.nan
    return float(sum(n for n, _ in counts)), float(max(counts)[1])


async def scenario_memory(target: Target, sizes: Sizes) -> Metrics:
    """6: RSS growth per idle kernel that has one WebSocket open: of the gateway process
    proper, and of everything the target runs except the kernels."""
    if target.server_processes() is None:
        return {"memory.gateway_mb_per_kernel": None, "memory.service_mb_per_kernel": None,
                "memory.tree_mb_per_kernel": None, "memory.idle_mb": None}
    await asyncio.sleep(1.0)
    gw0, svc0, tree0 = memory_now(target)
    ready, failed = await start_many(target, sizes.memory_kernels, sizes)
    try:
        if not ready:
            raise RuntimeError("no kernel started")
        await asyncio.sleep(2.0)
        gwk, svck, treek = memory_now(target)
    finally:
        await close_all(target, ready)
    k = len(ready)
    return {"memory.gateway_mb_per_kernel": (gwk - gw0) / k,
            "memory.service_mb_per_kernel": (svck - svc0) / k,
            "memory.tree_mb_per_kernel": (treek - tree0) / k,
            "memory.idle_mb": gw0, "memory.failures": float(failed)}


async def scenario_many(target: Target, sizes: Sizes) -> Metrics:
    """8: `many` kernels alive at once behind one gateway, each with one WebSocket open,
    started `many_batch` at a time; then every one runs `1+1` at once. Counts failures,
    the gateway's open files against its limit, and its memory per kernel."""
    if target.server_processes() is None:
        return {"many.ready": None}
    await asyncio.sleep(1.0)
    gw0, svc0, _ = memory_now(target)
    ready: list[Ready] = []
    failed = exec_failed = 0
    try:
        for done in range(0, sizes.many, sizes.many_batch):
            got, bad = await start_many(target, min(sizes.many_batch, sizes.many - done), sizes)
            ready += got
            failed += bad
        await asyncio.sleep(2.0)
        gwk, svck, _ = memory_now(target)
        fds, limit = gateway_fds(target)
        results = await asyncio.gather(*(run_code(c, "1+1", sizes.exec_timeout * 4)
                                         for _, c, _ in ready), return_exceptions=True)
        exec_failed = sum(isinstance(r, BaseException) for r in results)
    finally:
        await close_all(target, ready)
    k = max(1, len(ready))
    say(f"{target.name}: {len(ready)} kernels alive at once, {failed} failed to start, "
        f"{exec_failed} did not answer; gateway {fds:.0f} open files (limit {limit:.0f})")
    return {"many.ready": float(len(ready)), "many.failures": float(failed),
            "many.exec_failures": float(exec_failed),
            "many.gateway_mb_per_kernel": (gwk - gw0) / k,
            "many.service_mb_per_kernel": (svck - svc0) / k,
            "many.gateway_fds": fds, "many.gateway_fd_limit": limit}


EPOCH_2001 = 1e9  # a number above this in the timing section is a Unix timestamp


def launch_fields(model: dict[str, Any] | None, requested_at: float) -> dict[str, float]:
    """7: the numeric fields under the model's "poolgate" key (e.g. its "timing"), flattened.

    Durations are kept as they are; Unix timestamps become seconds after the bench sent
    its POST (`requested_at`), so both read as seconds on one scale.
    """
    out: dict[str, float] = {}

    def walk(section: dict[str, Any], prefix: str) -> None:
        for key, value in section.items():
            if isinstance(value, dict):
                walk(value, f"{prefix}.{key}")
            elif isinstance(value, (int, float)) and not isinstance(value, bool):
                if value > EPOCH_2001:
                    out[f"{prefix}.{key}@"] = float(value) - requested_at
                else:
                    out[f"{prefix}.{key}"] = float(value)

    section = (model or {}).get("poolgate")
    if isinstance(section, dict):
        walk(section, "launch")
    return out


async def scenario_start(target: Target, sizes: Sizes) -> Metrics:
    """1: sequential starts, request to first kernel_info_reply; 7: launch timing hook."""
    times: list[float] = []
    hops: dict[str, list[float]] = {}
    failures = 0
    for _ in range(sizes.starts):
        await target.before_start()
        requested_at = time.time()
        try:
            ref, conn, seconds = await ready_kernel(target, sizes.start_timeout)
        except StartFailed as exc:
            failures += 1
            say(f"{target.name}: a start failed: {exc}")
            await target.cleanup()
            continue
        times.append(seconds)
        model = await target.kernel_model(ref)
        for key, value in launch_fields(model, requested_at).items():
            hops.setdefault(key, []).append(value)
        await conn.close()
        await target.shutdown_kernel(ref)
    if not times:
        raise RuntimeError(f"all {failures} starts failed")
    out: Metrics = {"start.p50_s": statistics.median(times), "start.max_s": max(times),
                    "start.failures": float(failures)}
    out.update({key: statistics.median(vals) for key, vals in hops.items()})
    if not hops:
        out["launch.timings"] = None
    return out


async def with_one_kernel(target: Target, sizes: Sizes,
                          body: Callable[[KernelConnection], Awaitable[Metrics]]) -> Metrics:
    ref, conn, _ = await ready_kernel(target, sizes.start_timeout)
    try:
        return await body(conn)
    finally:
        await conn.close()
        await target.shutdown_kernel(ref)


async def scenario_execute(target: Target, sizes: Sizes) -> Metrics:
    """2: `1+1` round trips (execute_reply and idle) on each of a few fresh kernels, one after
    another; p50/p95/p99 in ms over all of them. One kernel's round trip can sit on either of
    two levels some 25% apart (README, Performance), so one kernel per round measures luck."""
    ms: list[float] = []

    async def body(conn: KernelConnection) -> Metrics:
        for _ in range(5):
            await run_code(conn, "1+1", sizes.exec_timeout)
        ms.extend([1000 * await run_code(conn, "1+1", sizes.exec_timeout)
                   for _ in range(sizes.executes)])
        return {}
    for _ in range(sizes.execute_kernels):
        await with_one_kernel(target, sizes, body)
    return {"execute.p50_ms": percentile(ms, 50), "execute.p95_ms": percentile(ms, 95),
            "execute.p99_ms": percentile(ms, 99)}


def print_code(lines: int) -> str:
    """A cell that prints `lines` lines of 1000 bytes, flushing every 250 lines (250 kB)."""
    return ("import sys\n_l = 'x' * 999 + '\\n'\n_w, _f = sys.stdout.write, sys.stdout.flush\n"
            f"for _i in range({lines}):\n    _w(_l)\n    if _i % 250 == 249:\n        _f()\n"
            "_f()\n")


def flushed_code(count: int, size: int) -> str:
    """A cell that writes `count` chunks of `size` bytes (newline included), each flushed: each
    is one iopub stream message, the shape of progress bars, logs and many small outputs."""
    return ("import sys\n_c = 'x' * %d + '\\n'\n_w, _f = sys.stdout.write, sys.stdout.flush\n"
            "for _i in range(%d):\n    _w(_c)\n    _f()\n" % (size - 1, count))


# 3's message-size variants: (metric prefix, message size in bytes, messages at iopub_mb=200)
IOPUB_VARIANTS = (("iopub4m", 4 << 20, 48), ("iopub64k", 65536, 1600), ("iopub16k", 16384, 4000),
                  ("iopub_small", 8, 10000))


def gateway_cpu(target: Target) -> float:
    """CPU seconds (user + system) the gateway processes proper have used so far (nan: none)."""
    total, found = 0.0, False
    for p in server_tree(target):
        try:
            if not is_kernel(p) and target.is_gateway_process(p):
                t = p.cpu_times()
                total, found = total + t.user + t.system, True
        except psutil.Error:
            continue
    return total if found else math.nan


async def scenario_iopub(target: Target, sizes: Sizes) -> Metrics:
    """3: stdout throughput of one printing cell (1000-byte lines flushed every 250 lines);
    bytes that never arrived count as lost. Then the same kernel's flushed writes of 4 MiB (a
    large image or table), 64 KiB, 16 KiB and 8 bytes, one iopub message each: messages a
    second, and the gateway process's own CPU per message (its CPU time over the cell /
    messages; the kernel's is not in it);
    for a gateway, once with the aiohttp client and once more with websocket-client (``wsc_``
    keys; the floor has no WebSocket, so its one figure is the floor of both)."""
    lines = max(1, int(sizes.iopub_mb * 1000))
    expected = lines * 1000
    timeout = 60.0 + 1.0 * sizes.iopub_mb
    ref, conn, _ = await ready_kernel(target, sizes.start_timeout)
    try:
        await run_code(conn, "1+1", sizes.exec_timeout)
        res = await conn.execute(print_code(lines), timeout)
        out: Metrics = {"iopub.mb_s": res.stdout_bytes / 1e6 / res.seconds,
                        "iopub.lost_bytes": float(expected - res.stdout_bytes),
                        "iopub.timeouts": 0.0 if res.complete else 1.0}
        for name, size, count in iopub_variants(sizes):
            cpu0 = gateway_cpu(target)
            res = await conn.execute(flushed_code(count, size), timeout)
            out.update(variant_metrics(name, "", count, size, res, gateway_cpu(target) - cpu0))
        await conn.close()  # one client at a time: a second session would get the output too
        where = target.ws_url(ref, uuid.uuid4().hex)
        if where is not None:
            out.update(await asyncio.to_thread(iopub_websocket_client, target, where, sizes))
    finally:
        await conn.close()
        await target.shutdown_kernel(ref)
    return out


def iopub_variants(sizes: Sizes) -> list[tuple[str, int, int]]:
    """(metric prefix, message size, messages) for this run's iopub size."""
    return [(name, size, max(10, int(full * min(1.0, sizes.iopub_mb / 200.0))))
            for name, size, full in IOPUB_VARIANTS]


def variant_metrics(name: str, client: str, count: int, size: int, res: ExecResult,
                    cpu: float) -> Metrics:
    return {f"{name}.{client}msg_s": count / res.seconds,
            f"{name}.{client}lost_bytes": float(count * size - res.stdout_bytes),
            f"{name}.{client}gw_cpu_us": 1e6 * cpu / count}


def iopub_websocket_client(target: Target, where: tuple[str, dict[str, str]],
                           sizes: Sizes) -> Metrics:
    """The flushed-write variants again over websocket-client (in a thread of its own)."""
    url, headers = where
    session_id = url.rsplit("session_id=", 1)[-1]
    timeout = 60.0 + 1.0 * sizes.iopub_mb
    ws = SyncWebSocketConnection(url, headers, session_id, timeout)
    out: Metrics = {}
    try:
        res = ws.execute("1+1", sizes.exec_timeout)
        if not res.complete:
            raise RuntimeError("websocket-client: 1+1 did not complete")
        for name, size, count in iopub_variants(sizes):
            cpu0 = gateway_cpu(target)
            res = ws.execute(flushed_code(count, size), timeout)
            out.update(variant_metrics(name, "wsc_", count, size, res,
                                       gateway_cpu(target) - cpu0))
    finally:
        ws.close()
    return out


async def scenario_concurrent(target: Target, sizes: Sizes) -> Metrics:
    """4: K kernels requested at once; seconds until the last one answered kernel_info."""
    out: Metrics = {}
    for k in sizes.concurrent:
        t0 = time.perf_counter()
        ready, failed = await start_many(target, k, sizes)
        out[f"concurrent.k{k}.all_ready_s"] = max((s for _, _, s in ready), default=None)
        out[f"concurrent.k{k}.failures"] = float(failed)
        say(f"{target.name}: {k} concurrent starts: {len(ready)} ready, {failed} failed, "
            f"{time.perf_counter() - t0:.1f}s")
        await close_all(target, ready)
        await asyncio.sleep(1.0)
    return out


async def busy_loop(conn: KernelConnection, deadline: float, timeout: float) -> int:
    done = 0
    while time.perf_counter() < deadline:
        res = await conn.execute("1+1", timeout)
        if not res.complete:
            break
        done += 1
    return done


async def scenario_busy(target: Target, sizes: Sizes) -> Metrics:
    """5: executes per second over N kernels that each run `1+1` in a loop."""
    ready, failed = await start_many(target, sizes.busy_kernels, sizes)
    try:
        if not ready:
            raise RuntimeError("no kernel started")
        await asyncio.gather(*(run_code(c, "1+1", sizes.exec_timeout) for _, c, _ in ready))
        t0 = time.perf_counter()
        deadline = t0 + sizes.busy_seconds
        counts = await asyncio.gather(*(busy_loop(c, deadline, sizes.exec_timeout)
                                        for _, c, _ in ready))
        elapsed = time.perf_counter() - t0
    finally:
        await close_all(target, ready)
    return {"busy.exec_per_s": sum(counts) / elapsed, "busy.failures": float(failed)}


SCENARIO_FUNCS: dict[str, Callable[[Target, Sizes], Awaitable[Metrics]]] = {
    "memory": scenario_memory,
    "start": scenario_start,
    "execute": scenario_execute,
    "iopub": scenario_iopub,
    "concurrent": scenario_concurrent,
    "busy": scenario_busy,
    "many": scenario_many,
}
