"""The supervisor: what the ``kernels.host`` task does for the whole life of one kernel.

It claims the launch (QUEUED → STARTING, which also rejects a duplicate delivery), launches
through the pool's launcher, publishes RUNNING, then watches: the kernel's iopub (execution
state and activity), its liveness, the registry's target, and commands from the worker's
control thread. A kernel that dies on its own is restarted under the same id; when it ends for
good, everything the launch created is cleaned up and the task returns the reason.
"""
from __future__ import annotations

import collections
import concurrent.futures
import dataclasses
import itertools
import json
import logging
import os
import queue
import random
import signal
import threading
import time
from typing import TYPE_CHECKING, Any

import redis
import zmq

from . import jmsg
from .config import PoolConfig
from .errors import GatewayError, LaunchRejected
from .hosting import WorkerHost
from .kernel_socket import KernelSocket
from .protocol import ConnectionInfo, KernelHandle, KernelStatus, LaunchRequest
from .registry import KernelRecord, now_iso
from .warm import hand_over

if TYPE_CHECKING:
    from .launchers.base import Launcher

log = logging.getLogger(__name__)
S = KernelStatus
STABLE_AFTER = 30.0  # a kernel that lived this long resets the count of quick deaths
REPLAY_MAX_MESSAGE = 1 << 20  # larger iopub messages are not kept in the replay buffer
REPLAY_HANDOFF_TTL = 60  # seconds a replay handed to a gateway stays in the registry
BUSY_WRITE_DELAY = 0.5  # "busy" reaches the registry only once a cell ran this long (no
# write at all for the quick cells of a busy notebook: each would be two)
# Seconds between two writes of last_activity (Jupyter Server's field; culling reads it in
# minutes): every write of 32 busy kernels is a registry call the kernels' CPU pays for (at 1 s
# the worker spent about a fifth more per execute).
ACTIVITY_WRITE_EVERY = 5.0
# Seconds between two reads of the kernel's iopub by its supervisor: every wake-up of 32 busy
# supervisors costs CPU the kernels need (at 0.02 s the worker used 0.6 ms per execute, at
# 0.25 s 0.22 ms, and 0.5 s and 1 s cut it further). The state it reads reaches the REST API
# this much later, at most; output waits in the socket meanwhile (one read takes what came).
IOPUB_BATCH = 0.5
# Where in that period each supervisor of a worker reads: kernels started together would
# otherwise read together (their first messages came together), and a worker's reads then come
# as one burst on one core every IOPUB_BATCH (32 kernels: 32 reads back to back) instead of
# one small read at a time. Spread by the golden ratio from a random start, so any number of
# supervisors is spread evenly and two workers on one machine do not read in step.
_PHASE_START = random.random()
_PHASES = itertools.count()
SMALL_PART = 65536  # iopub parts under this are copied into bytes; bigger ones are viewed
IOPUB_READ_MAX = 5000  # messages read in one go; more waiting: read again at once
# Seconds between two reads of the kernel's record (target, status) by its supervisor. A stop,
# restart or replay comes as a control command at once; the record is the durable intent for a
# command that got lost, and says whether a gateway declared the kernel dead. Read every tick
# (1 s), it was the registry's largest cost per idle kernel (issue 24: 1 of 2.9 commands/s).
RECORD_CHECK_EVERY = 5.0
ADOPT_AT_ONCE = 16  # kernels a restarted worker adopts at once (reap_orphans)
# An adopted kernel's shell that answers late (Supervisor._check_probe): how long iopub has,
# after the answer came, to say otherwise (a status it published before answering may still
# be on its way) before the answer is taken for idle.
PROBE_GRACE = 1.0

# Requests whose busy and idle say nothing of a cell: most go on the control channel, which
# ipykernel answers while a cell runs, so their idle comes mid-cell. Jupyter Server tracks
# the state the same way (its untracked_message_types). A gateway's kernel_info nudge on
# control, when a second tab connected to a kernel busy with a silent cell, made the kernel
# read idle, and idle culling ended it mid-cell.
UNTRACKED_PARENTS = frozenset({
    "kernel_info_request", "comm_info_request", "shutdown_request", "interrupt_request",
    "debug_request", "usage_request", "create_subshell_request", "delete_subshell_request",
    "list_subshell_request"})


def status_shell(parent: bytes | memoryview) -> str | None:
    """Whose state a status message (its parent header's frame) tells: "" the main shell's
    (an execute's, or ipykernel's first, with no parent), a subshell's id (JEP 91: the
    request's header names it), None nobody's (a request in UNTRACKED_PARENTS)."""
    try:
        head = json.loads(bytes(parent))
    except ValueError:
        return ""
    if not isinstance(head, dict):
        return ""
    if head.get("msg_type") in UNTRACKED_PARENTS:
        return None
    return str(head.get("subshell_id") or "")


