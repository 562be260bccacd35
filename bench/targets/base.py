"""The interface every target implements, and the shared plumbing of gateway targets.

Rule: a target tracks every kernel it started until it has shut it down, so `cleanup()`
can end all of them after a scenario, an error or Ctrl-C.
"""

from __future__ import annotations

import abc
import asyncio
import json
import logging
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import psutil

from bench.client import KernelConnection, WebSocketTransport
from bench.procs import ManagedProcess

log = logging.getLogger(__name__)


class TargetUnavailable(RuntimeError):
    """The target cannot run here (not installed, no Redis, did not become ready)."""


@dataclass
class KernelRef:
    """One started kernel: its id, and for the floor the manager that owns it."""

    kernel_id: str
    handle: Any = None


@dataclass
class RunContext:
    """What targets share within one bench run."""

    workdir: Path  # temp folder: logs, kernelspecs, data dirs
    kernelspec_dir: Path  # a JUPYTER_PATH entry holding kernels/<name>/kernel.json
    kernel_name: str = "python3"
    token: str | None = None
    ready_timeout: float = 120.0
    # extra command-line arguments per process: "eg", "kg", "poolgate",
    # "poolgate-redis:worker", "poolgate-redis:gateway" (from --args NAME=ARGS)
    extra_args: dict[str, list[str]] = field(default_factory=dict)
    ws_compress: bool = False  # WebSocket clients offer permessage-deflate, as browsers do
    venv_root: Path = field(default_factory=lambda: Path(__file__).resolve().parents[1] / ".venvs")


class Target(abc.ABC):
    """Starts, measures and stops one way of running kernels."""

    name: str = "?"

    def __init__(self, ctx: RunContext) -> None:
        self.ctx = ctx
        self.kernels: dict[str, KernelRef] = {}

    async def start(self) -> None:  # noqa: B027 (optional hook)
        """Bring the target up; raise TargetUnavailable with a reason if it cannot."""

    async def stop(self) -> None:  # noqa: B027 (optional hook)
        """End the target and everything it started."""

    @abc.abstractmethod
    async def start_kernel(self) -> KernelRef:
        """Ask for a kernel; returns once the target answered (not yet kernel_info)."""

    @abc.abstractmethod
    async def connect(self, ref: KernelRef) -> KernelConnection:
        """Open the client connection to a started kernel."""

    def ws_url(self, ref: KernelRef, session_id: str) -> tuple[str, dict[str, str]] | None:
        """The kernel's WebSocket URL and request headers, for a second client library;
        None for a target without a WebSocket (the floor)."""
        return None

    @abc.abstractmethod
    async def shutdown_kernel(self, ref: KernelRef) -> None:
        """Shut the kernel down and forget it."""

    async def kernel_model(self, ref: KernelRef) -> dict[str, Any] | None:
        """The REST kernel model, where the target has one."""
        return None

    async def describe(self) -> dict[str, Any]:
        """Versions and settings worth keeping with the results (JSON only)."""
        return {}

    async def kernel_alive(self, ref: KernelRef) -> bool:
        """False once the target knows the kernel died (the floor does; gateways say so
        by failing or closing the WebSocket)."""
        return True

    def server_processes(self) -> list[ManagedProcess] | None:
        """The processes whose memory counts as the gateway's; None where not applicable."""
        return None

    def is_gateway_process(self, proc: psutil.Process) -> bool:
        """Of server_processes' trees, the gateway proper (the process holding the
        WebSockets); by default every process that is not a kernel."""
        return True

    # Scenarios this target runs (None: all); the others are reported n/a.
    scenarios: tuple[str, ...] | None = None

    async def before_start(self) -> None:  # noqa: B027 (optional hook)
        """Called before each measured sequential start (not timed)."""

    async def cleanup(self, timeout: float = 120.0) -> None:
        """Shut down every kernel still tracked, in parallel; never raises."""
        refs = list(self.kernels.values())
        if not refs:
            return
        try:
            async with asyncio.timeout(timeout):
                results = await asyncio.gather(*(self.shutdown_kernel(r) for r in refs),
                                               return_exceptions=True)
        except TimeoutError:
            log.warning("%s: cleanup of %d kernels timed out", self.name, len(refs))
            return
        for ref, res in zip(refs, results, strict=True):
            if isinstance(res, BaseException):
                log.warning("%s: shutting down %s failed: %r", self.name, ref.kernel_id, res)


