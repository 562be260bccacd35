"""Soak: many kernels, many cells, random faults, for a fixed time; prints what was lost.

    python -m tests.soak --minutes 5 --kernels 8 [--seed 1] [--heartbeat-ttl 15]

Outside the normal test run. It starts its own Redis (which it restarts as one of the
faults), two gateways and a worker, keeps every kernel busy with cells whose output it checks
line by line, and every few seconds does one fault at random: SIGKILL a gateway (and start it
again), SIGKILL the worker (and start it again within the heartbeat TTL), restart Redis empty.

Clients behave as JupyterLab does: one WebSocket per kernel, with a session_id of its own. A
request is written once; a socket found closed before it (a browser has read the close by the
time its user runs a cell) gets the request after the reconnect instead. When the socket breaks
mid-cell the client reconnects with the same session_id to either gateway (retrying while they
are down or answer 503) and keeps collecting the same cell's messages by msg_id. Every cell
prints LINES numbered lines and ends with an expression; its output is judged whole: every line,
in order, and the result.
Messages that arrive twice (same msg_id: what a dying gateway had sent but not yet recorded,
replayed by the next one; README "Reliability") are counted as repeated lines, not as errors.
A cell that cannot be completed within CELL_BOUND seconds counts as lost output.

At the end it lists the kernels (retrying on 503 while the registry rebuilds, and asking for a
kernel the list misses on its own, as Jupyter Server does), runs one more cell on every kernel
through a fresh connection (it must still hold the state set before the first fault), deletes
every kernel and looks for kernel processes left behind. Every wait, join and HTTP call is
bounded, so it always ends with its report. Counts that must be zero: cells with lost output,
cells out of order, kernels lost, duplicate kernels (listed, but nobody started them), orphan
kernel processes, 404 answers for a kernel that was alive, client errors (a client thread that
failed). Exit status 0 only when all are zero. A lost cell's note says whether the kernel ran it
(each cell appends its number to a list in the kernel, read by the final cell). A cell whose
request the kernel never got, and whose socket broke within DYING_SOCKET seconds of sending it,
before any of its output, went into a socket as its gateway died: counted apart (README: what a
gateway crash can still lose), not as lost output; any other undelivered request is lost output.
"""
from __future__ import annotations

import argparse
import collections
import json
import os
import random
import select
import signal
import tempfile
import threading
import time
import traceback
import uuid
from pathlib import Path
from typing import Any

import psutil
import requests
import websocket

from tests.client import Channel, Result
from tests.conftest import PrivateRedis, Stack, free_port, kernel_processes

LINES = 20  # numbered lines each cell prints
CELL_BOUND = 90.0  # seconds a cell may take, reconnects included; later its output counts as lost
CONNECT_TIMEOUT = 10.0  # one WebSocket handshake
HTTP_TIMEOUT = 15.0  # one REST call
SLICE = 5.0  # collect in slices, to notice a kernel reported dead meanwhile
DYING_SOCKET = 1.0  # a socket that broke this soon after a request, before any output
DYING_KEY = "requests lost in a dying gateway's socket"
MUST_BE_ZERO = ("cells with lost output", "cells out of order", "kernels lost", "duplicate kernels",
                "orphan kernel processes", "404 answers for a live kernel", "client errors")


class Tally:
    """Counters and notes, shared by the client threads."""

    def __init__(self) -> None:
        self.counts: collections.Counter[str] = collections.Counter()
        self.notes: list[str] = []
        self.dropped_notes = 0
        self._lock = threading.Lock()
        self.t0 = time.monotonic()

    def add(self, key: str, n: int = 1) -> None:
        with self._lock:
            self.counts[key] += n

    def note(self, text: str) -> None:
        with self._lock:
            if len(self.notes) < 60:
                self.notes.append(f"[{time.monotonic() - self.t0:6.1f}s] {text}")
            else:
                self.dropped_notes += 1


class CellLost(Exception):
    """A cell that could not be completed; ``dead`` when the kernel was reported dead."""

    def __init__(self, why: str, res: Result, dead: bool = False, mid: str = "") -> None:
        super().__init__(why)
        self.why = why
        self.res = res
        self.dead = dead
        self.mid = mid


