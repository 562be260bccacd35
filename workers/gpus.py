"""GPU discovery and the per-worker GPU allocator.

The rule of this module: *discovery* is pure parsing of what ``nvidia-smi`` prints, of the
worker's ``CUDA_VISIBLE_DEVICES`` or of a configured list (only :func:`run_nvidia_smi` runs
anything), and the *allocator* is the one owner of who holds which GPU in a worker process. A
GPU is held by at most ``per_gpu`` kernels at once (1 unless the pool allows sharing), a kernel's
GPUs are distinct, and launches that wait for GPUs are served first come, first served.

Modes of discovery (``discover:`` of a gpu pool)::

    list        the pool's ``gpus`` list, as given (indices, UUIDs or MIG ids)
    env         the worker's own CUDA_VISIBLE_DEVICES (set but empty: no GPUs)
    nvidia-smi  ``nvidia-smi --query-gpu=index,uuid,name,memory.total --format=csv,noheader``
    auto        list if one is given, else env if CUDA_VISIBLE_DEVICES is set, else nvidia-smi
"""
from __future__ import annotations

import logging
import shutil
import subprocess
import threading
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

from .errors import ConfigError

log = logging.getLogger(__name__)

MODES = ("auto", "nvidia-smi", "env", "list")
NVIDIA_SMI_ARGS = ("--query-gpu=index,uuid,name,memory.total", "--format=csv,noheader")
#: CUDA_VISIBLE_DEVICES values that hide every GPU.
HIDDEN = {"", "-1", "none", "void", "nodevfiles"}


@dataclass(frozen=True)
class GPU:
    """One GPU a worker may hand out; ``id`` is what CUDA_VISIBLE_DEVICES gets."""

    id: str
    uuid: str = ""
    name: str = ""
    memory_mib: int = 0

    def label(self) -> str:
        return f"{self.id} ({self.name})" if self.name else self.id


@dataclass(frozen=True)
class Discovery:
    """The GPUs a worker found, how, and (when it found none) why."""

    gpus: tuple[GPU, ...]
    source: str                      # list | env | nvidia-smi
    why: str = ""                    # why none were found: shown by a worker that refuses to start

    def describe(self) -> str:
        if not self.gpus:
            return f"no GPUs ({self.why})"
        names = ", ".join(g.label() for g in self.gpus)
        return f"{len(self.gpus)} GPUs via {self.source}: {names}"


# -- discovery: pure parsers -------------------------------------------------------------


def _mib(text: str) -> int:
    """``"81559 MiB"`` or ``"81559"`` → 81559; anything else → 0 (the field is informative)."""
    value = text.strip().split()[0] if text.strip() else ""
    return int(value) if value.isdigit() else 0


def parse_nvidia_smi(text: str) -> tuple[GPU, ...]:
    """The GPUs in the CSV of ``nvidia-smi --query-gpu=index,uuid,name,memory.total``."""
    gpus: list[GPU] = []
    for line in text.splitlines():
        if not line.strip():
            continue
        if "no devices were found" in line.lower():
            return ()
        fields = [f.strip() for f in line.split(",")]
        if len(fields) < 2 or not fields[0].isdigit():
            raise ConfigError(f"nvidia-smi printed a line poolgate cannot read: {line.strip()!r} "
                              f"(expected 'index, uuid, name, memory.total')")
        name = ", ".join(fields[2:-1] if len(fields) > 3 else fields[2:3])
        memory = _mib(fields[-1]) if len(fields) > 3 else 0
        gpus.append(GPU(id=fields[0], uuid=fields[1], name=name, memory_mib=memory))
    return tuple(gpus)


def parse_visible_devices(value: str) -> tuple[GPU, ...]:
    """The GPUs a CUDA_VISIBLE_DEVICES value names, as CUDA reads it: up to a negative entry."""
    if value.strip().lower() in HIDDEN:
        return ()
    gpus: list[GPU] = []
    for item in (v.strip() for v in value.split(",")):
        if not item or item.startswith("-"):
            break  # CUDA ignores the entries from the first invalid one on
        gpus.append(GPU(id=item, uuid=item if item.startswith(("GPU-", "MIG-")) else ""))
    return tuple(gpus)


def parse_list(items: Iterable[str]) -> tuple[GPU, ...]:
    """The pool's configured ``gpus`` list; ids must be unique."""
    gpus = tuple(GPU(id=str(i).strip()) for i in items if str(i).strip())
    ids = [g.id for g in gpus]
    if len(set(ids)) != len(ids):
        raise ConfigError(f"options.gpus: every GPU may be listed once, got {ids}")
    return gpus


# -- discovery: the one impure step -------------------------------------------------------

def run_nvidia_smi(path: str, timeout: float = 15.0) -> tuple[str, str]:
    """(stdout, problem): what ``nvidia-smi`` printed, or why it could not say."""
    try:
        done = subprocess.run([path, *NVIDIA_SMI_ARGS], capture_output=True, text=True,
                              timeout=timeout, check=False)
    except (OSError, subprocess.TimeoutExpired) as exc:
        return "", f"nvidia-smi could not run: {exc}"
    if done.returncode != 0:
        said = (done.stdout + done.stderr).strip().splitlines()
        return "", f"nvidia-smi exited with code {done.returncode}: {said[-1] if said else ''}"
    return done.stdout, ""


