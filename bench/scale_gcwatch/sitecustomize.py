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

# Where a process's resident memory lies, every minute, for a soak (bench/gc_soak.py ``--memmap
# DIR``): one JSON line per minute in DIR/<pid>.jsonl. tracemalloc sees only what Python asked
# for; this splits RSS by kind of mapping (/proc/self/smaps) and reads glibc's own account
# (mallinfo2: bytes handed out, bytes free inside its heaps), to tell a leak from fragmentation,
# thread stacks or malloc arenas. Cheap: no tracing, one read of smaps a minute.
_MM = os.environ.get("POOLGATE_BENCH_MEMMAP")
if _PATH and _MM:
    import ctypes
    import json
    import sys
    import threading

    class _MallInfo2(ctypes.Structure):
        _fields_ = [(f, ctypes.c_size_t) for f in (
            "arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks",
            "fordblks", "keepcost")]

    _libc = ctypes.CDLL(None)
    _libc.mallinfo2.restype = _MallInfo2
    _ARENA = 64 << 20  # glibc's thread arenas: 64 MiB reservations, 64 MiB aligned
    _STACK = int(os.environ.get("POOLGATE_BENCH_STACK", str(8 << 20)))

    def _smaps() -> dict[str, int]:
        kinds = {"heap": 0, "stacks": 0, "arenas": 0, "anon": 0, "files": 0}
        stacks = 0
        kind, size = "", 0
        with open("/proc/self/smaps") as f:
            for line in f:
                head = line.split()
                if "-" in head[0] and not head[0].endswith(":"):
                    lo, hi = (int(x, 16) for x in head[0].split("-"))
                    size = hi - lo
                    path = head[5] if len(head) > 5 else ""
                    if path == "[heap]":
                        kind = "heap"
                    elif path.startswith("/"):
                        kind = "files"
                    elif path:
                        kind = "anon"
                    elif size == _STACK:
                        kind, stacks = "stacks", stacks + 1
                    elif lo % _ARENA == 0 and size <= _ARENA:
                        kind = "arenas"
                    else:
                        kind = "anon"
                elif head[0] == "Rss:":
                    kinds[kind] += int(head[1]) * 1024
        kinds["stack_mappings"] = stacks
        return kinds

    def _memmap() -> None:
        t0 = time.time()
        while True:
            time.sleep(60)
            m = _libc.mallinfo2()
            with open("/proc/self/statm") as f:
                rss = int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
            policy = getattr(sys.modules.get("poolgate.gateway.gcpolicy"), "_state", {})
            line = {"t": round(time.time() - t0), "rss": rss, "threads": threading.active_count(),
                    **{k: policy[k] for k in ("trims", "trim_seconds", "trim_max") if k in policy},
                    "malloc_in_use": m.uordblks, "malloc_free": m.fordblks,
                    "malloc_mmapped": m.hblkhd, "malloc_sbrk": m.arena,
                    "python_blocks": sys.getallocatedblocks(), **_smaps()}
            with open(f"{_MM}/{os.getpid()}.jsonl", "a") as out:
                out.write(json.dumps(line) + "\n")

    def _start_memmap() -> None:
        threading.Thread(target=_memmap, daemon=True).start()

    _start_memmap()
    os.register_at_fork(after_in_child=_start_memmap)
