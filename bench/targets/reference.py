"""eg and kg: Jupyter Enterprise Gateway 3 and Kernel Gateway 3, each from its own venv."""

from __future__ import annotations

import asyncio
import os
from pathlib import Path

from bench.procs import ManagedProcess, free_port
from bench.targets.base import GatewayTarget, TargetUnavailable
from bench.venvs import ensure_venv


def gateway_env(ctx_kernelspec_dir: Path, bin_dir: Path, runtime_dir: Path) -> dict[str, str]:
    """The environment for a gateway process: our kernelspec first, its venv's bin on PATH."""
    env = {k: v for k, v in os.environ.items() if k not in ("VIRTUAL_ENV", "PYTHONPATH")}
    env["JUPYTER_PATH"] = str(ctx_kernelspec_dir)
    env["JUPYTER_RUNTIME_DIR"] = str(runtime_dir)
    env["PATH"] = f"{bin_dir}{os.pathsep}{env.get('PATH', '')}"
    env["PYTHONUNBUFFERED"] = "1"
    return env


class VenvGatewayTarget(GatewayTarget):
    """A gateway started from bench/.venvs/<venv> with `jupyter <subcommand>`."""

    venv = ""
    subcommand = ""

    def extra_args(self) -> list[str]:
        return []

    async def start(self) -> None:
        try:
            bin_dir = await asyncio.to_thread(ensure_venv, self.venv, self.ctx.venv_root)
        except Exception as exc:  # pip or venv failure: report it, don't abort the run
            raise TargetUnavailable(f"cannot build venv {self.venv}: {exc}") from exc
        self.port = free_port()
        workdir = self.ctx.workdir / self.name
        argv = [str(bin_dir / "jupyter"), self.subcommand, "--ip=127.0.0.1",
                f"--port={self.port}", *self.extra_args(), *self.ctx.extra_args.get(self.name, [])]
        env = gateway_env(self.ctx.kernelspec_dir, bin_dir, workdir / "runtime")
        proc = ManagedProcess(self.name, argv, env, workdir / "gateway.log", cwd=workdir)
        workdir.mkdir(parents=True, exist_ok=True)
        self.procs.append(proc)
        proc.start()
        await self.wait_ready()


class EnterpriseGatewayTarget(VenvGatewayTarget):
    """Enterprise Gateway 3, local kernels (LocalProcessProxy), default settings.

    Its jupyter_server 1.x channel handler has no IOPub rate limit unless one is configured.
    """

    name = "eg"
    venv = "eg"
    subcommand = "enterprisegateway"

    def extra_args(self) -> list[str]:
        return ["--EnterpriseGatewayApp.port_retries=0"]


class KernelGatewayTarget(VenvGatewayTarget):
    """Kernel Gateway 3 (jupyter_server 2) with the IOPub rate limit off.

    KG 3 hands its kernels' WebSockets to jupyter_server's ZMQChannelsWebsocketConnection,
    whose limit_rate is on (1 MB/s) by default; KernelGatewayApp has no rate-limit trait.
    """

    name = "kg"
    venv = "kg"
    subcommand = "kernelgateway"

    def extra_args(self) -> list[str]:
        return ["--KernelGatewayApp.port_retries=0",
                "--ZMQChannelsWebsocketConnection.limit_rate=False"]
