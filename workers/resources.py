"""Kernel resources: what a launch asks for (gpus, cpus, memory, image), and how a worker holds
a local kernel to its cpus and memory.

The rule of this module: a request is checked once, at admission, by :func:`admit` (pure: the
gateway calls it and turns a request past the pool's limits into a 400), and a worker enforces
what was admitted or refuses the launch with a message that says why it cannot; it never starts
a kernel with less confinement than was asked for.

What a kernel asks for, strongest first::

    env KERNEL_GPUS / KERNEL_CPUS / KERNEL_MEMORY / KERNEL_IMAGE     (the client, per launch)
    kernelspec metadata.poolgate.resources.{gpus,cpus,memory,image}  (the operator, per spec)

Limits are options of the pool that any launcher may declare: ``max_gpus_per_kernel``,
``max_cpus_per_kernel`` (0: no limit) and ``max_memory_per_kernel`` ("": no limit).
Quantities: gpus are whole numbers; cpus are numbers or millicores (``1.5``, ``500m``);
memory is bytes or a Kubernetes quantity (``512Mi``, ``2Gi``, ``2G`` = 2·10⁹).

Enforcement (local and gpu pools), by :class:`Confiner`: a cgroup v2 child per kernel
(``memory.max``, ``cpu.max``) where the worker's cgroup, or its parent, has those controllers
enabled and is writable; else resource limits on the kernel process: ``RLIMIT_DATA`` for memory
(not ``RLIMIT_AS``, which counts the address space CUDA reserves and stops GPU kernels from
starting) and CPU affinity to ``ceil(cpus)`` CPUs. Both are set by this module's ``main``, which
the kernel's argv is prefixed with (``python -m poolgate.workers.resources … -- argv``) and which execs
the kernel: no ``preexec_fn`` in a threaded worker.
"""
from __future__ import annotations

import argparse
import dataclasses
import functools
import logging
import math
import os
import re
import sys
import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from .errors import BadRequest, ConfigError, LaunchRejected
from .launcher_options import options_class

log = logging.getLogger(__name__)

ENV = {"gpus": "KERNEL_GPUS", "cpus": "KERNEL_CPUS", "memory": "KERNEL_MEMORY",
       "image": "KERNEL_IMAGE"}
LIMIT_KEYS = {"gpus": "max_gpus_per_kernel", "cpus": "max_cpus_per_kernel",
              "memory": "max_memory_per_kernel"}
#: Launchers known to host no GPUs: asking them for one is refused at admission.
NO_GPU_LAUNCHERS = frozenset({"local", "yarn"})
_UNITS = {"": 1, "k": 10**3, "m": 10**6, "g": 10**9, "t": 10**12, "p": 10**15,
          "ki": 2**10, "mi": 2**20, "gi": 2**30, "ti": 2**40, "pi": 2**50}
_QUANTITY = re.compile(r"^\s*(\d+(?:\.\d+)?|\.\d+)\s*([kmgtp]i?)?b?\s*$", re.IGNORECASE)


class PoolConfig(Protocol):
    """What this module reads of a pool (workers.config.PoolConfig, which imports this module
    to check a loaded queues.yaml)."""

    @property
    def name(self) -> str: ...
    @property
    def launcher(self) -> str: ...
    @property
    def options(self) -> Mapping[str, Any]: ...


class KernelSpec(Protocol):
    """What this module reads of a kernelspec (workers.config.KernelSpec)."""

    @property
    def name(self) -> str: ...
    @property
    def pool(self) -> str: ...
    @property
    def resources(self) -> Mapping[str, Any]: ...


# -- quantities: pure parsers ----------------------------------------------------------------


def parse_gpus(value: Any, where: str) -> int:
    """A whole number of GPUs >= 0."""
    text = str(value).strip()
    if isinstance(value, bool) or not text.isdigit():
        raise ValueError(f"{where}: expected a whole number of GPUs >= 0, got {value!r}")
    return int(text)


