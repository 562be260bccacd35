"""What idle kernels cost the registry (issue 24), on cheap kernels (bench/cheap/) and a Redis
of the test's own, so that INFO commandstats counts this stack alone.

The figures behind the bound are in docs/scale.md: with the test's heartbeat TTL of 3 s a
worker refreshes each kernel's heartbeat every second (1 command), its supervisor reads the
record every 5 s (0.2), and the gateway holding the kernel's WebSocket checks its liveness every
5 s (0.4). Before issue 24 the supervisor read the record every second and the gateway's check
took three commands: 2.6 a second.
"""
from __future__ import annotations

import time
from pathlib import Path

import redis

from poolgate.workers.registry import Registry
from tests.cheap import start_cheap_stack
from tests.client import Channel
from tests.conftest import STACKS, PrivateRedis, free_port

KERNELS = 24
WINDOW = 15.0  # three of the slowest periodic reads (5 s)
BOUND = 2.0  # registry commands a second per idle kernel with an open WebSocket


def calls(client: redis.Redis) -> dict[str, int]:
    return {k: int(v["calls"]) for k, v in client.info("commandstats").items()}


def test_idle_kernels_cost_the_registry_a_bounded_number_of_commands(
        tmp_path: Path, private_redis: PrivateRedis) -> None:
    url = f"redis://127.0.0.1:{private_redis.port}"
    stack = start_cheap_stack(tmp_path, slots=KERNELS + 2, redis_url=url)
    STACKS.append(stack)
    channels: list[Channel] = []
    try:
        bases = [stack.url, stack.start_gateway(free_port()).base]  # two gateways, as deployed
        kids = [stack.gw.start("cheap")["id"] for _ in range(KERNELS)]
        for n, kid in enumerate(kids):
            ch = Channel(bases[n % 2], kid)
            assert ch.execute("1").status == "ok"  # connected, iopub live
            channels.append(ch)
        client = redis.Redis(port=private_redis.port)
        before, t0 = calls(client), time.monotonic()
        time.sleep(WINDOW)  # the measured window, not a synchronisation
        after, seconds = calls(client), time.monotonic() - t0
        spent = {k: after[k] - before.get(k, 0) for k in after if k != "cmdstat_info"}
        rate = sum(spent.values()) / seconds / KERNELS
        top = sorted(spent.items(), key=lambda kv: -kv[1])[:6]
        assert rate <= BOUND, f"{rate:.2f} registry commands/s per idle kernel: {top}"
    finally:
        for ch in channels:
            ch.close()
        for k in stack.live_kernels():
            stack.gw.shutdown(k["id"])
        stack.stop()
        STACKS.remove(stack)


def test_a_stop_whose_command_was_lost_still_ends_the_kernel(
        tmp_path: Path, private_redis: PrivateRedis) -> None:
    """The record's target is the durable intent: the supervisor reads it every few seconds
    (no longer every second), and a kernel whose stop command never came still ends."""
    url = f"redis://127.0.0.1:{private_redis.port}"
    stack = start_cheap_stack(tmp_path, redis_url=url)
    STACKS.append(stack)
    try:
        kid = stack.gw.start("cheap")["id"]
        Registry(stack.registry_url).update(kid, target="STOPPED")  # no command sent
        deadline = time.monotonic() + 30
        while kid in [k["id"] for k in stack.gw.kernels()] and time.monotonic() < deadline:
            time.sleep(0.2)
        assert kid not in [k["id"] for k in stack.gw.kernels()]
    finally:
        stack.stop()
        STACKS.remove(stack)
