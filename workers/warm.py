"""Warm kernels: a pool option that keeps N started kernels per kernelspec ready on each worker,
so a launch hands one over instead of starting a process (``local``, ``ssh``, ``docker``,
``docker-swarm`` and ``kubernetes`` pools, config.WARM_LAUNCHERS; on ssh they are placed on the
pool's hosts as any kernel is, and each holds a place there; a container, service or pod keeps its
warm id label, which stop() finds in the handle's ``data.labelled``).

At handover the request's env (``KERNEL_*`` and allow-listed names, plus ``KERNEL_ID``) is set in
the kernel's ``os.environ`` and ``KERNEL_WORKING_DIR`` becomes its working directory, by a silent
execute_request. What only applies at process start cannot be handed over: the process's own
environment as other programs see it (``/proc/<pid>/environ``), the kernelspec's argv, resources
(``cpus``, ``memory``, ``gpus``, an image), the host and the remote user. A request whose
resources differ from the warm kernel's, or that its launcher says the warm kernel cannot serve
(``Launcher.warm_fits``: another ssh user, image, namespace), starts cold, and its timing says why
(``timing.warm: false``, ``timing.cold_because``). A restart starts a fresh process with the
request's env, like any other kernel.

Warm kernels count against the worker's slots: the set refills only while kernels plus warm
ones are fewer than the slots, and a cold launch that finds the worker full stops a warm kernel to
take its slot (and, on ssh, its host place). They are recorded under the worker's name in the
registry, so a worker's next life stops those a crash left behind. Each one's memory (its RSS,
as the kernel reads it from /proc/self/statm once it is ready) goes in the worker's heartbeat,
for ``GET /api/pools``.
"""
from __future__ import annotations

import json
import logging
import threading
import time
import uuid
from dataclasses import dataclass, field
from typing import Any

from . import resources
from .errors import LaunchRejected
from .hosting import WorkerHost
from .kernel_socket import KernelSocket
from .launchers.base import Launcher
from .protocol import KernelHandle, LaunchRequest

log = logging.getLogger(__name__)
CHECK_EVERY = 15.0  # seconds between liveness polls of the ready warm kernels

#: What a warm kernel evaluates to report its own resident memory (Linux; None elsewhere).
RSS_EXPRESSION = ("__import__('os').sysconf('SC_PAGE_SIZE') * "
                  "int(open('/proc/self/statm').read().split()[1])")


def handover_code(env: dict[str, str], working_dir: str) -> str:
    """The code a warm kernel runs when it becomes a client's kernel (pure, tested)."""
    return ("import os as _pg_os\n"
            f"_pg_os.environ.update({json.dumps(env)})\n"
            f"if _pg_os.path.isdir({json.dumps(working_dir)}): _pg_os.chdir({json.dumps(working_dir)})\n"
            "del _pg_os\n") if working_dir else (
            "import os as _pg_os\n"
            f"_pg_os.environ.update({json.dumps(env)})\n"
            "del _pg_os\n")


def resources_differ(started_for: LaunchRequest, req: LaunchRequest) -> str:
    """Why a kernel started for ``started_for`` cannot serve ``req``'s resources; '' if it can
    (pure, tested)."""
    def asked(r: LaunchRequest) -> dict[str, Any]:  # an image is the launcher's (warm_fits)
        return {k: v for k, v in r.resources.items() if k not in ("resource_dir", "image")}
    if asked(started_for) == asked(req):
        return ""
    return (f"the request asks for resources {asked(req) or 'none'}; the warm kernels were "
            f"started with {asked(started_for) or 'none'} (resources apply at process start)")


def _execute(handle: KernelHandle, content: dict[str, object], timeout: float) -> dict[str, Any]:
    """One silent execute_request on the kernel's shell; its reply's content."""
    conn = handle.connection
    assert conn is not None
    with KernelSocket(conn) as sock:
        sock.send("execute_request", {"silent": True, "store_history": False,
                                      "user_expressions": {}, "allow_stdin": False,
                                      "stop_on_error": True, **content})
        if not sock.answered(timeout):
            raise LaunchRejected("the warm kernel did not answer")
        reply: dict[str, Any] = json.loads(sock.recv()[3])
        return reply


def kernel_rss(handle: KernelHandle, timeout: float = 5.0) -> int | None:
    """The kernel process's resident memory in bytes, as it reads it itself; None if it cannot
    say (not Linux, a kernel without user_expressions, no answer)."""
    try:
        reply = _execute(handle, {"code": "", "user_expressions": {"rss": RSS_EXPRESSION}},
                         timeout)
        text = reply["user_expressions"]["rss"]["data"]["text/plain"]
        return int(text)
    except Exception:
        log.debug("Warm kernel %s: RSS not readable", handle.kernel_id, exc_info=True)
        return None


