"""ssh launcher, pure half: the pool's options and the remote shell scripts, built from data.

Nothing here opens a connection. Every remote step is one POSIX ``sh`` script that the launcher
feeds to ``sh -s`` on the host's stdin, so neither the kernel's environment nor its connection
key ever appears on a remote command line (where ``ps`` would show it) or in a log.
"""
from __future__ import annotations

import json
import random
import re
import shlex
from collections.abc import Collection
from dataclasses import dataclass

from ..errors import ConfigError, LaunchRejected
from ..protocol import LaunchRequest
from .local_builders import build_connection, parse_port_range

PLACEMENTS = ("round-robin", "least-loaded")
HOST_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")
USER_NAME = re.compile(r"^[a-z_][a-z0-9_.-]*\$?$")
BARE_PYTHON = re.compile(r"^python(\d+(\.\d+)?)?$")
ENV_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
HEREDOC_END = "POOLGATE_CONNECTION_EOF"


@dataclass(frozen=True)
class SSHHost:
    """One host of an ssh pool (``options.hosts[i]`` in queues.yaml)."""

    name: str
    address: str
    port: int = 22
    user: str = ""            # default: the pool's user
    key_file: str = ""        # default: the pool's key_file
    max_kernels: int = 4      # kernels this host runs at once
    kernel_ip: str = ""       # where its kernels listen, as gateways reach them (default: address)

    def __post_init__(self) -> None:
        # ValueError("field: rule"): workers.config.build prefixes the YAML path.
        if not HOST_NAME.match(self.name):
            raise ValueError(f"name: expected letters, digits, '.', '_' or '-', got {self.name!r}")
        if not self.address:
            raise ValueError("address: required (a host name or IP the worker connects to)")
        if not 1 <= self.port <= 65535:
            raise ValueError(f"port: expected 1..65535, got {self.port}")
        if self.max_kernels < 1:
            raise ValueError(f"max_kernels: expected an integer >= 1, got {self.max_kernels}")

    @property
    def label(self) -> str:
        """``a (10.0.0.5:22)``: how logs and error messages name the host."""
        return f"{self.name} ({self.address}:{self.port})"

    @property
    def listen_ip(self) -> str:
        return self.kernel_ip or self.address


@dataclass(frozen=True)
class SSHOptions:
    """Options of a ``launcher: ssh`` pool."""

    hosts: tuple[SSHHost, ...] = ()
    port_range: str = ""             # "50000-50999": kernel ports on the hosts come from here
    placement: str = "round-robin"   # or "least-loaded"
    user: str = ""                   # remote user; default: the worker's own user
    key_file: str = ""               # private key; default: the user's ~/.ssh keys
    known_hosts: str = "~/.ssh/known_hosts"
    auto_add_host_keys: bool = False  # accept unknown host keys (logged as a warning)
    allow_impersonation: bool = False  # KERNEL_USERNAME picks the remote user
    python: str = "python3"          # the remote interpreter that replaces a spec's "python"
    command: str = ""                # replaces the spec's argv; {python}, {connection_file}
    remote_dir: str = "/tmp/poolgate-kernels"  # where connection files live on the hosts
    transport: str = "tcp"
    connect_timeout: float = 10.0
    command_timeout: float = 30.0
    keepalive: float = 15.0          # seconds between keepalives on each host's connection
    poll_interval: float = 2.0       # how often kernels are polled (one command per host)
    check_interval: float = 5.0      # how often a host with kernels is checked for life
    down_for: float = 30.0           # seconds a host that refused stays out of placement

    def __post_init__(self) -> None:
        if not self.hosts:
            raise ValueError("hosts: expected at least one host")
        names = [h.name for h in self.hosts]
        dup = sorted({n for n in names if names.count(n) > 1})
        if dup:
            raise ValueError(f"hosts: host names must be unique; repeated: {', '.join(dup)}")
        if self.placement not in PLACEMENTS:
            raise ValueError(f"placement: expected one of {', '.join(PLACEMENTS)}, "
                             f"got {self.placement!r}")
        if not self.port_range:
            raise ValueError("port_range: required for an ssh pool, e.g. '50000-50999' "
                             "(the ports kernels open on the hosts)")
        try:
            parse_port_range(self.port_range)
        except ConfigError as exc:
            raise ValueError(exc.message) from None
        if not self.remote_dir.startswith("/"):
            raise ValueError(f"remote_dir: expected an absolute path, got {self.remote_dir!r}")
        for name in ("connect_timeout", "command_timeout", "keepalive", "poll_interval",
                     "check_interval", "down_for"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name}: expected a number > 0, got {getattr(self, name)}")

    @property
    def ports(self) -> tuple[int, int]:
        found = parse_port_range(self.port_range)
        assert found is not None
        return found

    def key_for(self, host: SSHHost) -> str:
        return host.key_file or self.key_file


