"""A burst of launches at once (issue 24): nothing lost, nothing started twice, nothing left
queued or orphaned, launches taken in order, on cheap kernels (bench/cheap/).

    python -m bench.scale_burst [--launches 1000] [--clients 100] [--workers 4] [--broker redis,amqp]

Per broker, a fresh stack (bench/scale_stack.py, one gateway). ``--clients`` client sessions
together send ``--launches`` POSTs at once; then, from the registry: launches lost (no 201 and no
running record), started twice (kernels in the hosts beyond the running records), the order in
which workers took them against their tickets, the queue wait (taken - queued) p50/p99, and the
time from the first POST to the last 201. Every kernel is then deleted, and what is left is
counted: records, queued tickets, kernels still in the hosts.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import aiohttp

from bench.cheap.launcher import ask
from bench.procs import reap_all
from bench.progress import say
from bench.scale import pct
from bench.scale_stack import POOL, Stack
from poolgate.workers.errors import LaunchRejected
from poolgate.workers.protocol import KernelStatus
from poolgate.workers.registry import Registry


def host_kernels(records: list[Any]) -> tuple[int, dict[str, str]]:
    """Kernels alive in every kernel host the records name: (count, id -> host)."""
    where: dict[str, str] = {}
    total = 0
    for control in {r.handle.get("data", {}).get("control") for r in records if r.handle} - {None}:
        try:
            ids = ask(control, {"op": "live"}, 10.0)["ids"]
        except LaunchRejected:
            continue
        total += len(ids)
        where.update({i: control for i in ids})
    return total, where


async def burst(urls: list[str], launches: int, clients: int) -> tuple[list[str], list[str], float]:
    """All POSTs at once from ``clients`` sessions; (ids started, errors, seconds to the last)."""
    ids: list[str] = []
    errors: list[str] = []
    sessions = [aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0),
                                      timeout=aiohttp.ClientTimeout(total=900))
                for _ in range(clients)]

    async def one(i: int) -> None:
        try:
            async with sessions[i % clients].post(f"{urls[i % len(urls)]}/api/kernels",
                                                  json={"name": POOL}) as r:
                if r.status == 201:
                    ids.append((await r.json())["id"])
                else:
                    errors.append(f"{r.status} {(await r.text())[:200]}")
        except aiohttp.ClientError as exc:
            errors.append(repr(exc))

    t0 = time.perf_counter()
    await asyncio.gather(*(one(i) for i in range(launches)))
    seconds = time.perf_counter() - t0
    for s in sessions:
        await s.close()
    return ids, errors, seconds


async def delete_all(url: str, ids: list[str]) -> int:
    sem, failed = asyncio.Semaphore(50), 0
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0)) as http:
        async def one(kid: str) -> None:
            nonlocal failed
            async with sem:
                async with http.delete(f"{url}/api/kernels/{kid}") as r:
                    failed += r.status not in (204, 404)
        await asyncio.gather(*(one(k) for k in ids))
    return failed


def run_one(args: argparse.Namespace, broker: str, folder: Path) -> dict[str, Any]:
    stack = Stack(folder, args.launches, args.workers, 1, broker)
    say(f"{broker}: {args.workers} workers, 1 gateway; {args.launches} launches from "
        f"{args.clients} clients at once")
    stack.start()
    out: dict[str, Any] = {"broker": broker, "launches": args.launches, "clients": args.clients,
                           "workers": args.workers}
    try:
        reg = Registry(f"redis://127.0.0.1:{stack.ports['registry']}/0")
        ids, errors, seconds = asyncio.run(burst(stack.urls, args.launches, args.clients))
        records = [r for r in reg.all() if r.pool == POOL]
        running = [r for r in records if r.status is KernelStatus.RUNNING]
        in_hosts, _ = host_kernels(records)
        waits = [r.timing["taken"] - r.timing["queued"] for r in running
                 if r.timing.get("taken") and r.timing.get("queued")]
        late, latest = [], 0.0
        for r in sorted(running, key=lambda r: r.ticket):
            taken = float(r.timing.get("taken", 0))
            late.append(max(0.0, latest - taken))
            latest = max(latest, taken)
        out.update({
            "first_post_to_last_ready_s": round(seconds, 1), "created_201": len(ids),
            "errors": len(errors), "error_samples": errors[:3],
            "lost": args.launches - len({*ids} | {r.id for r in running}),
            "running_records": len(running), "kernels_in_hosts": in_hosts,
            "started_twice": in_hosts - len(running),
            "queue_wait_p50_s": round(pct(waits, 0.5), 2), "queue_wait_p99_s": round(pct(waits, 0.99), 2),
            # a launch taken after one with a later ticket: by how much (4 workers take in
            # parallel, so a few ms is the broker handing two out together)
            "taken_out_of_order": sum(1 for x in late if x > 0.05),
            "most_out_of_order_s": round(max(late, default=0.0), 3),
        })
        say(f"  {json.dumps(out)}")
        failed = asyncio.run(delete_all(stack.urls[0], [r.id for r in running]))
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            left = [r for r in reg.all() if r.pool == POOL and r.status.live]
            if not left:
                break
            time.sleep(0.5)
        left_hosts, _ = host_kernels(records)
        out.update({"delete_failed": failed, "records_left": len(left),
                    "queued_left": int(reg.r.zcard(f"pg:q:{POOL}")),
                    "orphans_in_hosts": left_hosts})
    finally:
        stack.stop()
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.scale_burst", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--launches", type=int, default=1000)
    p.add_argument("--clients", type=int, default=100)
    p.add_argument("--workers", type=int, default=4)
    p.add_argument("--broker", default="redis,amqp", help="redis, amqp or both")
    p.add_argument("--json", type=Path)
    args = p.parse_args(argv)
    import resource
    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    work = Path(tempfile.mkdtemp(prefix="poolgate-burst-"))
    results = []
    try:
        for broker in args.broker.split(","):
            res = run_one(args, broker, work / broker)
            print(json.dumps(res), flush=True)
            results.append(res)
    finally:
        reap_all()
        import shutil
        shutil.rmtree(work, ignore_errors=True)
    if args.json:
        args.json.write_text(json.dumps(results, indent=1))
    ok = all(r.get("lost") == 0 and r.get("started_twice") == 0 and r.get("records_left") == 0
             and r.get("orphans_in_hosts") == 0 and r.get("queued_left") == 0 for r in results)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