def parse_cpus(value: Any, where: str) -> float:
    """CPUs as a number > 0 (``1.5``) or millicores (``500m``)."""
    text = str(value).strip().lower()
    try:
        cpus = float(text[:-1]) / 1000 if text.endswith("m") else float(text)
    except ValueError:
        cpus = math.nan
    if isinstance(value, bool) or not cpus > 0 or math.isinf(cpus):
        raise ValueError(f"{where}: expected a number of CPUs > 0 (like 2, 0.5 or 500m), "
                         f"got {value!r}")
    return cpus


def parse_memory(value: Any, where: str) -> int:
    """Bytes, from an integer or a quantity: ``512Mi``, ``2Gi``, ``2G`` (10⁹), ``1.5GiB``."""
    m = _QUANTITY.match(str(value)) if not isinstance(value, bool) else None
    if m is None or float(m.group(1)) <= 0:
        raise ValueError(f"{where}: expected memory like 512Mi, 2Gi or a number of bytes > 0, "
                         f"got {value!r}")
    return int(float(m.group(1)) * _UNITS[(m.group(2) or "").lower()])


def format_memory(size: int) -> str:
    """Bytes as the largest binary unit that divides them, for messages: 2147483648 → 2Gi."""
    for unit in ("Pi", "Ti", "Gi", "Mi", "Ki"):
        if size % _UNITS[unit.lower()] == 0:
            return f"{size // _UNITS[unit.lower()]}{unit}"
    return f"{size}B"


_PARSERS = {"gpus": parse_gpus, "cpus": parse_cpus, "memory": parse_memory}


@functools.cache
def limit_defaults(launcher: str) -> dict[str, Any]:
    """The per-kernel limits a launcher's Options dataclass sets by default (gpu: one GPU)."""
    fields = {f.name: f.default for f in dataclasses.fields(options_class(launcher))
              if f.default is not dataclasses.MISSING}
    return {k: fields[k] for k in LIMIT_KEYS.values() if k in fields}


def pool_limits(pool: PoolConfig) -> dict[str, float]:
    """The per-kernel limits of ``pool``: its options over its launcher's defaults."""
    options = {**limit_defaults(pool.launcher), **pool.options}
    return parse_limits(options, f"pools.{pool.name}.options")


def parse_limits(options: Mapping[str, Any], where: str) -> dict[str, float]:
    """The per-kernel limits a pool's options set (a missing, 0 or "" limit is absent)."""
    out: dict[str, float] = {}
    for name, key in LIMIT_KEYS.items():
        raw = options.get(key)
        if raw is None or str(raw).strip() in ("", "0", "0.0"):
            continue
        try:
            out[name] = _PARSERS[name](raw, f"{where}.{key}")
        except ValueError as exc:
            raise ConfigError(str(exc)) from None
    return out


# -- admission ----------------------------------------------------------------------------


def _within(name: str, value: float, limits: Mapping[str, float], pool: str) -> str:
    """'' if ``value`` is within the pool's limit, else why not."""
    limit = limits.get(name)
    if limit is None or value <= limit:
        return ""

    def show(v: float) -> str:
        return format_memory(int(v)) if name == "memory" else f"{v:g}"

    return (f"{show(value)} is more than pool {pool!r} allows one kernel "
            f"({LIMIT_KEYS[name]}: {show(limit)})")


