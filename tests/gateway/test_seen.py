"""What a gateway records as delivered to a client, for another gateway's replay if it dies:
only frames that were sent, and of replies only those a replay could otherwise rebuild."""
from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import pytest
from simple_websocket import ConnectionClosed

from poolgate.gateway.channels.pump import Outbox
from poolgate.gateway.channels.session import KernelSession


class Client:
    def __init__(self, fail: bool = False) -> None:
        self.fail = fail
        self.got: list[str | bytes] = []

    def send_many(self, frames: list[str | bytes], done: Any = None) -> None:
        if self.fail:
            raise ConnectionClosed(1006, "gone")
        self.got += frames
        if done is not None:  # all written at once (tests/gateway/test_connection.py: later)
            done()


def message(channel: str, msg_id: str, msg_type: str, parent: str,
            content: dict[str, Any]) -> tuple[str, dict[str, Any], list[bytes]]:
    head = {"msg_id": msg_id, "msg_type": msg_type}
    parts = [json.dumps(head).encode(), json.dumps({"msg_id": parent}).encode(), b"{}",
             json.dumps(content).encode()]
    return channel, head, parts


def add(out: Outbox, sess: KernelSession, channel: str, head: dict[str, Any],
        parts: list[bytes]) -> None:
    """What Pump._relay passes: the parent of a reply, or of an idle once replies wait."""
    idle = channel == "iopub" and head["msg_type"] == "status" and b"idle" in parts[3]
    pid = json.loads(parts[1])["msg_id"] if channel != "iopub" or idle else ""
    out.add(f"frame {head['msg_id']}", channel, head, pid)


@pytest.fixture
def sess() -> Iterator[KernelSession]:
    s = KernelSession("k1", "s1")
    yield s
    s.close()


def test_frames_count_as_delivered_only_once_sent(sess: KernelSession) -> None:
    client = Client()
    out = Outbox(client, sess)  # type: ignore[arg-type]
    ch, head, parts = message("iopub", "busy1", "status", "r1", {"execution_state": "busy"})
    add(out, sess, ch, head, parts)
    ch, head, parts = message("shell", "reply1", "execute_reply", "r1", {"status": "ok"})
    add(out, sess, ch, head, parts)
    assert sess.last_iopub is None and not sess.replied and not sess.seen_dirty
    out.flush()
    assert client.got == ["frame busy1", "frame reply1"]
    assert sess.last_iopub == "busy1" and list(sess.replied) == ["r1"] and sess.seen_dirty


def test_an_idle_ends_what_a_replay_must_know_of_its_request(sess: KernelSession) -> None:
    out = Outbox(Client(), sess)  # type: ignore[arg-type]
    for ch, head, parts in (
            message("shell", "reply1", "execute_reply", "r1", {"status": "ok"}),
            message("shell", "reply2", "execute_reply", "r2", {"status": "ok"}),
            message("iopub", "idle1", "status", "r1", {"execution_state": "idle"})):
        add(out, sess, ch, head, parts)
    out.flush()
    # r1's idle was delivered: a replay starts after it, r1 needs no record; r2 still does
    assert sess.last_iopub == "idle1" and list(sess.replied) == ["r2"]


def test_a_failed_send_records_nothing(sess: KernelSession) -> None:
    out = Outbox(Client(fail=True), sess)  # type: ignore[arg-type]
    ch, head, parts = message("shell", "reply1", "execute_reply", "r1", {"status": "ok"})
    add(out, sess, ch, head, parts)
    with pytest.raises(ConnectionClosed):
        out.flush()
    assert sess.last_iopub is None and not sess.replied and not sess.seen_dirty
    out.flush()  # the frames are not sent twice to a client that went away
