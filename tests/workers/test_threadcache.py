"""glibc's per-thread caches off for poolgate's long-lived threaded processes
(workers/threadcache.py), run in a child interpreter as the gateway and worker commands do."""
from __future__ import annotations

import json
import os
import subprocess
import sys

CACHE_SCRIPT = r"""
import ctypes, json, os, random, threading
from poolgate.workers.threadcache import no_thread_caches

no_thread_caches()  # as the gateway and worker commands do: this script runs again, once

class MallInfo2(ctypes.Structure):
    _fields_ = [(f, ctypes.c_size_t) for f in (
        "arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks",
        "fordblks", "keepcost")]

libc = ctypes.CDLL(None)
libc.mallinfo2.restype = MallInfo2
go_on = threading.Event()
done = threading.Semaphore(0)

def session(seed):  # a WebSocket's thread: messages of assorted sizes come and go
    rng = random.Random(seed)
    for _ in range(20):
        messages = [bytes(rng.randrange(520, 1030)) for _ in range(200)]
        del messages
    done.release()
    go_on.wait()  # the thread lives on, as the gateway's threads do

in_use = libc.mallinfo2().uordblks
threads = [threading.Thread(target=session, args=(i,)) for i in range(300)]
for t in threads:
    t.start()
for _ in threads:
    done.acquire()
held = libc.mallinfo2().uordblks - in_use
go_on.set()
for t in threads:
    t.join()
print(json.dumps({"held": held, "tunables": os.environ.get("GLIBC_TUNABLES")}))
"""


def held_by_idle_threads(env: dict[str, str]) -> tuple[int, str | None]:
    out = subprocess.run([sys.executable, "-c", CACHE_SCRIPT], capture_output=True, text=True,
                         timeout=120, check=True, env=env)
    r = json.loads(out.stdout.strip().splitlines()[-1])
    return r["held"], r["tunables"]


def test_poolgates_threads_keep_no_freed_memory_and_children_get_the_environment_given() -> None:
    env = {k: v for k, v in os.environ.items() if k != "GLIBC_TUNABLES"}
    held, tunables = held_by_idle_threads(env)
    assert held < 15e6  # 300 threads that freed everything hold next to nothing
    assert tunables is None  # put back as it was: kernels and other children keep glibc's caches
    held, tunables = held_by_idle_threads({**env, "GLIBC_TUNABLES": "glibc.malloc.arena_max=4"})
    assert held < 15e6 and tunables == "glibc.malloc.arena_max=4"  # added to an operator's own
    # with glibc's own caches (an operator's GLIBC_TUNABLES naming tcache_count is kept), each
    # thread keeps up to seven freed chunks of each size for itself
    held, tunables = held_by_idle_threads({**env, "GLIBC_TUNABLES": "glibc.malloc.tcache_count=7"})
    assert tunables == "glibc.malloc.tcache_count=7"
    assert held > 30e6
