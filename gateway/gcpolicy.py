"""The gateway's garbage collection: a full collection walks what is new, not every session.

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
"""
from __future__ import annotations

import gc
import os
from typing import Any

FULL_WALK_EVERY = 16
_state = {"full": 0, "installed": False}


def _on_collect(phase: str, info: dict[str, Any]) -> None:
    if info.get("generation") != 2:
        return
    if phase == "start":
        _state["full"] += 1
        if _state["full"] % FULL_WALK_EVERY == 0:
            gc.unfreeze()  # this collection walks everything again
    else:
        gc.freeze()


def install() -> None:
    """Freeze what start-up made and every full collection's survivors from now on (once)."""
    if _state["installed"] or os.environ.get("POOLGATE_GC_FREEZE", "1") == "0":
        return
    _state["installed"] = True
    gc.collect()
    gc.freeze()
    gc.callbacks.append(_on_collect)
