"""Bench only: log this process's long garbage collections (bench/scale.py ``--gc-log``).

Python imports ``sitecustomize`` at start-up from its path; bench/scale_stack.py puts this
folder first on the path of the processes it watches, with ``POOLGATE_BENCH_GCLOG`` naming the
file. Each collection of generation 1 or 2 that took at least 5 ms is one line: wall time at its
end, generation, milliseconds, objects collected, and the objects the collector tracks now.

With ``POOLGATE_BENCH_GCFREEZE=1`` (``--gc-freeze``, an experiment): after each full collection,
``gc.freeze()`` moves every survivor to the permanent generation, so the next full collection
walks only what came since, not every idle session's objects again; every 16th full collection
first ``gc.unfreeze()``s them all, so cycles among frozen objects (a closed session's) are still
collected, if 16 times less often.
"""
from __future__ import annotations

import gc
import os
import time
from typing import Any

_PATH = os.environ.get("POOLGATE_BENCH_GCLOG")
_FREEZE = os.environ.get("POOLGATE_BENCH_GCFREEZE") == "1"
_started = [0.0]
_full = [0]


def _watch(phase: str, info: dict[str, Any]) -> None:
    if info.get("generation", 0) < 1:
        return
    full = info["generation"] == 2
    if phase == "start":
        if full and _FREEZE:
            _full[0] += 1
            if _full[0] % 16 == 0:  # this one walks everything (CPython merges at unfreeze)
                gc.unfreeze()
        _started[0] = time.perf_counter()
        return
    ms = (time.perf_counter() - _started[0]) * 1000
    if ms >= 5 and _PATH:
        with open(_PATH, "a") as log:
            log.write(f"{time.time():.3f} {os.getpid()} gen{info['generation']} {ms:.1f}ms "
                      f"collected={info.get('collected', 0)} tracked={len(gc.get_objects())} "
                      f"frozen={gc.get_freeze_count()}\n")
    if full and _FREEZE:
        gc.freeze()


if _PATH:
    gc.callbacks.append(_watch)
