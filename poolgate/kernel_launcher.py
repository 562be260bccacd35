"""The kernel launcher: wraps a kernelspec's argv where a resource manager picks the host.

Runs inside the kernel's container, pod or YARN container as ``python -m
poolgate.kernel_launcher -- ARGV...`` (``{connection_file}`` in ARGV is substituted). It picks
free ports (or takes ``--ports``), writes the connection file, starts the kernel in a process
group of its own, waits until the kernel listens on all five ports (a port it picked that
another process took first starts the kernel again on fresh ones), and sends host, ports and
key back to the launching worker in one authenticated, encrypted reply (Fernet). A kernel that
fails to start is reported the same way, with the tail of its output, so the client's error
says why. Afterwards it forwards SIGINT/SIGTERM to the kernel, listens (same authentication)
for signal commands from workers, and exits with the kernel's exit status.

The rule of this module: the standard library and ``cryptography`` only, and nothing else of
poolgate but ``poolgate.yarn_am`` (standard library only), imported only in a YARN AM container,
so that any kernel image can carry this one file. The worker's half is
``workers/launchers/reply.py``, which imports the wire format from here.

As a YARN application's AM container (the yarn pool sets ``POOLGATE_YARN_AM=1``, and the
NodeManager ``CONTAINER_ID`` and ``HADOOP_TOKEN_FILE_LOCATION``) it is also the application's
ApplicationMaster (poolgate/yarn_am.py, the one other module it may import): it registers with
the ResourceManager before it starts the kernel (a refusal fails the launch with the RM's
reason), heartbeats until the kernel ends, and then unregisters with SUCCEEDED (the kernel
exited 0), KILLED (a signal ended it) or FAILED (any other status, with the tail of its output),
so the application ends FINISHED with that final status. An AM_SHUTDOWN from the RM ends the
kernel; a SIGTERM (the NodeManager killing the container) ends it without unregistering, as the
RM asked for that.

Environment (set by the worker; removed from the kernel's environment):
  POOLGATE_RESPONSE_ADDRESS  host:port where the worker waits for the reply
  POOLGATE_RESPONSE_KEY      a Fernet key for this launch only
  POOLGATE_RESPONSE_TOKEN    a one-time token the reply must carry
  POOLGATE_LAUNCH_ID         which launch this is (sent in clear, picks the key)
  POOLGATE_KERNEL_ID         the kernel's id
Read, and left to the kernel:
  POOLGATE_YARN_AM           1: register as the YARN AM (the yarn pool's REST submissions)
  POOLGATE_AM_HEARTBEAT      seconds between AM heartbeats (default 10)
"""
from __future__ import annotations

import argparse
import base64
import collections
import hashlib
import hmac
import json
import logging
import os
import secrets
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from typing import TYPE_CHECKING, Any

from cryptography.fernet import Fernet, InvalidToken

if TYPE_CHECKING:
    from poolgate.yarn_am import ApplicationMaster

log = logging.getLogger("poolgate.kernel_launcher")

MAGIC = b"poolgate-reply/1"       # a reply: MAGIC SP launch-id SP fernet-token LF
COMMAND_MAGIC = b"poolgate-cmd/1"  # a command: COMMAND_MAGIC SP fernet-token LF
MAX_REPLY = 64 * 1024              # bytes a reply or a command may have, all told
CHANNELS = ("shell", "iopub", "stdin", "control", "hb")
ENV_PREFIX = "POOLGATE_"
SECRET_ENV = ("POOLGATE_RESPONSE_ADDRESS", "POOLGATE_RESPONSE_KEY", "POOLGATE_RESPONSE_TOKEN",
              "POOLGATE_LAUNCH_ID")
TAIL_BYTES = 4000
PORT_TAKEN = "one of the kernel's ports was taken"
# Starts on fresh ports when one of the free ports picked was taken before the kernel bound it
# (another process took it in between): the kernel is started again, up to this many times.
PORT_ATTEMPTS = 3


# -- the wire format (shared with workers/launchers/reply.py) ----------------------------------


