"""A session's readiness table (gateway/channels/session.py), pair by pair: client frames reach
the kernel only once iopub is confirmed, and a move the table does not list is a loud error."""
from __future__ import annotations

import itertools

import pytest

from poolgate.gateway.channels.session import InvalidTransition, KernelSession, Readiness, advance
from poolgate.workers import jmsg

W, N, R = Readiness.WAITING, Readiness.NUDGING, Readiness.READY
ALLOWED = {(W, W), (W, N), (N, N), (N, W), (N, R), (R, W)}


@pytest.mark.parametrize("current,new", list(itertools.product(Readiness, Readiness)),
                         ids=lambda s: s.value)
def test_each_pair(current: Readiness, new: Readiness) -> None:
    if (current, new) in ALLOWED:
        assert advance(current, new) is new
    else:
        with pytest.raises(InvalidTransition, match=f"from {current.value} to {new.value}"):
            advance(current, new)


class StubPeer:
    def __init__(self) -> None:
        self.ready = True
        self.sent: list[list[bytes]] = []

    def send(self, frames: list[bytes]) -> None:
        self.sent.append(frames)

    def close(self) -> None:
        pass


@pytest.fixture
def sess() -> KernelSession:
    s = KernelSession("k", "session")
    s.sockets = {ch: StubPeer() for ch in ("shell", "control", "stdin", "iopub")}  # type: ignore
    s.signer = jmsg.Signer(b"key")
    return s


def test_a_session_starts_waiting_and_is_ready_only_after_a_nudge(sess: KernelSession) -> None:
    assert sess.readiness is W and not sess.ready and not sess.nudging
    assert not sess.became_ready()  # iopub traffic without a nudge out proves nothing
    sess.nudge()
    assert sess.nudging and not sess.ready
    assert sess.became_ready() and sess.ready and not sess.nudging
    assert not sess.became_ready()  # already ready: nothing to do


def test_a_ready_session_cannot_be_nudged(sess: KernelSession) -> None:
    sess.nudge()
    sess.became_ready()
    with pytest.raises(InvalidTransition):
        sess.nudge()
    assert sess.ready


def test_renudge_waits_again_only_from_ready(sess: KernelSession) -> None:
    sess.nudge()
    sess.renudge()  # a new process while the nudge is out: still nudging, counters reset
    assert sess.nudging and sess.nudge_sent == 0.0
    sess.became_ready()
    sess.renudge()
    assert sess.readiness is W


@pytest.mark.parametrize("before", ["waiting", "nudging", "ready"])
def test_hold_and_closing_the_channels_wait_from_any_state(sess: KernelSession,
                                                            before: str) -> None:
    if before != "waiting":
        sess.nudge()
    if before == "ready":
        sess.became_ready()
    sess.hold()
    assert sess.readiness is W
    sess.close_sockets()
    assert sess.readiness is W and not sess.sockets
