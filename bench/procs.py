"""Child processes of the bench: free ports, start in a new session, wait for readiness, stop.

Rule: every process the bench starts goes through `ManagedProcess`, which records it in a
module registry; `reap_all()` (also run at exit) ends each one and everything below it, by
PID, so no gateway or kernel outlives the bench, even after an error or Ctrl-C.
"""

from __future__ import annotations

import atexit
import contextlib
import os
import resource
import shutil
import signal
import socket
import subprocess
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import psutil

_LIVE: list[ManagedProcess] = []
_EXTRA: list[psutil.Process] = []


def free_port() -> int:
    """Return a TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def track_pid(pid: int) -> None:
    """Remember a process started outside ManagedProcess (floor kernels) for `reap_all`."""
    try:
        _EXTRA.append(psutil.Process(pid))
    except psutil.NoSuchProcess:
        pass


def is_kernel(proc: psutil.Process) -> bool:
    """True for an ipykernel process (counted apart from the gateway in memory figures)."""
    try:
        return any("ipykernel" in part for part in proc.cmdline())
    except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
        return False


def tree_of(pid: int) -> list[psutil.Process]:
    """The process `pid` and all its descendants that are alive now."""
    try:
        root = psutil.Process(pid)
        return [root, *root.children(recursive=True)]
    except psutil.NoSuchProcess:
        return []


def rss_mb(procs: list[psutil.Process]) -> float:
    """Summed resident set size of `procs`, in MB (1e6 bytes), skipping ones that ended."""
    total = 0
    for proc in procs:
        try:
            total += proc.memory_info().rss
        except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
            pass
    return total / 1e6


def _kill_all(procs: list[psutil.Process]) -> None:
    for proc in procs:
        try:
            if proc.is_running():  # psutil checks create_time: a reused PID is left alone
                proc.kill()
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            pass
    psutil.wait_procs(procs, timeout=5)


@dataclass
class ManagedProcess:
    """One command run in its own session, its output going to a log file."""

    name: str
    argv: list[str]
    env: dict[str, str]
    log_path: Path
    cwd: Path | None = None
    popen: subprocess.Popen[bytes] | None = field(default=None, init=False)
    _seen: dict[int, psutil.Process] = field(default_factory=dict, init=False)
    _offset: int = field(default=0, init=False)  # where this run's output starts in the log

    def start(self) -> None:
        """Start the command; stdout and stderr both go to `log_path`."""
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.log_path, "ab") as log:
            # each round appends to the same log: what a ready line is looked for in must be
            # this run's output only (a previous round's "ready" made round 2 start too early)
            self._offset = log.tell()
            self.popen = subprocess.Popen(
                self.argv, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                env=self.env, cwd=self.cwd, start_new_session=True,
            )
        _LIVE.append(self)

    @property
    def pid(self) -> int:
        assert self.popen is not None, "not started"
        return self.popen.pid

    def exited(self) -> int | None:
        """The exit status if the process has ended, else None."""
        return None if self.popen is None else self.popen.poll()

    def log_text(self) -> str:
        """What this run of the command has written (the log may hold earlier rounds' too)."""
        try:
            with open(self.log_path, "rb") as log:
                log.seek(self._offset)
                return log.read().decode(errors="replace")
        except FileNotFoundError:
            return ""

    def log_tail(self, lines: int = 15) -> str:
        return "\n".join(self.log_text().splitlines()[-lines:])

    def tree(self) -> list[psutil.Process]:
        """This process and its descendants now; also remembered for `stop`."""
        procs = tree_of(self.pid) if self.popen is not None else []
        for proc in procs:
            self._seen.setdefault(proc.pid, proc)
        return procs

    def stop(self, grace: float = 15.0) -> None:
        """SIGTERM the process group, wait `grace` s, then SIGKILL every process it had.

        Kernels run in sessions of their own (jupyter_client uses start_new_session), so
        they are killed by PID from the tree snapshot, not through the process group.
        """
        if self.popen is None:
            return
        snapshot = [*self._seen.values(), *self.tree()]
        if self.popen.poll() is None:
            try:
                os.killpg(self.popen.pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
            try:
                self.popen.wait(timeout=grace)
            except subprocess.TimeoutExpired:
                pass
        try:
            os.killpg(self.popen.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
        self.popen.wait()
        _kill_all(snapshot)
        if self in _LIVE:
            _LIVE.remove(self)


def reap_all() -> None:
    """Stop every process the bench started and is still running (also runs at exit)."""
    for proc in list(_LIVE):
        proc.stop(grace=5.0)
    _kill_all(_EXTRA)
    _EXTRA.clear()


atexit.register(reap_all)


@contextlib.contextmanager
def work_folder(prefix: str, keep: bool) -> Iterator[Path]:
    """The work folder of a many-process run (bench.scale, scale_burst, gc_soak), with this
    process's open-file limit raised to its hard limit (a WebSocket per kernel). On the way
    out every process the run started is reaped, and the folder removed unless ``keep``."""
    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    work = Path(tempfile.mkdtemp(prefix=prefix))
    try:
        yield work
    finally:
        reap_all()
        if keep:
            from bench.progress import say
            say(f"work folder: {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)