def seal(key: str | bytes, payload: dict[str, Any]) -> bytes:
    """``payload`` as JSON, encrypted and authenticated with Fernet ``key`` (timestamped)."""
    return Fernet(key).encrypt(json.dumps(payload, sort_keys=True).encode())


def unseal(key: str | bytes, token: bytes, ttl: float | None = None) -> dict[str, Any]:
    """The payload of a :func:`seal` token; InvalidToken if forged, corrupt or older than ttl."""
    data = Fernet(key).decrypt(token, ttl=int(ttl) if ttl else None)
    payload = json.loads(data)
    if not isinstance(payload, dict):
        raise ValueError("payload is not a JSON object")
    return payload


def reply_line(launch_id: str, key: str | bytes, payload: dict[str, Any]) -> bytes:
    """One reply as it travels to the worker."""
    return b" ".join((MAGIC, launch_id.encode(), seal(key, payload))) + b"\n"


def control_key(connection_key: str) -> bytes:
    """The Fernet key of a kernel's command port, derived from its connection key: whoever may
    drive the kernel (holds its connection key) may signal it, and no other secret is kept."""
    digest = hmac.new(connection_key.encode(), b"poolgate-launcher-control", hashlib.sha256)
    return base64.urlsafe_b64encode(digest.digest())


def command_line(connection_key: str, kernel_id: str, signum: int) -> bytes:
    """A signal command for a launcher's command port (valid for 30 s, used once)."""
    payload = {"kernel_id": kernel_id, "cmd": "signal", "signum": int(signum),
               "nonce": secrets.token_hex(8)}
    return b" ".join((COMMAND_MAGIC, seal(control_key(connection_key), payload))) + b"\n"


def read_line(sock: socket.socket, limit: int, deadline: float) -> bytes:
    """Bytes up to the first LF; ValueError past ``limit`` bytes, TimeoutError past deadline."""
    buf = b""
    while b"\n" not in buf:
        left = deadline - time.monotonic()
        if left <= 0:
            raise TimeoutError("no complete line in time")
        sock.settimeout(left)
        chunk = sock.recv(4096)
        if not chunk:
            break
        buf += chunk
        if len(buf) > limit:
            raise ValueError(f"more than {limit} bytes")
    line = buf.split(b"\n", 1)[0]
    if len(line) > limit:
        raise ValueError(f"more than {limit} bytes")
    return line


# -- the launcher ---------------------------------------------------------------------------


def route_ip(address: str) -> str:
    """The local IP on the route to ``address`` (host:port): where the worker reaches us."""
    host, _, port = address.rpartition(":")
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        try:
            s.connect((host, int(port or 9)))  # no packet is sent
            return str(s.getsockname()[0])
        except OSError:
            return socket.gethostbyname(socket.gethostname())


def free_ports(bind_ip: str, count: int) -> list[int]:
    """``count`` ports free now, bound together and released for the kernel to bind."""
    held = []
    try:
        for _ in range(count):
            s = socket.socket()
            held.append(s)
            s.bind((bind_ip, 0))
        return [int(s.getsockname()[1]) for s in held]
    finally:
        for s in held:
            s.close()


class Kernel:
    """The kernel process, its output's tail (echoed to our stdout), and signals to its group."""

    def __init__(self, argv: list[str], env: dict[str, str]) -> None:
        self.tail: collections.deque[bytes] = collections.deque()
        self.size = 0
        self.proc = subprocess.Popen(argv, env=env, stdin=subprocess.DEVNULL,
                                     stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                     start_new_session=True)
        threading.Thread(target=self._pump, daemon=True, name="kernel-output").start()

    def _pump(self) -> None:
        assert self.proc.stdout is not None
        fd = self.proc.stdout.fileno()
        out = getattr(sys.stdout, "buffer", None)
        for chunk in iter(lambda: os.read(fd, 4096), b""):
            if out is not None:
                out.write(chunk)
                out.flush()
            self.tail.append(chunk)
            self.size += len(chunk)
            while self.size - len(self.tail[0]) >= TAIL_BYTES and len(self.tail) > 1:
                self.size -= len(self.tail.popleft())

    def output(self) -> str:
        return b"".join(self.tail)[-TAIL_BYTES:].decode(errors="replace")

    def signal(self, signum: int) -> None:
        try:
            os.killpg(self.proc.pid, signum)
        except (ProcessLookupError, PermissionError):
            pass