def choose_user(requested: str, host: SSHHost, options: SSHOptions,
                local_user: str) -> tuple[str, str]:
    """The remote user for a launch, and a note for the log when the request was not honoured.

    ``requested`` is KERNEL_USERNAME. It selects the user only where the pool allows
    impersonation; otherwise the pool's user runs the kernel, and the note says so.
    """
    default = host.user or options.user or local_user
    if not requested or requested == default:
        return default, ""
    if not options.allow_impersonation:
        return default, (f"KERNEL_USERNAME={requested!r} does not select the remote user: the "
                         f"pool does not allow impersonation; running as {default!r}")
    if not USER_NAME.match(requested):
        raise LaunchRejected(f"KERNEL_USERNAME={requested!r} is not a valid user name")
    return requested, ""


def build_argv(spec_argv: tuple[str, ...], options: SSHOptions, connection_file: str) -> list[str]:
    """The remote command: the template if the pool sets one, else the spec's argv."""
    argv = shlex.split(options.command) if options.command else list(spec_argv)
    if argv and BARE_PYTHON.match(argv[0]):  # as jupyter_client does, on the remote side
        argv[0] = options.python
    return [a.replace("{python}", options.python).replace("{connection_file}", connection_file)
            .replace("{resource_dir}", "") for a in argv]


def build_env(req: LaunchRequest) -> dict[str, str]:
    """The kernel's environment on the host: the spec's, the request's, and KERNEL_ID."""
    env = dict(req.spec_env)
    env.update(req.env)
    env["KERNEL_ID"] = req.kernel_id
    bad = sorted(k for k in env if not ENV_NAME.match(k))
    if bad:
        raise LaunchRejected(f"env: {', '.join(bad)} cannot be passed to a remote shell")
    return env


def kernel_dir(options: SSHOptions, kernel_id: str) -> str:
    return f"{options.remote_dir.rstrip('/')}/{kernel_id}"


def build_connection_json(host: SSHHost, key: str, ports: list[int], transport: str) -> str:
    """The connection file the remote kernel starts from: fixed ports, bound to ``listen_ip``."""
    return json.dumps(build_connection(host.listen_ip, key, ports, transport), sort_keys=True)


def pick_ports(port_range: tuple[int, int], count: int = 5, rng: random.Random | None = None,
               avoid: Collection[int] = ()) -> list[int]:
    """``count`` distinct ports drawn from the range, none in ``avoid`` (ports handed to other
    kernels on the host) while the range has enough others. The host's own state is not known
    here: a kernel that cannot bind is started again on fresh ports (SSHLauncher)."""
    lo, hi = port_range
    rng = rng or random.SystemRandom()
    left = [p for p in range(lo, hi + 1) if p not in avoid] if avoid else range(lo, hi + 1)
    return rng.sample(left if len(left) >= count else range(lo, hi + 1), count)


# -- remote scripts -----------------------------------------------------------------------

#: True while pid $1 runs: a zombie (an orphan nobody reaped yet) counts as gone. No forks:
#: it runs on every poll.
ALIVE = ('alive() { if [ -r "/proc/$1/stat" ]; then read -r s < "/proc/$1/stat" || return 1; '
         's=${s##*") "}; s=${s%% *}; [ -n "$s" ] && [ "$s" != Z ] && [ "$s" != X ]; '
         'else kill -0 "$1" 2>/dev/null; fi; }')


