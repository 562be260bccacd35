"""A launcher that asks a kernel-host process (bench/cheap/host.py) for a new kernel instead of
forking one: for scale runs, never for the default config.

A pool names it by import path (``launcher: bench.cheap.launcher:CheapLauncher``); the worker
must be able to import ``bench`` (run it from the repository root or with it on PYTHONPATH).
Each worker starts its own host process in prepare() and ends it in close(); a handle carries
its host's control endpoint, so any worker can stop a kernel another worker launched.
"""
from __future__ import annotations

import json
import os
import secrets
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import zmq

from poolgate.workers.errors import LaunchRejected
from poolgate.workers.launchers.base import Launcher, without_worker_secrets
from poolgate.workers.protocol import ConnectionInfo, KernelHandle, LaunchRequest

ROOT = str(Path(__file__).resolve().parents[2])  # the folder that holds bench/
LIVE_EVERY = 1.0  # seconds between two reads of the host's live kernels (poll() is per kernel)


@dataclass(frozen=True)
class CheapOptions:
    """Options of a pool whose launcher is CheapLauncher."""

    ip: str = "127.0.0.1"     # where the host's kernels bind
    timeout: float = 10.0     # seconds to wait for the host's answer


def ask(endpoint: str, request: dict[str, Any], timeout: float) -> dict[str, Any]:
    """One request to a kernel host; LaunchRejected if it does not answer in time."""
    sock = zmq.Context.instance().socket(zmq.REQ)
    sock.linger = 0
    try:
        sock.connect(endpoint)
        sock.send(json.dumps(request).encode())
        if not sock.poll(int(timeout * 1000)):
            raise LaunchRejected(f"the cheap kernel host at {endpoint} did not answer")
        answer: dict[str, Any] = json.loads(sock.recv())
        return answer
    finally:
        sock.close()


class CheapLauncher(Launcher):
    """Kernels hosted by one bench/cheap/host.py process per worker."""

    Options = CheapOptions

    def __init__(self, pool, options, runtime_dir):  # type: ignore[no-untyped-def]
        super().__init__(pool, options, runtime_dir)
        # in the temp folder, not runtime_dir: an ipc path must fit in 107 bytes
        self.control = f"ipc://{tempfile.gettempdir()}/pg-cheap-{os.getpid()}-{secrets.token_hex(4)}"
        self.proc: subprocess.Popen[bytes] | None = None
        self._lock = threading.Lock()
        self._live: set[str] = set()
        self._live_at = 0.0

    @classmethod
    def runs_here(cls, options: Any) -> str | None:
        return None

    def prepare(self) -> None:
        env = without_worker_secrets(dict(os.environ))
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [ROOT, env.get("PYTHONPATH", "")]))
        log = open(Path(self.runtime_dir) / "cheap-host.log", "ab")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "bench.cheap.host", "--control", self.control,
             "--ip", self.options.ip], env=env, stdout=log, stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL, start_new_session=True)
        ask(self.control, {"op": "ping"}, 30.0)

    def close(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(10)
        Path(self.control[len("ipc://"):]).unlink(missing_ok=True)

    def launch(self, req: LaunchRequest,
               previous: KernelHandle | None = None) -> Iterator[KernelHandle]:
        if self.proc is None or self.proc.poll() is not None:
            raise LaunchRejected("the cheap kernel host is not running")
        key = previous.connection.key if previous and previous.connection else secrets.token_hex(16)
        answer = ask(self.control, {"op": "start", "id": req.kernel_id, "key": key},
                     self.options.timeout)
        if not answer.get("ok"):
            raise LaunchRejected(f"the cheap kernel host refused: {answer.get('error')}")
        conn = ConnectionInfo(ip=self.options.ip, key=key, **answer["ports"])
        with self._lock:
            self._live.add(req.kernel_id)
        yield KernelHandle(req.kernel_id, self.pool.name, self.options.ip, conn,
                           {"control": self.control})

    def poll(self, handle: KernelHandle) -> str | None:
        control = handle.data.get("control", "")
        if control != self.control:  # launched by another worker: ask its host
            try:
                ids = ask(control, {"op": "live"}, self.options.timeout).get("ids", [])
            except LaunchRejected:
                return "its kernel host is gone"
            return None if handle.kernel_id in ids else "ended"
        if self.proc is None or self.proc.poll() is not None:
            return "the kernel host exited"
        with self._lock:
            if time.monotonic() - self._live_at >= LIVE_EVERY:
                self._live = set(ask(self.control, {"op": "live"}, self.options.timeout)["ids"])
                self._live_at = time.monotonic()
            return None if handle.kernel_id in self._live else "ended"

    def send_signal(self, handle: KernelHandle, signum: int) -> None:
        """Nothing to do: the kernels run no code, so there is nothing to interrupt."""

    def stop(self, handle: KernelHandle, grace: float = 5.0) -> None:
        try:
            ask(handle.data.get("control", self.control), {"op": "stop", "id": handle.kernel_id},
                max(1.0, grace))
        except LaunchRejected:
            pass  # its host is gone, and its kernels with it
        with self._lock:
            self._live.discard(handle.kernel_id)
