"""Many live kernels, each with an open WebSocket: what the gateway, registry and broker cost per
kernel (issue 24). The kernels are cheap test kernels, many in one process (bench/cheap/), so the
kernels themselves cost next to nothing.

    python -m bench.scale [--kernels 2000] [--gateways 1,2] [--workers 4] [--idle 60]

For each gateway count G (a fresh stack each, see bench/scale_stack.py):
1. baseline: 10 kernels live; ``--active`` clients (5 a kernel) each run ``--rounds`` executes
   one after another; round trip p50/p99 (request to execute_reply and status idle);
2. the other kernels are started (``--concurrency`` POSTs at a time, round robin over the
   gateways) and each gets one WebSocket (kernel_info answered through it);
3. per kernel: gateway RSS and open fds, registry used_memory, worker RSS, kernel-host RSS;
4. the same clients' round trips, now on ``--active`` distinct kernels of the N;
5. idle window: ``--idle`` seconds with nothing sent; registry (and Redis broker) commands per
   second per kernel from INFO commandstats, worker/gateway/maintenance CPU per kernel;
6. every kernel runs one execute through its WebSocket; all must answer.
Prints one JSON object per G (``--json FILE`` writes them all).
"""
from __future__ import annotations

import argparse
import asyncio
import json
import resource
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

import aiohttp

from bench.client import KernelConnection, WebSocketTransport
from bench.procs import reap_all
from bench.progress import say
from bench.scale_stack import POOL, Stack, usage

BASELINE_KERNELS = 10


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))] if ordered else float("nan")


def commandstats(client: Any) -> dict[str, int]:
    return {k.removeprefix("cmdstat_"): int(v["calls"])
            for k, v in client.info("commandstats").items()}


class ReadingTransport(WebSocketTransport):
    """A WebSocket read all the time by a task of its own, as a browser reads it: an idle
    client still answers the gateway's pings (aiohttp answers them only while reading), and
    the gateway closes a socket whose pings go unanswered."""

    def __init__(self, ws: aiohttp.ClientWebSocketResponse, session_id: str) -> None:
        super().__init__(ws, session_id)
        self.inbox: asyncio.Queue[dict[str, Any] | Exception] = asyncio.Queue()
        self.reader = asyncio.ensure_future(self._read())

    async def _read(self) -> None:
        try:
            while True:
                self.inbox.put_nowait(await WebSocketTransport.recv(self))
        except Exception as exc:  # closed: the next recv says so
            self.inbox.put_nowait(exc)

    async def recv(self) -> dict[str, Any]:
        item = await self.inbox.get()
        if isinstance(item, Exception):
            self.inbox.put_nowait(item)
            raise item
        return item

    async def close(self) -> None:
        self.reader.cancel()
        await super().close()


class Driver:
    """The bench's clients: REST over one aiohttp session, one WebSocket per kernel."""

    def __init__(self, stack: Stack, session: aiohttp.ClientSession) -> None:
        self.stack, self.http = stack, session
        self.kernels: list[str] = []
        self.conns: dict[str, KernelConnection] = {}

    def url(self, i: int) -> str:
        return self.stack.urls[i % len(self.stack.urls)]

    async def start(self, count: int, concurrency: int) -> tuple[float, int]:
        """Start ``count`` kernels; returns (seconds, failures)."""
        sem, failures = asyncio.Semaphore(concurrency), 0

        async def one(i: int) -> None:
            nonlocal failures
            async with sem:
                async with self.http.post(f"{self.url(i)}/api/kernels",
                                          json={"name": POOL}) as r:
                    if r.status == 201:
                        self.kernels.append((await r.json())["id"])
                    else:
                        failures += 1
                        if failures <= 3:
                            say(f"  start failed: {r.status} {(await r.text())[:300]}")

        t0 = time.perf_counter()
        base = len(self.kernels)
        await asyncio.gather(*(one(base + i) for i in range(count)))
        return time.perf_counter() - t0, failures

    async def open(self, kid: str, i: int) -> KernelConnection:
        ws = await self.http.ws_connect(
            f"{self.url(i).replace('http', 'ws', 1)}/api/kernels/{kid}/channels"
            f"?session_id={uuid.uuid4().hex}", max_msg_size=0, heartbeat=None)
        conn = KernelConnection(ReadingTransport(ws, uuid.uuid4().hex))
        await conn.kernel_info(60)
        return conn

    async def open_all(self, concurrency: int) -> int:
        """One WebSocket per kernel that has none; returns failures."""
        sem, failures = asyncio.Semaphore(concurrency), 0

        async def one(i: int, kid: str) -> None:
            nonlocal failures
            async with sem:
                try:
                    self.conns[kid] = await self.open(kid, i)
                except (aiohttp.ClientError, TimeoutError, ConnectionError) as exc:
                    failures += 1
                    if failures <= 3:
                        say(f"  WebSocket to {kid} failed: {exc!r}")

        await asyncio.gather(*(one(i, k) for i, k in enumerate(self.kernels) if k not in self.conns))
        return failures

    @staticmethod
    async def round_trips(conns: list[KernelConnection], rounds: int) -> list[float]:
        """Each connection runs ``rounds`` executes one after another, all connections at once."""
        times: list[float] = []

        async def client(conn: KernelConnection) -> None:
            for _ in range(rounds):
                res = await conn.execute("1+1", timeout=60)
                if not res.complete:
                    raise RuntimeError("an active client's execute did not complete")
                times.append(res.seconds * 1000)

        await asyncio.gather(*(client(c) for c in conns))
        return times

    async def execute_all(self, concurrency: int) -> int:
        """One execute on every kernel's WebSocket; returns how many answered completely."""
        sem, ok = asyncio.Semaphore(concurrency), 0

        async def one(conn: KernelConnection) -> None:
            nonlocal ok
            async with sem:
                res = await conn.execute("'still here'", timeout=120)
                ok += res.complete and res.status == "ok"

        await asyncio.gather(*(one(c) for c in self.conns.values()))
        return ok


