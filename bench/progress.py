"""Progress lines go to stderr, so stdout carries only the final table."""

from __future__ import annotations

import sys


def say(msg: str) -> None:
    print(f"[bench] {msg}", file=sys.stderr, flush=True)
