"""Many live kernels, each with an open WebSocket: what the gateway, registry and broker cost per
kernel (issue 24). The kernels are cheap test kernels, many in one process (bench/cheap/), so the
kernels themselves cost next to nothing.

    python -m bench.scale [--kernels 2000] [--gateways 1,2] [--workers 4] [--idle 60]
    python -m bench.scale --kernels 500 --gateways 1 --idle 30     # the short variant

For each gateway count G, two stacks side by side (bench/scale_stack.py), alike but for their
kernels: "ten" holds the 10 active kernels only, "many" the same 10 and N - 10 idle ones.
1. both: 10 kernels, and ``--active`` clients (5 a kernel) with a WebSocket each;
2. many: the other kernels are started (``--concurrency`` POSTs at a time, round robin over the
   gateways) and each gets one WebSocket (kernel_info answered through it), read all the time;
3. per kernel: gateway RSS and open fds, registry used_memory, worker RSS, kernel-host RSS;
4. wait until the many side's gateway CPU holds still (the new kernels' first writes are over);
5. ``--rounds`` rounds, each side in turn (the order alternating): every client runs
   ``--executes`` executes one after another, all clients at once; round trip p50/p99 (request to
   execute_reply and status idle) per round and pooled, and their ratio (many / ten), so machine
   load that comes and goes meets both sides alike;
6. idle window: ``--idle`` seconds with nothing sent; registry (and Redis broker) commands per
   second per kernel from INFO commandstats, RabbitMQ messages per second per kernel from the
   private node's /api/overview (``--broker amqp``), worker/gateway/maintenance/broker CPU;
7. every kernel runs one execute through a WebSocket; all must answer.
Prints one JSON object per G (``--json FILE`` writes them all).
"""
from __future__ import annotations

import argparse
import asyncio
import gc
import json
import resource
import sys
import time
import uuid
from pathlib import Path
from typing import Any

import aiohttp

from bench.client import KernelConnection, WebSocketTransport
from bench.procs import work_folder
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

    async def open_all(self, concurrency: int, skip: int = 0) -> int:
        """One WebSocket per kernel that has none (but the first ``skip``); returns failures."""
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

        await asyncio.gather(*(one(i, k) for i, k in enumerate(self.kernels)
                               if i >= skip and k not in self.conns))
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
    out["broker"] = usage(stack.broker_procs())
    rabbit = stack.rabbit_overview()
    if rabbit is not None:
        out["rabbit"] = rabbit
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


