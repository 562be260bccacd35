"""bench.parallel's fairness line: whether the slowest round trips of the parallel scenario are
a few kernels' (some kernels starved) or everyone's by turns, and whether they come together
(a stall of something all kernels share) or one at a time."""
from __future__ import annotations

from bench.parallel import fairness


def trips(count: int, seconds: float, every: float = 0.02, start: float = 0.0
          ) -> list[tuple[float, float]]:
    return [(start + i * every, seconds) for i in range(count)]


def test_one_starved_kernel_holds_all_the_slowest_round_trips() -> None:
    per_kernel = [trips(100, 0.010) for _ in range(3)]
    per_kernel.append(trips(96, 0.010) + trips(4, 0.200, every=1.0, start=5.0))
    line, = fairness(per_kernel)
    assert "round trips per kernel 100–100" in line
    assert "the slowest 1% (4) by kernel: [4, 0, 0, 0]" in line
    assert "p50 per kernel 10.0–10.0 ms" in line


def test_slow_round_trips_at_the_same_moment_are_counted_as_overlapping() -> None:
    together = [trips(99, 0.010) + [(3.0, 0.150)] for _ in range(4)]  # a shared stall at 3 s
    line, = fairness(together)
    assert "the slowest 1% (4) by kernel: [1, 1, 1, 1], 4 of them overlapping" in line
    apart = [trips(99, 0.010) + [(k * 1.0, 0.150)] for k in range(4)]  # one kernel at a time
    line, = fairness(apart)
    assert "[1, 1, 1, 1], 0 of them overlapping" in line


def test_no_round_trips_no_line() -> None:
    assert fairness([[], []]) == []
