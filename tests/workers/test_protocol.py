"""The kernel lifecycle table."""
from __future__ import annotations

import pytest

from poolgate.workers.protocol import TRANSITIONS, InvalidTransition, advance, sources_of
from poolgate.workers.protocol import KernelStatus as S


def test_happy_path_and_restart() -> None:
    state = S.QUEUED
    for nxt in (S.STARTING, S.RUNNING, S.RESTARTING, S.RUNNING, S.STOPPING, S.STOPPED):
        state = advance(state, nxt)
    assert state is S.STOPPED


def test_failed_reachable_from_every_live_state_and_final_states_are_final() -> None:
    for s in S:
        if s.live:
            assert S.FAILED in TRANSITIONS[s]
        else:
            assert TRANSITIONS[s] == frozenset()


@pytest.mark.parametrize("a,b", [(S.QUEUED, S.RUNNING), (S.STOPPED, S.RUNNING),
                                 (S.FAILED, S.STARTING), (S.RUNNING, S.QUEUED)])
def test_invalid(a: S, b: S) -> None:
    with pytest.raises(InvalidTransition):
        advance(a, b)


def test_sources() -> None:
    assert sources_of(S.STARTING) == {S.QUEUED}
    assert sources_of(S.RUNNING) == {S.STARTING, S.RESTARTING}


# Every pair, allowed or not, written out here rather than read from TRANSITIONS, so that a
# transition dropped from or added to the table (STARTING -> STOPPING, say) fails a test.
Q, ST, R, RS = S.QUEUED, S.STARTING, S.RUNNING, S.RESTARTING
SG, SD, F = S.STOPPING, S.STOPPED, S.FAILED
ALLOWED = {
    (Q, ST), (Q, SD), (Q, F),  # a queued launch starts, is withdrawn, or fails
    (ST, R), (ST, SG), (ST, F),  # a launch is stopped while it starts
    (R, RS), (R, SG), (R, F),
    (RS, R), (RS, SG), (RS, F),
    (SG, SD), (SG, F),
}
ALL_PAIRS = [(a, b) for a in S for b in S]


def test_the_table_has_every_status() -> None:
    assert set(TRANSITIONS) == set(S) and len(S) == 7


@pytest.mark.parametrize("a, b", [p for p in ALL_PAIRS if p in ALLOWED])
def test_every_allowed_transition(a: S, b: S) -> None:
    assert advance(a, b) is b
    assert a in sources_of(b)


@pytest.mark.parametrize("a, b", [p for p in ALL_PAIRS if p not in ALLOWED])
def test_every_refused_transition(a: S, b: S) -> None:
    with pytest.raises(InvalidTransition, match=f"{a.value} -> {b.value}"):
        advance(a, b)
    assert a not in sources_of(b)


def test_no_status_goes_to_itself_or_back_to_queued() -> None:
    assert not {(a, b) for a, b in ALLOWED if a is b or b is Q}
