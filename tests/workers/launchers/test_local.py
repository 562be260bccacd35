"""The local launcher: pure builders, the launcher registry, and a real kernel's life."""
from __future__ import annotations

import signal
import sys
from pathlib import Path

import pytest

from poolgate.workers import launchers
from poolgate.workers.config import PoolConfig
from poolgate.workers.errors import ConfigError
from poolgate.workers.launchers.local import build_command, build_env
from poolgate.workers.launchers.local_builders import build_connection, parse_port_range
from poolgate.workers.protocol import LaunchRequest


def test_every_registered_launcher_resolves() -> None:
    for name in launchers.LAUNCHERS:
        cls = launchers.resolve(name)
        assert cls.__name__.endswith("Launcher")


def test_unknown_launcher_suggests() -> None:
    with pytest.raises(ConfigError, match="did you mean 'local'"):
        launchers.resolve("lokal")


def test_a_launcher_named_by_import_path_resolves_and_a_bad_one_says_why() -> None:
    """How the scale bench's pool names its test launcher without a LAUNCHERS entry."""
    from poolgate.workers.launchers.local import LocalLauncher

    assert launchers.resolve("poolgate.workers.launchers.local:LocalLauncher") is LocalLauncher
    with pytest.raises(ConfigError, match="cannot be imported"):
        launchers.resolve("poolgate.workers.launchers.nosuch:Thing")
    with pytest.raises(ConfigError, match="not a Launcher subclass"):
        launchers.resolve("poolgate.workers.launchers.local:LocalOptions")


def test_builders() -> None:
    assert build_connection("127.0.0.1", "k", None, "tcp") == {
        "shell_port": 0, "iopub_port": 0, "stdin_port": 0, "control_port": 0, "hb_port": 0,
        "ip": "127.0.0.1", "key": "k", "transport": "tcp", "signature_scheme": "hmac-sha256"}
    assert build_command(("python", "-m", "x", "-f", "{connection_file}", "{resource_dir}/a"),
                         "/c.json", "/r") == [sys.executable, "-m", "x", "-f", "/c.json", "/r/a"]
    req = LaunchRequest("kid", "local", "python3", ("python",), env={"KERNEL_X": "1"},
                        spec_env={"A": "spec", "KERNEL_X": "spec"})
    env = build_env({"JPY_PARENT_PID": "1", "PATH": "/bin"}, req)
    assert env == {"PATH": "/bin", "A": "spec", "KERNEL_X": "1", "KERNEL_ID": "kid"}
    assert parse_port_range("9000-9100") == (9000, 9100) and parse_port_range("") is None
    with pytest.raises(ConfigError):
        parse_port_range("9000-9002")


def test_real_kernel_launch_poll_signal_stop(tmp_path: Path) -> None:
    pool = PoolConfig(name="local", launcher="local", queue="local")
    launcher = launchers.create(pool, str(tmp_path))
    req = LaunchRequest("k1", "local", "python3",
                        ("python", "-m", "ipykernel_launcher", "-f", "{connection_file}"),
                        launch_timeout=60)
    handles = list(launcher.launch(req))
    handle = handles[-1]
    assert handles[0].connection is None and handle.connection is not None
    assert launcher.poll(handle) is None
    launcher.send_signal(handle, signal.SIGINT)  # an idle kernel shrugs off an interrupt
    assert launcher.poll(handle) is None
    # restart in place: same key, same ports
    launcher.stop(handle, grace=0)
    assert launcher.poll(handle) is not None
    again = list(launcher.launch(req, previous=handle))[-1]
    assert again.connection == handle.connection
    launcher.stop(again, grace=0)
    assert launcher.poll(again) is not None
    assert not (tmp_path / "k1").exists()
    launcher.stop(again, grace=0)  # idempotent


def test_launch_failure_keeps_the_output(tmp_path: Path) -> None:
    pool = PoolConfig(name="local", launcher="local", queue="local")
    launcher = launchers.create(pool, str(tmp_path))
    req = LaunchRequest("k2", "local", "bad", ("python", "-c", "raise SystemExit('nope: bad')",
                                               "{connection_file}"), launch_timeout=20)
    gen = launcher.launch(req)
    first = next(gen)
    with pytest.raises(Exception, match="exited while starting"):
        list(gen)
    assert "nope: bad" in launcher.failure_detail(first)
    launcher.stop(first, grace=0)