def requested(pool: PoolConfig, spec_resources: Mapping[str, Any],
              env: Mapping[str, str], spec_where: str) -> dict[str, Any]:
    """The resources a launch asks for, parsed; raises BadRequest (env) or ConfigError (spec)."""
    out: dict[str, Any] = {}
    limits = pool_limits(pool)
    for name, var in ENV.items():
        from_env = env.get(var) not in (None, "")
        raw = env[var] if from_env else spec_resources.get(name)
        if raw is None or raw == "":
            continue
        where = f"env.{var}" if from_env else f"{spec_where}.{name}"
        error = BadRequest if from_env else ConfigError
        if name == "image":
            out[name] = str(raw)
            problem = image_refused(pool, out[name]) if from_env else ""
            if problem:
                raise BadRequest(f"{where}: {problem}")
            continue
        try:
            out[name] = _PARSERS[name](raw, where)
        except ValueError as exc:
            raise error(str(exc)) from None
        if name == "gpus" and out[name] and pool.launcher in NO_GPU_LAUNCHERS:
            raise error(f"{where}: pool {pool.name!r} (launcher {pool.launcher}) has no GPUs; "
                        f"use a kernelspec of a gpu pool")
        problem = _within(name, out[name], limits, pool.name)
        if problem:
            raise error(f"{where}: {problem}")
    return out


def image_refused(pool: PoolConfig, image: str) -> str:
    """Why ``pool`` does not run KERNEL_IMAGE=``image``, for a launcher with an image allow-list
    (docker, docker-swarm: options ``allow_kernel_image`` and ``allowed_images``); else ''."""
    names = {f.name for f in dataclasses.fields(options_class(pool.launcher))}
    if "allowed_images" not in names:
        return ""
    if not pool.options.get("allow_kernel_image"):
        return f"pool {pool.name!r} does not let kernels pick their image"
    allowed = [str(i) for i in pool.options.get("allowed_images") or []]
    if image not in allowed:
        return f"{image!r} is not an image pool {pool.name!r} allows ({', '.join(allowed)})"
    return ""


def admit(pool: PoolConfig, spec: KernelSpec, env: Mapping[str, str]) -> dict[str, Any]:
    """Called by the gateway before a launch is queued: what it asks for, within the limits."""
    where = f"kernelspecs.{spec.name}.metadata.poolgate.resources"
    return requested(pool, spec.resources, env, where)


def shown(request: Mapping[str, Any], handle: Mapping[str, Any]) -> dict[str, Any]:
    """What a kernel model shows (under ``poolgate``): the resources the launch asked for and
    the GPU ids it got, from the registry record's request and handle."""
    out: dict[str, Any] = {}
    asked = {k: v for k, v in (request.get("resources") or {}).items() if k in ENV}
    if asked:
        out["resources"] = asked
    data = handle.get("data") or {}
    if isinstance(data, dict) and "gpus" in data:
        out["gpus"] = list(data["gpus"])
    return out


def check_config(pools: Mapping[str, PoolConfig], specs: Mapping[str, KernelSpec]) -> None:
    """Called by load_config: pool limits parse, and every spec's own request is within them."""
    for pool in pools.values():
        pool_limits(pool)
    for spec in specs.values():
        admit(pools[spec.pool], spec, {})


# -- enforcement ----------------------------------------------------------------------------


@dataclass(frozen=True)
class Limits:
    """The cpus and memory one kernel is held to (None: not limited)."""

    cpus: float | None = None
    memory: int | None = None

    @classmethod
    def of(cls, resources: Mapping[str, Any]) -> Limits:
        """From a LaunchRequest's ``resources`` (admitted values, or raw ones from a spec)."""
        cpus = resources.get("cpus")
        memory = resources.get("memory")
        return cls(cpus=parse_cpus(cpus, "cpus") if cpus not in (None, "") else None,
                   memory=parse_memory(memory, "memory") if memory not in (None, "") else None)

    def __bool__(self) -> bool:
        return self.cpus is not None or self.memory is not None


@dataclass(frozen=True)
class Confinement:
    """How one kernel is confined: the argv to put before its own, and what the handle keeps."""

    prefix: tuple[str, ...] = ()
    data: dict[str, Any] = field(default_factory=dict)


