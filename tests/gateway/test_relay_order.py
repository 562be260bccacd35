"""The order in which a session's pump relays what the kernel's channels hold when several hold
messages at once (a gateway that was not scheduled while a cell ran, on a loaded machine):
iopub first, since the kernel sent a request's busy and output before its reply."""
from __future__ import annotations

import json
from collections import deque
from collections.abc import Iterator
from typing import Any

import pytest

from poolgate.gateway.channels.pump import Pump
from poolgate.gateway.channels.session import KernelSession
from poolgate.workers import jmsg


class Peer:
    """A kernel channel holding received messages; its hash fixes where a set puts it."""

    def __init__(self, name: str, rank: int) -> None:
        self.name, self.rank = name, rank
        self.inbox: deque[list[bytes]] = deque()

    def __hash__(self) -> int:
        return self.rank


class Stats:
    def add(self, *args: Any) -> None:
        pass


class Client:
    protocol = None
    closed = False

    def __init__(self) -> None:
        self.got: list[str] = []
        self.stats = Stats()

    def send_many(self, frames: list[Any], done: Any = None) -> None:
        for f in frames:
            self.got.append(json.loads(bytes(f))["msg_type"])
        if done is not None:
            done()


class Service:
    registry = None


def received(msg_type: str, parent: str, content: dict[str, Any]) -> list[bytes]:
    """A message as the kernel's socket delivers it: identities, delimiter, signature, parts."""
    return [b"kernel", jmsg.DELIM, b"", json.dumps({"msg_id": msg_type, "msg_type": msg_type})
            .encode(), json.dumps({"msg_id": parent}).encode(), b"{}",
            json.dumps(content).encode()]


@pytest.fixture
def sess() -> Iterator[KernelSession]:
    s = KernelSession("k1", "s1")
    yield s
    s.close()


@pytest.mark.parametrize("ranks", [(0, 1), (1, 0)])
def test_output_held_with_its_reply_reaches_the_client_before_the_reply(
        sess: KernelSession, ranks: tuple[int, int]) -> None:
    client = Client()
    shell, iopub = Peer("shell", ranks[0]), Peer("iopub", ranks[1])
    iopub.inbox.extend([received("status", "r1", {"execution_state": "busy"}),
                        received("stream", "r1", {"name": "stdout", "text": "hi\n"}),
                        received("status", "r1", {"execution_state": "idle"})])
    shell.inbox.append(received("execute_reply", "r1", {"status": "ok"}))
    pump = Pump(client, sess, Service(), lambda kid: False)  # type: ignore[arg-type]
    due: set[Any] = {shell, iopub}
    while due:
        due = pump._read_kernel(due)
    assert client.got == ["status", "stream", "status", "execute_reply"]
