"""When a worker's supervisors read their kernels' iopub: spread over the batch period, not
together (kernels started together would otherwise read together, a burst on one core every
batch), on a grid a slow read does not shift."""
from __future__ import annotations

import itertools

from poolgate.workers import supervisor
from poolgate.workers.supervisor import IOPUB_BATCH, next_on_grid, read_phase


def test_supervisors_started_together_read_at_spread_phases(monkeypatch) -> None:  # type: ignore[no-untyped-def]
    for start in (0.0, 0.37, 0.99):
        monkeypatch.setattr(supervisor, "_PHASE_START", start)
        monkeypatch.setattr(supervisor, "_PHASES", itertools.count())
        for n in (2, 8, 32):
            phases = sorted(read_phase() for _ in range(n))
            assert all(0 <= p < IOPUB_BATCH for p in phases)
            gaps = [b - a for a, b in zip(phases, phases[1:], strict=False)]
            gaps.append(phases[0] + IOPUB_BATCH - phases[-1])  # around the period's end
            # evenly spread: no two closer than a third of an even share, none far apart
            assert min(gaps) > IOPUB_BATCH / n / 3 and max(gaps) < IOPUB_BATCH / n * 3


def test_reads_stay_on_their_grid_whatever_a_read_took() -> None:
    phase = 0.13
    assert next_on_grid(100.13, IOPUB_BATCH, phase) == IOPUB_BATCH + 100.13  # on time: +period
    for late in (0.001, 0.2, IOPUB_BATCH - 0.001):  # a read that ended this much after its slot
        due = next_on_grid(100.13 + late, IOPUB_BATCH, phase)
        assert abs(due - (100.13 + IOPUB_BATCH)) < 1e-9
    due = next_on_grid(100.13 + IOPUB_BATCH + 0.05, IOPUB_BATCH, phase)  # a whole batch late
    assert abs(due - (100.13 + 2 * IOPUB_BATCH)) < 1e-9

