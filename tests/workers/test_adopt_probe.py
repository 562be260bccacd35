"""A worker that comes back within the heartbeat TTL adopts its kernels, taking each as busy if
its last supervisor recorded so, unless the kernel's main shell answers kernel_info at once.
A shell that answers late (busy with a cell, or slow on a loaded machine) is kept asking: its
answer, when no status of the main shell came on iopub meanwhile, means the kernel is idle.
Before, an adopted kernel whose idle was missed stayed busy until its next cell, and idle
culling never ended it. Real ipykernel kernels; the supervisor's own methods."""
from __future__ import annotations

import json
import time
from collections.abc import Iterator

import pytest
import zmq
from jupyter_client import BlockingKernelClient, KernelManager
from jupyter_client.manager import start_new_kernel

from poolgate.workers import jmsg
from poolgate.workers.protocol import ConnectionInfo
from poolgate.workers.supervisor import PROBE_GRACE, ReplayBuffer, Supervisor


@pytest.fixture()
def kernel() -> Iterator[tuple[KernelManager, BlockingKernelClient]]:
    km, kc = start_new_kernel(kernel_name="python3")
    try:
        yield km, kc
    finally:
        kc.stop_channels()
        km.shutdown_kernel(now=True)


def adopter(km: KernelManager, recorded: str) -> tuple[Supervisor, ConnectionInfo]:
    """A supervisor as adopt() leaves it before its thread starts: iopub watched, and the
    state its last supervisor recorded."""
    conn = ConnectionInfo.from_dict(km.get_connection_info(session=False))
    sup = Supervisor.__new__(Supervisor)  # no worker around it: only the state it keeps
    sup.kid, sup.iopub, sup.state, sup.busy_subshells = "k", None, recorded, set()
    sup.replay_buf, sup.active_at = ReplayBuffer(0, 0), 0.0
    sup.status_only, sup.narrowed = True, False
    sup.shell_probe, sup.probe_answered = None, 0.0
    sup._watch_iopub(conn)
    return sup, conn


def lose_until_idle(sock: zmq.Socket[bytes], seconds: float) -> list[str]:
    """The main shell's statuses, read here (and so lost to the supervisor) until an idle."""
    states: list[str] = []
    until = time.monotonic() + seconds
    while states[-1:] != ["idle"] and sock.poll(max(0, int((until - time.monotonic()) * 1000))):
        parts, _ = jmsg.split(sock.recv_multipart())
        if json.loads(parts[0])["msg_type"] == "status" and \
                json.loads(parts[1]).get("msg_type") == "execute_request":
            states.append(json.loads(parts[3])["execution_state"])
    return states


def check_until(sup: Supervisor, seconds: float) -> None:
    until = time.monotonic() + seconds
    while time.monotonic() < until:
        sup._check_probe(time.monotonic())
        time.sleep(0.1)


def test_a_missed_idle_is_made_good_by_the_shells_late_answer(kernel) -> None:  # type: ignore[no-untyped-def]
    km, kc = kernel
    kc.execute("import time; time.sleep(1.5)")  # silent: only its statuses say it runs
    time.sleep(0.3)
    sup, conn = adopter(km, "busy")
    sup._confirm_iopub(conn, shell_state=True)
    assert sup.state == "busy" and sup.shell_probe is not None  # the cell holds the shell
    assert sup.iopub is not None
    assert lose_until_idle(sup.iopub, 5.0)[-1:] == ["idle"]  # the cell's idle, lost to it
    check_until(sup, PROBE_GRACE + 0.5)
    assert sup.state == "idle" and sup.shell_probe is None
    assert sup.active_at > 0  # idle from now: culling counts from here


def test_iopub_says_busy_after_the_answer_and_wins(kernel) -> None:  # type: ignore[no-untyped-def]
    """The cell ends, the shell answers, and a client's next cell has begun before the answer
    is taken: its busy, read from iopub, ends the probe; the kernel stays busy."""
    km, kc = kernel
    kc.execute("import time; time.sleep(1.5)")
    time.sleep(0.3)
    sup, conn = adopter(km, "busy")
    sup._confirm_iopub(conn, shell_state=True)
    assert sup.shell_probe is not None
    kc.execute("import time; time.sleep(5)")  # queued behind the probe's kernel_info
    deadline = time.monotonic() + 10
    while not sup.probe_answered:  # the first cell ended and the shell answered
        assert time.monotonic() < deadline
        sup._check_probe(time.monotonic())
        time.sleep(0.05)
    time.sleep(PROBE_GRACE)
    sup._check_probe(time.monotonic())
    assert sup.shell_probe is None and sup.state == "busy"  # the second cell's busy


def test_an_idle_kernel_that_answers_at_once_needs_no_probe(kernel) -> None:  # type: ignore[no-untyped-def]
    km, _ = kernel
    sup, conn = adopter(km, "busy")  # recorded busy, but its cell ended while no one listened
    sup._confirm_iopub(conn, shell_state=True)
    assert sup.state == "idle" and sup.shell_probe is None
