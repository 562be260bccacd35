"""The paired streaming bench (bench/stream_pairs.py): what it reports as a ratio to the floor
is computed pair by pair, from cells that ran seconds apart, not from far-apart medians."""
from __future__ import annotations

import pytest

from bench.stream_pairs import summarise, table


def test_paired_ratio_compares_each_cell_with_its_own_floor_cell() -> None:
    # the machine ran at half speed for the second pair: the floor and the target both slowed
    floor = [6000.0, 3000.0, 6000.0, 3000.0]
    target = [5400.0, 2700.0, 5400.0, 2700.0]
    out = summarise(floor, target)
    assert out["paired_median"] == pytest.approx(0.9)
    assert out["paired_p10"] == pytest.approx(0.9)
    assert out["paired_p90"] == pytest.approx(0.9)
    assert out["ratio_of_medians"] == pytest.approx(4050 / 4500)
    assert out["median_msg_s"] == pytest.approx(4050)


def test_a_slow_pair_shows_in_the_spread_not_as_a_shifted_median() -> None:
    floor = [5000.0] * 10
    target = [4500.0] * 8 + [1000.0, 1000.0]
    out = summarise(floor, target)
    assert out["paired_median"] == pytest.approx(0.9)
    assert out["paired_p10"] == pytest.approx(0.2)
    assert out["paired_p90"] == pytest.approx(0.9)


def test_pairs_must_match() -> None:
    with pytest.raises(ValueError):
        summarise([1.0, 2.0], [1.0])
    with pytest.raises(ValueError):
        summarise([], [])


def test_cells_that_lost_output_show_in_the_table() -> None:
    """A gateway that drops messages (one did: 16 of 2,000 16 KiB writes) is named in its row,
    with how much it lost, instead of ending the run or reading as a plain rate."""
    row = {"median_msg_s": 3000.0, "ratio_of_medians": 0.9, "paired_median": 0.9,
           "paired_p10": 0.8, "paired_p90": 1.0, "kernel_us": 300.0, "gateway_us": 500.0}
    results = {"iopub64k": {"messages": 800, "bytes": 65536,
                            "floor": {"median_msg_s": 3300.0, "kernel_us": 290.0},
                            "kg": {**row, "lost_bytes": [0, 262144, 0, 65536]},
                            "poolgate": {**row, "lost_bytes": [0, 0, 0, 0]}}}
    lines = table(results).splitlines()
    kg = next(line for line in lines if "| kg aiohttp |" in line)
    poolgate = next(line for line in lines if "| poolgate aiohttp |" in line)
    assert kg.endswith("| 2 of 4 (327,680 bytes) |")
    assert poolgate.endswith("| 0 |")
    assert all(line.count("|") == lines[0].count("|") for line in lines)