def hand_over(launcher: Launcher, handle: KernelHandle, req: LaunchRequest,
              timeout: float = 10.0) -> tuple[KernelHandle | None, dict[str, Any]]:
    """Make a warm kernel the request's kernel (its env and working directory). Returns the
    handle and the launch timing's note; if the kernel fails it, stops it and returns None (the
    supervisor then starts the kernel cold) with the reason."""
    env = {**req.env, "KERNEL_ID": req.kernel_id}
    try:
        reply = _execute(handle, {"code": handover_code(env, req.working_dir)}, timeout)
        if reply.get("status") != "ok":
            raise LaunchRejected(f"it answered {reply.get('status')!r}")
    except Exception as exc:
        why = f"the warm kernel failed its hand-over ({exc})"
        log.warning("Kernel %s: %s; starting it cold", req.kernel_id, why)
        try:
            launcher.stop(handle, grace=0)
        except Exception:
            log.exception("Kernel %s: could not stop the warm kernel that failed", req.kernel_id)
        return None, {"warm": False, "cold_because": why}
    log.info("Kernel %s: a warm kernel on %s was handed over", req.kernel_id,
             handle.host or "this worker")
    return handle, {"warm": True}


@dataclass
class Warm:
    """One ready warm kernel: its handle, what it was started for, its memory."""

    handle: KernelHandle
    started_for: LaunchRequest
    rss: int | None = None
    since: float = field(default_factory=time.time)


