"""A memory soak of the gateway's collection policy (gateway/gcpolicy.py) under session churn.

    python -m bench.gc_soak [--minutes 10] [--idle 500] [--churners 16] [--variants freeze,plain]

The policy freezes each full collection's survivors and unfreezes them every 16th full
collection, so a cycle among a closed session's objects that was frozen is freed only by such a
walk. This soak checks that the gateway's memory still levels off while sessions come and go,
beside the same gateway without it (``--variants``, below).

Two stacks side by side (bench/scale_stack.py, cheap kernels, one gateway each), alike but for
that variable: "freeze" (the gateway as shipped) and "plain" (CPython's collector and glibc's
allocator as they come); ``--variants freeze,glibc`` compares the gateway with and without its
allocator settings (malloc_trim after each full collection, no per-thread caches: see
gateway/gcpolicy.py), ``freeze,no-trim`` with and without the trim alone. On each:
1. ``--idle`` kernels are started, each with a WebSocket held open for the whole soak (the
   long-lived objects a full collection would walk, as on a busy gateway);
2. for ``--minutes``, ``--churners`` clients per stack loop: three times in four they open a
   WebSocket to one of the idle kernels, run kernel_info and one execute, and close it; once in
   four they start a kernel, do the same on it and delete it (its session, its kernel's record
   and its pump all go);
3. every ``--sample`` seconds: each gateway's RSS, and the sessions opened so far;
4. every full collection of each gateway is logged (bench/scale_gcwatch: milliseconds, objects
   collected, objects frozen).
Reported per stack: sessions and kernels churned, RSS at the first sample after the first
minute and at the end, RSS growth per 1,000 sessions over the second half (least squares), the
full collections (how many, how many walked everything, their longest and median ms, and what
the walks collected). The churn loops of both stacks run at once, from one process, so the load
that comes and goes meets both alike. Prints one JSON object (``--json FILE`` writes it too).
``--tracemalloc DIR``: what Python itself allocated, a snapshot a minute per process, to tell
a leak of objects from memory Python does not track (compare two with
``tracemalloc.Snapshot.load(b).compare_to(tracemalloc.Snapshot.load(a), "lineno")``).
``--memmap DIR``: where each gateway's and worker's resident memory lies, a line a minute in
DIR/<pid>.jsonl (RSS by kind of mapping: brk heap, glibc thread arenas, thread stacks, other
anonymous, files; glibc's bytes in use and free; Python's allocated blocks): cheap enough to
leave on for a long soak.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import aiohttp

from bench.procs import work_folder
from bench.progress import say
from bench.scale import Driver
from bench.scale_stack import POOL, Stack, usage

# the gateway's environment per stack: "freeze" is the gateway as shipped (its collection
# policy, malloc_trim after each full collection, glibc's per-thread caches off); "no-trim" that
# without malloc_trim; "glibc" the policy alone, on glibc's defaults (the gateway before the
# malloc changes); "plain" none of it (CPython's and glibc's own behaviour)
GLIBC_DEFAULTS = {"POOLGATE_MALLOC_TRIM": "0", "GLIBC_TUNABLES": "glibc.malloc.tcache_count=7"}
VARIANTS: dict[str, dict[str, str]] = {
    "freeze": {},
    "no-trim": {"POOLGATE_MALLOC_TRIM": "0"},
    "glibc": GLIBC_DEFAULTS,
    "plain": {"POOLGATE_GC_FREEZE": "0", **GLIBC_DEFAULTS}}


def slope(points: list[tuple[float, float]]) -> float:
    """Least-squares slope of y on x (0 for fewer than two distinct x)."""
    if len({x for x, _ in points}) < 2:
        return 0.0
    xs, ys = zip(*points)
    return statistics.linear_regression(xs, ys).slope


def full_collections(stack: Stack) -> list[dict[str, float]]:
    """The gateway's logged generation-2 collections: ms, collected, frozen (before freezing)."""
    return [c for c in stack.gc_log() if c["process"].startswith("gateway") and c["gen"] == 2]