def listening(ip: str, ports: list[int]) -> bool:
    for port in ports:
        try:
            socket.create_connection((ip, port), timeout=0.5).close()
        except OSError:
            return False
    return True


def wait_listening(kernel: Kernel, ip: str, ports: list[int], timeout: float) -> str | None:
    """None once the kernel accepts connections on every port; else why it never will."""
    deadline = time.monotonic() + timeout
    probe_ip = "127.0.0.1" if ip in ("0.0.0.0", "") else ip
    while time.monotonic() < deadline:
        code = kernel.proc.poll()
        if code is not None:
            time.sleep(0.1)  # let the pump read its last words
            return f"the kernel exited with status {code} while starting"
        if "Address already in use" in kernel.output():
            return PORT_TAKEN
        if listening(probe_ip, ports):
            return None
        time.sleep(0.1)
    return f"the kernel did not listen on its ports within {timeout:.0f}s"


def send_reply(address: str, line: bytes, deadline: float) -> str:
    """Deliver the reply, retrying while the worker cannot be reached; its answer (ok/refused)."""
    host, _, port = address.rpartition(":")
    last = ""
    while time.monotonic() < deadline:
        try:
            with socket.create_connection((host, int(port)), timeout=5) as s:
                s.sendall(line)
                return read_line(s, 256, time.monotonic() + 10).decode(errors="replace")
        except (OSError, ValueError) as exc:
            last = str(exc)
            time.sleep(0.5)
    return f"unreachable: {last}"


class CommandPort:
    """Signal commands from workers, sealed with the kernel's control key, each used once."""

    def __init__(self, bind_ip: str, port: int, kernel_id: str, connection_key: str,
                 kernel: Kernel) -> None:
        self.sock = socket.socket()
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind((bind_ip, port))
        self.sock.listen(8)
        self.port = int(self.sock.getsockname()[1])
        self.kernel_id, self.key, self.kernel = kernel_id, control_key(connection_key), kernel
        self.seen: set[str] = set()
        threading.Thread(target=self._serve, daemon=True, name="command-port").start()

    def _serve(self) -> None:
        while True:
            conn, peer = self.sock.accept()
            with conn:
                try:
                    conn.sendall(self._handle(read_line(conn, MAX_REPLY, time.monotonic() + 5)))
                except (OSError, ValueError, TimeoutError) as exc:
                    log.warning("command from %s refused: %s", peer[0], exc)

    def _handle(self, line: bytes) -> bytes:
        magic, _, token = line.partition(b" ")
        if magic != COMMAND_MAGIC:
            raise ValueError("not a poolgate command")
        try:
            cmd = unseal(self.key, token, ttl=30)
        except (InvalidToken, ValueError) as exc:
            raise ValueError(f"not authentic ({type(exc).__name__})") from None
        nonce = str(cmd.get("nonce", ""))
        if cmd.get("kernel_id") != self.kernel_id or not nonce or nonce in self.seen:
            raise ValueError("wrong kernel or a replayed command")
        self.seen.add(nonce)
        if cmd.get("cmd") != "signal" or int(cmd.get("signum", 0)) not in (
                signal.SIGINT, signal.SIGTERM, signal.SIGKILL, signal.SIGQUIT, signal.SIGHUP):
            return b"refused unknown command\n"
        self.kernel.signal(int(cmd["signum"]))
        log.info("signal %s sent to the kernel on request", cmd["signum"])
        return b"ok\n"


def register_am(env: dict[str, str], host: str) -> ApplicationMaster:
    """Register this YARN container as its application's AM (poolgate/yarn_am.py); AMError or
    ValueError with the reason when it cannot."""
    from poolgate.yarn_am import ApplicationMaster

    am = ApplicationMaster.from_environment(env)
    if am is None:
        raise ValueError("POOLGATE_YARN_AM is set, and this is not a YARN container (no "
                         "CONTAINER_ID or HADOOP_TOKEN_FILE_LOCATION)")
    am.register(host)
    log.info("registered as the YARN ApplicationMaster of %s (heartbeat every %.1fs)",
             env.get("CONTAINER_ID"), am.heartbeat)
    return am