def spread(values: list[float]) -> dict[str, float]:
    ordered = sorted(values)
    return {"min": round(ordered[0], 2), "median": round(ordered[len(ordered) // 2], 2),
            "max": round(ordered[-1], 2)} if ordered else {}


def quantiles(times: list[float]) -> dict[str, Any]:
    return {"p50_ms": round(pct(times, 0.5), 2), "p99_ms": round(pct(times, 0.99), 2),
            "samples": len(times)}


async def settle(stack: Stack, window: float, longest: float) -> dict[str, float]:
    """Wait until the stack's gateway CPU rate holds still: two ``window``-second readings
    within 20 % (or 2 % of a core) of each other, at most ``longest`` seconds. Kernels just
    started still write their first records and sessions their first marks."""
    t0 = time.monotonic()
    last, rate = usage(stack.gateway_procs())["cpu"], -1.0
    while True:
        await asyncio.sleep(window)  # one reading window (the rate is the measurement)
        cpu = usage(stack.gateway_procs())["cpu"]
        new = (cpu - last) / window
        if abs(new - rate) <= max(0.2 * rate, 0.02) or time.monotonic() - t0 >= longest:
            return {"seconds": round(time.monotonic() - t0, 1), "gateway_cores": round(new, 4)}
        last, rate = cpu, new


async def interleaved(args: argparse.Namespace, sides: dict[str, tuple[Stack, list[KernelConnection]]],
                      out: dict[str, Any]) -> None:
    """``--rounds`` rounds; each runs the 10-live side and the N-live side one after the other
    (the order alternates), so both meet the same machine load. The same clients on the same
    number of active kernels both sides: the only difference is the N-live side's idle kernels."""
    per: dict[str, list[dict[str, Any]]] = {k: [] for k in sides}
    pooled: dict[str, list[float]] = {k: [] for k in sides}
    for _stack, conns in sides.values():  # a warm-up round each, not counted
        await Driver.round_trips(conns, 2)
    for r in range(args.rounds):
        for name in (list(sides) if r % 2 == 0 else list(reversed(sides))):
            stack, conns = sides[name]
            cpu0, t0 = usage(stack.gateway_procs())["cpu"], time.time()
            times = await Driver.round_trips(conns, args.executes)
            cpu1, t1 = usage(stack.gateway_procs())["cpu"], time.time()
            pooled[name] += times
            per[name].append({**quantiles(times), "executes_per_s": round(len(times) / (t1 - t0), 1),
                              "gateway_cpu_ms_per_execute": round((cpu1 - cpu0) * 1000 / len(times), 3)})
            if stack.gc_watch:  # the gateways' long collections while this side's round ran
                gcs = [ms for t, who, ms in stack.gc_pauses()
                       if t0 <= t <= t1 + 0.5 and who.startswith("gateway")]
                per[name][-1]["gateway_gc_ms"] = {"count": len(gcs), "max": max(gcs, default=0.0),
                                                  "total": round(sum(gcs), 1)}
        a, b = per["ten"][-1], per["many"][-1]
        say(f"  round {r + 1}/{args.rounds}: p99 10 live {a['p99_ms']} ms, {args.kernels} live "
            f"{b['p99_ms']} ms (x{b['p99_ms'] / a['p99_ms']:.2f}); p50 {a['p50_ms']} / {b['p50_ms']} ms"
            + (f"; gateway GC {a['gateway_gc_ms']} / {b['gateway_gc_ms']}" if "gateway_gc_ms" in a else ""))
    out["rt_10_live"] = quantiles(pooled["ten"])
    out["rt_n_live"] = quantiles(pooled["many"])
    out["rt_p99_ratio"] = round(out["rt_n_live"]["p99_ms"] / out["rt_10_live"]["p99_ms"], 2)
    out["rt_p50_ratio"] = round(out["rt_n_live"]["p50_ms"] / out["rt_10_live"]["p50_ms"], 2)
    out["rounds"] = per
    out["rt_p99_ratio_by_round"] = spread([m["p99_ms"] / t["p99_ms"]
                                           for t, m in zip(per["ten"], per["many"], strict=True)])
    out["rt_p50_ratio_by_round"] = spread([m["p50_ms"] / t["p50_ms"]
                                           for t, m in zip(per["ten"], per["many"], strict=True)])
    say(f"  pooled: p99 10 live {out['rt_10_live']['p99_ms']} ms, {args.kernels} live "
        f"{out['rt_n_live']['p99_ms']} ms: x{out['rt_p99_ratio']} (by round "
        f"{out['rt_p99_ratio_by_round']})")


def broker_messages(a: dict[str, Any], b: dict[str, Any], secs: float, n: int) -> dict[str, float]:
    """RabbitMQ messages per second per kernel between two /api/overview readings."""
    sa, sb = a.get("message_stats", {}), b.get("message_stats", {})
    keys = ("publish", "deliver_get", "ack", "redeliver", "get_empty", "drop_unroutable",
            "return_unroutable")
    return {k: round((sb.get(k, 0) - sa.get(k, 0)) / secs / n, 5) for k in keys}


def per_kernel(base: dict[str, Any], full: dict[str, Any], sockets: int, kernels: int) -> dict[str, Any]:
    def d(part: str, key: str, n: int, scale: float = 1.0, nd: int = 2) -> float:
        return round(float(full[part][key] - base[part][key]) / n / scale, nd)
    return {"gateway_rss_kb": d("gateway", "rss", sockets, 1e3, 1),
            "gateway_fds": d("gateway", "fds", sockets),
            "gateway_threads": d("gateway", "threads", sockets),
            "registry_bytes": round((full["registry_memory"] - base["registry_memory"]) / kernels),
            "registry_keys": round((full["registry_keys"] - base["registry_keys"]) / kernels, 2),
            "worker_rss_kb": d("worker", "rss", kernels, 1e3, 1),
            "worker_fds": d("worker", "fds", kernels), "worker_threads": d("worker", "threads", kernels),
            "host_rss_kb": d("host", "rss", kernels, 1e3, 1), "host_fds": d("host", "fds", kernels)}


def idle_rates(a: dict[str, Any], b: dict[str, Any], live: int, kernels: int) -> dict[str, Any]:
    """What one stack did between snapshots ``a`` and ``b``, per kernel (per WebSocket for the
    gateway's CPU)."""
    secs = b["time"] - a["time"]
    idle: dict[str, Any] = {"seconds": round(secs, 1), "kernels": kernels, "websockets": live,
                            "registry_cmds_per_s_per_kernel":
                                per_second(a["registry_cmds"], b["registry_cmds"], secs, kernels)}
    if "broker_cmds" in a:
        idle["broker_cmds_per_s_per_kernel"] = per_second(a["broker_cmds"], b["broker_cmds"], secs,
                                                          kernels)
    if "rabbit" in a:
        idle["broker_messages_per_s_per_kernel"] = broker_messages(a["rabbit"], b["rabbit"], secs,
                                                                   kernels)
        idle["broker_messages_per_s"] = broker_messages(a["rabbit"], b["rabbit"], secs, 1)
    for part in ("worker", "gateway", "maintenance", "host", "broker"):
        n = live if part == "gateway" else kernels
        cpu = b[part]["cpu"] - a[part]["cpu"]
        idle[f"{part}_cpu_ms_per_s_per_kernel"] = round(cpu / secs / n * 1000, 4)
    return idle


async def idle_window(args: argparse.Namespace, many: Stack, ten: Stack, live: int,
                      kernels: int) -> dict[str, Any]:
    """``--idle`` seconds with nothing sent, both stacks read at once. Per kernel on the N-live
    stack, and the difference between the stacks per extra kernel ("marginal"): the processes'
    own background (Celery's heartbeats and events, beat, pidbox) cancels out there."""
    a = (snapshot(many), snapshot(ten))
    await asyncio.sleep(args.idle)  # the measured window itself, not a synchronisation
    b = (snapshot(many), snapshot(ten))
    out = idle_rates(a[0], b[0], live, kernels)
    tens = idle_rates(a[1], b[1], args.active, BASELINE_KERNELS)
    extra, extra_ws = kernels - BASELINE_KERNELS, live - args.active
    marginal: dict[str, float] = {}
    for key in ("worker", "gateway", "maintenance", "host", "broker"):
        k = f"{key}_cpu_ms_per_s_per_kernel"
        n_m, n_t = (live, args.active) if key == "gateway" else (kernels, BASELINE_KERNELS)
        marginal[k] = round((out[k] * n_m - tens[k] * n_t) / (extra_ws if key == "gateway" else extra), 4)
    for key in ("registry_cmds_per_s_per_kernel", "broker_cmds_per_s_per_kernel"):
        if key in out:
            marginal[key] = round((out[key]["total"] * kernels - tens[key]["total"] * BASELINE_KERNELS)
                                  / extra, 4)
    if "broker_messages_per_s" in out:
        for k in ("publish", "deliver_get"):
            marginal[f"broker_{k}_per_s_per_kernel"] = round(
                (out["broker_messages_per_s"][k] - tens["broker_messages_per_s"][k]) / extra, 5)
        out["broker_messages_per_s_10_live"] = tens["broker_messages_per_s"]
    out["marginal_per_extra_kernel"] = marginal
    return out


async def run_one(args: argparse.Namespace, gateways: int, folder: Path) -> dict[str, Any]:
    n = args.kernels
    many = Stack(folder / "many", n, args.workers, gateways, args.broker)
    ten = Stack(folder / "ten", BASELINE_KERNELS, args.workers, gateways, args.broker)
    many.gc_watch = ten.gc_watch = args.gc_log
    result: dict[str, Any] = {"kernels": n, "gateways": gateways, "workers": args.workers,
                              "broker": args.broker, "active_clients": args.active,
                              "executes_per_client_per_round": args.executes,
                              "rounds_each": args.rounds}
    try:
        for name, stack in (("10 live", ten), (f"{n} live", many)):
            say(f"G={gateways}, {name}: starting {args.workers} workers, {gateways} gateways, "
                f"registry and {args.broker} broker")
            stack.start()
        connector = aiohttp.TCPConnector(limit=0)
        async with aiohttp.ClientSession(connector=connector) as http:
            dt, dm = Driver(ten, http), Driver(many, http)
            base = snapshot(many)
            sides: dict[str, tuple[Stack, list[KernelConnection]]] = {}
            for name, d in (("ten", dt), ("many", dm)):  # the active kernels, 5 clients each
                await d.start(BASELINE_KERNELS, BASELINE_KERNELS)
                sides[name] = (d.stack, [await d.open(d.kernels[i % BASELINE_KERNELS], i)
                                         for i in range(args.active)])
            secs, failed = await dm.start(n - BASELINE_KERNELS, args.concurrency)
            result["start"] = {"seconds": round(secs, 1), "failed": failed,
                               "per_second": round((n - BASELINE_KERNELS) / secs, 1)}
            say(f"  started {len(dm.kernels)} kernels in {secs:.0f} s ({failed} failed)")
            t0 = time.perf_counter()
            result["ws_failed"] = await dm.open_all(args.concurrency, skip=BASELINE_KERNELS)
            result["ws_open_seconds"] = round(time.perf_counter() - t0, 1)
            sockets = len(dm.conns) + args.active
            say(f"  {len(dm.conns)} idle WebSockets open, {args.active} active")
            full = snapshot(many)
            result["per_kernel"] = per_kernel(base, full, sockets, len(dm.kernels))
            say(f"  per kernel: {json.dumps(result['per_kernel'])}")
            result["gateway_totals"] = {"rss_mb": round(full["gateway"]["rss"] / 1e6, 1),
                                        "fds": full["gateway"]["fds"],
                                        "threads": full["gateway"]["threads"],
                                        "fd_limit": resource.getrlimit(resource.RLIMIT_NOFILE)[1]}
            # the bench's own heap (2,000 sockets and their readers) out of its full collections:
            # a pause here would stall whichever side is running
            gc.collect()
            gc.freeze()
            result["settle"] = await settle(many, args.settle_window, args.settle_max)
            say(f"  settled after {result['settle']['seconds']} s: gateway "
                f"{result['settle']['gateway_cores']} cores idle")
            await interleaved(args, sides, result)
            if args.idle:
                say(f"  idle window: {args.idle} s")
                result["idle"] = idle = await idle_window(args, many, ten, sockets, len(dm.kernels))
                say(f"  idle: {idle['registry_cmds_per_s_per_kernel']['total']} registry cmds/s "
                    f"per kernel, worker CPU {idle['worker_cpu_ms_per_s_per_kernel']} ms/s per "
                    f"kernel, gateway CPU {idle['gateway_cpu_ms_per_s_per_kernel']} ms/s per socket")
            ok = await dm.execute_all(args.concurrency)
            active_ok = 0
            for i in range(BASELINE_KERNELS):  # each active kernel through one of its clients
                res = await sides["many"][1][i].execute("'still here'", timeout=120)
                active_ok += res.complete and res.status == "ok"
            result["final_execute"] = {"answered": ok + active_ok, "of": len(dm.conns) + BASELINE_KERNELS,
                                       "kernels_started": len(dm.kernels)}
            say(f"  final execute: {ok + active_ok} of {len(dm.kernels)} kernels answered")
            for conns in (c for _, c in sides.values()):
                for c in conns:
                    await c.close()
            for c in dm.conns.values():
                await c.close()
    except Exception as exc:  # report what was measured, and what broke
        result["error"] = repr(exc)
        say(f"  failed: {exc!r}")
    finally:
        many.stop()
        ten.stop()
    return result


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.scale", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--kernels", type=int, default=2000)
    p.add_argument("--gateways", default="1,2", help="gateway counts, one run each")
    p.add_argument("--workers", type=int, default=4)
    p.add_argument("--active", type=int, default=50, help="active clients for the round trips")
    p.add_argument("--rounds", type=int, default=8,
                   help="measured rounds on each side (10 live, N live), interleaved")
    p.add_argument("--executes", type=int, default=100,
                   help="executes per active client per round, one after another")
    p.add_argument("--settle-window", type=float, default=5.0,
                   help="seconds per gateway CPU reading while waiting for the N live to settle")
    p.add_argument("--settle-max", type=float, default=60.0)
    p.add_argument("--gc-log", action="store_true",
                   help="log the gateways' and workers' collections of 5 ms or more, and report "
                        "the gateways' during each round (bench/scale_gcwatch)")
    p.add_argument("--concurrency", type=int, default=50, help="POSTs / WebSocket opens at once")
    p.add_argument("--idle", type=float, default=60, help="idle window in seconds (0: none)")
    p.add_argument("--broker", choices=("redis", "amqp"), default="redis")
    p.add_argument("--json", type=Path)
    p.add_argument("--keep", action="store_true", help="keep the work folder (logs)")
    args = p.parse_args(argv)
    if args.kernels < max(args.active, BASELINE_KERNELS) + 1:
        p.error("--kernels must exceed --active and 10")
    results = []
    with work_folder("poolgate-scale-", args.keep) as work:
        for g in (int(x) for x in args.gateways.split(",")):
            res = asyncio.run(run_one(args, g, work / f"g{g}"))
            print(json.dumps(res), flush=True)
            results.append(res)
    if args.json:
        args.json.write_text(json.dumps(results, indent=1))
    return 0 if all(r.get("final_execute", {}).get("answered") == r["kernels"] for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
