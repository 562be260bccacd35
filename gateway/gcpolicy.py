"""The gateway's memory: a full collection walks what is new, not every session, and what
sessions free goes back to the system.

Each open WebSocket session keeps some 235 objects that CPython's cyclic collector tracks; at
2,000 sessions a full (generation 2) collection walked ~480,000 objects with the GIL held and
stopped every socket on the gateway for 0.5–0.95 s (docs/scale.md, "What grows with idle
kernels"). With this policy each full collection's survivors are frozen (``gc.freeze``), so the
next one walks only what came since (38 ms at most in the same 2,000-kernel run). Every
``FULL_WALK_EVERY``-th full collection unfreezes them first and walks everything, so cycles
among old objects (a closed session's) are still freed, that many times less often. What
reference counting frees (nearly all of a closed session) is freed at once, as before.

``POOLGATE_GC_FREEZE=0`` in the gateway's environment leaves CPython's own policy in place (for
an operator who suspects this one, and for ``python -m bench.gc_soak``, which runs both).

After each full collection the gateway also gives the C library's free memory back to the
system (glibc's ``malloc_trim``). Every WebSocket has a thread, and glibc serves threads from up
to eight heaps per core; what sessions free there stays resident, between chunks still in use,
and a soak of session churn saw nearly all of the gateway's growth there: RSS up 24–31 MB in
six minutes, of which 15–23 MB was glibc's own free memory, while what Python held stayed level
(docs/scale.md). ``POOLGATE_MALLOC_TRIM=0`` turns this off; it does nothing where the C library
is not glibc.

Trimming cannot reach glibc's per-thread caches; the gateway and worker commands turn those off
(workers/threadcache.py).
"""
from __future__ import annotations

import ctypes
import gc
import os
import time
from collections.abc import Callable
from typing import Any

FULL_WALK_EVERY = 16
# trims: how many and how long, read by the bench's memory soak (bench/scale_gcwatch)
_state: dict[str, Any] = {"full": 0, "installed": False,
                         "trims": 0, "trim_seconds": 0.0, "trim_max": 0.0}


def _on_collect(phase: str, info: dict[str, Any]) -> None:
    if info.get("generation") != 2:
        return
    if phase == "start":
        _state["full"] += 1
        if _state["full"] % FULL_WALK_EVERY == 0:
            gc.unfreeze()  # this collection walks everything again
    else:
        gc.freeze()


def malloc_trim() -> Callable[[], object] | None:
    """glibc's ``malloc_trim(0)`` (it returns every whole free page of every heap to the
    system), or None where the C library has none."""
    try:
        fn = ctypes.CDLL(None).malloc_trim
    except (OSError, AttributeError):
        return None
    fn.argtypes, fn.restype = [ctypes.c_size_t], ctypes.c_int
    return lambda: fn(0)


def _trim_after(trim: Callable[[], object]) -> Callable[[str, dict[str, Any]], None]:
    def on_collect(phase: str, info: dict[str, Any]) -> None:
        if phase == "stop" and info.get("generation") == 2:
            t0 = time.perf_counter()
            trim()
            took = time.perf_counter() - t0
            _state["trims"] += 1
            _state["trim_seconds"] += took
            _state["trim_max"] = max(_state["trim_max"], took)
    return on_collect


def install() -> None:
    """Freeze what start-up made and every full collection's survivors from now on, and give
    free memory back after each full collection (once)."""
    if _state["installed"]:
        return
    _state["installed"] = True
    if os.environ.get("POOLGATE_GC_FREEZE", "1") != "0":
        gc.collect()
        gc.freeze()
        gc.callbacks.append(_on_collect)
    trim = malloc_trim() if os.environ.get("POOLGATE_MALLOC_TRIM", "1") != "0" else None
    if trim is not None:
        gc.callbacks.append(_trim_after(trim))