def cell_code(n: int) -> str:
    """Cell ``n``: it notes that it ran (so a lost cell can be told from a lost request),
    prints LINES numbered lines and ends with an expression."""
    return (f"soak_ran.append({n})\nimport time\nfor i in range({LINES}):\n"
            f"    print('{n}-%d' % i, flush=True); time.sleep(0.02)\n'{n}-done'")


def judge(res: Result, n: int) -> tuple[int, int, list[str], list[str]]:
    """(lines missing, lines repeated, what was lost, what came out of order) of cell ``n``.

    A stream message that arrives again (same msg_id) is a repeat; the rest, in the order it
    arrived, must be exactly the cell's lines, followed by its result and an ``ok`` reply.
    """
    seen: set[str] = set()
    out, repeated = "", 0
    for msg in res.messages:
        if msg.get("msg_type") != "stream" or msg["content"].get("name") != "stdout":
            continue
        mid = msg.get("header", {}).get("msg_id", "")
        text = msg["content"].get("text", "")
        if mid in seen:
            repeated += max(1, text.count("\n"))
            continue
        seen.add(mid)
        out += text
    want = [f"{n}-{i}" for i in range(LINES)]
    got = out.splitlines()
    missing = len(set(want) - set(got))
    lost, disorder = [], []
    if missing:
        lost.append(f"{missing} of {LINES} lines missing")
    elif got != want:
        disorder.append(f"lines out of order or garbled: {got}")
    if res.result != repr(f"{n}-done"):
        lost.append(f"result {res.result!r}, expected {repr(f'{n}-done')!r}")
    if res.status != "ok" or res.error or res.stderr:
        lost.append(f"reply {res.status!r}, error {res.error}, stderr {res.stderr[-200:]!r}")
    return missing, repeated, lost, disorder


def read_arrived(ch: Channel) -> None:
    """Read every frame that has already arrived, as a browser has by the time its user runs
    a cell: a socket the gateway closed (or a gateway that died) is then noticed before the
    request is written into it, and JupyterLab holds the request until it has reconnected.
    Raises WebSocketConnectionClosedException (or OSError) for a closed socket."""
    sock = ch.ws.sock
    while sock is not None and select.select([sock], [], [], 0)[0]:
        ch.other.append(ch.recv(1.0))


def summary(types: list[Any]) -> str:
    """['status', 'stream', 'stream'] → 'status, stream x2' (in order of first appearance)."""
    if types is None:
        return "(nothing readable)"
    counts = collections.Counter(types)
    return ", ".join(f"{t} x{counts[t]}" if counts[t] > 1 else str(t) for t in dict.fromkeys(types)) \
        or "nothing"


