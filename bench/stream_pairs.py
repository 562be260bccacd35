"""Streaming, paired: the iopub scenario's flushed-write variants on the floor and on gateways,
cell by cell in turn, so every figure is compared with a floor cell run seconds before it.

    python -m bench.stream_pairs --pairs 10 --targets poolgate [--spin-idle] [--json FILE]

Why: ``python -m bench`` runs each target's round on its own, minutes apart, and a single
variant's rate on this kind of machine moves by ×2 between minutes (and by ×2 between two
cells of the same kernel). Here one kernel per target and client stays up for the whole run;
a *pair* is one cell on the floor and one on each target and client, in an order that rotates,
and every variant runs ``--pairs`` pairs. Reported per variant, target and client: the median
messages a second, its ratio to the floor's median, the median of the per-pair ratios (with
their 10th and 90th percentiles), and CPU per message of the target's kernel process (the
same ipykernel code everywhere) and of the gateway process (nothing on the floor).

``--spin-idle`` runs one busy loop per CPU at SCHED_IDLE priority for the whole run: it takes
a CPU only when nothing else wants it, but a CPU running it never goes idle. On a virtual
machine whose idle vCPUs halt, waking a halted vCPU costs the waker far more than a context
switch; a kernel's every flushed write takes several thread hand-offs (ipykernel's main
thread, its iopub thread, libzmq's I/O thread), so how busy the *other* processes keep the
CPUs changes the kernel's own speed. The option shows how much of a gap is that.

``--pin-kernels CPU`` holds every kernel of the run (the floor's and the targets') to one CPU,
all its threads: then ipykernel's threads hand the GIL over on one CPU, whatever the other
processes do. On this 2-vCPU machine that, not the gateway, decides the small-message rates
(docs/scale.md, "Streaming: where the gap to the floor is").
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import subprocess
import sys
import time
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psutil

from bench.__main__ import bench_workdir, extra_args
from bench.client import ExecResult, SyncWebSocketConnection
from bench.procs import is_kernel, reap_all
from bench.progress import say
from bench.scenarios import IOPUB_VARIANTS, flushed_code, gateway_cpu, ready_kernel, server_tree
from bench.targets import TARGETS, RunContext, Target

# In a session of its own, so in an autogroup of its own (where the kernel groups processes by
# session, sched_autogroup_enabled): nice 19 for the group and SCHED_IDLE within it. A group
# competes with the others by its own weight whatever its tasks' priorities, and one that
# shared the bench's group would take the bench's turns.
SPIN = ("import os\ntry:\n    open('/proc/self/autogroup', 'w').write('19')\nexcept OSError:\n"
        "    pass\nos.sched_setscheduler(0, os.SCHED_IDLE, os.sched_param(0))\n"
        "while True:\n    pass\n")


@dataclass
class Cells:
    """What one (target, client) measured: per pair, messages a second and CPU per message."""

    rates: list[float] = field(default_factory=list)
    kernel_us: list[float] = field(default_factory=list)
    gateway_us: list[float] = field(default_factory=list)
    lost: list[int] = field(default_factory=list)  # bytes of output missing, per cell


def summarise(floor: list[float], other: list[float]) -> dict[str, float]:
    """Ratios of ``other``'s rates to the floor's: of the medians, and per pair (the cells of
    one pair ran within seconds of each other), the median and 10th/90th percentiles."""
    if len(floor) != len(other) or not floor:
        raise ValueError("one floor cell per pair is needed")
    pairs = [o / f for o, f in zip(other, floor)]
    cuts = statistics.quantiles(pairs, n=10, method="inclusive") if len(pairs) > 1 \
        else [pairs[0]] * 9
    return {"median_msg_s": statistics.median(other),
            "ratio_of_medians": statistics.median(other) / statistics.median(floor),
            "paired_median": statistics.median(pairs),
            "paired_p10": cuts[0], "paired_p90": cuts[-1]}


def pin(proc: psutil.Process, cpu: int) -> None:
    """Hold every thread of ``proc`` to ``cpu`` (threads it starts later inherit it)."""
    for tid in os.listdir(f"/proc/{proc.pid}/task"):
        try:
            os.sched_setaffinity(int(tid), {cpu})
        except OSError:  # a thread that ended meanwhile
            continue


def cpu_seconds(proc: psutil.Process) -> float:
    """CPU seconds (user + system) ``proc`` has used so far."""
    t = proc.cpu_times()
    return t.user + t.system


class Runner:
    """One kernel per (target, client), each run with a callable that executes a cell."""

    def __init__(self) -> None:
        self.me = psutil.Process()
        self.known: set[int] = set()  # kernel pids already assigned to a (target, client)
        self.cells: dict[str, Cells] = {}
        self.run: dict[str, Callable[[str], Awaitable[ExecResult]]] = {}
        self.kernel: dict[str, psutil.Process] = {}
        self.target: dict[str, Target] = {}
        self.sync_sockets: list[SyncWebSocketConnection] = []  # closed by close()

    def new_kernel(self, target: Target) -> psutil.Process:
        """The kernel process that appeared since the last call (one per kernel started)."""
        procs = server_tree(target) if target.server_processes() else \
            self.me.children(recursive=True)
        fresh = [p for p in procs if is_kernel(p) and p.pid not in self.known]
        if len(fresh) != 1:
            raise RuntimeError(f"{target.name}: expected one new kernel process, found "
                               f"{[p.pid for p in fresh]}")
        self.known.add(fresh[0].pid)
        return fresh[0]

    async def add(self, key: str, target: Target, websocket_client: bool) -> None:
        ref, conn, _ = await ready_kernel(target, 120.0)
        self.kernel[key], self.target[key] = self.new_kernel(target), target
        if not websocket_client:
            self.run[key] = lambda code: conn.execute(code, 300.0)
            return
        await conn.close()
        where = target.ws_url(ref, uuid.uuid4().hex)
        assert where is not None
        url, headers = where
        ws = SyncWebSocketConnection(url, headers, url.rsplit("session_id=", 1)[-1], 300.0)
        self.sync_sockets.append(ws)
        self.run[key] = lambda code: asyncio.to_thread(ws.execute, code, 300.0)

    def close(self) -> None:
        for ws in self.sync_sockets:
            ws.close()

    async def cell(self, key: str, code: str, count: int, size: int) -> None:
        target, kernel = self.target[key], self.kernel[key]
        gateway = target.server_processes() is not None
        k0, g0 = cpu_seconds(kernel), gateway_cpu(target) if gateway else 0.0
        t0 = time.perf_counter()
        res = await self.run[key](code)
        seconds = time.perf_counter() - t0
        if not res.complete:
            raise RuntimeError(f"{key}: the cell did not finish ({res.stdout_bytes} of "
                               f"{count * size} bytes)")
        cells = self.cells[key]
        cells.lost.append(count * size - res.stdout_bytes)
        if cells.lost[-1]:  # a gateway that drops output: reported in the table, run goes on
            say(f"{key}: {res.stdout_bytes} of {count * size} bytes arrived before idle")
        cells.rates.append(count / seconds)
        cells.kernel_us.append(1e6 * (cpu_seconds(kernel) - k0) / count)
        cells.gateway_us.append(1e6 * (gateway_cpu(target) - g0) / count if gateway else 0.0)


async def measure(args: argparse.Namespace, ctx: RunContext) -> dict[str, Any]:
    targets: list[Target] = [TARGETS["floor"](ctx)]
    targets += [TARGETS[name](ctx) for name in args.targets.split(",") if name]
    for target in targets:
        env = dict(item.split(":", 1)[1].split("=", 1) for item in args.kernel_env
                   if item.split(":", 1)[0] == target.name)
        if env:  # e.g. KERNEL_CPUS=1: what a user asks for in the launch's env
            body = target.start_body()
            body["env"] = {**body.get("env", {}), **env}
            target.start_body = lambda body=body: body  # type: ignore[method-assign]
    runner = Runner()
    results: dict[str, Any] = {}
    try:
        for target in targets:
            say(f"starting {target.name}")
            await target.start()
            await runner.add(target.name, target, websocket_client=False)
            if target.name != "floor" and "websocket-client" in args.clients:
                await runner.add(f"{target.name} websocket-client", target, True)
        keys = list(runner.run)
        if args.pin_kernels is not None:
            for proc in runner.kernel.values():
                pin(proc, args.pin_kernels)
        for key in keys:
            await runner.run[key]("1+1")
        for name, size, full in IOPUB_VARIANTS:
            if name not in args.variants:
                continue
            count = max(10, int(full * args.scale))
            code = flushed_code(count, size)
            for key in keys:
                runner.cells[key] = Cells()
            for i in range(args.pairs):
                for key in keys[i % len(keys):] + keys[:i % len(keys)]:
                    await runner.cell(key, code, count, size)
            floor = runner.cells["floor"]
            say(f"{name}: floor {statistics.median(floor.rates):.0f} msg/s")
            results[name] = {"messages": count, "bytes": size, "floor": {
                "median_msg_s": statistics.median(floor.rates),
                "kernel_us": statistics.median(floor.kernel_us), "rates": floor.rates,
                "lost_bytes": floor.lost}}
            for key in keys[1:]:
                cells = runner.cells[key]
                results[name][key] = {**summarise(floor.rates, cells.rates),
                                      "kernel_us": statistics.median(cells.kernel_us),
                                      "gateway_us": statistics.median(cells.gateway_us),
                                      "rates": cells.rates, "lost_bytes": cells.lost}
    finally:
        runner.close()
        for target in targets:
            try:
                await target.cleanup()
                await target.stop()
            except Exception as exc:  # noqa: BLE001 - stop the others all the same
                say(f"{target.name}: stopping failed: {exc}")
    return results


def lost_cells(lost: list[int]) -> str:
    """'0', or how many of the cells lost output and how much: a rate over less output than
    was written is not comparable, and a gateway that drops output must not read as fast."""
    bad = [b for b in lost if b]
    return f"{len(bad)} of {len(lost)} ({sum(bad):,} bytes)" if bad else "0"


def table(results: dict[str, Any]) -> str:
    rows = ["| variant | target, client | msg/s (median) | ratio of medians | paired ratio, "
            "median (p10–p90) | kernel CPU/msg | gateway CPU/msg | cells that lost output |",
            "|---|---|---|---|---|---|---|---|"]
    for name, row in results.items():
        floor = row["floor"]
        rows.append(f"| {name} ({row['messages']} × {row['bytes']} B) | floor | "
                    f"{floor['median_msg_s']:,.0f} | | | {floor['kernel_us']:.0f} µs | | "
                    f"{lost_cells(floor.get('lost_bytes', []))} |")
        for key, r in row.items():
            if key in ("floor", "messages", "bytes"):
                continue
            client = key if " " in key else f"{key} aiohttp"
            rows.append(f"| | {client} | {r['median_msg_s']:,.0f} | ×{r['ratio_of_medians']:.2f}"
                        f" | ×{r['paired_median']:.2f} ({r['paired_p10']:.2f}–"
                        f"{r['paired_p90']:.2f}) | {r['kernel_us']:.0f} µs | "
                        f"{r['gateway_us']:.0f} µs | {lost_cells(r.get('lost_bytes', []))} |")
    return "\n".join(rows)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m bench.stream_pairs", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--targets", default="poolgate",
                   help="gateway targets beside the floor (comma-separated: poolgate, "
                        "poolgate-before, kg, eg)")
    p.add_argument("--pairs", type=int, default=10, help="pairs per variant")
    p.add_argument("--variants", default="iopub64k,iopub16k,iopub_small",
                   help="of iopub4m, iopub64k, iopub16k, iopub_small")
    p.add_argument("--clients", default="aiohttp,websocket-client",
                   help="aiohttp, and websocket-client too unless left out")
    p.add_argument("--scale", type=float, default=0.5,
                   help="messages per cell as a fraction of the iopub scenario's at 200 MB "
                        "(48 × 4 MiB, 1600 × 64 KiB, 4000 × 16 KiB, 10000 small)")
    p.add_argument("--spin-idle", action="store_true",
                   help="keep every CPU busy with a SCHED_IDLE loop (see above)")
    p.add_argument("--pin-kernels", type=int, metavar="CPU",
                   help="hold every kernel's threads to this CPU (see above)")
    p.add_argument("--args", action="append", default=[], metavar="NAME=ARGS",
                   help="extra arguments for one target's process, as for python -m bench "
                        "(e.g. 'poolgate-before=--config=q.yaml' with POOLGATE_BENCH_BEFORE=.)")
    p.add_argument("--kernel-env", action="append", default=[], metavar="TARGET:NAME=VALUE",
                   help="a variable in that gateway target's launch requests, e.g. "
                        "'poolgate:KERNEL_CPUS=1' (a kernel held to one CPU, docs/gpu.md)")
    p.add_argument("--json", help="write the figures (and every cell's rate) to this file")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    workdir, spec_root = bench_workdir("poolgate-pairs-", "python3")
    ctx = RunContext(workdir=workdir, kernelspec_dir=spec_root, extra_args=extra_args(args.args))
    spinners = [subprocess.Popen([sys.executable, "-c", SPIN], start_new_session=True)
                for _ in range(os.cpu_count() or 1)] if args.spin_idle else []
    t0 = time.time()
    try:
        results = asyncio.run(measure(args, ctx))
    finally:
        for s in spinners:
            s.kill()
            s.wait()
        reap_all()
    print(table(results))
    if args.json:
        meta = {"started": t0, "seconds": time.time() - t0, "pairs": args.pairs,
                "scale": args.scale, "spin_idle": args.spin_idle,
                "pin_kernels": args.pin_kernels, "args": args.args,
                "kernel_env": args.kernel_env, "targets": args.targets}
        Path(args.json).write_text(json.dumps({"meta": meta, "results": results}, indent=1))
        say(f"results written to {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