def snapshot(stack: Stack) -> dict[str, Any]:
    reg = stack.registry()
    out = {"gateway": usage(stack.gateway_procs()), "worker": usage(stack.worker_procs()),
           "host": usage(stack.host_procs()), "maintenance": usage(stack.maintenance_procs()),
           "registry_memory": int(reg.info("memory")["used_memory"]),
           "registry_keys": int(reg.dbsize()), "registry_cmds": commandstats(reg),
           "time": time.monotonic()}
    broker = stack.broker()
    if broker is not None:
        out["broker_cmds"] = commandstats(broker)
        out["broker_memory"] = int(broker.info("memory")["used_memory"])
    return out


def per_second(a: dict[str, int], b: dict[str, int], seconds: float, n: int) -> dict[str, float]:
    """Commands per second per kernel between two commandstats, by command (and 'total')."""
    diff = {k: b.get(k, 0) - a.get(k, 0) for k in b}
    diff = {k: v for k, v in diff.items() if v > 0 and k != "info"}  # the bench's own INFO
    out = {k: round(v / seconds / n, 4) for k, v in sorted(diff.items(), key=lambda kv: -kv[1])}
    out["total"] = round(sum(diff.values()) / seconds / n, 4)
    return out


async def run_one(args: argparse.Namespace, gateways: int, folder: Path) -> dict[str, Any]:
    n = args.kernels
    stack = Stack(folder, n, args.workers, gateways, args.broker)
    say(f"G={gateways}: starting {args.workers} workers, {gateways} gateways, 2 Redis")
    stack.start()
    result: dict[str, Any] = {"kernels": n, "gateways": gateways, "workers": args.workers,
                              "broker": args.broker}
    try:
        connector = aiohttp.TCPConnector(limit=0)
        async with aiohttp.ClientSession(connector=connector) as http:
            d = Driver(stack, http)
            base = snapshot(stack)
            secs, failed = await d.start(BASELINE_KERNELS, BASELINE_KERNELS)
            ten = [await d.open(d.kernels[i % BASELINE_KERNELS], i) for i in range(args.active)]
            times = await d.round_trips(ten, args.rounds)
            result["rt_10_live"] = {"p50_ms": round(pct(times, 0.5), 2),
                                    "p99_ms": round(pct(times, 0.99), 2), "samples": len(times)}
            for c in ten:
                await c.close()
            say(f"  10 live: p50 {result['rt_10_live']['p50_ms']} ms, p99 "
                f"{result['rt_10_live']['p99_ms']} ms")
            secs, failed = await d.start(n - BASELINE_KERNELS, args.concurrency)
            result["start"] = {"seconds": round(secs, 1), "failed": failed,
                               "per_second": round((n - BASELINE_KERNELS) / secs, 1)}
            say(f"  started {len(d.kernels)} kernels in {secs:.0f} s ({failed} failed)")
            t0 = time.perf_counter()
            result["ws_failed"] = await d.open_all(args.concurrency)
            result["ws_open_seconds"] = round(time.perf_counter() - t0, 1)
            live = len(d.conns)
            say(f"  {live} WebSockets open")
            full = snapshot(stack)
            result["per_kernel"] = {
                "gateway_rss_kb": round((full["gateway"]["rss"] - base["gateway"]["rss"]) / live / 1e3, 1),
                "gateway_fds": round((full["gateway"]["fds"] - base["gateway"]["fds"]) / live, 2),
                "gateway_threads": round((full["gateway"]["threads"] - base["gateway"]["threads"]) / live, 2),
                "registry_bytes": round((full["registry_memory"] - base["registry_memory"]) / live),
                "registry_keys": round((full["registry_keys"] - base["registry_keys"]) / live, 2),
                "worker_rss_kb": round((full["worker"]["rss"] - base["worker"]["rss"]) / live / 1e3, 1),
                "worker_fds": round((full["worker"]["fds"] - base["worker"]["fds"]) / live, 2),
                "worker_threads": round((full["worker"]["threads"] - base["worker"]["threads"]) / live, 2),
                "host_rss_kb": round((full["host"]["rss"] - base["host"]["rss"]) / live / 1e3, 1),
                "host_fds": round((full["host"]["fds"] - base["host"]["fds"]) / live, 2),
            }
            say(f"  per kernel: {json.dumps(result['per_kernel'])}")
            result["gateway_totals"] = {"rss_mb": round(full["gateway"]["rss"] / 1e6, 1),
                                        "fds": full["gateway"]["fds"],
                                        "threads": full["gateway"]["threads"],
                                        "fd_limit": resource.getrlimit(resource.RLIMIT_NOFILE)[1]}
            active = [d.conns[k] for k in d.kernels[BASELINE_KERNELS:] if k in d.conns][:args.active]
            a = snapshot(stack)
            times = await d.round_trips(active, args.rounds)
            b = snapshot(stack)
            result["active"] = {  # commands and CPU per execute while the clients ran
                "registry_cmds_per_execute": round(sum(per_second(
                    a["registry_cmds"], b["registry_cmds"], 1.0, len(times)).values()) / 2, 2),
                "gateway_cpu_ms_per_execute": round(
                    (b["gateway"]["cpu"] - a["gateway"]["cpu"]) * 1000 / len(times), 3),
                "executes_per_second": round(len(times) / (b["time"] - a["time"]), 1),
                # the idle kernels' background runs meanwhile: subtract the idle window's rate
                "registry_cmds_per_second": round(per_second(
                    a["registry_cmds"], b["registry_cmds"], b["time"] - a["time"], 1)["total"])}
            result["rt_n_live"] = {"p50_ms": round(pct(times, 0.5), 2),
                                   "p99_ms": round(pct(times, 0.99), 2), "samples": len(times)}
            result["rt_p99_ratio"] = round(result["rt_n_live"]["p99_ms"] /
                                           result["rt_10_live"]["p99_ms"], 2)
            say(f"  {live} live: p50 {result['rt_n_live']['p50_ms']} ms, p99 "
                f"{result['rt_n_live']['p99_ms']} ms (x{result['rt_p99_ratio']} of 10 live)")
            if args.idle:
                say(f"  idle window: {args.idle} s")
                a = snapshot(stack)
                await asyncio.sleep(args.idle)  # the measured window itself, not a synchronisation
                b = snapshot(stack)
                secs = b["time"] - a["time"]
                idle: dict[str, Any] = {"seconds": round(secs, 1), "kernels": live,
                                        "registry_cmds_per_s_per_kernel":
                                            per_second(a["registry_cmds"], b["registry_cmds"], secs, live)}
                if "broker_cmds" in a:
                    idle["broker_cmds_per_s_per_kernel"] = per_second(
                        a["broker_cmds"], b["broker_cmds"], secs, live)
                for part in ("worker", "gateway", "maintenance", "host"):
                    idle[f"{part}_cpu_ms_per_s_per_kernel"] = round(
                        (b[part]["cpu"] - a[part]["cpu"]) / secs / live * 1000, 4)
                result["idle"] = idle
                say(f"  idle: {idle['registry_cmds_per_s_per_kernel']['total']} registry cmds/s "
                    f"per kernel, worker CPU {idle['worker_cpu_ms_per_s_per_kernel']} ms/s per kernel")
            ok = await d.execute_all(args.concurrency)
            result["final_execute"] = {"answered": ok, "of": live, "kernels_started": len(d.kernels)}
            say(f"  final execute: {ok} of {live} answered")
            for c in d.conns.values():
                await c.close()
    except Exception as exc:  # report what was measured, and what broke
        result["error"] = repr(exc)
        say(f"  failed: {exc!r}")
    finally:
        stack.stop()
    return result


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.scale", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--kernels", type=int, default=2000)
    p.add_argument("--gateways", default="1,2", help="gateway counts, one run each")
    p.add_argument("--workers", type=int, default=4)
    p.add_argument("--active", type=int, default=50, help="active clients for the round trips")
    p.add_argument("--rounds", type=int, default=20, help="executes per active client")
    p.add_argument("--concurrency", type=int, default=50, help="POSTs / WebSocket opens at once")
    p.add_argument("--idle", type=float, default=60, help="idle window in seconds (0: none)")
    p.add_argument("--broker", choices=("redis", "amqp"), default="redis")
    p.add_argument("--json", type=Path)
    p.add_argument("--keep", action="store_true", help="keep the work folder (logs)")
    args = p.parse_args(argv)
    if args.kernels < max(args.active, BASELINE_KERNELS) + 1:
        p.error("--kernels must exceed --active and 10")
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))  # one WebSocket per kernel here too
    results = []
    work = Path(tempfile.mkdtemp(prefix="poolgate-scale-"))
    try:
        for g in (int(x) for x in args.gateways.split(",")):
            res = asyncio.run(run_one(args, g, work / f"g{g}"))
            print(json.dumps(res), flush=True)
            results.append(res)
    finally:
        reap_all()
        say(f"work folder: {work}" if args.keep else "")
        if not args.keep:
            import shutil
            shutil.rmtree(work, ignore_errors=True)
    if args.json:
        args.json.write_text(json.dumps(results, indent=1))
    return 0 if all(r.get("final_execute", {}).get("answered") == r["kernels"] for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
