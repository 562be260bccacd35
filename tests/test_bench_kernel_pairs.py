"""bench.kernel_pairs: kernels driven directly, one client process each, variants in turn."""
from __future__ import annotations

import pytest

from bench.kernel_pairs import main, summary, table


def test_summary_is_over_every_round_trip() -> None:
    took = sorted([5.0] * 98 + [40.0, 90.0])
    assert summary(took) == {"round_trips": 100.0, "p50_ms": 5.0, "p99_ms": 90.0,
                             "max_ms": 90.0}
    with pytest.raises(ValueError):
        summary([])


def test_table_shows_each_pair_and_the_median_over_pairs() -> None:
    runs = {"lean": [summary([4.0, 6.0, 9.0]), summary([5.0, 7.0, 30.0]),
                     summary([3.0, 5.0, 8.0])]}
    row = table(runs).splitlines()[-1]
    assert row == "| lean | 3, 3, 3 | 6, 7, 5 | 9, 30, 8 | 9, 30, 8 | 6.0 / 9.0 |"


def test_a_short_run_drives_real_kernels_of_each_variant(
        capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["--pairs", "1", "--kernels", "2", "--seconds", "1",
                 "--variants", "stock,lean"]) == 0
    out = capsys.readouterr().out
    rows = {line.split(" | ")[0].strip("| "): line for line in out.splitlines()
            if line.startswith("| stock") or line.startswith("| lean")}
    assert set(rows) == {"stock", "lean"}
    for line in rows.values():
        assert int(line.split(" | ")[1]) > 10  # round trips in that second, both kernels


def test_unknown_variants_are_refused() -> None:
    with pytest.raises(SystemExit):
        main(["--variants", "lean,turbo"])
