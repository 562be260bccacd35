"""The scale bench's order analysis (bench/scale_burst.py): what it reports as taken out of
ticket order is what happened, over the pool and within each worker."""
from __future__ import annotations

import pytest

from bench.scale_burst import late_by, order


def test_late_by_measures_how_much_earlier_than_an_earlier_ticket() -> None:
    # ticket 3 was taken 0.2 s before ticket 2; ticket 4 after everything before it
    assert late_by([(1, 10.0), (2, 10.5), (3, 10.3), (4, 11.0)]) == pytest.approx([0, 0, 0.2, 0])


def test_order_in_order_reports_nothing() -> None:
    seen = {f"k{i}": {"ticket": i, "worker": f"w{i % 2}", "taken": 100.0 + i} for i in range(1, 9)}
    out = order(seen, 0.05)
    assert out["pool"]["taken_before_an_earlier_ticket"] == 0
    assert out["within_each_worker"]["taken_before_an_earlier_ticket"] == 0
    assert out["by_worker"] == {"w0": 4, "w1": 4}


def test_order_tells_pool_from_worker() -> None:
    # each worker takes its own launches in ticket order, but w1 takes ticket 2 before w0
    # takes ticket 1: out of order over the pool, in order within each worker
    seen = {"a": {"ticket": 1, "worker": "w0", "taken": 5.0},
            "b": {"ticket": 2, "worker": "w1", "taken": 4.0},
            "c": {"ticket": 3, "worker": "w0", "taken": 6.0},
            "d": {"ticket": 4, "worker": "w1", "taken": 4.01}}
    out = order(seen, 0.05)
    assert out["pool"]["taken_before_an_earlier_ticket"] == 2
    assert out["pool"]["by_more_than_0.05s"] == 2
    assert out["pool"]["most_s"] == 1.99
    assert out["within_each_worker"]["taken_before_an_earlier_ticket"] == 0
    # a launch with no ticket or taken time (refused, say) is left out, not counted as in order
    seen["e"] = {"ticket": 0, "worker": "w0", "taken": 1.0}
    assert order(seen, 0.05)["pool"]["launches"] == 4
