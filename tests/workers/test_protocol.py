"""The kernel lifecycle table."""
from __future__ import annotations

import pytest

from workers.protocol import (TRANSITIONS, InvalidTransition, KernelStatus as S, advance,
                              sources_of)


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