def own_cgroup(proc_cgroup: str, mountinfo: str) -> Path | None:
    """The directory of this process's cgroup v2, from /proc/self/cgroup and mountinfo."""
    rel = next((line[3:] for line in proc_cgroup.splitlines() if line.startswith("0::")), None)
    mount = None
    for line in mountinfo.splitlines():
        left, _, right = line.partition(" - ")
        if right.split(" ")[:1] == ["cgroup2"]:
            parts = left.split(" ")
            mount = (parts[3], parts[4])  # (root inside the fs, mount point)
    if rel is None or mount is None:
        return None
    root, point = mount
    rel = rel.strip()
    if root != "/" and rel.startswith(root):
        rel = rel[len(root):]
    return Path(point) / rel.lstrip("/")


def usable_parent(own: Path, controllers: set[str]) -> Path | None:
    """The cgroup under which kernel cgroups can be made: ``own``, else its parent."""
    for cand in (own, own.parent):
        try:
            enabled = set((cand / "cgroup.subtree_control").read_text().split())
        except OSError:
            continue
        if controllers <= enabled and os.access(cand, os.W_OK):
            return cand
    return None


def build_cgroup_files(limits: Limits, period: int = 100_000) -> dict[str, str]:
    """The files a kernel's cgroup gets: ``memory.max`` and ``cpu.max``."""
    files: dict[str, str] = {}
    if limits.memory is not None:
        files["memory.max"] = str(limits.memory)
    if limits.cpus is not None:
        files["cpu.max"] = f"{max(1000, int(limits.cpus * period))} {period}"
    return files


def build_confine_command(cgroup: str = "", memory: int | None = None,
                          cpus: tuple[int, ...] = ()) -> tuple[str, ...]:
    """The wrapper argv that applies the limits and then execs the kernel's argv."""
    cmd = [sys.executable, "-m", "poolgate.workers.resources"]
    if cgroup:
        cmd += ["--cgroup", cgroup]
    if memory is not None:
        cmd += ["--memory", str(memory)]
    if cpus:
        cmd += ["--cpus", ",".join(str(c) for c in cpus)]
    return (*cmd, "--")


class Confiner:
    """Holds the kernels of one launcher to their cpus and memory; one per launcher.

    ``cgroup_root`` is the worker's own cgroup directory (found from /proc when not given);
    tests pass a folder laid out like one.
    """

    def __init__(self, cgroup_root: Path | None | str = "auto") -> None:
        self._root = cgroup_root
        self._lock = threading.Lock()
        self._next_cpu = 0

    def own(self) -> Path | None:
        if self._root != "auto":
            return Path(self._root) if self._root else None
        try:
            self._root = own_cgroup(Path("/proc/self/cgroup").read_text(),
                                    Path("/proc/self/mountinfo").read_text())
        except OSError:
            self._root = None
        return self._root

    def plan(self, kid: str, limits: Limits) -> Confinement:
        """How to hold kernel ``kid`` to ``limits``; LaunchRejected when this worker cannot."""
        if not limits:
            return Confinement()
        need = ({"memory"} if limits.memory is not None else set()) | (
            {"cpu"} if limits.cpus is not None else set())
        own = self.own()
        parent = usable_parent(own, need) if own is not None else None
        if parent is not None:
            done = self._cgroup(parent / f"poolgate-{kid}", limits)
            if done is not None:
                return done
        return self._rlimits(limits)

    def _cgroup(self, path: Path, limits: Limits) -> Confinement | None:
        try:
            path.mkdir(exist_ok=True)
            for name, value in build_cgroup_files(limits).items():
                (path / name).write_text(value)
        except OSError as exc:
            log.warning("Cannot use cgroup %s (%s); limiting the kernel with rlimits", path, exc)
            remove_cgroup(str(path), tries=1)
            return None
        data = {"via": "cgroup", "cgroup": str(path), **_shown(limits)}
        return Confinement(build_confine_command(cgroup=str(path)), {"limits": data})

    def _rlimits(self, limits: Limits) -> Confinement:
        import resource

        if limits.memory is not None and not hasattr(resource, "RLIMIT_DATA"):
            raise LaunchRejected(f"this worker cannot enforce memory "
                                 f"{format_memory(limits.memory)}: no cgroup v2 memory controller "
                                 f"it may use and no RLIMIT_DATA on this platform; ask for no "
                                 f"memory limit or use another pool")
        cpus: tuple[int, ...] = ()
        if limits.cpus is not None:
            cpus = self._pick_cpus(math.ceil(limits.cpus))
        data = {"via": "rlimit", **_shown(limits)}
        if cpus:
            data["cpuset"] = list(cpus)
        return Confinement(build_confine_command(memory=limits.memory, cpus=cpus), {"limits": data})

    def _pick_cpus(self, count: int) -> tuple[int, ...]:
        if not hasattr(os, "sched_setaffinity"):
            raise LaunchRejected(f"this worker cannot enforce {count} CPUs: no cgroup v2 cpu "
                                 f"controller it may use and no CPU affinity on this platform")
        allowed = sorted(os.sched_getaffinity(0))
        if count > len(allowed):
            raise LaunchRejected(f"the kernel asks for {count} CPUs; this worker may use "
                                 f"{len(allowed)} ({', '.join(map(str, allowed))})")
        with self._lock:  # spread kernels over the CPUs instead of piling them on the first
            start = self._next_cpu % len(allowed)
            self._next_cpu += count
        return tuple(sorted(allowed[(start + i) % len(allowed)] for i in range(count)))


