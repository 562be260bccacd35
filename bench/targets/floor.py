"""floor: the same work with jupyter_client directly, no gateway in between."""

from __future__ import annotations

import importlib.metadata
import uuid
from typing import Any

import zmq.asyncio
from jupyter_client.manager import AsyncKernelManager

from bench.client import KernelConnection, ZmqTransport
from bench.procs import track_pid
from bench.targets.base import KernelRef, Target


class FloorTarget(Target):
    """AsyncKernelManager + AsyncKernelClient in the bench process, one shared ZMQ context."""

    name = "floor"

    async def start(self) -> None:
        self.zmq_context = zmq.asyncio.Context()

    async def stop(self) -> None:
        self.zmq_context.destroy(linger=0)

    async def describe(self) -> dict[str, Any]:
        return {name: importlib.metadata.version(name)
                for name in ("jupyter_client", "ipykernel", "pyzmq")}

    async def start_kernel(self) -> KernelRef:
        km = AsyncKernelManager(kernel_name=self.ctx.kernel_name, context=self.zmq_context)
        ref = KernelRef(uuid.uuid4().hex, km)
        self.kernels[ref.kernel_id] = ref
        # Kernel output goes to a log, as a gateway's kernels' output goes to its log.
        with open(self.ctx.workdir / "floor-kernels.log", "ab") as log:
            await km.start_kernel(stdout=log, stderr=log)
        pid = getattr(getattr(km.provisioner, "process", None), "pid", None)
        if pid is not None:
            track_pid(int(pid))
        return ref

    async def connect(self, ref: KernelRef) -> KernelConnection:
        km: AsyncKernelManager = ref.handle
        kc = km.client(context=self.zmq_context)
        kc.start_channels(shell=True, iopub=True, stdin=False, hb=False, control=False)
        return KernelConnection(ZmqTransport(kc))

    async def kernel_alive(self, ref: KernelRef) -> bool:
        km: AsyncKernelManager = ref.handle
        return bool(await km.is_alive())

    async def shutdown_kernel(self, ref: KernelRef) -> None:
        km: AsyncKernelManager = ref.handle
        if km.has_kernel:
            # jupyter_client sends its shutdown request on a blocking DEALER socket, which waits
            # forever for a kernel that never bound its ports (a floor start that failed in the
            # 100-at-once round hung a whole run there): such a kernel is killed, not asked.
            asked = await km.is_alive()
            if asked:
                km._connect_control_socket()
                km._control_socket.sndtimeo = 5000
            try:
                await km.shutdown_kernel(now=not asked)
            except zmq.Again:
                await km.shutdown_kernel(now=True)
        self.kernels.pop(ref.kernel_id, None)
