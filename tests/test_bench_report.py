"""bench.report: the table `python -m bench` prints. Figures are medians over rounds, but a
failure in any round must show: a target that failed to start one kernel of 32 in one round
of four is not a target with no failed starts."""
from __future__ import annotations

from bench.report import medians, table
from bench.runner import TargetResult


def test_failures_are_the_total_over_rounds_and_figures_the_median() -> None:
    rounds = [{"parallel.k32.p99_ms": p99, "parallel.k32.failures": failed}
              for p99, failed in ((170.0, 0.0), (210.0, 1.0), (180.0, 0.0), (190.0, 0.0))]
    kg = TargetResult("kg", rounds=rounds)
    floor = TargetResult("floor", rounds=[{"parallel.k32.p99_ms": 100.0,
                                           "parallel.k32.failures": 0.0}])
    assert medians(kg) == {"parallel.k32.p99_ms": 185.0, "parallel.k32.failures": 1.0}
    lines = table([floor, kg]).splitlines()
    failed = next(line for line in lines if "32 kernels in parallel, failed starts" in line)
    assert [c.strip() for c in failed.split("|")[1:]] == ["0", "1"]
    p99 = next(line for line in lines if "32 kernels in parallel, 1+1 p99" in line)
    assert [c.strip() for c in p99.split("|")[1:]] == ["100 (×1.00)", "185 (×1.85)"]
    assert lines[-1].endswith("failures their total over all rounds.")