def _shown(limits: Limits) -> dict[str, Any]:
    out: dict[str, Any] = {}
    if limits.cpus is not None:
        out["cpus"] = limits.cpus
    if limits.memory is not None:
        out["memory"] = limits.memory
    return out


def remove_cgroup(path: str, tries: int = 40) -> None:
    """Remove a kernel's cgroup once its processes have left it (they may take a moment)."""
    for i in range(tries):
        try:
            os.rmdir(path)
            return
        except FileNotFoundError:
            return
        except OSError:
            if i + 1 < tries:
                time.sleep(0.05)
    log.warning("Cannot remove cgroup %s: processes are still in it", path)


def cleanup(data: Mapping[str, Any]) -> None:
    """Called by a launcher's stop() after the kernel's processes are gone."""
    limits = data.get("limits") or {}
    if isinstance(limits, dict) and limits.get("cgroup"):
        remove_cgroup(str(limits["cgroup"]))


# -- the wrapper: python -m poolgate.workers.resources [--cgroup D] [--memory N] [--cpus L] -- argv --


def main(argv: list[str] | None = None) -> int:
    """Apply the limits to this process, then exec the kernel; exit 126 if they cannot be."""
    p = argparse.ArgumentParser(prog="python -m poolgate.workers.resources")
    p.add_argument("--cgroup", default="")
    p.add_argument("--memory", type=int, default=None)
    p.add_argument("--cpus", default="")
    p.add_argument("argv", nargs=argparse.REMAINDER)
    args = p.parse_args(argv)
    cmd = args.argv[1:] if args.argv[:1] == ["--"] else args.argv
    if not cmd:
        p.error("no command after --")
    try:
        if args.cgroup:
            Path(args.cgroup, "cgroup.procs").write_text(str(os.getpid()))
        if args.memory is not None:
            import resource

            resource.setrlimit(resource.RLIMIT_DATA, (args.memory, args.memory))
        if args.cpus:
            os.sched_setaffinity(0, {int(c) for c in args.cpus.split(",")})
    except (OSError, ValueError) as exc:
        print(f"poolgate: cannot apply the kernel's resource limits: {exc}", file=sys.stderr)
        return 126
    try:
        os.execvp(cmd[0], cmd)
    except OSError as exc:
        print(f"poolgate: cannot run {cmd[0]!r}: {exc}", file=sys.stderr)
    return 127


if __name__ == "__main__":
    sys.exit(main())