def discover(mode: str, configured: Sequence[str], environ: Mapping[str, str]) -> Discovery:
    """Find this worker's GPUs the way ``mode`` says (see the module docstring)."""
    if mode not in MODES:
        raise ConfigError(f"options.discover: expected one of {', '.join(MODES)}, got {mode!r}")
    if mode == "list" or (mode == "auto" and configured):
        return Discovery(parse_list(configured), "list", "the pool's 'gpus' list is empty")
    visible = environ.get("CUDA_VISIBLE_DEVICES")
    if mode == "env" or (mode == "auto" and visible is not None):
        if visible is None:
            return Discovery((), "env", "CUDA_VISIBLE_DEVICES is not set for this worker")
        return Discovery(parse_visible_devices(visible), "env",
                         f"CUDA_VISIBLE_DEVICES={visible!r} hides every GPU")
    path = shutil.which("nvidia-smi", path=environ.get("PATH"))
    if path is None:
        why = ("nvidia-smi is not on PATH, no 'gpus' list is configured and "
               "CUDA_VISIBLE_DEVICES is unset")
        return Discovery((), "nvidia-smi", why)
    out, problem = run_nvidia_smi(path)
    if problem:
        return Discovery((), "nvidia-smi", problem)
    return Discovery(parse_nvidia_smi(out), "nvidia-smi", "nvidia-smi lists no GPUs")


# -- the allocator ------------------------------------------------------------------------


@dataclass
class _Waiter:
    owner: str
    count: int
    prefer: tuple[str, ...] = ()


class GPUAllocator:
    """Who holds which GPU in this worker; thread-safe, first come first served.

    ``acquire`` either hands out ``count`` distinct GPUs or keeps the owner's place in line;
    ``release`` frees an owner's GPUs (and its place), and the next in line gets them.
    """

    def __init__(self, gpus: Sequence[GPU], per_gpu: int = 1) -> None:
        if per_gpu < 1:
            raise ValueError("per_gpu must be >= 1")
        self.gpus = tuple(gpus)
        self.per_gpu = per_gpu
        self._held: dict[str, tuple[GPU, ...]] = {}
        self._line: list[_Waiter] = []
        self._cond = threading.Condition()

    @property
    def capacity(self) -> int:
        """How many (kernel, GPU) pairs this worker can hold at once."""
        return len(self.gpus) * self.per_gpu

    def load(self) -> dict[str, int]:
        """GPU id → how many kernels hold it."""
        with self._cond:
            return self._load()

    def _load(self) -> dict[str, int]:
        load = {g.id: 0 for g in self.gpus}
        for held in self._held.values():
            for g in held:
                load[g.id] += 1
        return load

    def holders(self) -> dict[str, tuple[str, ...]]:
        """Owner → the ids of the GPUs it holds."""
        with self._cond:
            return {o: tuple(g.id for g in gs) for o, gs in self._held.items()}

    def held(self, owner: str) -> tuple[GPU, ...]:
        """The GPUs ``owner`` holds (none if it holds none)."""
        with self._cond:
            return self._held.get(owner, ())

    def free(self) -> int:
        """GPUs with room for one more kernel."""
        with self._cond:
            return sum(1 for n in self._load().values() if n < self.per_gpu)

    def waiting(self) -> list[str]:
        """Owners waiting in line, the next one first."""
        with self._cond:
            return [w.owner for w in self._line]

    def _pick(self, count: int, prefer: Sequence[str]) -> tuple[GPU, ...] | None:
        load = self._load()
        room = [g for g in self.gpus if load[g.id] < self.per_gpu]
        if len(room) < count:
            return None
        order = {g.id: i for i, g in enumerate(self.gpus)}
        # The GPUs it had before (a restart keeps its GPU), then the least used, in order.
        room.sort(key=lambda g: (g.id not in prefer, load[g.id], order[g.id]))
        return tuple(room[:count])

    def acquire(self, owner: str, count: int, prefer: Sequence[str] = (),
                timeout: float = 0.0) -> tuple[GPU, ...] | None:
        """``count`` GPUs for ``owner``, waiting up to ``timeout`` seconds for its turn.

        Returns None when they are not free yet: the owner keeps its place in line until it
        calls again, :meth:`cancel` or :meth:`release`. An owner that holds GPUs gets them again.
        """
        if count > len(self.gpus):
            raise ValueError(f"{count} GPUs asked; this worker has {len(self.gpus)}")
        deadline = time.monotonic() + timeout
        with self._cond:
            if owner in self._held:
                return self._held[owner]
            me = next((w for w in self._line if w.owner == owner), None)
            if me is None:
                me = _Waiter(owner, count, tuple(prefer))
                self._line.append(me)
            while True:
                got = self._pick(count, me.prefer) if self._line[0] is me else None
                if got is not None:
                    self._line.remove(me)
                    self._held[owner] = got
                    self._cond.notify_all()  # the next in line may fit too
                    return got
                left = deadline - time.monotonic()
                if left <= 0:
                    return None
                self._cond.wait(left)

    def cancel(self, owner: str) -> None:
        """Give up ``owner``'s place in line (its launch ended before it got GPUs)."""
        with self._cond:
            self._line = [w for w in self._line if w.owner != owner]
            self._cond.notify_all()

    def release(self, owner: str) -> tuple[str, ...]:
        """Free ``owner``'s GPUs and place in line; returns the ids it held. Idempotent."""
        with self._cond:
            held = self._held.pop(owner, ())
            self._line = [w for w in self._line if w.owner != owner]
            self._cond.notify_all()
        if held:
            log.debug("GPUs %s freed by %s", [g.id for g in held], owner)
        return tuple(g.id for g in held)