def test_warm_handover_code() -> None:
    from poolgate.workers.warm import handover_code

    code = handover_code({"KERNEL_ID": "k", "KERNEL_USERNAME": "a'b"}, "/tmp")
    ns: dict[str, object] = {}
    import os

    before = os.getcwd()
    try:
        exec(code, ns)  # noqa: S102 - the same code a warm kernel runs
        assert os.environ["KERNEL_ID"] == "k" and os.environ["KERNEL_USERNAME"] == "a'b"
        assert os.getcwd() == os.path.realpath("/tmp")
    finally:
        os.chdir(before)
        os.environ.pop("KERNEL_ID", None)
        os.environ.pop("KERNEL_USERNAME", None)


@pytest.mark.parametrize("channel", [0, 1], ids=["shell", "iopub"])
def test_ports_taken_before_the_kernel_binds_them_are_replaced(tmp_path: Path, channel: int,
                                                               monkeypatch: pytest.MonkeyPatch) -> None:
    """The launcher picks the kernel's ports up front (no polling of its connection file);
    if another process takes one before the kernel binds it, the kernel starts again on others.
    A kernel whose iopub port was taken does not exit (ipykernel 7 hangs closing the sockets it
    had bound): its log tells, and the launch does not wait for its timeout."""
    import socket

    from poolgate.workers.launchers import local

    squatter = socket.socket()
    squatter.bind(("127.0.0.1", 0))
    squatter.listen()
    taken = squatter.getsockname()[1]
    real = local.pick_ports
    calls: list[list[int]] = []

    def first_one_taken(ip: str, port_range: tuple[int, int], count: int = 5) -> list[int]:
        ports = real(ip, port_range, count)
        if not calls:
            ports[channel] = taken  # someone bound it meanwhile
        calls.append(ports)
        return ports

    monkeypatch.setattr(local, "pick_ports", first_one_taken)
    pool = PoolConfig(name="local", launcher="local", queue="local")
    launcher = launchers.create(pool, str(tmp_path))
    req = LaunchRequest("k2", "local", "python3",
                        ("python", "-m", "ipykernel_launcher", "-f", "{connection_file}"),
                        launch_timeout=20)
    try:
        handle = list(launcher.launch(req))[-1]
        assert len(calls) == 2 and handle.connection is not None
        assert calls[1][channel] != taken
        assert getattr(handle.connection, f"{local.CHANNELS[channel]}_port") == calls[1][channel]
        assert launcher.poll(handle) is None
        launcher.stop(handle, grace=0)
    finally:
        squatter.close()


def test_kernel_ports_come_from_below_the_ephemeral_range(tmp_path: Path) -> None:
    """Outgoing connections take ephemeral ports: kernel ports picked there could be taken
    before the kernel binds them (or a connection to them could connect to itself)."""
    from poolgate.workers.launchers.local import below_ephemeral, pick_ports

    f = tmp_path / "range"
    f.write_text("32768\t60999\n")
    assert below_ephemeral(str(f)) == (10000, 32767)
    f.write_text("1024 65535\n")
    assert below_ephemeral(str(f)) is None  # no room below: the kernel picks its own
    assert below_ephemeral(str(tmp_path / "missing")) is None
    first, second = pick_ports("127.0.0.1", (10000, 32767)), pick_ports("127.0.0.1", (10000, 32767))
    assert len(set(first + second)) == 10 and all(10000 <= p <= 32767 for p in first + second)


def test_launch_refused_before_the_kernel_starts_leaves_no_files(tmp_path: Path,
                                                                  monkeypatch: pytest.MonkeyPatch
                                                                  ) -> None:
    """A launch the worker refuses for its resources (more CPUs than it may use, say) gets no
    stop(): its folder and connection file must not outlive the refusal."""
    from poolgate.workers.errors import LaunchRejected

    pool = PoolConfig(name="local", launcher="local", queue="local")
    launcher = launchers.create(pool, str(tmp_path))

    def refuse(*_: object) -> None:
        raise LaunchRejected("the kernel asks for 4 CPUs; this worker may use 2 (0, 1)")

    monkeypatch.setattr(launcher, "confine", refuse)
    req = LaunchRequest("k-refused", "local", "python3",
                        ("python", "-m", "ipykernel_launcher", "-f", "{connection_file}"),
                        launch_timeout=10)
    with pytest.raises(LaunchRejected, match="4 CPUs"):
        list(launcher.launch(req))
    assert not (tmp_path / "k-refused").exists()
