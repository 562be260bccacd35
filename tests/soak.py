"""Soak: many kernels, many cells, random faults, for a fixed time; prints what was lost.

    python -m tests.soak --minutes 5 --kernels 8 [--seed 1]

Outside the normal test run. It starts its own Redis (which it restarts as one of the
faults), two gateways and a worker, keeps every kernel busy with cells whose output it checks
line by line, and every few seconds does one fault at random: SIGKILL a gateway (and start it
again), SIGKILL the worker (and start it again within the heartbeat TTL), restart Redis empty.
At the end it counts kernels lost, cells whose output was incomplete, duplicate kernels and
kernel processes left behind. Clients reconnect with the same session_id, as JupyterLab does.
"""
from __future__ import annotations

import argparse
import os
import random
import signal
import tempfile
import threading
import time
from pathlib import Path

import psutil

from tests.client import Channel
from tests.conftest import RUN_ID, PrivateRedis, Stack, free_port


def client_loop(stack: Stack, kid: str, stop: threading.Event, stats: dict[str, int]) -> None:
    session = f"soak-{kid[:8]}"
    n = 0
    while not stop.is_set():
        n += 1
        lines = 20
        code = f"import time\nfor i in range({lines}):\n    print('{n}-%d' % i, flush=True); time.sleep(0.02)"
        base = random.choice([g for g in stack.bases])
        try:
            ch = Channel(base, kid, session=session, timeout=60)
            res = ch.execute(code, timeout=60)
            ch.close()
        except Exception:
            stats["cells_interrupted_by_faults"] += 1
            time.sleep(0.5)
            continue
        want = "".join(f"{n}-{i}\n" for i in range(lines))
        stats["cells"] += 1
        if res.stdout != want:
            stats["cells_with_lost_output"] += 1


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--minutes", type=float, default=5)
    ap.add_argument("--kernels", type=int, default=8)
    ap.add_argument("--seed", type=int, default=1)
    args = ap.parse_args()
    random.seed(args.seed)
    tmp = Path(tempfile.mkdtemp(prefix="poolgate-soak-"))
    server = PrivateRedis(tmp)
    server.start()
    stack = Stack(tmp, "redis", db=0, ttl=10, redis_url=f"redis://127.0.0.1:{server.port}").start()
    second = free_port()
    stack.start_gateway(second)
    stack.bases = [stack.url, f"http://127.0.0.1:{second}"]  # type: ignore[attr-defined]
    stats = {"cells": 0, "cells_with_lost_output": 0, "cells_interrupted_by_faults": 0, "faults": 0}
    kids = [stack.gw.start()["id"] for _ in range(args.kernels)]
    stop = threading.Event()
    threads = [threading.Thread(target=client_loop, args=(stack, k, stop, stats)) for k in kids]
    for t in threads:
        t.start()
    deadline = time.monotonic() + args.minutes * 60
    try:
        while time.monotonic() < deadline:
            time.sleep(random.uniform(3, 8))
            fault = random.choice(["gateway", "worker", "redis"])
            stats["faults"] += 1
            print(f"soak: fault {stats['faults']}: {fault}", flush=True)
            if fault == "gateway":
                i = random.randrange(len(stack.gateways))
                proc = stack.gateways.pop(i)
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
                port = int(stack.bases[i].rsplit(":", 1)[1])  # type: ignore[attr-defined]
                stack.start_gateway(port)
                stack.gateways.insert(i, stack.gateways.pop())
            elif fault == "worker":
                stack.kill_worker("local")
                stack.start_worker("local")
            else:
                server.kill()
                server.start()
        stop.set()
        for t in threads:
            t.join(120)
        models = {k["id"]: k for k in stack.gw.kernels()}
        lost = [k for k in kids if models.get(k, {}).get("execution_state") in (None, "dead")]
        extra = [k for k in models if k not in kids]
        for k in kids:
            stack.gw.shutdown(k)
    finally:
        stop.set()
        stack.stop()
        server.kill()
    time.sleep(1)
    orphans = [p.pid for p in psutil.process_iter(["cmdline", "environ"])
               if (p.info.get("environ") or {}).get("POOLGATE_TEST_RUN") == RUN_ID
               and "ipykernel_launcher" in " ".join(p.info.get("cmdline") or [])]
    print(f"soak: {args.minutes} min, {args.kernels} kernels, {stats['faults']} faults, "
          f"{stats['cells']} cells checked")
    print(f"soak: kernels lost {len(lost)}, cells with lost output {stats['cells_with_lost_output']}, "
          f"duplicate kernels {len(extra)}, orphan processes {len(orphans)} "
          f"(cells cut short by a fault and retried: {stats['cells_interrupted_by_faults']})")
    return 0 if not (lost or extra or orphans or stats["cells_with_lost_output"]) else 1


if __name__ == "__main__":
    raise SystemExit(main())
