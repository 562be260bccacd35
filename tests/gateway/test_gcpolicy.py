"""The gateway's collection policy (gateway/gcpolicy.py): full collections skip what survived the
last one, and memory of closed sessions is still freed. Run in a child interpreter, since the
policy changes the process's collector."""
from __future__ import annotations

import json
import os
import subprocess
import sys

SCRIPT = r"""
import gc, json, weakref
from poolgate.gateway import gcpolicy

class Node:
    pass

old = [Node() for _ in range(20000)]          # what start-up made
gcpolicy.install()
frozen_at_start = gc.get_freeze_count()

later = [Node() for _ in range(5000)]          # sessions opened since
gc.collect()
frozen_after_full = gc.get_freeze_count()

plain = Node()                                  # no cycle: freed at once even when frozen
gc.collect()
plain_ref = weakref.ref(plain)
del plain
plain_freed_at_once = plain_ref() is None

a, b = Node(), Node()                           # a closed session's cycle among frozen objects
a.peer, b.peer = b, a
gc.collect()
cycle_ref = weakref.ref(a)
del a, b
full_collections = 0
while cycle_ref() is not None and full_collections < 40:
    gc.collect()
    full_collections += 1
print(json.dumps({"frozen_at_start": frozen_at_start, "frozen_after_full": frozen_after_full,
                  "plain_freed_at_once": plain_freed_at_once,
                  "cycle_freed": cycle_ref() is None, "full_collections": full_collections,
                  "every": gcpolicy.FULL_WALK_EVERY}))
"""


def run_policy(**env: str) -> dict[str, object]:
    out = subprocess.run([sys.executable, "-c", SCRIPT], capture_output=True, text=True,
                         timeout=120, check=True, env={**os.environ, **env})
    return dict(json.loads(out.stdout.strip().splitlines()[-1]))


def test_full_collections_freeze_their_survivors_and_still_free_closed_cycles() -> None:
    r = run_policy()
    assert r["frozen_at_start"] >= 20000  # start-up's objects are out of every walk
    assert r["frozen_after_full"] >= r["frozen_at_start"] + 5000  # and each full one's survivors
    assert r["plain_freed_at_once"]  # reference counting still frees a closed session at once
    assert r["cycle_freed"]  # a cycle among frozen objects is freed by a walk of everything...
    assert 1 < r["full_collections"] <= r["every"]  # ...not at once, at most FULL_WALK_EVERY later


def test_poolgate_gc_freeze_0_leaves_cpythons_own_policy() -> None:
    r = run_policy(POOLGATE_GC_FREEZE="0")
    assert r["frozen_at_start"] == 0 and r["frozen_after_full"] == 0  # nothing frozen
    assert r["plain_freed_at_once"] and r["cycle_freed"]
    assert r["full_collections"] == 1  # every full collection walks everything: freed by the first


TRIM_SCRIPT = r"""
import gc, json, os, threading
from poolgate.gateway import gcpolicy

gcpolicy.install()

def rss():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")

kept = []
def session():  # a WebSocket's thread: its allocations come from a glibc heap of its own
    blocks = [bytes(4000) for _ in range(20000)]    # ~80 MB
    kept.extend(blocks[::8])                         # an eighth stays, spread over all of it
t = threading.Thread(target=session)
t.start()
t.join()
before = rss()
gc.collect()
print(json.dumps({"before": before, "after": rss()}))
"""


def rss_around_a_full_collection(**env: str) -> tuple[int, int]:
    out = subprocess.run([sys.executable, "-c", TRIM_SCRIPT], capture_output=True, text=True,
                         timeout=120, check=True, env={**os.environ, **env})
    r = json.loads(out.stdout.strip().splitlines()[-1])
    return r["before"], r["after"]


def test_a_full_collection_gives_memory_freed_between_live_blocks_back_to_the_system() -> None:
    # ~70 MB freed by a thread, in holes between blocks still alive: glibc keeps it resident
    # until something trims its heaps; the gateway does after each full collection
    before, after = rss_around_a_full_collection()
    assert before - after > 40e6
    before, after = rss_around_a_full_collection(POOLGATE_MALLOC_TRIM="0")
    assert abs(before - after) < 10e6  # without it nothing goes back