class Stop(Exception):
    """Raised inside the loop when the kernel must end; carries the reason."""

    def __init__(self, reason: str, status: KernelStatus = S.STOPPED, code: str = "") -> None:
        super().__init__(reason)
        self.reason = reason
        self.status = status
        self.code = code  # the GatewayError code of a failed launch, for the waiting client


def read_phase() -> float:
    """The next supervisor's offset (seconds) within the IOPUB_BATCH period."""
    return (_PHASE_START + next(_PHASES) * 0.6180339887498949) % 1.0 * IOPUB_BATCH


def next_on_grid(now: float, period: float, phase: float) -> float:
    """The first point after ``now`` on the grid ``phase + k * period``: a read or tick that
    took long does not move a supervisor's grid, so phases stay spread for its whole life."""
    return now - (now - phase) % period + period


def received(frames: list[zmq.Frame]) -> list[bytes | memoryview]:
    """The parts of a message received with ``copy=False``: big ones stay in the message libzmq
    received (a view, not a copy: copying every MB of output into new bytes cost the
    supervisor a third of its CPU while a kernel streamed), small ones become bytes.

    For a small message this costs more than a copying receive (8 against 11 µs a message),
    so the supervisor receives this way only after a big message (output streaming)."""
    return [f.bytes if len(f) < SMALL_PART else f.buffer for f in frames]


def reads_status_only(pool: PoolConfig) -> bool:
    """Whether a supervisor of this pool needs only its kernel's status messages: with no
    replay buffer to fill, and busy kernels never culled (so output while busy is no activity
    that counts), it does, and narrows its subscription to them (Supervisor._narrow): the
    kernel then stops sending it a second copy of all its output."""
    return not pool.replay_buffer and not pool.cull_busy


class ReplayBuffer:
    """The newest iopub messages of one kernel, as received: at most ``count`` messages and
    ``max_bytes`` bytes; a message larger than REPLAY_MAX_MESSAGE is not kept."""

    def __init__(self, count: int, max_bytes: float) -> None:
        self.count, self.max_bytes = count, max_bytes
        self.messages: collections.deque[list[bytes | memoryview]] = collections.deque()
        self.size = 0

    def add(self, msg: list[bytes | memoryview]) -> int:
        """Keep ``msg`` (unless the buffer is off or it is too large); return its size."""
        size = sum(map(len, msg))
        if not self.count or size > REPLAY_MAX_MESSAGE:
            return size
        self.messages.append(msg)
        self.size += size
        while len(self.messages) > self.count or self.size > self.max_bytes:
            self.size -= sum(map(len, self.messages.popleft()))
        return size

    def blobs(self) -> list[bytes]:
        """Every kept message as one blob of its parts and buffers (jmsg.encode_parts)."""
        out = []
        for msg in self.messages:
            try:
                parts, buffers = jmsg.split(msg)
            except ValueError:
                continue
            out.append(jmsg.encode_parts(parts + buffers))
        return out


