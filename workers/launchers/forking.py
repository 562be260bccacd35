"""The local launcher's side of the fork server (forkserver.py): start one per interpreter,
ask it for kernels, and watch the kernels it forked as Popen watches its own."""
from __future__ import annotations

import json
import logging
import os
import select
import socket
import subprocess
import threading
import time
from pathlib import Path

import psutil

from .base import without_worker_secrets

log = logging.getLogger(__name__)
SCRIPT = str(Path(__file__).with_name("forkserver.py"))
ROOM_ENV = "POOLGATE_FORKSERVER_ROOM"
ROOM_ARG = "--title-room"
ARGV_ROOM = 2048    # bytes of command line a forked kernel can show as its own
ENV_ROOM = 32768    # bytes of environment beyond the worker's, likewise
MODULES = ("ipykernel_launcher", "ipykernel")
# Read by the interpreter or the C library when a process starts, so a fork cannot apply
# them: a kernel whose environment differs from the fork server's in one of these is exec'd.
START_PREFIXES = ("PYTHON", "LD_", "MALLOC_", "GLIBC_", "LC_")
START_NAMES = ("LANG", "LANGUAGE")
UNKNOWN = -255      # exit code of a forked kernel whose status nobody recorded
READY_WAIT = 0.0    # a launch never waits for a fork server still importing: it execs


def readable(fd: int, timeout: float) -> bool:
    """poll(2), not select(2): a worker with a hundred kernels has fds past select's 1024."""
    poller = select.poll()
    poller.register(fd, select.POLLIN)
    return bool(poller.poll(timeout * 1000))


def why_not(cmd: list[str], env: dict[str, str], server_env: dict[str, str]) -> str | None:
    """None if the kernel ``cmd``/``env`` can be forked from a server started with
    ``server_env``; else the reason it must be exec'd."""
    if len(cmd) < 3 or cmd[1] != "-m" or cmd[2] not in MODULES:
        return "its command is not '<python> -m ipykernel_launcher ...'"
    for name in set(env) | set(server_env):
        if (name.startswith(START_PREFIXES) or name in START_NAMES) and \
                env.get(name) != server_env.get(name):
            return f"its environment sets {name}, which applies only at process start"
    return None


class Forked:
    """A kernel forked by a fork server: the part of Popen the launcher uses."""

    def __init__(self, pid: int, server: ForkServer) -> None:
        self.pid = pid
        self.server = server
        self.returncode: int | None = None
        self._lock = threading.Lock()  # poll() comes from the supervisor and control threads
        try:
            self._pidfd: int | None = os.pidfd_open(pid)
        except (OSError, AttributeError):
            self._pidfd = None

    def _running(self) -> bool:
        if self._pidfd is not None:  # readable once the process has exited
            return not readable(self._pidfd, 0)
        try:
            return psutil.Process(self.pid).status() != psutil.STATUS_ZOMBIE
        except psutil.Error:
            return False

    def poll(self) -> int | None:
        with self._lock:
            if self.returncode is None and not self._running():
                code = self.server.exit_code(self.pid)
                self.returncode = UNKNOWN if code is None else code
                self._close()
            return self.returncode

    def wait(self, timeout: float | None = None) -> int:
        end = None if timeout is None else time.monotonic() + timeout
        while self.poll() is None:
            if end is not None and time.monotonic() >= end:
                raise subprocess.TimeoutExpired(str(self.pid), timeout or 0)
            time.sleep(0.01)
        assert self.returncode is not None
        return self.returncode

    def close(self) -> None:
        with self._lock:
            self._close()

    def _close(self) -> None:
        if self._pidfd is not None:
            os.close(self._pidfd)
            self._pidfd = None


