"""Warm kernels: a pool option that keeps N started kernels per kernelspec ready on each worker,
so a launch hands one over instead of starting a process.

At handover the request's env (``KERNEL_*`` and allow-listed names, plus ``KERNEL_ID``) is set in
the kernel's ``os.environ`` and ``KERNEL_WORKING_DIR`` becomes its working directory, by a silent
execute_request. What only applies at process start cannot be handed over: the process's own
environment as other programs see it (``/proc/<pid>/environ``), the kernelspec's argv, and
resources (``gpus``, ``cpus``, ``memory``): so only ``local`` pools offer warm kernels.
A restart starts a fresh process with the request's env, like any other kernel.

Warm kernels count against the worker's slots: the set refills only while kernels plus warm
ones are fewer than the slots. They are recorded under the worker's name in the registry, so a
worker's next life stops those a crash left behind.
"""
from __future__ import annotations

import json
import logging
import threading
import time
import uuid

from .errors import LaunchRejected
from .hosting import WorkerHost
from .kernel_socket import KernelSocket
from .protocol import KernelHandle, LaunchRequest

log = logging.getLogger(__name__)


def handover_code(env: dict[str, str], working_dir: str) -> str:
    """The code a warm kernel runs when it becomes a client's kernel (pure, tested)."""
    return ("import os as _pg_os\n"
            f"_pg_os.environ.update({json.dumps(env)})\n"
            f"if _pg_os.path.isdir({json.dumps(working_dir)}): _pg_os.chdir({json.dumps(working_dir)})\n"
            "del _pg_os\n") if working_dir else (
            "import os as _pg_os\n"
            f"_pg_os.environ.update({json.dumps(env)})\n"
            "del _pg_os\n")


def hand_over(handle: KernelHandle, req: LaunchRequest, timeout: float = 10.0) -> None:
    """Make a warm kernel the request's kernel: its env and working directory."""
    conn = handle.connection
    assert conn is not None
    with KernelSocket(conn) as sock:
        env = {**req.env, "KERNEL_ID": req.kernel_id}
        sock.send("execute_request", {"code": handover_code(env, req.working_dir),
                                      "silent": True, "store_history": False,
                                      "user_expressions": {}, "allow_stdin": False,
                                      "stop_on_error": True})
        if not sock.answered(timeout):
            raise LaunchRejected("the warm kernel did not answer its handover")
        if json.loads(sock.recv()[3]).get("status") != "ok":
            raise LaunchRejected("the warm kernel refused its handover")


class WarmSet:
    """The warm kernels of one worker process, refilled by a background thread."""

    def __init__(self, runtime: WorkerHost) -> None:
        self.rt = runtime
        self.ready: dict[str, list[KernelHandle]] = {}
        self._lock = threading.Lock()
        self._wake = threading.Event()
        self.wanted = {(pool, spec): n for pool in runtime.pools
                       for spec, n in runtime.config.pools[pool].warm.items() if n > 0}

    def count(self) -> int:
        return sum(self.counts().values())

    def counts(self) -> dict[str, int]:
        """Ready warm kernels by "<pool>/<kernelspec>" (in the worker's heartbeat)."""
        with self._lock:
            return {key: len(v) for key, v in self.ready.items()}

    def take(self, pool: str, spec: str) -> KernelHandle | None:
        with self._lock:
            handles = self.ready.get(f"{pool}/{spec}") or []
            handle = handles.pop(0) if handles else None
        if handle is not None:
            self.rt.registry.forget_warm(self.rt.name, handle.kernel_id)
            self._wake.set()
            self.rt.beat()  # /api/pools shows the warm set as it is
        return handle

    def start(self) -> None:
        if self.wanted:
            threading.Thread(target=self._fill, name="poolgate-warm", daemon=True).start()

    def _fill(self) -> None:
        while not self.rt.shutting_down.is_set():
            for (pool, spec), n in self.wanted.items():
                key = f"{pool}/{spec}"
                with self._lock:
                    have = len(self.ready.get(key, []))
                if have < n and self.rt.used + self.count() < self.rt.slots:
                    self._start_one(pool, spec, key)
            self._wake.wait(1.0)
            self._wake.clear()
        self.stop_all()

    def _start_one(self, pool: str, spec_name: str, key: str) -> None:
        spec = self.rt.config.kernelspecs[spec_name]
        req = LaunchRequest(kernel_id=f"warm-{uuid.uuid4()}", pool=pool, spec_name=spec_name,
                            argv=spec.argv, spec_env=dict(spec.env), launch_timeout=60,
                            resources={"resource_dir": spec.resource_dir},
                            interrupt_mode=spec.interrupt_mode)
        handle = None
        try:
            for handle in self.rt.launcher(pool).launch(req):
                self.rt.registry.record_warm(self.rt.name, handle.kernel_id, handle.to_dict())
        except Exception:
            log.warning("Pool %s: could not start a warm %s kernel", pool, spec_name, exc_info=True)
            if handle is not None:
                self.rt.launcher(pool).stop(handle, grace=0)
                self.rt.registry.forget_warm(self.rt.name, handle.kernel_id)
            time.sleep(5)
            return
        assert handle is not None
        with self._lock:
            if not self.rt.shutting_down.is_set():
                self.ready.setdefault(key, []).append(handle)
                handle = None
        if handle is not None:  # the worker began to shut down meanwhile
            self.rt.launcher(pool).stop(handle, grace=0)
            self.rt.registry.forget_warm(self.rt.name, handle.kernel_id)
            return
        log.info("Pool %s: a warm %s kernel is ready", pool, spec_name)
        self.rt.beat()

    def stop_all(self) -> None:
        with self._lock:
            handles = [h for hs in self.ready.values() for h in hs]
            self.ready.clear()
        for h in handles:
            try:
                self.rt.launcher(h.pool).stop(h, grace=0)
            finally:
                self.rt.registry.forget_warm(self.rt.name, h.kernel_id)


def reap_warm(runtime: WorkerHost) -> int:
    """Stop warm kernels an earlier life of this worker left behind."""
    left = runtime.registry.warm_of(runtime.name)
    for kid, data in left.items():
        handle = KernelHandle.from_dict(data)
        if handle.pool in runtime.config.pools:
            try:
                runtime.launcher(handle.pool).stop(handle, grace=0)
            except Exception:
                log.exception("Could not stop the leftover warm kernel %s", kid)
        runtime.registry.forget_warm(runtime.name, kid)
    return len(left)
