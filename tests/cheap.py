"""A stack whose one pool runs the scale bench's cheap kernels (bench/cheap/): many kernels in
one host process per worker, named by import path, so tests can run many kernels cheaply."""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import redis

import tests.conftest as conftest
from tests.conftest import Stack

ROOT = str(Path(__file__).resolve().parents[1])
SPEC = {"argv": ["unused", "{connection_file}"], "display_name": "cheap", "language": "python",
        "interrupt_mode": "message", "metadata": {"poolgate": {"pool": "cheap"}}}


def start_cheap_stack(tmp_path: Path, slots: int = 8,
                      pool: dict[str, Any] | None = None, redis_url: str = "") -> Stack:
    """A worker on pool ``cheap`` and a gateway; the caller stops it. ``redis_url``:
    a Redis of the test's own (registry and broker) instead of the run's."""
    conftest.need_redis()
    tag = f"t{conftest.RUN_ID}cheap"
    pools = {"cheap": {"launcher": "bench.cheap.launcher:CheapLauncher", "queue": tag,
                       "slots": slots, "heartbeat_ttl": 3.0, "launch_timeout": 30, **(pool or {})},
             # the packaged python3 spec routes here; no worker serves it in these tests
             "local": {"launcher": "local", "queue": f"{tag}-local", "slots": 1}}
    specs = {"cheap": SPEC, "tiny-py": None, "broken": None, "msgint": None, "eg-local": None}
    stack = Stack(tmp_path, redis_url or conftest.REDIS, db=conftest.DB_BASE + 4, pools=pools,
                  specs=specs, redis_url=redis_url,
                  extra={"default_pool": "cheap", "default_kernelspec": "cheap"})
    stack.env["PYTHONPATH"] = os.pathsep.join(filter(None, [ROOT, os.environ.get("PYTHONPATH")]))
    redis.Redis.from_url(stack.registry_url).flushdb()
    try:
        stack.start_worker("cheap")
        stack.start_gateway(stack.port)
    except BaseException:
        stack.stop()
        raise
    return stack