class WarmSet:
    """The warm kernels of one worker process, refilled by a background thread."""

    def __init__(self, runtime: WorkerHost) -> None:
        self.rt = runtime
        self.ready: dict[str, list[Warm]] = {}
        self._lock = threading.Lock()
        self._wake = threading.Event()
        self._starting: dict[str, Warm] = {}  # being started now, by warm id
        self._thread: threading.Thread | None = None
        self.wanted = {(pool, spec): n for pool in runtime.pools
                       for spec, n in runtime.config.pools[pool].warm.items() if n > 0}

    def count(self) -> int:
        return sum(self.counts().values())

    def counts(self) -> dict[str, int]:
        """Ready warm kernels by "<pool>/<kernelspec>" (in the worker's heartbeat)."""
        with self._lock:
            return {key: len(v) for key, v in self.ready.items()}

    def rss(self) -> dict[str, int]:
        """Their resident memory in bytes by "<pool>/<kernelspec>", of those that could say."""
        with self._lock:
            return {key: sum(w.rss for w in v if w.rss is not None)
                    for key, v in self.ready.items() if any(w.rss is not None for w in v)}

    def take(self, pool: str, req: LaunchRequest) -> tuple[KernelHandle | None, dict[str, Any]]:
        """A ready warm kernel made ``req``'s (launcher's ``take_over``), or None and why not:
        the note for the launch's timing ({} where the pool keeps no warm kernels of the spec).
        Called by the supervisor after it took its slot; with none to hand over and the worker
        full, a warm kernel gives its slot to this launch."""
        if (pool, req.spec_name) not in self.wanted:
            self._yield_slot(pool)
            return None, {}
        launcher = self.rt.launcher(pool)
        why, found = "no warm kernel was ready", None
        with self._lock:
            ready = self.ready.get(f"{pool}/{req.spec_name}") or []
            for i, w in enumerate(ready):
                why = resources_differ(w.started_for, req) or \
                    launcher.warm_fits(w.handle, w.started_for, req)
                if not why:
                    found = ready.pop(i)
                    break
        if found is None:
            self._yield_slot(pool)
            return None, {"warm": False, "cold_because": why}
        self._wake.set()
        try:
            handle = launcher.take_over(found.handle, req.kernel_id)
        except Exception as exc:
            log.warning("Kernel %s: could not take over warm kernel %s", req.kernel_id,
                        found.handle.kernel_id, exc_info=True)
            self._discard(found)
            return None, {"warm": False, "cold_because": f"the warm kernel could not be taken "
                                                         f"over ({exc})"}
        self.rt.registry.forget_warm(self.rt.name, found.handle.kernel_id)
        self.rt.beat()  # /api/pools shows the warm set as it is
        return handle, {"warm": True}

    def _yield_slot(self, pool: str) -> None:
        """When kernels and warm ones overfill the worker, stop one warm kernel (this pool's
        first): a cold launch must not wait on a slot, or an ssh host place, a warm one holds."""
        with self._lock:
            if self.rt.used + sum(len(v) for v in self.ready.values()) <= self.rt.slots:
                return
            keys = sorted(self.ready, key=lambda k: not k.startswith(pool + "/"))
            victim = next((self.ready[k].pop(0) for k in keys if self.ready[k]), None)
        if victim is not None:
            log.info("Worker %s: a cold launch needs the slot of a warm %s kernel; stopping it",
                     self.rt.name, victim.started_for.spec_name)
            self._discard(victim)
            self.rt.beat()

    def _discard(self, w: Warm) -> None:
        try:
            self.rt.launcher(w.handle.pool).stop(w.handle, grace=0)
        except Exception:
            log.exception("Could not stop warm kernel %s", w.handle.kernel_id)
        finally:
            self.rt.registry.forget_warm(self.rt.name, w.handle.kernel_id)

    def start(self) -> None:
        if self.wanted:
            self._thread = threading.Thread(target=self._fill, name="poolgate-warm", daemon=True)
            self._thread.start()

    def _fill(self) -> None:
        checked = time.monotonic()
        while not self.rt.shutting_down.is_set():
            if time.monotonic() - checked >= CHECK_EVERY:
                self._check()
                checked = time.monotonic()
            for (pool, spec), n in self.wanted.items():
                key = f"{pool}/{spec}"
                with self._lock:
                    have = len(self.ready.get(key, []))
                if have < n and self.rt.used + self.count() < self.rt.slots:
                    self._start_one(pool, spec, key)
            self._wake.wait(1.0)
            self._wake.clear()
        self.stop_all()

    def _check(self) -> None:
        """Drop warm kernels that died (a lost ssh host, a kill): the set refills."""
        with self._lock:
            warms = [w for ws in self.ready.values() for w in ws]
        for w in warms:
            try:
                why = self.rt.launcher(w.handle.pool).poll(w.handle)
            except Exception as exc:
                why = str(exc)
            if why is None:
                continue
            with self._lock:
                ready = self.ready.get(f"{w.handle.pool}/{w.started_for.spec_name}", [])
                if w not in ready:
                    continue  # handed over meanwhile
                ready.remove(w)
            log.warning("Warm kernel %s ended (%s); replacing it", w.handle.kernel_id, why)
            self._discard(w)
            self.rt.beat()

    def request(self, pool: str, spec_name: str) -> LaunchRequest:
        """What a warm kernel is started for: the spec as a request with no env would be."""
        spec = self.rt.config.kernelspecs[spec_name]
        pool_config = self.rt.config.pools[pool]
        asked = resources.admit(pool_config, spec, {})  # as the gateway builds a request's
        return LaunchRequest(kernel_id=f"warm-{uuid.uuid4()}", pool=pool, spec_name=spec_name,
                             argv=spec.argv, spec_env=dict(spec.env),
                             launch_timeout=pool_config.launch_timeout,
                             resources={**spec.resources, **asked,
                                        "resource_dir": spec.resource_dir},
                             interrupt_mode=spec.interrupt_mode)

    def _start_one(self, pool: str, spec_name: str, key: str) -> None:
        req = self.request(pool, spec_name)
        launcher = self.rt.launcher(pool)
        handle = None
        # recorded before it holds anything: an ssh place with no kernel record is kept only
        # while a worker records its warm kernel (workers/placement.py prune)
        self.rt.registry.record_warm(self.rt.name, req.kernel_id,
                                     KernelHandle(req.kernel_id, pool).to_dict())
        try:
            for handle in launcher.launch(req):
                self.rt.registry.record_warm(self.rt.name, handle.kernel_id, handle.to_dict())
                with self._lock:  # stop_all() stops it if the worker stops meanwhile
                    self._starting[req.kernel_id] = Warm(handle, req)
            assert handle is not None and handle.connection is not None
        except Exception:
            with self._lock:
                self._starting.pop(req.kernel_id, None)
            log.warning("Pool %s: could not start a warm %s kernel", pool, spec_name, exc_info=True)
            self._discard(Warm(handle or KernelHandle(req.kernel_id, pool), req))
            self.rt.shutting_down.wait(5)
            return
        warm = Warm(handle, req, rss=kernel_rss(handle))
        with self._lock:
            self._starting.pop(req.kernel_id, None)
            keep = not self.rt.shutting_down.is_set()
            if keep:
                self.ready.setdefault(key, []).append(warm)
        if not keep:  # the worker began to shut down meanwhile
            self._discard(warm)
            return
        log.info("Pool %s: a warm %s kernel is ready on %s (%s)", pool, spec_name,
                 handle.host or "this worker",
                 f"{warm.rss / 2**20:.0f} MiB" if warm.rss is not None else "RSS unknown")
        self.rt.beat()

    def stop_all(self, wait: float = 15.0) -> None:
        """Stop the ready warm kernels and the one being started; called when the worker stops
        (after ``shutting_down`` is set), which waits up to ``wait`` seconds for a start under
        way to end, so that none is left running after the worker."""
        with self._lock:
            warms = [w for ws in self.ready.values() for w in ws]
            warms += self._starting.values()
            self.ready.clear()
            self._starting.clear()
        for w in warms:
            self._discard(w)
        thread = self._thread
        if thread is not None and thread is not threading.current_thread():
            thread.join(wait)  # its start, if one was under way, ends and stops what it made


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
