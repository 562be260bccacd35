"""The scale bench's cheap kernels (bench/cheap/) through a real gateway and worker: a pool whose
launcher is named by import path asks one host process for kernels instead of forking them, and
each kernel answers like ipykernel (signed replies, busy/idle, stream output, shutdown)."""
from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import psutil
import pytest

from tests.cheap import start_cheap_stack
from tests.conftest import STACKS, Stack


@pytest.fixture
def cheap_stack(tmp_path: Path) -> Iterator[Stack]:
    stack = start_cheap_stack(tmp_path)
    STACKS.append(stack)
    yield stack
    stack.stop()
    STACKS.remove(stack)


def hosts_of(stack: Stack) -> list[psutil.Process]:
    worker = psutil.Process(stack.workers["cheap"].pid)
    return [p for p in worker.children(recursive=True) if "bench.cheap.host" in " ".join(p.cmdline())]


def test_kernels_of_one_host_process_answer_execute_through_the_gateway(cheap_stack: Stack) -> None:
    gw = cheap_stack.gw
    kids = [gw.start("cheap")["id"] for _ in range(3)]
    assert len(hosts_of(cheap_stack)) == 1  # three kernels, no process of their own
    for n, kid in enumerate(kids):
        ch = gw.channel(kid)
        first, second = ch.execute(f"a{n}"), ch.execute(f"b{n}")
        assert (first.status, first.stdout, first.idle) == ("ok", f"a{n}\n", True)
        assert (second.reply["execution_count"], second.stdout) == (2, f"b{n}\n")
        ch.send("kernel_info_request", {})
        info = ch.recv()
        while info["msg_type"] != "kernel_info_reply":
            info = ch.recv()
        assert info["content"]["implementation"] == "poolgate-cheap"
        ch.close()
    gw.shutdown(kids[0])
    assert [k["id"] for k in cheap_stack.live_kernels()] == kids[1:]
    for kid in kids[1:]:
        assert gw.post(f"/api/kernels/{kid}/interrupt").status_code == 204
        gw.shutdown(kid)
    assert cheap_stack.live_kernels() == []