class Supervisor:
    """Launches one kernel and looks after it until it ends."""

    def __init__(self, runtime: WorkerHost, kernel_id: str, pool: str, task: Any = None) -> None:
        self.rt = runtime
        self.reg = runtime.registry
        self.kid = kernel_id
        self.pool = runtime.config.pools[pool]
        self.launcher: Launcher = runtime.launcher(pool)
        self.task = task
        self.commands: queue.Queue[str] = queue.Queue()
        self._wake_r, self._wake_w = os.pipe()
        self.handle: KernelHandle | None = None
        self.req: LaunchRequest | None = None
        self.generation = 0
        self.quick_deaths = 0
        self.started_at = 0.0
        self.iopub: zmq.Socket[bytes] | None = None
        self.record: KernelRecord | None = None
        self.beating = False  # the worker's heartbeat thread refreshes this kernel's heartbeat
        self.active_at = time.monotonic()  # the kernel's last iopub message, for culling
        self.state = "idle"  # the main shell's execution state
        self.busy_subshells: set[str] = set()  # subshells (JEP 91) running a request
        self.written_state: str | None = None  # the execution state the registry holds
        self.state_due = 0.0  # when a pending "busy" is written
        self.activity_written = 0.0
        self.status_only = reads_status_only(self.pool)  # then iopub is narrowed (_narrow)
        self.narrowed = False
        # The replay buffer: the newest iopub messages, as received, for clients of a gateway
        # that died (handed over on request: see replay()).
        self.replay_buf = ReplayBuffer(self.pool.replay_buffer,
                                       self.pool.replay_buffer_mb * 1_000_000)
        self.next_cull_check = 0.0
        self.next_record_check = 0.0
        self.read_phase = read_phase()
        self.first_started = 0.0
        self.taken_at = 0.0
        # An adopted kernel's shell that did not answer kernel_info in time (_confirm_iopub),
        # kept until it answers or iopub says the main shell's state (_check_probe).
        self.shell_probe: KernelSocket | None = None
        self.probe_answered = 0.0  # when it answered (monotonic); 0: not yet

    # -- called from the worker's control thread ------------------------------------------

    def command(self, action: str) -> None:
        """Queue a command for the supervisor thread and wake it."""
        if action == "interrupt" and self.handle is not None:
            self.launcher.send_signal(self.handle, signal.SIGINT)  # instant, safe from any thread
            return
        self.commands.put(action)
        os.write(self._wake_w, b"x")

    # -- the task body --------------------------------------------------------------------

    def run(self) -> dict[str, Any]:
        t0 = self.taken_at = time.time()
        ok, prev = self.reg.transition(self.kid, S.STARTING, pool=self.pool.name,
                                       worker=self.rt.name, taken=t0)
        if not ok:
            why = f"it was {prev}" if prev else "it was withdrawn"
            log.info("Kernel %s: launch not taken (%s)", self.kid, why)
            return {"kernel_id": self.kid, "status": "SKIPPED", "reason": f"not launched: {why}"}
        self.record = self.reg.get(self.kid)
        if self.record is None:
            return {"kernel_id": self.kid, "status": "SKIPPED", "reason": "record vanished"}
        self.req = LaunchRequest.from_dict(self.record.request)
        return self._supervise(t0, adopted=False)

    def adopt(self, rec: KernelRecord) -> bool:
        """Take over a live kernel an earlier life of this worker launched (it came back
        within the heartbeat TTL). Returns False when the kernel cannot be adopted."""
        conn = self.reg.connection(self.kid)
        if not rec.handle or conn is None:
            return False
        self.record, self.req = rec, LaunchRequest.from_dict(rec.request)
        handle = KernelHandle.from_dict(rec.handle)
        self.handle = KernelHandle(handle.kernel_id, handle.pool, handle.host, conn, handle.data)
        if self.launcher.poll(self.handle) is not None:
            return False
        self.generation = rec.generation
        self.started_at = self.first_started = time.time()
        self._watch_iopub(conn)
        # What its last supervisor wrote, until the kernel says otherwise: a cell that prints
        # nothing says nothing on iopub, and taken for idle it would be culled mid-cell.
        self.state = self.written_state = "busy" if rec.execution_state == "busy" else "idle"
        self._confirm_iopub(conn, shell_state=True)
        self._record_state(time.monotonic())
        self.reg.heartbeat(self.kid, self.rt.name, self.pool.heartbeat_ttl)
        self.beating = True
        log.info("Kernel %s: adopted by worker %s after its restart", self.kid, self.rt.name)
        threading.Thread(target=self._supervise, args=(time.time(), True), daemon=True,
                         name=f"adopted-{self.kid[:8]}").start()
        return True

    def _confirm_iopub(self, conn: ConnectionInfo, wait: float = 5.0,
                       shell_state: bool = False) -> None:
        """Ask for kernel_info until iopub answers: what the kernel publishes before the
        subscription is live is lost to us. For a kernel just launched, that was the busy of a
        cell its client began the moment it read RUNNING: its supervisor took a kernel busy
        with a silent cell for idle, and culled it mid-cell (seen in the suite).

        ``shell_state`` (an adopted kernel, whose state is not known): ask on control as well,
        which ipykernel answers while a cell runs, and take the kernel for idle if its main
        shell answers too (a shell busy with a cell answers only after it)."""
        assert self.iopub is not None  # watched (_watch_iopub, which ended any probe)
        shell: KernelSocket | None = KernelSocket(conn)
        control = KernelSocket(conn, "control") if shell_state else None
        try:
            deadline = time.monotonic() + wait
            while time.monotonic() < deadline:
                for sock in (shell, control):
                    if sock is not None:
                        sock.send("kernel_info_request")
                if self.iopub.poll(200):
                    assert shell is not None
                    answered = shell_state and shell.answered(0.2)
                    if answered:
                        self.state = "idle"  # then what iopub says after its answer
                    self._drain_iopub(self.iopub)  # its busy and idle are not a cell's
                    if shell_state and not answered and self.state == "busy":
                        # Busy with a cell, or slow: its answer, whenever it comes, is
                        # after any cell the shell was running (_check_probe).
                        self.shell_probe, shell = shell, None
                    return
            log.warning("Kernel %s: its iopub did not answer within %.0fs; its state may be "
                        "missed until it publishes again", self.kid, wait)
        finally:
            for sock in (shell, control):
                if sock is not None:
                    sock.close()

    def _check_probe(self, now: float) -> None:
        """An adopted kernel taken for busy (its last supervisor's record) whose shell did not
        answer at once: when the answer comes, the main shell is free. Taken for idle unless
        iopub says the main shell's state meanwhile: any such status ends the probe
        (_drain_iopub), since iopub's word is newer. Without it, an idle kernel that was slow
        to answer (a loaded machine), or whose cell ended while no supervisor was listening,
        stayed busy until its next cell, and idle culling never ended it."""
        probe = self.shell_probe
        if probe is None:
            return
        if not self.probe_answered:
            if probe.answered(0):
                self.probe_answered = now
            return
        if now - self.probe_answered < PROBE_GRACE:
            return
        while self.iopub is not None and self._drain_iopub(self.iopub):
            pass
        if self.shell_probe is probe:  # iopub said nothing of the main shell
            self._end_probe()
            self.state = "idle"
            self.active_at = now  # idle from now, for culling: when the cell ended is unknown
            log.info("Kernel %s: its shell answered; taken for idle", self.kid)

    def _end_probe(self) -> None:
        if self.shell_probe is not None:
            self.shell_probe.close()
        self.shell_probe, self.probe_answered = None, 0.0

    def _supervise(self, t0: float, adopted: bool) -> dict[str, Any]:
        self.rt.supervisors[self.kid] = self
        self.rt.take_slot()
        status, reason, code = S.STOPPED, "shut down", ""
        try:
            if not adopted:
                self._launch(first=True)
            self._loop()
        except Stop as stop:
            status, reason, code = stop.status, stop.reason, stop.code
        except Exception as exc:  # a bug or a backend failure: the kernel must not leak
            log.exception("Kernel %s: supervisor failed", self.kid)
            status, reason = S.FAILED, f"supervisor error: {exc}"
        finally:
            self._end_probe()
            self._finish(status, reason, code)
            self.rt.supervisors.pop(self.kid, None)
            self.rt.release_slot()
            os.close(self._wake_r)
            os.close(self._wake_w)
        return {"kernel_id": self.kid, "status": status.value, "reason": reason,
                "pool": self.pool.name, "lifetime": round(time.time() - t0, 3)}

    # -- launching ------------------------------------------------------------------------

    def _launch(self, first: bool) -> None:
        assert self.req is not None
        previous = None if first else self.handle
        t0 = time.time()
        req = self._first_request(t0) if first else self.req
        log.info("Launching kernel %s (%s) on pool %s", self.kid, self.req.spec_name, self.pool.name)
        warm, note = self.rt.take_warm(self.pool.name, self.req) if first else (None, {})
        try:
            if warm is not None:  # a started kernel is handed over (workers/warm.py)
                self.handle = warm
                self.reg.update(self.kid, handle=stored(warm), host=warm.host)
                warm, note = hand_over(self.launcher, warm, self.req)  # None: start it cold
            for handle in (self.launcher.launch(req, previous) if warm is None else ()):
                self.handle = handle
                self.reg.update(self.kid, handle=stored(handle), host=handle.host)
                if self._target() == "STOPPED":
                    raise Stop("shut down while starting")
        except Stop:
            raise
        except GatewayError as exc:
            raise Stop(self._explain(exc.message), S.FAILED, exc.code) from exc
        except Exception as exc:
            log.warning("Kernel %s: launch failed", self.kid, exc_info=True)
            raise Stop(self._explain(f"launch failed: {exc}"), S.FAILED) from exc
        assert self.handle is not None and self.handle.connection is not None
        self.started_at = time.time()
        self.first_started = self.first_started or self.started_at
        self._watch_iopub(self.handle.connection)
        self._confirm_iopub(self.handle.connection)  # before a client can start a cell
        timing = dict(self.record.timing if self.record else {})
        timing.update(launch=round(self.started_at - t0, 4), taken=self.taken_at, **note)
        # Connection and heartbeat first: a gateway that reads RUNNING without a heartbeat
        # declares the kernel dead ("worker lost"), and a client told RUNNING connects at once.
        self.reg.set_connection(self.kid, self.handle.connection)
        self.reg.heartbeat(self.kid, self.rt.name, self.pool.heartbeat_ttl)
        ok, prev = self.reg.transition(
            self.kid, S.RUNNING, pool=self.pool.name, generation=self.generation,
            note={"timing": timing} if first else None,  # for the launch histograms
            execution_state="idle", last_activity=now_iso(), timing=timing, reason="")
        if not ok:
            raise Stop(f"the record moved to {prev or 'deleted'} while starting")
        self.state = self.written_state = "idle"
        self.busy_subshells.clear()  # a new kernel process
        self.beating = True
        log.info("Kernel %s running on %s after %.2fs", self.kid, self.handle.host, self.started_at - t0)
        if self.task is not None and first:
            meta = {"kernel_id": self.kid, "pool": self.pool.name, "host": self.handle.host,
                    "worker": self.rt.name, "user": self.req.user}
            self.task.update_state(state="RUNNING", meta=meta)
            # Flower keeps event fields on its task object: "worker" there must stay its own
            self.task.send_event("task-running", **{k: v for k, v in meta.items() if k != "worker"})

    def _first_request(self, now: float) -> LaunchRequest:
        """The request with the launch timeout left since the gateway queued it: the worker
        gives up when the waiting client does, so the client's error carries the worker's
        reason (no free host, say) instead of a bare timeout."""
        assert self.req is not None
        queued = (self.record.timing if self.record else {}).get("queued")
        if not queued:
            return self.req
        left = float(queued) + self.req.launch_timeout - now
        return dataclasses.replace(self.req, launch_timeout=max(1.0, min(left,
                                                                         self.req.launch_timeout)))

    def _explain(self, message: str) -> str:
        detail = self.launcher.failure_detail(self.handle) if self.handle else ""
        return f"{message}\n--- kernel output (last lines) ---\n{detail}" if detail else message

    def _watch_iopub(self, conn: ConnectionInfo) -> None:
        if self.iopub is not None:
            self.iopub.close(linger=0)
        sock: zmq.Socket[bytes] = zmq.Context.instance().socket(zmq.SUB)
        sock.setsockopt(zmq.LINGER, 0)
        sock.setsockopt(zmq.RCVHWM, 0)  # never drop: the replay buffer must see every message
        sock.setsockopt(zmq.SUBSCRIBE, b"")
        sock.connect(conn.url("iopub"))
        self.iopub = sock
        self.narrowed = False  # a new kernel process: its topics are learnt again
        self._end_probe()

    # -- supervising ----------------------------------------------------------------------

    def _target(self) -> str | None:
        return self.reg.get_field(self.kid, "target")

    def _loop(self) -> None:
        """Wait for commands, the kernel's iopub and the tick. Iopub is read at most every
        IOPUB_BATCH seconds, at this supervisor's phase (read_phase): what the kernel publishes
        meanwhile waits in the socket, so a busy kernel costs its supervisor one wake-up per
        batch, not one per message, and the worker's supervisors do not wake together."""
        assert self.iopub is not None
        commands = zmq.Poller()
        commands.register(self._wake_r, zmq.POLLIN)
        poller = zmq.Poller()
        poller.register(self._wake_r, zmq.POLLIN)
        poller.register(self.iopub, zmq.POLLIN)
        iopub = self.iopub
        next_tick = next_drain = 0.0
        tick = min(1.0, self.pool.heartbeat_ttl / 3)
        # ticks (registry reads, liveness) spread like the reads, half a batch after them
        tick_phase = (self.read_phase + IOPUB_BATCH / 2) / IOPUB_BATCH * tick
        while True:
            if self.iopub is not iopub:  # reconnected after a restart on new ports
                poller.unregister(iopub)
                iopub = self.iopub
                poller.register(iopub, zmq.POLLIN)
            now = time.monotonic()
            due = min(next_tick, self._state_due())
            if now < next_drain:  # read iopub again only once the batch is over
                events = dict(commands.poll(timeout=int(max(0.0, min(due, next_drain) - now) * 1000)))
                if time.monotonic() >= next_drain and iopub.poll(0):
                    events[iopub] = zmq.POLLIN
            else:
                events = dict(poller.poll(timeout=int(max(0.0, due - now) * 1000)))
            try:
                if self._wake_r in events:
                    os.read(self._wake_r, 4096)
                    while not self.commands.empty():
                        self._obey(self.commands.get_nowait())
                if iopub in events and self.iopub is iopub:  # not if a restart replaced it
                    more = self._drain_iopub(iopub)
                    next_drain = 0.0 if more else next_on_grid(time.monotonic(), IOPUB_BATCH,
                                                               self.read_phase)
                now = time.monotonic()
                self._record_state(now)
                if now >= next_tick:
                    next_tick = next_on_grid(now, tick, tick_phase)
                    self._tick()
            except redis.RedisError as exc:
                # A registry blip (a Redis restart): the kernel keeps running; try again soon.
                log.warning("Kernel %s: registry unreachable (%s); the kernel keeps running",
                            self.kid, exc)
                time.sleep(0.5)

    def _drain_iopub(self, sock: zmq.Socket[bytes]) -> bool:
        """Read what the kernel published: execution state, activity, the replay buffer.
        True if there may be more (the next read comes at once, not after a batch).
        Activity, for culling and ``last_activity``, is any message but the statuses of
        untracked requests (as in Jupyter Server): a tab that connects, or reconnects after a
        network blip, has the gateway ask for kernel_info, and that is not the user's work.

        Nothing here talks to the registry: a message costs a receive and an append."""
        state = None  # the main shell's, as the last of its statuses read here says
        subshells = self.busy_subshells
        keep = self.replay_buf.add
        activity = 0  # messages read that count as activity
        more = True
        big = False  # the last message was big: the next one likely is too (see received)
        for _ in range(IOPUB_READ_MAX):
            try:
                msg: list[bytes | memoryview] = (
                    received(sock.recv_multipart(zmq.NOBLOCK, copy=False)) if big
                    else [*sock.recv_multipart(zmq.NOBLOCK)])
            except zmq.Again:
                more = False
                break
            big = keep(msg) >= SMALL_PART
            activity += 1
            try:
                parts, _ = jmsg.split(msg)
                if b'"status"' in parts[0]:
                    shell = status_shell(parts[1])
                    if shell is None:
                        activity -= 1  # a nudge's status is not the user's activity
                    said = json.loads(bytes(parts[3])).get("execution_state") \
                        if shell is not None else None
                    if said == "starting":  # ipykernel's first status: for a running kernel
                        said = "idle"       # that is idle ("starting" means launching)
                    if shell and said == "busy":
                        subshells.add(shell)
                    elif shell:
                        subshells.discard(shell)
                    elif said is not None:
                        state = said
                    if self.status_only and not self.narrowed:
                        self._narrow(sock, msg[0])
            except (ValueError, IndexError, AttributeError, TypeError):
                continue
        if activity:
            self.active_at = time.monotonic()
        if state is not None:
            self.state = state
            if self.shell_probe is not None:
                self._end_probe()  # iopub's word on the main shell is newer than a probe's
        return more

    def _narrow(self, sock: zmq.Socket[bytes], topic: bytes | memoryview) -> None:
        """From now on receive only messages with this status message's topic (ipykernel:
        ``kernel.<id>.status``), not all output. A kernel that publishes without topics
        (the first frame is the delimiter) keeps sending everything."""
        self.narrowed = True
        topic = bytes(topic)
        if not topic or topic == jmsg.DELIM:
            return
        sock.setsockopt(zmq.SUBSCRIBE, topic)
        sock.setsockopt(zmq.UNSUBSCRIBE, b"")

    @property
    def shown_state(self) -> str:
        """The kernel's execution state: busy while its main shell or a subshell runs a
        request (a subshell's idle is not the main shell's)."""
        return "busy" if self.busy_subshells and self.state == "idle" else self.state

    def _record_state(self, now: float) -> None:
        """Write execution state and activity to the registry: a change to idle at once, busy
        only once it lasted BUSY_WRITE_DELAY (a quick cell writes nothing), activity at most
        every ACTIVITY_WRITE_EVERY seconds."""
        fields: dict[str, Any] = {}
        state = self.shown_state
        if state == self.written_state:
            self.state_due = 0.0
        else:
            if state == "busy" and not self.state_due:
                self.state_due = now + BUSY_WRITE_DELAY
            if state != "busy" or now >= self.state_due:
                fields["execution_state"] = state
        if self.active_at > self.activity_written and (
                fields or now - self.activity_written >= ACTIVITY_WRITE_EVERY):
            fields["last_activity"] = now_iso()
        if fields:
            self.reg.update(self.kid, **fields)
            self.activity_written = now
            if "execution_state" in fields:
                self.written_state, self.state_due = state, 0.0

    def _state_due(self) -> float:
        """When _record_state has something to write (inf: nothing pending)."""
        due = float("inf")
        if self.shown_state != self.written_state and self.state_due:
            due = self.state_due
        if self.active_at > self.activity_written:
            due = min(due, self.activity_written + ACTIVITY_WRITE_EVERY)
        return due

    def replay(self, token: str) -> None:
        """Hand the replay buffer to a gateway that asked (its client's gateway died).

        Drains the iopub socket first, so everything published before the gateway subscribed
        is in it; the gateway reads ``pg:replay:<token>`` once the count arrives."""
        while self.iopub is not None and self._drain_iopub(self.iopub):
            pass
        self.reg.hand_replay(token, self.replay_buf.blobs(), REPLAY_HANDOFF_TTL)

    @property
    def _worker_shut_down(self) -> str:
        """Why a kernel ends with its worker (FAILED for its clients, no fault of its own)."""
        return f"worker {self.rt.name} shut down"

    def _tick(self) -> None:
        assert self.handle is not None
        if self.rt.shutting_down.is_set():
            raise Stop(self._worker_shut_down, S.FAILED)
        now = time.monotonic()
        self._check_probe(now)
        if now >= self.next_record_check:
            self.next_record_check = now + RECORD_CHECK_EVERY
            self._check_record()
        self._enforce_limits()
        died = self.launcher.poll(self.handle)
        if died is not None:
            self._auto_restart(died)

    def _check_record(self) -> None:
        """Obey the record: its target, a gateway's verdict, its loss (a Redis restart)."""
        status, target = self.reg.status_and_target(self.kid)
        if status is None:
            if self.reg.deleted(self.kid):
                raise Stop("shut down (its record was deleted)")
            self.restore_record()
        elif status == "FAILED":
            raise Stop("declared dead by a gateway (no heartbeat)", S.FAILED)
        elif target == "STOPPED":
            raise Stop("shut down")

    def _cull_timeout(self) -> float:
        """The idle timeout: the kernelspec's ``metadata.poolgate.cull_idle_timeout``, else the pool's."""
        spec = self.rt.config.kernelspecs.get(self.req.spec_name if self.req else "")
        meta = (spec.metadata.get("poolgate") or {}) if spec else {}
        value = meta.get("cull_idle_timeout") if isinstance(meta, dict) else None
        return float(value) if isinstance(value, (int, float)) else self.pool.cull_idle_timeout

    def _enforce_limits(self) -> None:
        """Maximum lifetime, then idle culling with Jupyter Server's rules."""
        now = time.monotonic()
        if self.pool.max_lifetime and time.time() - self.first_started > self.pool.max_lifetime:
            raise Stop(f"ended: it reached pool {self.pool.name!r}'s maximum lifetime of "
                       f"{self.pool.max_lifetime:.0f}s (max_lifetime)")
        timeout = self._cull_timeout()
        if not timeout or now < self.next_cull_check:
            return
        self.next_cull_check = now + min(self.pool.cull_interval, timeout)
        idle = now - self.active_at
        if idle < timeout or (self.shown_state == "busy" and not self.pool.cull_busy):
            return
        if not self.pool.cull_connected and self.reg.connection_count(self.kid) > 0:
            return
        raise Stop(f"culled: idle for {idle:.0f}s (cull_idle_timeout: {timeout:.0f}s)")

    def restore_record(self) -> None:
        """The registry lost this kernel's record (a Redis that keeps nothing): write it again."""
        if self.record is None or self.handle is None or self.handle.connection is None:
            return
        log.warning("Kernel %s: record missing from the registry; restoring it", self.kid)
        self.record.status = S.RUNNING
        self.record.target = "RUNNING"
        self.record.handle = stored(self.handle)
        self.record.generation = self.generation
        self.record.execution_state = self.written_state = self.shown_state
        # The heartbeat first, as at launch: a gateway that reads a RUNNING record without
        # one declares the kernel dead ("worker lost").
        self.reg.heartbeat(self.kid, self.rt.name, self.pool.heartbeat_ttl)
        self.reg.restore(self.record)
        self.reg.set_connection(self.kid, self.handle.connection)

    def _obey(self, action: str) -> None:
        if action == "stop":
            if self._target() in ("STOPPED", None):
                raise Stop("shut down")
        elif action == "restart":
            self._restart("restart requested", requested=True)
        elif action.startswith("replay:"):
            self.replay(action.split(":", 1)[1])
        elif action == "shutdown-worker":
            raise Stop(self._worker_shut_down, S.FAILED)

    def _auto_restart(self, died: str) -> None:
        assert self.handle is not None
        lived = time.time() - self.started_at
        self.quick_deaths = 0 if lived > STABLE_AFTER else self.quick_deaths + 1
        if self.quick_deaths > self.pool.max_restarts:
            raise Stop(self._explain(f"the kernel died {self.quick_deaths} times in a row "
                                     f"({died}); not restarting it again"), S.FAILED)
        log.warning("Kernel %s died (%s); restarting it (%d of %d)", self.kid, died,
                    self.quick_deaths, self.pool.max_restarts)
        self._restart(f"the kernel died ({died}); restarted", graceful=False)

    def _restart(self, reason: str, graceful: bool = True, requested: bool = False) -> None:
        """Restart the kernel in place. ``requested``: a client asked (its gateways then send
        no ``restarting`` status, which JupyterLab reads as "the kernel died")."""
        assert self.handle is not None
        ok, prev = self.reg.transition(self.kid, S.RESTARTING, pool=self.pool.name,
                                       note={"requested": requested},
                                       execution_state="restarting", reason=reason)
        if not ok:
            return
        self.state = self.written_state = "restarting"
        self.busy_subshells.clear()
        if graceful:
            self._ask_shutdown(restart=True)
        self.launcher.stop(self.handle, grace=1.0 if graceful else 0)
        self.generation += 1
        self._launch(first=False)

    # -- ending ---------------------------------------------------------------------------

    def _ask_shutdown(self, restart: bool = False) -> None:
        """shutdown_request on the control channel: the kernel's own way to end."""
        conn = self.handle.connection if self.handle else None
        if conn is None or self.launcher.poll(self.handle) is not None:  # type: ignore[arg-type]
            return
        with KernelSocket(conn, "control") as sock:
            sock.send("shutdown_request", {"restart": restart})
            sock.answered(1.0)

    def _finish(self, status: KernelStatus, reason: str, code: str = "") -> None:
        if status is S.FAILED and not self.started_at and self._target() == "STOPPED":
            # The client withdrew this launch (its timeout) and never had the kernel: it is
            # removed, not listed as dead for an hour.
            status, reason = S.STOPPED, f"launch timed out and was withdrawn: {reason}"
        if self.iopub is not None:
            self.iopub.close(linger=0)
        if self.handle is not None:
            if not self.beating:  # stopped while STARTING: a STOPPING record without a
                # heartbeat reads as "worker lost" to gateways and the reconciler
                self.reg.heartbeat(self.kid, self.rt.name, self.pool.heartbeat_ttl)
                self.beating = True
            self.reg.transition(self.kid, S.STOPPING, pool=self.pool.name)
            try:
                self._ask_shutdown()
                self.launcher.stop(self.handle, grace=2.0)
            except Exception:
                log.exception("Kernel %s: cleanup failed; an operator should check %s",
                              self.kid, self.handle.to_dict())
        if status is S.FAILED:
            # its worker stopping (an operator's Ctrl-C, a drain) is no fault of the kernel's:
            # clients still see it dead, but the log does not warn once per kernel
            (log.info if reason == self._worker_shut_down else log.warning)(
                "Kernel %s on pool %s failed: %s", self.kid, self.pool.name, reason)
            self.reg.transition(self.kid, S.FAILED, pool=self.pool.name, reason=reason,
                                execution_state="dead", error=code)
            self.reg.expire_failed(self.kid)
        else:
            log.info("Kernel %s on pool %s stopped: %s", self.kid, self.pool.name, reason)
            self.reg.transition(self.kid, S.STOPPED, pool=self.pool.name, reason=reason)
            self.reg.delete(self.kid, self.pool.name, reason=reason)


