"""Scenario sizes: the full defaults and the --quick smoke sizes."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Sizes:
    """How much work each scenario does in one round."""

    starts: int = 10  # 1: sequential starts
    executes: int = 200  # 2: `1+1` round trips on each kernel...
    execute_kernels: int = 4  # 2: ...of this many fresh kernels, one after another
    iopub_mb: float = 200.0  # 3: MB (1e6 bytes) of stdout printed by one cell
    concurrent: tuple[int, ...] = (1, 8, 32, 100)  # 4: K concurrent starts
    busy_kernels: int = 32  # 5: kernels executing in a loop at once
    busy_seconds: float = 10.0  # 5: how long they loop
    memory_kernels: int = 16  # 6: idle kernels, one WebSocket each
    start_timeout: float = 60.0  # per kernel, plus 2 s per concurrent start
    exec_timeout: float = 30.0  # one `1+1`
    many: int = 200  # 8: kernels alive at once behind one gateway
    many_batch: int = 25  # 8: started this many at a time
    parallel: tuple[int, ...] = (8, 32)  # 9: N kernels running round trips at once
    parallel_seconds: float = 10.0  # 9: how long they run
    parallel_rate: float = 0.0  # 9: then paced at this many requests a second in all (0: not)
    parallel_sched: int = 0  # 9: 1: also CPU, run-queue wait and switches per round trip


FULL = Sizes()
QUICK = Sizes(starts=2, executes=20, execute_kernels=1, iopub_mb=5.0, concurrent=(1, 4), busy_kernels=4,
              busy_seconds=2.0, memory_kernels=2, many=4, many_batch=2,
              parallel=(4,), parallel_seconds=2.0)

SCENARIOS = ("memory", "start", "execute", "iopub", "concurrent", "busy", "many", "parallel")
