"""Real OpenSSH servers for the tests: one per loopback address, key-only, children of the tests.

Each :class:`SSHD` has its own host key, an ``sshd_config`` that lets only the current user in,
only with a public key from one ``authorized_keys`` file, and listens on ``<address>:<port>``
(127.0.0.2, 127.0.0.3, …: separate hosts as far as the launcher can tell). :meth:`SSHD.stop`
ends the daemon alone, by its PID, as ``systemctl stop ssh`` would (open sessions survive);
:meth:`SSHD.power_off` ends the machine: the daemon, its sessions and the kernels on it.
Nothing here skips: a missing ``sshd`` fails the test that needs it.
"""
from __future__ import annotations

import getpass
import os
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path

import psutil
import pytest

SSHD_BINARY = "/usr/sbin/sshd"
PRIVSEP_DIR = "/run/sshd"  # Debian's sshd refuses to start as root without it


def keygen(path: Path, comment: str = "poolgate-test") -> Path:
    """A fresh ed25519 key pair at ``path`` and ``path``.pub, no passphrase."""
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", comment, "-f", str(path)],
                   check=True)
    return path


def free_port(address: str) -> int:
    with socket.socket() as s:
        s.bind((address, 0))
        return int(s.getsockname()[1])


def greets(address: str, port: int) -> bool:
    try:
        with socket.create_connection((address, port), timeout=1) as s:
            s.settimeout(1)
            return s.recv(8).startswith(b"SSH-")
    except OSError:
        return False


def build_sshd_config(address: str, port: int, host_key: Path, authorized_keys: Path,
                      user: str, home: Path) -> str:
    """Key-only login for ``user``; StrictModes off because the key files live under /tmp."""
    return "\n".join([
        f"ListenAddress {address}:{port}",
        f"HostKey {host_key}",
        "PidFile none",
        f"AuthorizedKeysFile {authorized_keys}",
        "AuthenticationMethods publickey",
        "PubkeyAuthentication yes",
        "PasswordAuthentication no",
        "KbdInteractiveAuthentication no",
        "UsePAM no",
        "StrictModes no",
        "PermitRootLogin prohibit-password",
        f"AllowUsers {user}",
        "AllowTcpForwarding no",
        "AllowAgentForwarding no",
        "X11Forwarding no",
        "PermitTTY no",
        "MaxStartups 100",
        # Sessions get a HOME of their own: the test user's real dotfiles (a pyenv init in
        # ~/.bashrc, say) would run before every command and make the tests hang on them.
        f"SetEnv HOME={home}",
        "LogLevel VERBOSE",
    ]) + "\n"


class SSHD:
    """One sshd on one loopback address, started as a child process of the tests."""

    def __init__(self, folder: Path, address: str, authorized_keys: Path,
                 user: str | None = None) -> None:
        if not os.access(SSHD_BINARY, os.X_OK) or shutil.which("ssh-keygen") is None:
            pytest.fail(f"{SSHD_BINARY} is not installed: apt-get install -y openssh-server "
                        "(.ci/run installs it)")
        self.folder = folder
        self.address = address
        self.user = user or getpass.getuser()
        folder.mkdir(parents=True, exist_ok=True)
        self.host_key = keygen(folder / "host_ed25519", f"host-{address}")
        self.port = free_port(address)
        self.config = folder / "sshd_config"
        self.home = folder / "home"
        self.home.mkdir(exist_ok=True)
        self.config.write_text(build_sshd_config(address, self.port, self.host_key,
                                                 authorized_keys, self.user, self.home))
        self.log = folder / "sshd.log"
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def known_hosts_line(self) -> str:
        kind, key = (self.host_key.with_suffix(".pub").read_text().split()[:2])
        return f"[{self.address}]:{self.port} {kind} {key}\n"

    def start(self) -> SSHD:
        if os.geteuid() == 0:
            os.makedirs(PRIVSEP_DIR, mode=0o755, exist_ok=True)
        check = subprocess.run([SSHD_BINARY, "-t", "-f", str(self.config)], capture_output=True,
                               text=True)
        if check.returncode != 0:
            pytest.fail(f"sshd rejects its test config: {check.stderr}")
        with open(self.log, "ab") as log:
            self.proc = subprocess.Popen([SSHD_BINARY, "-D", "-e", "-f", str(self.config)],
                                         stdout=log, stderr=subprocess.STDOUT,
                                         start_new_session=True)
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline:
            if greets(self.address, self.port):
                return self
            if self.proc.poll() is not None:
                break
            time.sleep(0.05)
        pytest.fail(f"sshd on {self.address}:{self.port} did not start:\n{self.log.read_text()}")

    def stop(self) -> None:
        """End the daemon by its PID; sessions it already accepted go on, as with systemd."""
        if self.proc is None or self.proc.poll() is not None:
            return
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()

    def power_off(self, kernel_marker: str) -> list[int]:
        """Lose the host: the daemon, its sessions, and the kernels listening on its address.

        Only processes this fixture started are touched: sshd's own tree, and kernels whose
        command line holds ``kernel_marker`` (the test pool's remote_dir). Returns their pids.
        """
        victims: list[psutil.Process] = []
        if self.proc is not None and self.proc.poll() is None:
            daemon = psutil.Process(self.proc.pid)
            victims += [daemon, *daemon.children(recursive=True)]
        victims += [p for p in kernels_listening(self.address, kernel_marker)]
        for p in victims:
            try:
                p.kill()
            except psutil.Error:
                pass
        if self.proc is not None:
            self.proc.wait()
        psutil.wait_procs(victims, timeout=5)
        return [p.pid for p in victims]


def kernels_listening(address: str, marker: str) -> list[psutil.Process]:
    """Processes started from ``marker`` (a remote_dir) that listen on ``address``."""
    out = []
    for p in remote_kernels(marker):
        try:
            if any(c.laddr and c.laddr.ip == address for c in p.net_connections("tcp")):
                out.append(p)
        except psutil.Error:
            continue
    return out


def remote_kernels(marker: str) -> list[psutil.Process]:
    """Live (not zombie) processes whose command line holds ``marker``."""
    out = []
    for p in psutil.process_iter(["cmdline", "status"]):
        try:
            if p.info["status"] == psutil.STATUS_ZOMBIE:
                continue
            if marker in " ".join(p.info["cmdline"] or []):
                out.append(p)
        except psutil.Error:
            continue
    return out