def summary(stack: Stack, samples: list[tuple[float, float, float]], sessions: int,
            kernels: int, errors: int, minutes: float) -> dict[str, Any]:
    """``samples``: (seconds since the churn began, sessions so far, gateway RSS bytes)."""
    later = [s for s in samples if s[0] >= 60] or samples
    half = [s for s in samples if s[0] >= minutes * 30] or samples
    fulls = full_collections(stack)
    # logged as each collection ends, before the policy freezes its survivors: a collection
    # that walked everything (an unfreeze, or every one under the plain policy) shows 0 frozen
    walks = [f for f in fulls if f["frozen"] == 0]
    ms = [f["ms"] for f in fulls]
    return {
        "sessions": sessions, "kernels_churned": kernels, "errors": errors,
        "rss_mb_first": round(later[0][2] / 1e6, 1), "rss_mb_end": round(samples[-1][2] / 1e6, 1),
        "rss_mb_max": round(max(s[2] for s in samples) / 1e6, 1),
        "rss_kb_per_1000_sessions_second_half": round(
            slope([(s[1], s[2]) for s in half]) * 1000 / 1e3, 1),
        "full_collections": len(fulls),
        "full_ms_median": round(statistics.median(ms), 1) if ms else None,
        "full_ms_max": round(max(ms), 1) if ms else None,
        "walks": len(walks), "walks_collected": [w["collected"] for w in walks],
        "frozen_max": max((f["frozen"] for f in fulls), default=0),
    }


async def churn(d: Driver, idle: list[str], deadline: float, counts: dict[str, int],
                rng: random.Random) -> None:
    """One client: sessions on idle kernels, and now and then a kernel started and deleted."""
    while time.monotonic() < deadline:
        fresh = rng.random() < 0.25
        kid = None
        try:
            if fresh:
                async with d.http.post(f"{d.url(0)}/api/kernels", json={"name": POOL}) as r:
                    if r.status != 201:
                        raise RuntimeError(f"start: {r.status}")
                    kid = (await r.json())["id"]
            conn = await d.open(kid or rng.choice(idle), 0)
            res = await conn.execute("1+1", timeout=60)
            await conn.close()
            if not (res.complete and res.status == "ok"):
                raise RuntimeError("execute did not complete")
            counts["sessions"] += 1
        except (aiohttp.ClientError, TimeoutError, ConnectionError, RuntimeError) as exc:
            counts["errors"] += 1
            if counts["errors"] <= 3:
                say(f"  churn error: {exc!r}")
            await asyncio.sleep(0.5)
        finally:
            if kid:
                async with d.http.delete(f"{d.url(0)}/api/kernels/{kid}") as r:
                    counts["kernels"] += r.status == 204
                    counts["errors"] += r.status != 204


