"""nbclient runs a notebook on a poolgate kernel through Jupyter Server's own gateway client,
``GatewayKernelManager`` (what papermill and Jupyter Server extensions use), in this process.

One workaround, needed with every current release: jupyter_client's
``KernelClient.wait_for_ready()`` asks its parent manager ``_async_is_alive()``, which
``GatewayKernelManager`` does not override, so jupyter_client's own version runs and fails an
assertion (there is no local kernel process) before anything reaches a gateway. The test
patches ``GatewayKernelManager._async_is_alive`` to await the manager's own ``is_alive()``,
which asks the gateway. Everything else is the released code unchanged; in particular
``GatewayKernelClient`` sends its messages as JSON with no ``channel`` key (the queue it is
sent from is the channel), which a gateway must read as the shell channel.
"""
from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import nbformat
import pytest
from jupyter_server.gateway.gateway_client import GatewayClient
from jupyter_server.gateway.managers import GatewayKernelManager
from nbclient import NotebookClient

from tests.conftest import Stack

CELLS = [
    "import os, sys\nprint('hello from', os.environ['KERNEL_ID'])\n"
    "print('to stderr', file=sys.stderr)",
    "from IPython.display import HTML, Markdown, display\n"
    "display(HTML('<b id=\"pg\">bold</b>'))\n"
    "display(Markdown('*poolgate*'))\n"
    "6 * 7",
    "raise ValueError('expected failure')",
    "print('after the error')",
]


@pytest.fixture
def gateway_client(redis_stack: Stack, monkeypatch: pytest.MonkeyPatch) -> Iterator[GatewayClient]:
    async def _async_is_alive(self: GatewayKernelManager) -> bool:
        return bool(await self.is_alive())

    # the workaround the module docstring explains
    monkeypatch.setattr(GatewayKernelManager, "_async_is_alive", _async_is_alive, raising=False)
    GatewayClient.clear_instance()
    client = GatewayClient.instance(url=redis_stack.url, request_timeout=60.0)
    assert client.gateway_enabled
    try:
        yield client
    finally:
        GatewayClient.clear_instance()


def outputs(cell: Any) -> list[dict[str, Any]]:
    return [dict(o) for o in cell["outputs"]]


def test_nbclient_runs_a_notebook_through_gateway_kernel_manager(
        gateway_client: GatewayClient, redis_stack: Stack) -> None:
    nb = nbformat.v4.new_notebook()
    nb.cells = [nbformat.v4.new_code_cell(src) for src in CELLS]
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3",
                                 "language": "python"}
    seen: dict[str, str] = {}

    def on_kernel(**kw: Any) -> None:  # the kernel nbclient started, to check it is gone after
        assert client.km is not None
        seen["id"] = client.km.kernel_id

    client = NotebookClient(nb, kernel_manager_class=GatewayKernelManager, kernel_name="python3",
                            timeout=30, startup_timeout=30, allow_errors=True,
                            on_notebook_start=on_kernel)
    client.execute()
    kid = seen["id"]

    first, rich, error, after = nb.cells
    streams = {o["name"]: o["text"] for o in outputs(first) if o["output_type"] == "stream"}
    assert streams["stdout"] == f"hello from {kid}\n", outputs(first)
    assert streams["stderr"] == "to stderr\n", outputs(first)

    kinds = [o["output_type"] for o in outputs(rich)]
    assert kinds == ["display_data", "display_data", "execute_result"], outputs(rich)
    assert rich["outputs"][0]["data"]["text/html"] == '<b id="pg">bold</b>'
    assert rich["outputs"][1]["data"]["text/markdown"] == "*poolgate*"
    assert rich["outputs"][2]["data"]["text/plain"] == "42"
    assert rich["execution_count"] == 2

    (err,) = outputs(error)
    assert err["output_type"] == "error" and err["ename"] == "ValueError", err
    assert err["evalue"] == "expected failure"

    # One line on stdout. The kernel may send it as two stream messages (print writes the
    # text, then the newline, and its flush timer can fire between them on a loaded machine);
    # front ends show consecutive stream outputs as one.
    streams = outputs(after)
    assert {(o["output_type"], o["name"]) for o in streams} == {("stream", "stdout")}, streams
    assert "".join(o["text"] for o in streams) == "after the error\n"
    assert after["execution_count"] == 4

    # nbclient owned the kernel manager, so it shut the kernel down through the gateway
    assert redis_stack.gw.get(f"/api/kernels/{kid}").status_code == 404