def finish_am(am: ApplicationMaster, status: str, diagnostics: str) -> None:
    """Unregister with a final status; an RM that cannot be told is logged, not fatal (the
    kernel has ended either way, and the RM then fails the attempt itself)."""
    from poolgate.yarn_am import AMError

    try:
        if am.finish(status, diagnostics):
            log.info("unregistered from the ResourceManager: %s", status)
    except AMError as exc:
        log.error("could not unregister from the ResourceManager (%s): %s", status, exc)
    finally:
        am.close()


def kernel_outcome(kernel_id: str, code: int, output: str) -> tuple[str, str]:
    """(final status, diagnostics) of an AM whose kernel exited with ``code``."""
    if code == 0:
        return "SUCCEEDED", f"kernel {kernel_id} exited with status 0"
    if code < 0:
        return "KILLED", f"kernel {kernel_id} was killed by signal {-code}"
    return "FAILED", f"kernel {kernel_id} exited with status {code}:\n{output[-2000:]}"


def parse_args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m poolgate.kernel_launcher",
                                description="Start a Jupyter kernel and report where it listens "
                                            "to the poolgate worker that launched it.")
    p.add_argument("--ip", default="", help="the address reported to the worker (default: "
                   "this host's address on the route to the worker)")
    p.add_argument("--bind-ip", default="", help="where the kernel listens (default: the "
                   "reported address when it is found here, else 0.0.0.0)")
    p.add_argument("--ports", default="", help="five ports (shell,iopub,stdin,control,hb) "
                   "instead of free ones; a sixth is the command port")
    p.add_argument("--command-port", type=int, default=0, help="the command port (0: free)")
    p.add_argument("--connection-file", default="", help="where to write it (default: temp)")
    p.add_argument("--ready-timeout", type=float, default=120.0)
    p.add_argument("argv", nargs=argparse.REMAINDER, help="the kernel's argv, after --")
    args = p.parse_args(argv)
    if args.argv and args.argv[0] == "--":
        args.argv = args.argv[1:]
    return args


