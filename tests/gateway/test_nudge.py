"""The kernel_info "nudge" that proves a session's iopub subscription is live before the client's
held messages go to the kernel: when it is sent, and how soon it is sent again."""
from __future__ import annotations

import json

import pytest

from poolgate.gateway.channels.session import NUDGE_EVERY, NUDGE_FIRST, KernelSession
from poolgate.workers import jmsg


class StubPeer:
    """A channel that records what would go to the kernel."""

    def __init__(self) -> None:
        self.ready = False
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


def kinds(peer: StubPeer) -> list[str]:
    return [json.loads(frames[2])["msg_type"] for frames in peer.sent]


def test_no_nudge_before_both_channels_are_up(sess: KernelSession) -> None:
    """Asked before the iopub handshake, a kernel could answer before it has the subscription:
    the answer would be lost and the client's first cell would wait for the next try."""
    shell, iopub = sess.sockets["shell"], sess.sockets["iopub"]
    sess.nudge()
    assert sess.nudging and shell.sent == []
    shell.ready = True
    assert sess.nudge_due(0.0)
    sess.nudge()
    assert shell.sent == []  # iopub is not up yet
    iopub.ready = True
    sess.nudge()
    assert kinds(shell) == ["kernel_info_request"]
    assert sess.is_nudge("iopub", [b"{}", shell.sent[0][2], b"{}", b"{}"])


def test_an_unanswered_nudge_is_sent_again_soon_then_less_often(sess: KernelSession) -> None:
    shell = sess.sockets["shell"]
    shell.ready = sess.sockets["iopub"].ready = True
    sess.nudge()
    gaps = []
    for _ in range(7):
        sent, now = sess.nudge_sent, sess.nudge_sent
        while not sess.nudge_due(now):
            now += 0.001
        gaps.append(round(now - sent, 2))
        sess.nudge()
        sess.nudge_sent = now  # as if the pump sent it at ``now``
    assert gaps[0] == pytest.approx(NUDGE_FIRST, abs=0.002)
    assert gaps == sorted(gaps) and gaps[-1] == pytest.approx(NUDGE_EVERY, abs=0.002)
    assert len(shell.sent) == 8

    sess.renudge()  # a new kernel process at the same place: soon again
    sess.nudge()
    assert sess.nudge_every == NUDGE_FIRST and len(shell.sent) == 9


def test_a_busy_kernel_is_nudged_on_control_and_on_shell_only_later(sess: KernelSession,
                                                                   monkeypatch) -> None:
    """ipykernel answers kernel_info on its control thread while a cell runs, so a session
    that connects to a busy kernel is confirmed at once (a second tab, JupyterLab's subshell
    console). A nudge on shell would wait behind the cell: it is sent only if nothing came on
    iopub for BUSY_SHELL_NUDGE (a kernel that does not answer on control). An idle kernel is
    nudged on both."""
    from poolgate.gateway.channels import session as session_module

    shell, control = sess.sockets["shell"], sess.sockets["control"]
    shell.ready = control.ready = sess.sockets["iopub"].ready = True
    clock = [1000.0]
    monkeypatch.setattr(session_module.time, "monotonic", lambda: clock[0])
    sess.nudge(busy=True)
    assert (kinds(control), kinds(shell)) == (["kernel_info_request"], [])
    assert sess.is_nudge("iopub", [b"{}", control.sent[0][2], b"{}", b"{}"])
    clock[0] += session_module.BUSY_SHELL_NUDGE - 0.1
    sess.nudge()  # a try before that: control only
    assert (len(control.sent), len(shell.sent)) == (2, 0)
    clock[0] += 0.2
    sess.nudge()
    assert (len(control.sent), kinds(shell)) == (3, ["kernel_info_request"])
    sess.renudge()  # a new kernel process: not busy
    sess.nudge()
    assert (len(control.sent), len(shell.sent)) == (4, 2)


def test_a_shell_nudge_is_known_until_answered_however_long_the_cell(sess: KernelSession,
                                                                    monkeypatch) -> None:
    """A shell nudge sent while a cell runs is answered when the cell ends, perhaps minutes
    after the session was ready: its reply and its busy/idle are still the gateway's, not the
    client's (a client that never asked would see a kernel_info_reply and a busy/idle with a
    parent it never sent). Once answered, its id is dropped after NUDGE_TRAIL; an unanswered
    control nudge NUDGE_TRAIL after the session was ready."""
    from poolgate.gateway.channels import session as session_module

    shell, control = sess.sockets["shell"], sess.sockets["control"]
    shell.ready = control.ready = sess.sockets["iopub"].ready = True
    clock = [1000.0]
    monkeypatch.setattr(session_module.time, "monotonic", lambda: clock[0])
    sess.nudge()
    on_shell, on_control = shell.sent[0][2], control.sent[0][2]
    sess.nudge_sent = 0.0
    sess.nudge()  # a second try, also unanswered on control
    second_control = control.sent[1][2]

    def answers(channel: str, parent: bytes) -> bool:
        return sess.is_nudge(channel, [b"{}", parent, b"{}", b"{}"])

    assert answers("iopub", on_control)  # the control nudge's busy: the session is ready
    assert sess.became_ready()
    assert answers("control", on_control)
    clock[0] += 600  # a cell of ten minutes; the client's own messages are not nudges
    assert not answers("iopub", json.dumps({"msg_id": "the-clients"}).encode())
    assert not answers("iopub", second_control)  # forgotten NUDGE_TRAIL after ready
    assert answers("shell", on_shell)  # the cell ended: the shell nudge's reply
    clock[0] += session_module.NUDGE_TRAIL - 0.1
    assert answers("iopub", on_shell)  # its idle
    clock[0] += 0.2
    assert not answers("iopub", on_shell)
    assert list(sess.nudges) == [json.loads(shell.sent[1][2])["msg_id"]]  # the 2nd, unanswered
