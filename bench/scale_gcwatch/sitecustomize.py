"""Bench only: log this process's long garbage collections (bench/scale.py ``--gc-log``).

Python imports ``sitecustomize`` at start-up from its path; bench/scale_stack.py puts this
folder first on the path of the processes it watches, with ``POOLGATE_BENCH_GCLOG`` naming the
file. Each collection of generation 1 or 2 that took at least 5 ms is one line: wall time at its
end, generation, milliseconds, objects collected, and the objects the collector tracks now.

The gateway's own collection policy (gateway/gcpolicy.py, which came from this bench's
``--gc-freeze`` experiment) freezes each full collection's survivors; ``frozen=`` shows it.
"""
from __future__ import annotations

import gc
import os
import time
from typing import Any

_PATH = os.environ.get("POOLGATE_BENCH_GCLOG")
# bench/gc_soak.py logs every full collection: generation 2 only, however short
_MIN_GEN = int(os.environ.get("POOLGATE_BENCH_GCLOG_GEN", "1"))
_MIN_MS = float(os.environ.get("POOLGATE_BENCH_GCLOG_MS", "5"))
_started = [0.0]


def _watch(phase: str, info: dict[str, Any]) -> None:
    if info.get("generation", 0) < _MIN_GEN:
        return
    if phase == "start":
        _started[0] = time.perf_counter()
        return
    ms = (time.perf_counter() - _started[0]) * 1000
    if ms >= _MIN_MS and _PATH:
        with open(_PATH, "a") as log:
            log.write(f"{time.time():.3f} {os.getpid()} gen{info['generation']} {ms:.1f}ms "
                      f"collected={info.get('collected', 0)} tracked={len(gc.get_objects())} "
                      f"frozen={gc.get_freeze_count()}\n")


if _PATH:
    gc.callbacks.append(_watch)

# Snapshots of what Python allocated, every minute, for a soak's memory (bench/gc_soak.py
# ``--tracemalloc DIR``): DIR/<pid>-<n>.snap, for tracemalloc.Snapshot.load. The thread is
# started again in a forked child (gunicorn's workers are forked from its arbiter).
_TM = os.environ.get("POOLGATE_BENCH_TRACEMALLOC")
if _PATH and _TM:
    import threading
    import tracemalloc

    def _snapshots() -> None:
        n = 0
        while True:
            time.sleep(60)
            n += 1
            tracemalloc.take_snapshot().dump(f"{_TM}/{os.getpid()}-{n:03d}.snap")

    def _start() -> None:
        threading.Thread(target=_snapshots, daemon=True).start()

    tracemalloc.start(4)
    _start()
    os.register_at_fork(after_in_child=_start)