class Client:
    """One JupyterLab-like client of one kernel: one WebSocket, reconnected when it breaks."""

    def __init__(self, soak: Soak, kid: str, session: str) -> None:
        self.soak = soak
        self.kid = kid
        self.session = session
        self.ch: Channel | None = None
        self.dead = False
        self.trace: list[str] = []  # the current cell's connections, for a lost cell's note
        self.lost: list[int] = []  # cells that could not be completed
        # ...of which the request went into a socket whose gateway died at that moment: the
        # socket broke within DYING_SOCKET seconds of the send, before any of the cell's output
        self.into_dying_socket: set[int] = set()
        self.broke_at_send: bool = False

    def drop(self) -> None:
        if self.ch is not None:
            try:
                self.ch.close()
            except Exception:
                pass
            self.ch = None

    def connect(self, deadline: float, res: Result) -> Channel:
        """A WebSocket on either gateway with this client's session_id, retried until ``deadline``."""
        last = ""
        while True:
            base = random.choice(self.soak.bases)
            try:
                ch = Channel(base, self.kid, session=self.session, timeout=CONNECT_TIMEOUT)
                self.trace.append(f"{self.soak.clock():.1f}s connected to :{base.rsplit(':', 1)[1]}")
                return ch
            except websocket.WebSocketBadStatusException as exc:
                last = f"{base}: HTTP {exc.status_code}"
                if exc.status_code == 404:
                    self.soak.tally.add("404 answers for a live kernel")
                    self.soak.tally.note(f"kernel {self.kid[:8]}: WebSocket answered 404 at {base}: "
                                         f"{(exc.resp_body or b'')[:200]!r}")
                elif exc.status_code not in (502, 503):
                    self.soak.tally.note(f"kernel {self.kid[:8]}: WebSocket answered "
                                         f"{exc.status_code} at {base}")
            except (websocket.WebSocketException, OSError) as exc:
                last = f"{base}: {type(exc).__name__}: {exc}"
            if time.monotonic() + 0.3 >= deadline:
                raise CellLost(f"no gateway took the WebSocket within the bound (last: {last})", res)
            time.sleep(0.3)

    def run(self, code: str, bound: float = CELL_BOUND) -> Result:
        """Execute ``code`` and collect its messages until reply and idle, across reconnects."""
        deadline = time.monotonic() + bound
        res = Result()
        mid = uuid.uuid4().hex
        sent = False
        sent_at = 0.0
        self.trace = []
        self.broke_at_send = False
        content = {"code": code, "silent": False, "store_history": True, "user_expressions": {},
                   "allow_stdin": False, "stop_on_error": True}
        while True:
            if self.ch is None:
                self.ch = self.connect(deadline, res)
            ch = self.ch
            try:
                if not sent:
                    ch.other.clear()
                    read_arrived(ch)
                    ch.send("execute_request", content, msg_id=mid)
                    sent, sent_at = True, time.monotonic()
                    self.trace.append(f"{self.soak.clock():.1f}s sent {mid[:8]}")
                left = deadline - time.monotonic()
                if left <= 0:
                    raise TimeoutError
                ch.collect(mid, timeout=min(SLICE, left), into=res)
                return res
            except (TimeoutError, websocket.WebSocketTimeoutException):
                dead = any(m.get("msg_type") == "status" and not m.get("parent_header")
                           and m.get("content", {}).get("execution_state") == "dead"
                           for m in ch.other)
                ch.other.clear()
                if dead:
                    raise CellLost("the gateway reported the kernel dead", res, True, mid) from None
                if time.monotonic() >= deadline:
                    raise CellLost(f"no reply and idle within {bound:.0f}s", res, False, mid) from None
            except (websocket.WebSocketException, OSError) as exc:
                self.soak.tally.add("reconnects")
                self.trace.append(f"{self.soak.clock():.1f}s socket broke ({type(exc).__name__})")
                if sent and not res.messages and time.monotonic() - sent_at < DYING_SOCKET:
                    self.broke_at_send = True
                if not sent:  # noticed before the request went out: it goes on the next socket
                    self.soak.tally.add("closed sockets noticed before a request")
                if self.soak.verbose:
                    self.soak.tally.note(f"kernel {self.kid[:8]}: socket broke mid-cell "
                                         f"({type(exc).__name__}); reconnecting")
                self.drop()

    def loop(self) -> None:
        n = 0
        try:
            while not self.soak.stop.is_set() and not self.dead:
                n += 1
                try:
                    res = self.run(cell_code(n))
                except CellLost as lost:
                    self.soak.tally.add("cells")
                    self.soak.tally.add("cells with lost output")
                    self.soak.tally.add("cells never completed")
                    missing = judge(lost.res, n)[0]
                    self.lost.append(n)
                    if self.broke_at_send:
                        self.into_dying_socket.add(n)
                    got = [m.get("msg_type") for m in lost.res.messages]
                    self.soak.tally.note(
                        f"kernel {self.kid[:8]} cell {n}: lost: {lost.why} ({missing} of {LINES} "
                        f"lines missing); client got {summary(got)}; {'; '.join(self.trace)}")
                    if lost.dead or self.soak.is_dead(self.kid):
                        self.dead = True
                        self.soak.tally.note(f"kernel {self.kid[:8]}: dead; its client stops")
                    continue
                missing, repeated, lost_, disorder = judge(res, n)
                self.soak.tally.add("cells")
                self.soak.tally.add("lines repeated", repeated)
                if lost_:
                    self.soak.tally.add("cells with lost output")
                elif disorder:
                    self.soak.tally.add("cells out of order")
                if lost_ or disorder:
                    self.soak.tally.note(f"kernel {self.kid[:8]} cell {n}: "
                                         f"{'; '.join(lost_ + disorder)}")
                time.sleep(random.uniform(0.1, 0.4))  # a person's pause between cells
        except Exception:
            self.soak.tally.add("client errors")
            self.soak.tally.note(f"kernel {self.kid[:8]}: client failed: {traceback.format_exc()[-600:]}")
        finally:
            self.drop()


