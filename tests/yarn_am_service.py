"""HadoopAMService: Hadoop's own ApplicationMasterProtocol server in a JVM, for the yarn tests.

``tests/yarn_am/AmService.java`` runs ``org.apache.hadoop.ipc.Server`` (through YarnRPC, TOKEN
authentication only, as the ResourceManager's ApplicationMasterService) from pyspark's Hadoop
jars. It is compiled here with javac against those jars, once per source and jar set (cached
under ``~/.cache/poolgate-tests``), and driven over stdin/stdout: :meth:`mint` writes an
AMRMToken into a credentials file with Hadoop's ``Credentials``; every register, allocate and
finish the server answers arrives as an event (a dict with ``event``, ``attempt``, … and ``t``,
when it was read). tests/yarn_rm.py learns its AMs' registrations and heartbeats from these.

No JDK or no pyspark is a test failure that says what to install (.ci/run installs both).
"""
from __future__ import annotations

import atexit
import hashlib
import importlib.util
import json
import os
import queue
import shutil
import subprocess
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

SOURCE = Path(__file__).with_name("yarn_am") / "AmService.java"
Event = dict[str, Any]


def hadoop_jars() -> Path:
    """pyspark's jars folder (Hadoop's client API and runtime are in it)."""
    spec = importlib.util.find_spec("pyspark")
    if spec is None or not spec.origin:
        raise RuntimeError("pyspark is not installed (its jars hold Hadoop's RPC server): "
                           "pip install 'pyspark>=3.5', as .ci/run does")
    jars = Path(spec.origin).parent / "jars"
    if not list(jars.glob("hadoop-client-api-*.jar")):
        raise RuntimeError(f"{jars} has no hadoop-client-api jar")
    return jars


def compiled() -> Path:
    """The folder of AmService.class, compiled if this source and jar set are new."""
    jars = hadoop_jars()
    for tool in ("javac", "java"):
        if shutil.which(tool) is None:
            raise RuntimeError(f"{tool} is not installed: apt-get install default-jdk-headless "
                               "(.ci/run does)")
    key = hashlib.sha256(SOURCE.read_bytes() + " ".join(
        sorted(p.name for p in jars.glob("hadoop-*.jar"))).encode()).hexdigest()[:16]
    cache = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    out = cache / "poolgate-tests" / f"yarn-am-{key}"
    if (out / "AmService.class").exists():
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix="yarn-am-", dir=out.parent))
    done = subprocess.run(["javac", "-nowarn", "-cp", f"{jars}/*", "-d", str(tmp), str(SOURCE)],
                          capture_output=True, text=True)
    if done.returncode:
        shutil.rmtree(tmp, ignore_errors=True)
        raise RuntimeError(f"javac {SOURCE.name} failed:\n{done.stderr[-3000:]}")
    try:
        tmp.rename(out)  # atomic: a parallel run compiled it too
    except OSError:
        shutil.rmtree(tmp, ignore_errors=True)
    return out


class HadoopAMService:
    """One JVM running AmService; ``port`` is its scheduler port on 127.0.0.1."""

    def __init__(self, protection: str = "authentication", start_timeout: float = 180.0) -> None:
        self.protection = protection  # hadoop.rpc.protection: SASL's qop
        self.start_timeout = start_timeout
        self.events: list[Event] = []
        self.listeners: list[Callable[[Event], None]] = []
        self.port = 0
        self._acks: queue.Queue[Event] = queue.Queue()
        self._lock = threading.Lock()
        self._cond = threading.Condition()
        self.proc: subprocess.Popen[str] | None = None
        self.stderr = tempfile.NamedTemporaryFile(prefix="yarn-am-", suffix=".log", delete=False)

    def start(self) -> HadoopAMService:
        classes = compiled()
        self.proc = subprocess.Popen(
            ["java", "-Xmx256m", "-XX:TieredStopAtLevel=1", "-cp",
             f"{classes}{os.pathsep}{hadoop_jars()}/*", "AmService", self.protection],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self.stderr, text=True,
            bufsize=1)
        threading.Thread(target=self._read, daemon=True, name="yarn-am-events").start()
        ready = self.wait_for(lambda e: e["event"] == "ready", self.start_timeout)
        self.port = int(ready["port"])
        return self

    def _read(self) -> None:
        assert self.proc is not None and self.proc.stdout is not None
        for line in self.proc.stdout:
            try:
                event = json.loads(line)
            except ValueError:
                continue
            event["t"] = time.monotonic()
            if event["event"] == "ok":
                self._acks.put(event)
                continue
            with self._cond:
                self.events.append(event)
                self._cond.notify_all()
            for listener in list(self.listeners):
                listener(event)
        with self._cond:
            self._cond.notify_all()

    def wait_for(self, match: Callable[[Event], bool], timeout: float = 30.0) -> Event:
        """The first event (seen or to come) that ``match`` takes."""
        deadline = time.monotonic() + timeout
        with self._cond:
            while True:
                for event in self.events:
                    if match(event):
                        return event
                if self.proc is not None and self.proc.poll() is not None:
                    raise RuntimeError(f"AmService exited: {self.log()}")
                left = deadline - time.monotonic()
                if left <= 0:
                    raise TimeoutError(f"no such AmService event within {timeout}s; "
                                       f"seen: {self.events[-5:]}")
                self._cond.wait(min(left, 0.5))

    def log(self) -> str:
        return Path(self.stderr.name).read_text(errors="replace")[-3000:]

    def command(self, line: str) -> Event:
        """Send one stdin command; its acknowledgement (RuntimeError if it failed)."""
        assert self.proc is not None and self.proc.stdin is not None
        with self._lock:
            self.proc.stdin.write(line + "\n")
            self.proc.stdin.flush()
            ack = self._acks.get(timeout=30)
        if "error" in ack:
            raise RuntimeError(f"AmService {line!r}: {ack['error']}")
        return ack

    def mint(self, attempt: str, path: Path | str, fmt: str = "writable",
             bad: bool = False) -> None:
        """Write a credentials file holding an AMRMToken for ``attempt`` (``bad``: a password
        from another key, as a forged or stale token has)."""
        self.command(f"MINT {attempt} {path} {fmt}{' bad' if bad else ''}")

    def order(self, attempt: str, command: str) -> None:
        """The next allocate of ``attempt`` answers ``command`` (SHUTDOWN or RESYNC)."""
        self.command(f"{command} {attempt}")

    def revoke(self, attempt: str) -> None:
        self.command(f"REVOKE {attempt}")

    def auth_counts(self) -> tuple[int, int]:
        """(failed, succeeded) SASL authentications, as Hadoop's RpcMetrics count them."""
        ack = self.command("STATS")
        return int(ack["auth_failures"]), int(ack["auth_successes"])

    def of(self, attempt: str, event: str = "") -> list[Event]:
        with self._cond:
            return [e for e in self.events if e.get("attempt") == attempt
                    and (not event or e["event"] == event)]

    def close(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            assert self.proc.stdin is not None
            self.proc.stdin.close()
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.stderr.close()
        os.unlink(self.stderr.name)


_shared: HadoopAMService | None = None
_shared_lock = threading.Lock()


def shared_service() -> HadoopAMService:
    """One AmService for this test process (a JVM starts in seconds, not milliseconds)."""
    global _shared
    with _shared_lock:
        if _shared is None or (_shared.proc is not None and _shared.proc.poll() is not None):
            _shared = HadoopAMService().start()
            atexit.register(_shared.close)
        return _shared
