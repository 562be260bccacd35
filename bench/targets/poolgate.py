"""poolgate (embedded `poolgate serve`) and poolgate-redis (worker + gateway on a Redis).

Both use the `poolgate` console script of the bench's own environment, as a user would.
Readiness: GET /api answers 200, and the ready line was printed: `poolgate serve`'s "poolgate is
ready at" (its gateway's own "Gateway ready" comes before the worker is up, and a launch on a pool
with no live worker fails at once), or the worker's "ready." for poolgate-redis; without it the
bench goes on after READY_LINE_GRACE seconds of /api answering.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import psutil

from bench.procs import ManagedProcess, free_port
from bench.progress import say
from bench.targets.base import GatewayTarget, TargetUnavailable
from bench.targets.reference import gateway_env

READY_LINE_GRACE = 20.0
REDIS_URL = os.environ.get("POOLGATE_BENCH_REDIS_URL", "redis://127.0.0.1:6379/7")


def find_poolgate() -> Path:
    """The `poolgate` script next to sys.executable, else on PATH; TargetUnavailable if none."""
    beside = Path(sys.executable).parent / "poolgate"
    if beside.exists():
        return beside
    found = shutil.which("poolgate")
    if found:
        return Path(found)
    raise TargetUnavailable(f"no `poolgate` script next to {sys.executable} or on PATH "
                            "(pip install -e . ?)")


def has_ready_line(proc: ManagedProcess, marker: str) -> bool:
    return any(marker in line for line in proc.log_text().splitlines())


class _PoolgateBase(GatewayTarget):
    def is_gateway_process(self, proc: psutil.Process) -> bool:
        """The gateway proper: `poolgate gateway` (gunicorn), not the worker or Redis."""
        try:
            return " gateway" in " ".join(proc.cmdline())
        except psutil.Error:
            return False

    def env(self, workdir: Path) -> dict[str, str]:
        exe = find_poolgate()
        return gateway_env(self.ctx.kernelspec_dir, exe.parent, workdir / "runtime")

    async def wait_for(self, ready_line_from: ManagedProcess, marker: str) -> None:
        """/api must answer; then wait up to READY_LINE_GRACE s for the ready line."""
        await self.wait_ready()
        api_up = time.monotonic()
        while not has_ready_line(ready_line_from, marker):
            if time.monotonic() - api_up > READY_LINE_GRACE:
                say(f"{self.name}: no 'ready' line from {ready_line_from.name}; going on "
                    "because /api answers")
                return
            await self.wait_ready()  # also notices a process that exited
            await asyncio.sleep(0.2)


class PoolgateTarget(_PoolgateBase):
    """`poolgate serve --port P --data-dir D`: embedded Redis, gateway and local worker."""

    name = "poolgate"

    async def start(self) -> None:
        exe = find_poolgate()
        workdir = self.ctx.workdir / self.name
        data_dir = workdir / "data"
        data_dir.mkdir(parents=True, exist_ok=True)
        self.port = free_port()
        argv = [str(exe), "serve", "--port", str(self.port), "--data-dir", str(data_dir),
                *self.ctx.extra_args.get(self.name, [])]
        proc = ManagedProcess("poolgate serve", argv, self.env(workdir),
                              workdir / "serve.log", cwd=workdir)
        self.procs.append(proc)
        proc.start()
        await self.wait_for(proc, "poolgate is ready at")


class PoolgateBeforeTarget(PoolgateTarget):
    """`python -m poolgate serve` from another checkout (POOLGATE_BENCH_BEFORE=/path/to/checkout,
    e.g. a `git worktree` of the commit before a change), so one run compares before and after
    on the same machine at the same time."""

    name = "poolgate-before"

    def checkout(self) -> Path:
        path = os.environ.get("POOLGATE_BENCH_BEFORE", "")
        if not path or not (Path(path) / "poolgate" / "__init__.py").is_file():
            raise TargetUnavailable("set POOLGATE_BENCH_BEFORE to a poolgate checkout "
                                    "(git worktree add /tmp/before <commit>)")
        return Path(path).resolve()

    def env(self, workdir: Path) -> dict[str, str]:
        env = super().env(workdir)
        env["PYTHONPATH"] = str(self.checkout())
        return env

    async def start(self) -> None:
        workdir = self.ctx.workdir / self.name
        data_dir = workdir / "data"
        data_dir.mkdir(parents=True, exist_ok=True)
        self.port = free_port()
        argv = [sys.executable, "-m", "poolgate", "serve", "--port", str(self.port),
                "--data-dir", str(data_dir), *self.ctx.extra_args.get(self.name, [])]
        proc = ManagedProcess("poolgate serve (before)", argv, self.env(workdir),
                              workdir / "serve.log", cwd=workdir)
        self.procs.append(proc)
        proc.start()
        await self.wait_for(proc, "poolgate is ready at")


def packaged_config(target: PoolgateTarget, change: Callable[[dict[str, Any], str], None]) -> str:
    """Write the packaged queues.yaml, changed by ``change(raw, default_pool)``, into the
    target's workdir and pass it as ``--config``; the default pool's name."""
    import yaml

    from poolgate.workers.config import packaged_data

    raw = yaml.safe_load((packaged_data() / "queues.yaml").read_text())
    pool = str(raw.get("default_pool") or next(iter(raw["pools"])))
    change(raw, pool)
    workdir = target.ctx.workdir / target.name
    workdir.mkdir(parents=True, exist_ok=True)
    config = workdir / "queues.yaml"
    config.write_text(yaml.safe_dump(raw))
    target.ctx.extra_args.setdefault(target.name, [])[:0] = ["--config", str(config)]
    return pool


class PoolgateWarmTarget(PoolgateTarget):
    """`poolgate serve --config C` where C is the packaged queues.yaml with one warm kernel
    of the bench's kernelspec in the default pool (`warm: {python3: 1}`); runs the start
    scenario only, each start once /api/pools shows the warm kernel ready."""

    name = "poolgate-warm"
    scenarios = ("start",)

    async def start(self) -> None:
        def warm(raw: dict[str, Any], pool: str) -> None:
            raw["pools"][pool]["warm"] = {self.ctx.kernel_name: 1}

        self.pool = packaged_config(self, warm)
        await super().start()

    async def before_start(self) -> None:
        http = await self.open_http()
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            async with http.get(f"{self.base_url}/api/pools/{self.pool}") as resp:
                pool = await resp.json(content_type=None)
            if pool.get("warm_ready", {}).get(self.ctx.kernel_name, 0) >= 1:
                return
            await asyncio.sleep(0.05)
        say(f"{self.name}: no warm kernel ready after 60 s; starting anyway")

    def started(self, model: dict[str, Any]) -> None:
        """Print the hand-over as the worker timed it (the model's ``poolgate.timing.launch``:
        from taking the launch to the kernel running; a warm kernel starts no process)."""
        launch = (model.get("poolgate") or {}).get("timing", {}).get("launch")
        if isinstance(launch, (int, float)):
            say(f"{self.name}: warm kernel handed over in {launch * 1000:.0f} ms "
                f"(worker's launch time)")


class PoolgateNoSubshellsTarget(PoolgateTarget):
    """`poolgate serve --config C` where C is the packaged queues.yaml with `subshells: false`
    in the default pool's options: forked kernels without ipykernel's shell-channel thread
    (README, "Forked kernels")."""

    name = "poolgate-nosubshells"

    async def start(self) -> None:
        def off(raw: dict[str, Any], pool: str) -> None:
            raw["pools"][pool].setdefault("options", {})["subshells"] = False

        packaged_config(self, off)
        await super().start()


class PoolgateRedisTarget(_PoolgateBase):
    """`poolgate worker --pool local` + `poolgate gateway --port P` on an external Redis."""

    name = "poolgate-redis"

    async def start(self) -> None:
        exe = find_poolgate()
        flush_redis(REDIS_URL)
        workdir = self.ctx.workdir / self.name
        workdir.mkdir(parents=True, exist_ok=True)
        env = self.env(workdir)
        env["POOLGATE_BROKER_URL"] = REDIS_URL
        env["POOLGATE_REGISTRY_URL"] = REDIS_URL
        self.port = free_port()
        extra = self.ctx.extra_args
        worker = ManagedProcess(
            "poolgate worker",
            [str(exe), "worker", "--pool", "local", *extra.get(f"{self.name}:worker", [])],
            env, workdir / "worker.log", cwd=workdir)
        gateway = ManagedProcess(
            "poolgate gateway",
            [str(exe), "gateway", "--port", str(self.port),
             *extra.get(f"{self.name}:gateway", [])],
            env, workdir / "gateway.log", cwd=workdir)
        self.procs += [worker, gateway]
        worker.start()
        gateway.start()
        await self.wait_for(worker, " ready.")


def flush_redis(url: str) -> None:
    """Check the Redis at `url` answers, and empty its database (dedicated to the bench)."""
    try:
        import redis
    except ImportError as exc:
        raise TargetUnavailable("python package `redis` is not installed") from exc
    try:
        client = redis.Redis.from_url(url, socket_connect_timeout=3)
        client.ping()
        client.flushdb()
        client.close()
    except redis.RedisError as exc:
        raise TargetUnavailable(f"Redis at {url} not reachable: {exc}") from exc