def build_start_script(argv: list[str], env: dict[str, str], folder: str, connection: str,
                       working_dir: str = "") -> str:
    """Write the connection file (0600) and start the kernel in a session of its own.

    ``setsid -f`` forks, so the kernel is the leader of its own process group (its pid is the
    group's id) and keeps default signal dispositions, which ``cmd &`` in a shell would not
    (SIGINT ignored). The script prints ``pid <n>``.
    """
    q = shlex.quote
    cfile = f"{folder}/connection.json"
    lines = ["umask 077", f"mkdir -p {q(folder)} || exit 1",
             f"cat > {q(cfile)} <<'{HEREDOC_END}'", connection, HEREDOC_END]
    lines.append(f"cd {q(working_dir)} 2>/dev/null || cd" if working_dir else "cd")
    lines += [f"{k}={q(v)}; export {k}" for k, v in sorted(env.items())]
    lines += [f"rm -f {q(folder + '/pid')}",
              "setsid -f sh -c 'echo $$ > \"$0\"; exec \"$@\"' "
              f"{q(folder + '/pid')} {' '.join(q(a) for a in argv)} "
              f"</dev/null >{q(folder + '/kernel.log')} 2>&1 || exit 1",
              "n=0",
              f"while [ ! -s {q(folder + '/pid')} ] && [ $n -lt 100 ]; "
              "do sleep 0.05; n=$((n+1)); done",
              f"echo \"pid $(cat {q(folder + '/pid')})\""]
    return "\n".join(lines) + "\n"


def parse_pid(output: str) -> int | None:
    """The pid that :func:`build_start_script` printed, or None."""
    m = re.search(r"^pid (\d+)$", output, re.MULTILINE)
    return int(m.group(1)) if m else None


def build_poll_script(kernels: dict[int, str]) -> str:
    """Print the pids (of pid → folder) that still run; one command for all of a host's kernels.

    A kernel's command line names its folder, so a pid reused by another process is not ours.
    """
    lines = [ALIVE, 'ours() { alive "$1" && { [ ! -r "/proc/$1/cmdline" ] || '
                    'grep -qF -- "$2" "/proc/$1/cmdline"; }; }']
    lines += [f"ours {int(pid)} {shlex.quote(folder)} && echo {int(pid)}"
              for pid, folder in sorted(kernels.items())]
    return "\n".join([*lines, "exit 0"]) + "\n"


def parse_pids(output: str) -> set[int]:
    """The pids that :func:`build_poll_script` printed."""
    return {int(w) for w in output.split() if w.isdigit()}


def build_signal_script(pid: int, signum: int) -> str:
    """Send ``signum`` to the kernel's process group (dash's kill takes no ``--``)."""
    return f"{ALIVE}\nalive {pid} || exit 0\nkill -{int(signum)} -{pid} 2>/dev/null || true\n"


def build_stop_script(pid: int, folder: str, grace: float) -> str:
    """Wait ``grace`` seconds, then SIGTERM the group, then SIGKILL it, then remove the folder.

    Exits 3 when the process is still there at the end (something an operator must see).
    """
    ticks = max(0, int(grace * 10))
    wait = 'n=0; while alive $p && [ $n -lt {} ]; do sleep 0.1; n=$((n+1)); done'
    body = [ALIVE, f"p={pid}"] if pid else [ALIVE]
    if pid:
        body += [wait.format(ticks),
                 "if alive $p; then kill -15 -$p 2>/dev/null; " + wait.format(10) + "; fi",
                 "kill -9 -$p 2>/dev/null", wait.format(20)]
    body.append(f"rm -rf -- {shlex.quote(folder)}")
    body.append("alive $p && exit 3\nexit 0" if pid else "exit 0")
    return "\n".join(body) + "\n"


def build_reap_script(folder: str) -> str:
    """Kill what a start we lost track of (its command timed out) left, by its pid file."""
    pidfile = shlex.quote(folder + "/pid")
    return (f'p=$(cat {pidfile} 2>/dev/null); [ -z "$p" ] || kill -9 -$p 2>/dev/null\n'
            f"rm -rf -- {shlex.quote(folder)}\n")


def build_tail_script(folder: str, nbytes: int = 2000) -> str:
    """The end of the kernel's own output."""
    return f"tail -c {int(nbytes)} {shlex.quote(folder + '/kernel.log')} 2>/dev/null\n"