def main(argv: list[str] | None = None, environ: dict[str, str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="[poolgate-launcher %(levelname)s] %(message)s")
    args = parse_args(sys.argv[1:] if argv is None else argv)
    env = dict(os.environ if environ is None else environ)
    try:
        address, key = env["POOLGATE_RESPONSE_ADDRESS"], env["POOLGATE_RESPONSE_KEY"]
        token, launch_id = env["POOLGATE_RESPONSE_TOKEN"], env["POOLGATE_LAUNCH_ID"]
    except KeyError as exc:
        log.error("%s is not set: run by a poolgate worker, not by hand", exc.args[0])
        return 2
    kernel_id = env.get("POOLGATE_KERNEL_ID", "")
    deadline = time.monotonic() + args.ready_timeout + 30
    base = {"token": token, "kernel_id": kernel_id}
    am: ApplicationMaster | None = None
    kernels: list[Kernel] = []
    am_told: list[str] = []    # why the RM ended the attempt (AM_SHUTDOWN), if it did
    signalled: list[int] = []  # SIGTERM: the NodeManager stops the container

    def fail(why: str, output: str = "") -> int:
        log.error("%s", why)
        if am is not None:
            finish_am(am, "FAILED", f"{why}\n{output[-2000:]}".strip())
        answer = send_reply(address, reply_line(launch_id, key, {**base, "ok": False,
                                                                  "error": why, "output": output}),
                            deadline)
        log.info("the worker answered the error report: %s", answer)
        return 3

    if not args.argv:
        return fail("no kernel argv given (expected: -- ARGV...)")
    try:
        ports = [int(p) for p in args.ports.split(",")] if args.ports else []
        if ports and len(ports) not in (5, 6):
            raise ValueError("expected 5 or 6 ports")
    except ValueError as exc:
        return fail(f"--ports {args.ports!r}: {exc}")
    if len(ports) == 6:
        args.command_port = ports.pop()
    ip = args.ip or route_ip(address)
    # Listening on the reported address only: with host networking, not on every interface.
    args.bind_ip = args.bind_ip or ("0.0.0.0" if args.ip else ip)
    ours = not ports  # ports picked here may be picked again when one is taken
    ports = ports or free_ports(args.bind_ip, 5)
    conn_key = secrets.token_hex(16)
    cfile = args.connection_file or os.path.join(
        tempfile.mkdtemp(prefix="poolgate-"), f"kernel-{kernel_id or 'x'}.json")
    if env.get("POOLGATE_YARN_AM") == "1":
        try:
            am = register_am(env, ip)
        except Exception as exc:  # AMError, or a broken token file: the launch fails loudly
            return fail(f"registering as the YARN ApplicationMaster failed: {exc}")

        def shutdown(why: str) -> None:
            log.warning("%s: stopping the kernel", why)
            am_told.append(why)
            for k in kernels:
                k.signal(signal.SIGTERM)
                threading.Timer(5.0, k.signal, (signal.SIGKILL,)).start()

        am.start_heartbeat(shutdown)
    kernel_env = {k: v for k, v in env.items() if k not in SECRET_ENV}
    kernel_argv = [a.replace("{connection_file}", cfile) for a in args.argv]

    def forward(signum: int, _frame: Any) -> None:
        signalled.append(signum)
        if kernels:
            kernels[-1].signal(signum)

    for signum in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP, signal.SIGQUIT):
        signal.signal(signum, forward)
    for attempt in range(1, PORT_ATTEMPTS + 1):
        connection = {"ip": args.bind_ip, "key": conn_key, "transport": "tcp",
                      "signature_scheme": "hmac-sha256", "kernel_name": "",
                      **{f"{c}_port": p for c, p in zip(CHANNELS, ports)}}
        fd = os.open(cfile, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as f:
            json.dump(connection, f)
        try:
            kernel = Kernel(kernel_argv, kernel_env)
        except OSError as exc:
            return fail(f"could not start {kernel_argv[0]!r}: {exc}")
        kernels.append(kernel)
        why = wait_listening(kernel, args.bind_ip, ports, args.ready_timeout)
        if why is None:
            break
        kernel.signal(signal.SIGKILL)
        if why != PORT_TAKEN or not ours or attempt == PORT_ATTEMPTS or signalled:
            return fail(why, kernel.output())
        kernel.proc.wait()
        log.warning("%s; starting it again on fresh ports (attempt %d of %d)", why,
                    attempt + 1, PORT_ATTEMPTS)
        ports = free_ports(args.bind_ip, 5)
    try:
        commands = CommandPort(args.bind_ip, args.command_port, kernel_id, conn_key, kernel)
    except OSError as exc:
        kernel.signal(signal.SIGKILL)
        return fail(f"could not open the command port {args.command_port}: {exc}")
    reply = {**base, "ok": True, "ip": ip, "key": conn_key, "transport": "tcp",
             "signature_scheme": "hmac-sha256", "pid": kernel.proc.pid,
             "command_port": commands.port, **{f"{c}_port": p for c, p in zip(CHANNELS, ports)}}
    answer = send_reply(address, reply_line(launch_id, key, reply), deadline)
    if answer != "ok":
        log.error("the worker did not take the reply (%s); stopping the kernel", answer)
        kernel.signal(signal.SIGKILL)
        if am is not None:
            finish_am(am, "FAILED", f"the worker did not take the kernel's reply: {answer}")
        return 4
    log.info("kernel %s listening on %s ports %s (pid %d)", kernel_id, ip, ports, kernel.proc.pid)
    code = kernel.proc.wait()
    log.info("kernel %s exited with status %d", kernel_id, code)
    if am is not None:
        if am_told or signal.SIGTERM in signalled:  # the RM ended it: nothing to tell it
            am.close()
        else:
            finish_am(am, *kernel_outcome(kernel_id, code, kernel.output()))
    return code if code >= 0 else 128 - code


if __name__ == "__main__":
    sys.exit(main())