async def soak(args: argparse.Namespace, folder: Path) -> dict[str, Any]:
    stacks = {name: Stack(folder / name, args.idle + args.churners, 1, 1, "redis")
              for name in args.variants}
    result: dict[str, Any] = {"minutes": args.minutes, "idle_sockets": args.idle,
                              "churners_per_stack": args.churners}
    try:
        for name, stack in stacks.items():
            stack.gc_watch = True
            stack.env.update(VARIANTS[name], POOLGATE_BENCH_GCLOG_GEN="2",
                             POOLGATE_BENCH_GCLOG_MS="0")
            say(f"{name}: starting a worker, a gateway, registry and broker")
            stack.start()
        async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0)) as http:
            drivers = {n: Driver(s, http) for n, s in stacks.items()}
            for name, d in drivers.items():
                secs, failed = await d.start(args.idle, 50)
                ws_failed = await d.open_all(50)
                say(f"{name}: {len(d.kernels)} idle kernels in {secs:.0f} s ({failed} failed), "
                    f"{len(d.conns)} WebSockets open ({ws_failed} failed)")
            counts = {n: {"sessions": 0, "kernels": 0, "errors": 0} for n in stacks}
            samples: dict[str, list[tuple[float, float, float]]] = {n: [] for n in stacks}
            t0 = time.monotonic()
            deadline = t0 + args.minutes * 60
            rng = random.Random(24)
            loops = [asyncio.ensure_future(churn(d, list(d.kernels), deadline, counts[n],
                                                 random.Random(rng.random())))
                     for n, d in drivers.items() for _ in range(args.churners)]
            while time.monotonic() < deadline:
                await asyncio.sleep(min(args.sample, max(0.0, deadline - time.monotonic())))
                line = []
                for n, s in stacks.items():
                    rss = usage(s.gateway_procs())["rss"]
                    samples[n].append((time.monotonic() - t0, counts[n]["sessions"], rss))
                    line.append(f"{n} {counts[n]['sessions']} sessions, RSS {rss / 1e6:.1f} MB")
                say(f"  {time.monotonic() - t0:5.0f} s: " + "; ".join(line))
            await asyncio.gather(*loops)
            ok = {}
            for n, d in drivers.items():  # the idle sessions still work
                answered = 0
                for c in d.conns.values():
                    res = await c.execute("'still here'", timeout=60)
                    answered += res.complete and res.status == "ok"
                    await c.close()
                ok[n] = answered
            for n, s in stacks.items():
                result[n] = summary(s, samples[n], counts[n]["sessions"], counts[n]["kernels"],
                                    counts[n]["errors"], args.minutes)
                result[n]["idle_answered"] = ok[n]
                result[n]["samples"] = [(round(t), c, round(r / 1e6, 1)) for t, c, r in samples[n]]
                say(f"{n}: {json.dumps({k: v for k, v in result[n].items() if k != 'samples'})}")
    except Exception as exc:  # report what was measured, and what broke
        result["error"] = repr(exc)
        say(f"  failed: {exc!r}")
    finally:
        for stack in stacks.values():
            stack.stop()
    return result


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.gc_soak", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--minutes", type=float, default=10.0)
    p.add_argument("--idle", type=int, default=500, help="idle kernels with a WebSocket each")
    p.add_argument("--churners", type=int, default=16, help="churning clients per stack")
    p.add_argument("--sample", type=float, default=20.0, help="seconds between RSS readings")
    p.add_argument("--variants", default="freeze,plain",
                   help=f"stacks to compare, side by side (of {', '.join(VARIANTS)})")
    p.add_argument("--json", type=Path)
    p.add_argument("--keep", action="store_true", help="keep the work folder (logs)")
    p.add_argument("--tracemalloc", type=Path, metavar="DIR",
                   help="each gateway and worker writes a tracemalloc snapshot to DIR every "
                        "minute (<pid>-<n>.snap; slows them several times)")
    p.add_argument("--memmap", type=Path, metavar="DIR",
                   help="each gateway and worker writes where its memory lies (smaps, mallinfo2) "
                        "to DIR/<pid>.jsonl every minute")
    args = p.parse_args(argv)
    args.variants = args.variants.split(",")
    if not set(args.variants) <= set(VARIANTS):
        p.error(f"--variants: of {', '.join(VARIANTS)}")
    for folder, variable in ((args.memmap, "POOLGATE_BENCH_MEMMAP"),
                             (args.tracemalloc, "POOLGATE_BENCH_TRACEMALLOC")):
        if folder:  # read by bench/scale_gcwatch/sitecustomize.py in each process
            folder.mkdir(parents=True, exist_ok=True)
            os.environ[variable] = str(folder.resolve())
    with work_folder("poolgate-soak-", args.keep) as work:
        result = asyncio.run(soak(args, work))
    print(json.dumps(result), flush=True)
    if args.json:
        args.json.write_text(json.dumps(result, indent=1))
    ok = "error" not in result and all(
        result[n]["errors"] == 0 and result[n]["idle_answered"] == args.idle for n in args.variants)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
