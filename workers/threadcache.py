"""glibc's per-thread malloc caches, off for poolgate's own long-lived threaded processes.

glibc gives each thread a cache (``tcache``) of up to seven freed chunks of each size up to
1 KiB, counted as in use and kept for that thread alone. A gateway holds a thread per WebSocket
and a worker a thread per slot and per kernel, for as long as they run, so each cache fills over
time: up to ~230 KB a thread, ~115 MB at 500 threads, held for no one (docs/scale.md: 300
threads that had freed everything held 53 MB with the caches and 1.5 MB without). Python
allocates objects up to 512 bytes from its own pools, so the caches served only larger ones, and
the gateway's CPU per message did not change without them.

glibc reads ``GLIBC_TUNABLES`` only when a program starts, so :func:`no_thread_caches` executes
the program again with ``glibc.malloc.tcache_count=0`` added, then puts the variable back as it
was: what the process starts (kernels, a fork server, ssh) gets the environment it was given.
Nothing happens on another C library, or where ``GLIBC_TUNABLES`` already names
``tcache_count`` (an operator's choice is kept).
"""
from __future__ import annotations

import os
import platform
import sys

OFF = "glibc.malloc.tcache_count=0"
_WAS = "POOLGATE_GLIBC_TUNABLES_WAS"  # set while the program executes itself again


def no_thread_caches() -> None:
    """Execute this program again with glibc's per-thread caches off (once), or, in the program
    so executed, restore ``GLIBC_TUNABLES`` for its children."""
    if _WAS in os.environ:
        was = os.environ.pop(_WAS)
        if was:
            os.environ["GLIBC_TUNABLES"] = was
        else:
            os.environ.pop("GLIBC_TUNABLES", None)
        return
    tunables = os.environ.get("GLIBC_TUNABLES", "")
    if "tcache_count" in tunables or platform.libc_ver()[0] != "glibc":
        return
    os.environ[_WAS] = tunables
    os.environ["GLIBC_TUNABLES"] = ":".join(filter(None, [tunables, OFF]))
    sys.stdout.flush()
    sys.stderr.flush()
    os.execv(sys.executable, sys.orig_argv)