def stored(handle: KernelHandle) -> dict[str, Any]:
    """A handle as the registry keeps it: without the connection key (kept encrypted apart)."""
    data = handle.to_dict()
    if data.get("connection"):
        data["connection"] = {**data["connection"], "key": ""}
    return data


def reap_orphans(runtime: WorkerHost) -> int:
    """Adopt or kill what is recorded under this worker's name from an earlier life of it.

    A kernel still RUNNING (the worker came back within the heartbeat TTL) and alive is
    adopted; anything else recorded under this name (FAILED is final) is stopped. Kernels are
    adopted ADOPT_AT_ONCE at a time: each adoption takes a moment (up to 0.2 s for a kernel
    busy with a cell, whose shell does not answer), and one by one, a worker with a hundred
    busy kernels took longer than the heartbeat TTL, so the last of them were declared dead
    before it reached them.
    """
    mine = [rec for rec in runtime.registry.all()
            if rec.worker == runtime.name and rec.id not in runtime.supervisors
            and rec.status is not S.STOPPED and not (rec.status is S.FAILED and not rec.handle)]

    def adopted(rec: KernelRecord) -> bool:
        if rec.status is not S.RUNNING or rec.pool not in runtime.config.pools:
            return False
        try:
            return Supervisor(runtime, rec.id, rec.pool).adopt(rec)
        except Exception:
            log.exception("Kernel %s: could not adopt it; stopping it", rec.id)
            return False

    with concurrent.futures.ThreadPoolExecutor(ADOPT_AT_ONCE, "adopting") as pool:
        kept = list(pool.map(adopted, mine))
    count = 0
    for rec, ok in zip(mine, kept):
        if ok:
            continue
        reason = f"worker {runtime.name} restarted; its earlier kernels were stopped"
        if rec.handle and rec.pool in runtime.config.pools:
            handle = KernelHandle.from_dict(rec.handle)
            try:
                runtime.launcher(rec.pool).stop(handle, grace=0)
            except Exception:
                log.exception("Kernel %s: could not stop orphan %s", rec.id, rec.handle)
        if rec.status.live:
            runtime.registry.transition(rec.id, S.FAILED, pool=rec.pool, reason=reason,
                                        execution_state="dead")
            runtime.registry.expire_failed(rec.id)
        runtime.registry.update(rec.id, handle={})  # nothing is left to stop
        log.warning("Kernel %s: %s", rec.id, reason)
        count += 1
    return count


__all__ = ["Supervisor", "reap_orphans", "Stop", "LaunchRejected"]
