"""gpu: local kernels, each handed its own GPUs through CUDA_VISIBLE_DEVICES.

The rule of this launcher: a worker hands out only the GPUs it discovered (workers/gpus.py), a
GPU to one kernel at a time (to ``kernels_per_gpu`` kernels when the pool says ``share: true``),
and frees a kernel's GPUs only once its processes are gone. A worker takes launches only while it
can serve the largest one the pool admits: its slots are its GPU capacity divided by
``max_gpus_per_kernel`` (:func:`slots_for`), so a launch that must wait for a GPU waits in the
pool's queue, in order, where any worker of the pool can take it. A worker given more slots than
that (``--slots``) makes the extra launches wait inside it, first come first served, until their
launch timeout.
"""
from __future__ import annotations

import logging
import os
import time
from collections.abc import Generator, Iterator
from typing import TYPE_CHECKING, Any

from ..errors import LaunchRejected, LaunchTimeout
from ..gpus import GPU, Discovery, GPUAllocator, discover
from ..protocol import KernelHandle, LaunchRequest
from ..resources import Confinement
from .gpu_builders import GPUOptions, build_gpu_env, per_gpu, slots_for, wanted_gpus
from .local import LocalLauncher

if TYPE_CHECKING:
    from ..config import PoolConfig

log = logging.getLogger(__name__)


def _found(options: GPUOptions) -> Discovery:
    return discover(options.discover, options.gpus, os.environ)


class GPULauncher(LocalLauncher):
    """Hosts kernels on this machine, each with the GPUs it asked for."""

    Options = GPUOptions

    options: GPUOptions

    def __init__(self, pool: PoolConfig, options: GPUOptions, runtime_dir: str) -> None:
        super().__init__(pool, options, runtime_dir)  # type: ignore[no-untyped-call]
        self.found = _found(options)
        self.gpus = GPUAllocator(self.found.gpus, per_gpu(options))
        self._launching: set[str] = set()
        log.info("Pool %s: %s", pool.name, self.found.describe())

    @classmethod
    def runs_here(cls, options: Any) -> str | None:
        found = _found(options)
        if not found.gpus:
            return f"this machine has {found.describe()}"
        if options.max_gpus_per_kernel > len(found.gpus):
            return (f"this machine has {found.describe()}, fewer than the "
                    f"{options.max_gpus_per_kernel} one kernel may ask for (max_gpus_per_kernel)")
        return None

    @classmethod
    def default_slots(cls, options: Any) -> int:
        found = _found(options)
        return slots_for(len(found.gpus), per_gpu(options), options.max_gpus_per_kernel)

    def launch(self, req: LaunchRequest,
               previous: KernelHandle | None = None) -> Iterator[KernelHandle]:
        deadline = time.monotonic() + req.launch_timeout
        count = wanted_gpus(req.resources, self.options)
        prefer = tuple(previous.data.get("gpus") or ()) if previous is not None else ()
        got = yield from self._acquire(req, count, prefer, deadline)
        log.info("Kernel %s gets GPUs %s on pool %s", req.kernel_id,
                 ", ".join(g.label() for g in got) or "none", self.pool.name)
        kid = req.kernel_id
        self._launching.add(kid)  # the local launcher's own retries stop processes, not GPUs
        yielded = False
        try:
            for handle in super().launch(req, previous):
                yielded = True
                yield handle
        finally:
            self._launching.discard(kid)
            if not yielded:  # no process holds them, and no stop() will come for one
                self.gpus.release(kid)

    def _acquire(self, req: LaunchRequest, count: int, prefer: tuple[str, ...],
                 deadline: float) -> Generator[KernelHandle, None, tuple[GPU, ...]]:
        """The kernel's GPUs; while none are free, yield a handle now and then (so a shutdown
        reaches the supervisor) and keep the kernel's place in line."""
        kid = req.kernel_id
        if count > len(self.gpus.gpus):
            raise LaunchRejected(f"the kernel asks for {count} GPUs; this worker has "
                                 f"{len(self.gpus.gpus)} ({self.found.describe()})")
        try:
            got = self.gpus.acquire(kid, count, prefer)
            if got is None:
                log.info("Kernel %s waits for %d GPUs on pool %s (held: %s)", kid, count,
                         self.pool.name, self.gpus.holders())
            while got is None:
                left = deadline - time.monotonic()
                if left <= 0:
                    raise LaunchTimeout(f"no {count} free GPUs on this worker within the launch "
                                        f"timeout; held: {self.gpus.holders()}")
                yield KernelHandle(kid, req.pool, data={"waiting_for_gpus": count})
                got = self.gpus.acquire(kid, count, prefer, timeout=min(1.0, left))
        except BaseException:
            self.gpus.cancel(kid)
            raise
        return got

    def confine(self, req: LaunchRequest, env: dict[str, str]) -> Confinement:
        gpus = self.gpus.held(req.kernel_id)
        env.update(build_gpu_env(gpus, self.found.source))
        held = super().confine(req, env)
        return Confinement(held.prefix, {**held.data, "gpus": [g.id for g in gpus]})

    def stop(self, handle: KernelHandle, grace: float = 5.0) -> None:
        super().stop(handle, grace)
        if handle.kernel_id not in self._launching:
            freed = self.gpus.release(handle.kernel_id)
            if freed:
                log.info("Kernel %s: GPUs %s are free again", handle.kernel_id, ", ".join(freed))