class GatewayTarget(Target):
    """A target that speaks the Kernel Gateway REST + WebSocket API on 127.0.0.1:port."""

    def __init__(self, ctx: RunContext) -> None:
        super().__init__(ctx)
        self.port = 0
        self.http: aiohttp.ClientSession | None = None
        self.procs: list[ManagedProcess] = []

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def _headers(self) -> dict[str, str]:
        return {"Authorization": f"token {self.ctx.token}"} if self.ctx.token else {}

    async def open_http(self) -> aiohttp.ClientSession:
        if self.http is None:
            # limit=0: 100 open WebSockets must not starve the REST calls of connections
            self.http = aiohttp.ClientSession(
                connector=aiohttp.TCPConnector(limit=0), headers=self._headers(),
                timeout=aiohttp.ClientTimeout(total=None, sock_connect=30))
        return self.http

    async def api_ready(self) -> bool:
        """True once GET /api answers 200."""
        http = await self.open_http()
        try:
            async with http.get(f"{self.base_url}/api",
                                timeout=aiohttp.ClientTimeout(total=3)) as resp:
                return resp.status == 200
        except (aiohttp.ClientError, TimeoutError):
            return False

    async def wait_ready(self, extra_check: Any = None) -> None:
        """Wait until /api answers (and `extra_check()` is true), or raise TargetUnavailable."""
        deadline = time.monotonic() + self.ctx.ready_timeout
        while time.monotonic() < deadline:
            for proc in self.procs:
                if proc.exited() is not None:
                    raise TargetUnavailable(
                        f"{proc.name} exited with {proc.exited()}:\n{proc.log_tail()}")
            if await self.api_ready() and (extra_check is None or extra_check()):
                return
            await asyncio.sleep(0.2)
        tails = "\n".join(f"--- {p.name}\n{p.log_tail()}" for p in self.procs)
        raise TargetUnavailable(f"not ready after {self.ctx.ready_timeout:.0f}s\n{tails}")

    async def describe(self) -> dict[str, Any]:
        http = await self.open_http()
        async with http.get(f"{self.base_url}/api") as resp:
            api: dict[str, Any] = await resp.json(content_type=None)
        return {"api": api, "argv": {p.name: p.argv for p in self.procs}}

    async def stop(self) -> None:
        if self.http is not None:
            await self.http.close()
            self.http = None
        for proc in reversed(self.procs):
            await asyncio.to_thread(proc.stop)

    def server_processes(self) -> list[ManagedProcess] | None:
        return self.procs

    def start_body(self) -> dict[str, Any]:
        """The POST /api/kernels body. KERNEL_USERNAME as Jupyter's gateway client sends it
        (EG refuses kernels for its unauthorized_users, which include root, without it)."""
        return {"name": self.ctx.kernel_name, "env": {"KERNEL_USERNAME": "bench"}}

    async def start_kernel(self) -> KernelRef:
        http = await self.open_http()
        async with http.post(f"{self.base_url}/api/kernels",
                             json=self.start_body()) as resp:
            body = await resp.text()
            if resp.status not in (200, 201):
                raise RuntimeError(f"POST /api/kernels: {resp.status} {body[:300]}")
        model = json.loads(body)
        ref = KernelRef(str(model["id"]))
        self.kernels[ref.kernel_id] = ref
        self.started(model)
        return ref

    def started(self, model: dict[str, Any]) -> None:  # noqa: B027 (optional hook)
        """Called with the model the start answered, before the start is timed as ready."""

    def channels_url(self, ref: KernelRef, session_id: str) -> str:
        return (f"ws://127.0.0.1:{self.port}/api/kernels/{ref.kernel_id}/channels"
                f"?session_id={session_id}")

    def ws_url(self, ref: KernelRef, session_id: str) -> tuple[str, dict[str, str]] | None:
        return self.channels_url(ref, session_id), self._headers()

    async def connect(self, ref: KernelRef) -> KernelConnection:
        http = await self.open_http()
        session_id = uuid.uuid4().hex
        url = self.channels_url(ref, session_id)
        ws = await http.ws_connect(url, max_msg_size=0, autoping=True, heartbeat=None,
                                   compress=15 if self.ctx.ws_compress else 0)
        return KernelConnection(WebSocketTransport(ws, session_id))

    async def shutdown_kernel(self, ref: KernelRef) -> None:
        http = await self.open_http()
        async with http.delete(f"{self.base_url}/api/kernels/{ref.kernel_id}") as resp:
            if resp.status not in (200, 204, 404):
                raise RuntimeError(f"DELETE kernel: {resp.status} {await resp.text()}")
        self.kernels.pop(ref.kernel_id, None)

    async def kernel_model(self, ref: KernelRef) -> dict[str, Any] | None:
        http = await self.open_http()
        async with http.get(f"{self.base_url}/api/kernels/{ref.kernel_id}") as resp:
            if resp.status != 200:
                return None
            model: dict[str, Any] = await resp.json()
            return model