class ForkServer:
    """One fork server process, for one Python interpreter, started with the worker's
    environment. Requests are one at a time (a fork takes a few ms)."""

    def __init__(self, python: str, log_path: Path) -> None:
        self.python = python
        self.log_path = log_path
        self.env = without_worker_secrets(dict(os.environ))  # its memory becomes the kernels'
        self._lock = threading.Lock()
        self._proc: subprocess.Popen[bytes] | None = None
        self._sock: socket.socket | None = None
        self._buf = b""
        self._ready = False
        self.failures = 0
        self.disabled: str | None = None   # why this interpreter's kernels are always exec'd

    def start(self) -> None:
        """Start the server (it imports ipykernel in the background); idempotent."""
        with self._lock:
            self._start()

    def _start(self) -> None:
        if self._proc is not None or self.disabled:
            return
        mine, theirs = socket.socketpair()
        env = dict(self.env)
        env[ROOM_ENV] = " " * ENV_ROOM
        try:
            with open(self.log_path, "ab") as out:
                self._proc = subprocess.Popen(
                    [self.python, SCRIPT, str(theirs.fileno()), ROOM_ARG, " " * ARGV_ROOM],
                    pass_fds=(theirs.fileno(),), env=env, stdin=subprocess.DEVNULL,
                    stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
        except OSError as exc:
            mine.close()
            self.disabled = f"cannot run {self.python!r}: {exc.strerror}"
            return
        finally:
            theirs.close()
        self._sock = mine
        self._buf = b""
        self._ready = False

    def _line(self, timeout: float) -> dict[str, object] | None:
        """The server's next line, or None if none came within ``timeout``."""
        assert self._sock is not None
        end = time.monotonic() + timeout
        while b"\n" not in self._buf:
            if not readable(self._sock.fileno(), max(0.0, end - time.monotonic())):
                return None
            chunk = self._sock.recv(65536)
            if not chunk:
                raise ConnectionError("the fork server exited")
            self._buf += chunk
        line, _, self._buf = self._buf.partition(b"\n")
        reply: dict[str, object] = json.loads(line)
        return reply

    def _request(self, obj: dict[str, object], timeout: float = 10.0) -> dict[str, object]:
        assert self._sock is not None
        self._sock.sendall(json.dumps(obj).encode() + b"\n")
        reply = self._line(timeout)
        if reply is None:
            raise TimeoutError("the fork server did not answer")
        return reply

    def _usable(self) -> bool:
        """Started and done importing; else start it (once more) and say no."""
        if self.disabled:
            return False
        if self._proc is None:
            self._start()
        if self._ready:
            return True
        try:
            hello = self._line(READY_WAIT)
        except (OSError, ValueError) as exc:
            self._fail(f"it exited while importing ipykernel ({exc})")
            return False
        if hello is None:
            return False
        if "error" in hello:
            self.disabled = str(hello["error"])
            log.warning("Kernels of %s are started without the fork server: %s",
                        self.python, self.disabled)
            self._kill()
            return False
        self._ready = True
        return True

    def wait_ready(self, timeout: float) -> bool:
        """Wait until the server has imported ipykernel; False if it has not by ``timeout``."""
        end = time.monotonic() + timeout
        while True:
            with self._lock:
                if self._usable():
                    return True
                if self.disabled:
                    return False
            if time.monotonic() >= end:
                return False
            time.sleep(0.02)

    def spawn(self, argv: list[str], env: dict[str, str], cwd: str, log_file: Path,
              lean: bool = True, subshells: bool = True) -> Forked | None:
        """Fork a kernel; None if the server cannot (not ready yet, gone): exec it instead.
        ``lean``: the kernel's execute skips ipykernel's empty waits (forkserver.py: _lean);
        ``subshells`` False: it runs without ipykernel's shell-channel thread (there:
        _without_subshells)."""
        with self._lock:
            if not self._usable():
                return None
            try:
                reply = self._request({"op": "spawn", "argv": argv, "env": env, "cwd": cwd,
                                       "log": str(log_file), "lean": lean,
                                       "subshells": subshells})
            except (OSError, ValueError) as exc:
                self._fail(str(exc))
                return None
            if "pid" not in reply:
                log.warning("Fork server of %s: %s", self.python, reply.get("error"))
                return None
            return Forked(int(str(reply["pid"])), self)

    def exit_code(self, pid: int) -> int | None:
        """The exit code of a kernel this server forked and reaped; None if it does not know."""
        with self._lock:
            if not self._ready:
                return None
            try:
                code = self._request({"op": "status", "pid": pid}).get("code")
            except (OSError, ValueError) as exc:
                self._fail(str(exc))
                return None
            return None if code is None else int(str(code))

    def _fail(self, why: str) -> None:
        self.failures += 1
        self._kill()
        if self.failures >= 3:
            self.disabled = f"the fork server failed {self.failures} times, last: {why}"
        log.warning("Fork server of %s: %s; kernels are exec'd until it is back",
                    self.python, why)

    def _kill(self) -> None:
        if self._sock is not None:
            self._sock.close()
            self._sock = None
        if self._proc is not None:
            try:
                self._proc.kill()
                self._proc.wait(timeout=2)
            except (OSError, subprocess.TimeoutExpired):
                pass
            self._proc = None
        self._ready = False

    def close(self) -> None:
        """Stop the server (kernels it forked live on)."""
        with self._lock:
            self._kill()
