"""Run the chosen scenarios for --rounds rounds against one target, start to stop.

Rule: whatever happens (a scenario error, a target that never came up, Ctrl-C), the
target's kernels are shut down after each scenario and the target is stopped at the end.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field
from typing import Any

from bench.config import Sizes
from bench.parallel import scenario_parallel
from bench.progress import say
from bench.scenarios import SCENARIO_FUNCS, Metrics, ready_kernel, run_code
from bench.targets import RunContext, Target, TargetUnavailable


@dataclass
class TargetResult:
    """Everything measured for one target: per-round metrics, errors, availability."""

    name: str
    status: str = "ok"
    rounds: list[Metrics] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)
    seconds: float = 0.0
    info: dict[str, Any] = field(default_factory=dict)


async def warm_up(target: Target, sizes: Sizes) -> None:
    """One unmeasured start + execute, so first-use costs (imports, caches) are paid."""
    ref, conn, seconds = await ready_kernel(target, sizes.start_timeout)
    await run_code(conn, "1+1", sizes.exec_timeout)
    await conn.close()
    await target.shutdown_kernel(ref)
    say(f"{target.name}: warm-up kernel ready in {seconds:.2f}s")


async def run_round(target: Target, sizes: Sizes, scenarios: list[str],
                    result: TargetResult) -> None:
    """One round of each scenario; metrics land in a new entry of result.rounds as they come."""
    metrics: Metrics = {}
    result.rounds.append(metrics)
    for name in scenarios:
        if target.scenarios is not None and name not in target.scenarios:
            continue
        t0 = time.perf_counter()
        try:
            got = await {**SCENARIO_FUNCS, "parallel": scenario_parallel}[name](target, sizes)
            metrics.update(got)
            shown = ", ".join(f"{k.split('.', 1)[1]}={v:.4g}" for k, v in got.items()
                              if v is not None)
            say(f"{target.name}: {name}: {shown or 'n/a'} ({time.perf_counter() - t0:.1f}s)")
        except Exception as exc:
            result.errors.append(f"round {len(result.rounds)} {name}: {exc!r}"[:500])
            say(f"{target.name}: {name} FAILED: {exc!r}"[:500])
        finally:
            await target.cleanup()


async def run_target(target_cls: type[Target], ctx: RunContext, sizes: Sizes, rounds: int,
                     scenarios: list[str], result: TargetResult) -> None:
    """Start the target, run `rounds` rounds of `scenarios` into `result`, stop it. Never
    raises, except CancelledError (Ctrl-C), after cleaning up."""
    target = target_cls(ctx)
    t0 = time.perf_counter()
    try:
        say(f"{target.name}: starting")
        await target.start()
        result.info = await target.describe()
        await warm_up(target, sizes)
        for _ in range(rounds):
            await run_round(target, sizes, scenarios, result)
    except TargetUnavailable as exc:
        result.status = f"unavailable: {exc}"
        say(f"{target.name}: {result.status}")
    except Exception as exc:
        result.status = f"failed: {exc!r}"
        say(f"{target.name}: {result.status}")
    except asyncio.CancelledError:
        result.status = "interrupted"
        raise
    finally:
        await shutdown(target)  # a Ctrl-C cancels once: this still runs to the end
        result.seconds += time.perf_counter() - t0


async def shutdown(target: Target) -> None:
    """Delete the target's kernels, then stop it."""
    try:
        await target.cleanup(timeout=60.0)
    finally:
        await target.stop()