class Soak:
    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.verbose = args.verbose
        self.tally = Tally()
        self.stop = threading.Event()
        self.faults: collections.Counter[str] = collections.Counter()
        self.rng = random.Random(args.seed)
        self.worker_down: list[float] = []
        self.tmp = Path(tempfile.mkdtemp(prefix="poolgate-soak-"))
        self.server = PrivateRedis(self.tmp)
        self.stack: Stack | None = None
        self.bases: list[str] = []
        self.kids: list[str] = []
        self.clients: list[Client] = []
        self.phase = "setup"

    # -- REST, bounded -----------------------------------------------------------------------

    def rest(self, method: str, path: str, bound: float = 60.0) -> requests.Response:
        """One REST call on either gateway, retried on 502/503 and connection errors until
        ``bound`` seconds have passed; any other answer is returned."""
        deadline = time.monotonic() + bound
        last: Any = None
        while True:
            base = random.choice(self.bases)
            try:
                r = requests.request(method, base + path, timeout=HTTP_TIMEOUT)
                if r.status_code not in (502, 503):
                    return r
                last = f"HTTP {r.status_code}: {r.text[:200]}"
            except requests.RequestException as exc:
                last = f"{type(exc).__name__}: {exc}"
            if time.monotonic() + 0.5 >= deadline:
                raise TimeoutError(f"{method} {path}: no answer but 503s/errors for {bound:.0f}s "
                                   f"(last: {last})")
            time.sleep(0.5)

    def clock(self) -> float:
        return time.monotonic() - self.tally.t0

    def is_dead(self, kid: str) -> bool:
        try:
            r = self.rest("GET", f"/api/kernels/{kid}", bound=20)
        except TimeoutError:
            return False
        return r.status_code == 200 and r.json().get("execution_state") == "dead"

    # -- faults ------------------------------------------------------------------------------

    def fault(self, kind: str) -> None:
        stack = self.stack
        assert stack is not None
        t0 = time.monotonic()
        if kind == "gateway":
            i = self.rng.randrange(len(stack.gateways))
            proc = stack.gateways.pop(i)
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            port = int(self.bases[i].rsplit(":", 1)[1])

            def gateway_back() -> None:
                try:
                    stack.start_gateway(port)
                except BaseException:
                    self.kill_group(stack.gateways.pop())  # a failed start leaves nothing behind
                    raise
                stack.gateways.insert(i, stack.gateways.pop())

            self._retry(gateway_back, "gateway restart")
        elif kind == "worker":
            stack.kill_worker("local")

            def worker_back() -> None:
                try:
                    stack.start_worker("local")
                except BaseException:
                    self.kill_group(stack.workers["local"])
                    raise

            self._retry(worker_back, "worker restart")
            down = time.monotonic() - t0
            self.worker_down.append(down)
            if down > self.args.heartbeat_ttl * 2 / 3:  # its kernels' heartbeats may have expired
                self.tally.note(f"worker fault: down {down:.1f}s, longer than 2/3 of the "
                                f"heartbeat TTL ({self.args.heartbeat_ttl:.0f}s)")
        else:
            self.server.kill()
            self._retry(self.server.start, "redis restart")
        self.faults[kind] += 1
        print(f"soak: {time.monotonic() - self.tally.t0:6.1f}s fault {sum(self.faults.values())}: "
              f"{kind} ({time.monotonic() - t0:.1f}s to bring it back)", flush=True)

    @staticmethod
    def kill_group(proc: Any) -> None:
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        proc.wait()

    def _retry(self, fn: Any, what: str) -> None:
        for attempt in range(3):
            try:
                fn()
                return
            except Exception as exc:
                self.tally.add("faults not recovered at once")
                self.tally.note(f"{what} failed (attempt {attempt + 1}): {str(exc)[-300:]}")
                time.sleep(1)
        raise RuntimeError(f"{what} failed 3 times")

    # -- kernel processes --------------------------------------------------------------------

    @staticmethod
    def kernel_processes() -> list[psutil.Process]:
        return kernel_processes()

    @staticmethod
    def alive(p: psutil.Process) -> bool:
        try:
            return p.is_running() and p.status() != psutil.STATUS_ZOMBIE
        except psutil.Error:
            return False

    @staticmethod
    def kernel_id_of(p: psutil.Process) -> str:
        try:
            return str(p.environ().get("KERNEL_ID", ""))
        except psutil.Error:
            return ""

    # -- the run -----------------------------------------------------------------------------

    def setup(self) -> None:
        a = self.args
        self.server.start()
        self.stack = Stack(self.tmp, "redis", db=0, slots=max(4, a.kernels), ttl=a.heartbeat_ttl,
                           redis_url=f"redis://127.0.0.1:{self.server.port}").start()
        second = free_port()
        self.stack.start_gateway(second)
        self.bases = [self.stack.url, f"http://127.0.0.1:{second}"]
        for _ in range(a.kernels):
            r = self.rest("POST", "/api/kernels", bound=120)
            if r.status_code != 201:
                raise RuntimeError(f"cannot start a kernel: {r.status_code} {r.text[:300]}")
            self.kids.append(r.json()["id"])
        for kid in self.kids:  # state the final check looks for: a restarted kernel lost it
            client = Client(self, kid, f"setup-{kid[:8]}")
            res = client.run(f"soak_token = '{kid}'\nsoak_ran = []\n'set'", bound=60)
            client.drop()
            if res.result != "'set'":
                raise RuntimeError(f"kernel {kid}: the first cell failed: {res}")

    def run(self) -> int:
        a = self.args
        self.setup()
        self.phase = "faults"
        print(f"soak: {a.kernels} kernels started on {self.bases}; faults for {a.minutes} min "
              f"(logs in {self.tmp / 'logs'})", flush=True)
        clients = self.clients = [Client(self, kid, f"soak-{kid[:8]}") for kid in self.kids]
        threads = [threading.Thread(target=c.loop, name=f"client-{c.kid[:8]}", daemon=True)
                   for c in clients]
        for t in threads:
            t.start()
        deadline = time.monotonic() + a.minutes * 60
        while time.monotonic() < deadline:
            time.sleep(min(self.rng.uniform(3, 8), max(0.0, deadline - time.monotonic())))
            if time.monotonic() >= deadline:
                break
            self.fault(self.rng.choice(["gateway", "worker", "redis"]))
        self.phase = "closing"
        self.stop.set()
        join_by = time.monotonic() + CELL_BOUND + 30
        for t in threads:
            t.join(max(0.0, join_by - time.monotonic()))
        stuck = [t.name for t in threads if t.is_alive()]
        if stuck:  # cannot happen with every wait bounded; counted, never waited for
            self.tally.add("cells with lost output", len(stuck))
            self.tally.note(f"client threads still running after the bound: {stuck}")
        print(f"soak: {time.monotonic() - self.tally.t0:6.1f}s faults over; clients done; "
              f"checking every kernel", flush=True)
        self.final_checks()
        return self.report()

    def final_checks(self) -> None:
        c = self.tally
        models: dict[str, dict[str, Any]] = {}
        try:
            r = self.rest("GET", "/api/kernels", bound=90)
            if r.status_code == 200:
                models = {m["id"]: m for m in r.json()}
            else:
                c.note(f"final listing: HTTP {r.status_code} {r.text[:200]}")
        except TimeoutError as exc:
            c.note(f"final listing: {exc}")
        lost: dict[str, str] = {}
        for kid in self.kids:
            if kid not in models:  # Jupyter Server asks for it on its own before dropping it
                try:
                    r = self.rest("GET", f"/api/kernels/{kid}", bound=60)
                    if r.status_code == 200:
                        models[kid] = r.json()
                        c.note(f"kernel {kid[:8]}: missing from the listing, found on its own")
                    else:
                        lost[kid] = f"not listed; GET answers {r.status_code} {r.text[:200]}"
                except TimeoutError as exc:
                    lost[kid] = f"not listed; {exc}"
            state = models.get(kid, {}).get("execution_state")
            if kid in models and state == "dead":
                lost[kid] = f"dead: {models[kid].get('poolgate', {}).get('reason', '')[:200]}"
        extra = [k for k in models if k not in self.kids]
        for k in extra:
            c.note(f"duplicate kernel {k}: listed, nobody started it: {models[k]}")

        # every kernel answers a cell through a fresh connection, with its state intact
        answers: dict[str, str] = {}
        lost_cells = {cl.kid: cl.lost for cl in self.clients}
        dying = {cl.kid: cl.into_dying_socket for cl in self.clients}

        def verify(kid: str) -> None:
            client = Client(self, kid, f"verify-{uuid.uuid4().hex[:8]}")
            try:
                res = client.run(f"print(soak_token)\nprint([n for n in {lost_cells.get(kid, [])} "
                                 f"if n in soak_ran])\n'alive'", bound=60)
                out = res.stdout.splitlines()
                if len(out) != 2 or out[0] != kid or res.result != "'alive'":
                    answers[kid] = f"state lost or wrong answer: {res.stdout[-200:]!r} {res.error}"
                else:
                    answers[kid] = ""
                    ran = set(json.loads(out[1]))
                    for n in lost_cells.get(kid, []):
                        if n in ran:
                            self.tally.add("lost cells the kernel ran")
                        elif n in dying.get(kid, ()):
                            # Inherent to the protocol (README "Reliability"): not lost output.
                            self.tally.add(DYING_KEY)
                            self.tally.add("cells with lost output", -1)
                        else:
                            self.tally.add("lost cells whose request never reached the kernel")
            except CellLost as exc:
                answers[kid] = f"no answer: {exc.why}"
            except Exception as exc:
                answers[kid] = f"no answer: {type(exc).__name__}: {exc}"
            finally:
                client.drop()

        checks = [threading.Thread(target=verify, args=(k,), daemon=True)
                  for k in self.kids if k not in lost]
        for t in checks:
            t.start()
        by = time.monotonic() + 90
        for t in checks:
            t.join(max(0.0, by - time.monotonic()))
        for kid in self.kids:
            if kid not in lost and answers.get(kid, "no answer within 90s"):
                lost[kid] = answers.get(kid, "no answer within 90s")
        for kid, why in lost.items():
            c.note(f"kernel {kid} lost: {why}")
        c.counts["kernels lost"] = len(lost)
        c.counts["duplicate kernels"] = len(extra)

        # processes: one per live kernel, none left after every kernel is deleted
        live = {k for k, m in models.items() if m.get("execution_state") != "dead"}
        per_kernel: collections.Counter[str] = collections.Counter()
        orphans: set[int] = set()
        for p in self.kernel_processes():
            kid = self.kernel_id_of(p)
            per_kernel[kid] += 1
            if kid not in live or per_kernel[kid] > 1:
                orphans.add(p.pid)
                c.note(f"kernel process {p.pid} (KERNEL_ID={kid}) belongs to no live kernel "
                       f"or is a second process of one")
        deleted_ok = self.delete_all(list(models))
        deadline = time.monotonic() + 30
        left = self.kernel_processes()
        while left and time.monotonic() < deadline:
            time.sleep(0.5)
            left = [p for p in left if self.alive(p)]
        for p in left:
            if p.pid not in orphans:
                orphans.add(p.pid)
                c.note(f"kernel process {p.pid} (KERNEL_ID={self.kernel_id_of(p)}) still runs "
                       f"30s after every kernel was deleted")
        if not deleted_ok:
            c.note("not every DELETE was answered 204/404")
        self.orphans = orphans

    def delete_all(self, ids: list[str]) -> bool:
        codes: dict[str, int] = {}

        def delete(kid: str) -> None:
            try:
                codes[kid] = self.rest("DELETE", f"/api/kernels/{kid}", bound=60).status_code
            except TimeoutError as exc:
                self.tally.note(f"DELETE {kid}: {exc}")
                codes[kid] = 0

        threads = [threading.Thread(target=delete, args=(k,), daemon=True) for k in ids]
        for t in threads:
            t.start()
        by = time.monotonic() + 90
        for t in threads:
            t.join(max(0.0, by - time.monotonic()))
        return all(codes.get(k) in (204, 404) for k in ids)

    def stop_everything(self) -> int:
        """Stop the stack and Redis; kill (and return the count of) kernel processes that
        outlived their worker."""
        if self.stack is not None:
            try:
                self.stack.stop()
            except Exception:
                traceback.print_exc()
        if self.server.proc is not None and self.server.proc.poll() is None:
            self.server.kill()
        time.sleep(1)
        left = self.kernel_processes()
        for p in left:
            try:
                p.kill()
            except psutil.Error:
                pass
        return len(left)

    def report(self) -> int:
        a, c = self.args, self.tally.counts
        after_stop = self.stop_everything()
        orphans = getattr(self, "orphans", set())
        c["orphan kernel processes"] = len(orphans)
        if after_stop:
            self.tally.note(f"{after_stop} kernel processes outlived the stopped stack (killed)")
        faults = ", ".join(f"{k} {self.faults[k]}" for k in ("gateway", "worker", "redis"))
        down = max(self.worker_down) if self.worker_down else 0.0
        failed = [k for k in MUST_BE_ZERO if c[k]]
        lines = [
            f"soak: {a.minutes:g} min, {a.kernels} kernels, seed {a.seed}, heartbeat TTL "
            f"{a.heartbeat_ttl:g}s; {sum(self.faults.values())} faults ({faults}); worker down at "
            f"most {down:.1f}s",
            f"soak: cells checked {c['cells']}, cells with lost output {c['cells with lost output']}"
            f" (never completed: {c['cells never completed']}, of which the kernel ran "
            f"{c['lost cells the kernel ran']} and never got the request of "
            f"{c['lost cells whose request never reached the kernel']} for no known reason), "
            f"cells out of order {c['cells out of order']}, lines repeated {c['lines repeated']}",
            f"soak: requests written into a socket as its gateway died, never delivered (the "
            f"kernel never ran them; README: what a gateway crash can still lose): "
            f"{c[DYING_KEY]}",
            f"soak: kernels lost {c['kernels lost']}, duplicate kernels {c['duplicate kernels']}, "
            f"orphan kernel processes {c['orphan kernel processes']} (left after the stack "
            f"stopped: {after_stop}), 404 answers for a live kernel "
            f"{c['404 answers for a live kernel']}",
            f"soak: reconnects {c['reconnects']} (of which noticed before a request went out: "
            f"{c['closed sockets noticed before a request']}), faults not recovered at once "
            f"{c['faults not recovered at once']}, client errors {c['client errors']}",
        ]
        for note in self.tally.notes:
            lines.append(f"soak: note {note}")
        if self.tally.dropped_notes:
            lines.append(f"soak: ... {self.tally.dropped_notes} more notes")
        lines.append("soak: PASS: every count that must be zero is zero" if not failed else
                     f"soak: FAIL: {', '.join(failed)}")
        print("\n".join(lines), flush=True)
        return 0 if not failed else 1


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--minutes", type=float, default=5)
    ap.add_argument("--kernels", type=int, default=8)
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--heartbeat-ttl", type=float, default=15.0,
                    help="the pool's heartbeat_ttl (the product's default: 15)")
    ap.add_argument("--verbose", action="store_true", help="a note for every reconnect")
    args = ap.parse_args()
    random.seed(args.seed)
    soak = Soak(args)
    # The last resort: everything is bounded, but should the closing phase still overrun,
    # say so, clean up and exit rather than hang.
    hard = args.minutes * 60 + 900

    def watchdog() -> None:
        time.sleep(hard)
        print(f"soak: INCOMPLETE: still in phase {soak.phase!r} after {hard:.0f}s; stopping",
              flush=True)
        try:
            soak.stop.set()
            soak.stop_everything()
        finally:
            os._exit(2)

    threading.Thread(target=watchdog, name="watchdog", daemon=True).start()
    try:
        return soak.run()
    except BaseException:
        traceback.print_exc()
        soak.stop.set()
        print(f"soak: ABORTED in phase {soak.phase!r}; counts so far: {dict(soak.tally.counts)}",
              flush=True)
        for note in soak.tally.notes:
            print(f"soak: note {note}")
        soak.stop_everything()
        return 2


if __name__ == "__main__":
    raise SystemExit(main())
