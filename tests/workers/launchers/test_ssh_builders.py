"""The ssh launcher's pure half: options as queues.yaml gives them, and the remote scripts."""
from __future__ import annotations

import json
import random
import subprocess
import sys
from pathlib import Path

import pytest

from poolgate.workers.config import build
from poolgate.workers.errors import ConfigError, LaunchRejected
from poolgate.workers.launcher_options import validate_options
from poolgate.workers.launchers import default_slots, resolve
from poolgate.workers.launchers.ssh_builders import (
    SSHHost,
    SSHOptions,
    build_argv,
    build_connection_json,
    build_env,
    build_poll_script,
    build_reap_script,
    build_signal_script,
    build_start_script,
    build_stop_script,
    choose_user,
    parse_pid,
    parse_pids,
    pick_ports,
)
from poolgate.workers.protocol import LaunchRequest

HOSTS = [{"name": "a", "address": "10.0.0.5", "port": 2222, "max_kernels": 3},
         {"name": "b", "address": "node-b", "user": "kern", "key_file": "/k/b",
          "kernel_ip": "192.168.1.9"}]


def options(**kw: object) -> SSHOptions:
    return build(SSHOptions, {"hosts": HOSTS, "port_range": "50000-50999", **kw},
                 "pools.ssh-rr.options")


def test_options_from_yaml_become_typed_hosts() -> None:
    opts = options(placement="least-loaded", user="svc")
    assert opts.hosts == (
        SSHHost(name="a", address="10.0.0.5", port=2222, max_kernels=3),
        SSHHost(name="b", address="node-b", user="kern", key_file="/k/b", kernel_ip="192.168.1.9"),
    )
    assert opts.ports == (50000, 50999)
    assert opts.hosts[0].label == "a (10.0.0.5:2222)"
    assert [h.listen_ip for h in opts.hosts] == ["10.0.0.5", "192.168.1.9"]
    assert opts.key_for(opts.hosts[1]) == "/k/b"


@pytest.mark.parametrize("kw,message", [
    ({"hosts": []}, "pools.ssh-rr.options.hosts: expected at least one host"),
    ({"hosts": "a"}, "pools.ssh-rr.options.hosts: expected a list of mappings"),
    ({"hosts": [{"name": "a", "address": "x", "prot": 22}]},
     "pools.ssh-rr.options.hosts[0].prot: unknown key; did you mean 'port'?"),
    ({"hosts": [{"name": "a", "address": "x", "port": 0}]},
     "pools.ssh-rr.options.hosts[0].port: expected 1..65535, got 0"),
    ({"hosts": [{"name": "a", "address": "x", "max_kernels": 0}]},
     "pools.ssh-rr.options.hosts[0].max_kernels: expected an integer >= 1, got 0"),
    ({"hosts": [{"name": "a b", "address": "x"}]}, "pools.ssh-rr.options.hosts[0].name:"),
    ({"hosts": [{"name": "a", "address": "x"}, {"name": "a", "address": "y"}]},
     "pools.ssh-rr.options.hosts: host names must be unique; repeated: a"),
    ({"placement": "random"},
     "pools.ssh-rr.options.placement: expected one of round-robin, least-loaded, got 'random'"),
    ({"port_range": ""}, "pools.ssh-rr.options.port_range: required for an ssh pool"),
    ({"port_range": "9-8"}, "pools.ssh-rr.options.port_range: expected 1024 <= LOW < HIGH"),
    ({"remote_dir": "kernels"}, "pools.ssh-rr.options.remote_dir: expected an absolute path"),
    ({"down_for": 0}, "pools.ssh-rr.options.down_for: expected a number > 0, got 0.0"),
])
def test_bad_options_name_the_path_and_rule(kw: dict[str, object], message: str) -> None:
    with pytest.raises(ConfigError) as info:
        options(**kw)
    assert message in info.value.message


def test_ssh_is_a_registered_launcher_and_its_slots_are_the_hosts_places() -> None:
    from poolgate.workers.config import PoolConfig

    assert resolve("ssh").__name__ == "SSHLauncher"
    raw = {"hosts": HOSTS, "port_range": "50000-50999"}
    assert validate_options("ssh", raw, "pools.ssh-rr") == raw
    pool = PoolConfig(name="ssh-rr", launcher="ssh", options=raw)
    assert default_slots(pool) == 3 + 4
    assert resolve("ssh").runs_here(options()) is None  # paramiko is installed with the tests


def test_user_is_the_pools_unless_impersonation_is_allowed() -> None:
    a, b = options().hosts
    assert choose_user("", a, options(), "worker") == ("worker", "")
    assert choose_user("", a, options(user="svc"), "worker") == ("svc", "")
    assert choose_user("", b, options(user="svc"), "worker") == ("kern", "")
    user, note = choose_user("alice", a, options(user="svc"), "worker")
    assert user == "svc"
    assert note == ("KERNEL_USERNAME='alice' does not select the remote user: the pool does not "
                    "allow impersonation; running as 'svc'")
    assert choose_user("alice", a, options(allow_impersonation=True), "w") == ("alice", "")
    with pytest.raises(LaunchRejected):
        choose_user("alice; rm -rf /", a, options(allow_impersonation=True), "w")


def test_argv_uses_the_remote_python_or_the_template() -> None:
    spec = ("python", "-m", "ipykernel_launcher", "-f", "{connection_file}")
    assert build_argv(spec, options(python="/opt/py/bin/python3"), "/r/k/connection.json") == [
        "/opt/py/bin/python3", "-m", "ipykernel_launcher", "-f", "/r/k/connection.json"]
    assert build_argv(("/usr/bin/R", "--slave", "{connection_file}"), options(), "/c.json") == [
        "/usr/bin/R", "--slave", "/c.json"]
    templ = options(command="conda run -n ds {python} -m ipykernel -f {connection_file}")
    assert build_argv(spec, templ, "/c.json") == [
        "conda", "run", "-n", "ds", "python3", "-m", "ipykernel", "-f", "/c.json"]


def test_env_and_connection_file() -> None:
    req = LaunchRequest(kernel_id="k1", pool="ssh-rr", spec_name="s", argv=("python",),
                        env={"KERNEL_USERNAME": "al"}, spec_env={"A": "1", "KERNEL_ID": "no"})
    assert build_env(req) == {"A": "1", "KERNEL_USERNAME": "al", "KERNEL_ID": "k1"}
    bad = LaunchRequest(kernel_id="k1", pool="p", spec_name="s", argv=("x",),
                        spec_env={"A-B": "1"})
    with pytest.raises(LaunchRejected):
        build_env(bad)
    host = options().hosts[1]
    assert json.loads(build_connection_json(host, "k3y", [1, 2, 3, 4, 5], "tcp")) == {
        "ip": "192.168.1.9", "key": "k3y", "transport": "tcp", "signature_scheme": "hmac-sha256",
        "shell_port": 1, "iopub_port": 2, "stdin_port": 3, "control_port": 4, "hb_port": 5}


def test_ports_are_distinct_and_in_range() -> None:
    ports = pick_ports((50000, 50009), rng=random.Random(1))
    assert len(set(ports)) == 5 and all(50000 <= p <= 50009 for p in ports)
    # Ports handed to the host's other kernels are avoided while the range has enough others.
    assert sorted(pick_ports((50000, 50009), avoid=ports)) == sorted(set(range(50000, 50010))
                                                                     - set(ports))
    full = pick_ports((50000, 50009), avoid=range(50000, 50007))
    assert len(set(full)) == 5 and all(50000 <= p <= 50009 for p in full)


START = """umask 077
mkdir -p /r/k1 || exit 1
cat > /r/k1/connection.json <<'POOLGATE_CONNECTION_EOF'
{"key": "s"}
POOLGATE_CONNECTION_EOF
cd '/home/al/my work' 2>/dev/null || cd
A='it'"'"'s'; export A
KERNEL_ID=k1; export KERNEL_ID
rm -f /r/k1/pid
setsid -f sh -c 'echo $$ > "$0"; exec "$@"' /r/k1/pid py -f /r/k1/connection.json \
</dev/null >/r/k1/kernel.log 2>&1 || exit 1
n=0
while [ ! -s /r/k1/pid ] && [ $n -lt 100 ]; do sleep 0.05; n=$((n+1)); done
echo "pid $(cat /r/k1/pid)"
""".replace("\\\n", "")


def test_start_script_keeps_secrets_off_command_lines() -> None:
    script = build_start_script(["py", "-f", "/r/k1/connection.json"],
                                {"KERNEL_ID": "k1", "A": "it's"}, "/r/k1", '{"key": "s"}',
                                "/home/al/my work")
    assert script == START
    assert parse_pid("noise\npid 4242\n") == 4242 and parse_pid("") is None


def test_control_scripts() -> None:
    assert build_signal_script(42, 2).endswith(
        "alive 42 || exit 0\nkill -2 -42 2>/dev/null || true\n")
    assert build_poll_script({43: "/r/k 2", 42: "/r/k1"}).splitlines()[2:] == [
        "ours 42 /r/k1 && echo 42", "ours 43 '/r/k 2' && echo 43", "exit 0"]
    assert parse_pids("42\n43\n") == {42, 43} and parse_pids("") == set()
    stop = build_stop_script(42, "/r/k1", 0.5).splitlines()
    assert stop[1:] == [
        "p=42",
        "n=0; while alive $p && [ $n -lt 5 ]; do sleep 0.1; n=$((n+1)); done",
        "if alive $p; then kill -15 -$p 2>/dev/null; n=0; while alive $p && [ $n -lt 10 ]; "
        "do sleep 0.1; n=$((n+1)); done; fi",
        "kill -9 -$p 2>/dev/null",
        "n=0; while alive $p && [ $n -lt 20 ]; do sleep 0.1; n=$((n+1)); done",
        "rm -rf -- /r/k1",
        "alive $p && exit 3",
        "exit 0",
    ]
    assert build_stop_script(0, "/r/k1", 5).splitlines()[1:] == ["rm -rf -- /r/k1", "exit 0"]
    assert build_reap_script("/r/k1") == (
        'p=$(cat /r/k1/pid 2>/dev/null); [ -z "$p" ] || kill -9 -$p 2>/dev/null\n'
        "rm -rf -- /r/k1\n")


def test_scripts_run_under_dash(tmp_path: Path) -> None:
    """The scripts are POSIX sh: start, poll, signal and stop a real process with /bin/sh."""
    folder = str(tmp_path / "k1")
    argv = [sys.executable, "-c", "import time; time.sleep(30)", folder]
    out = subprocess.run(["sh", "-s"], input=build_start_script(argv, {"KERNEL_ID": "k1"}, folder,
                                                                "{}"),
                         capture_output=True, text=True, timeout=20)
    pid = parse_pid(out.stdout)
    assert pid, out.stderr
    assert (tmp_path / "k1" / "connection.json").stat().st_mode & 0o777 == 0o600

    def sh(script: str) -> int:
        return subprocess.run(["sh", "-s"], input=script, text=True, timeout=20).returncode

    def polled(kernels: dict[int, str]) -> set[int]:
        return parse_pids(subprocess.run(["sh", "-s"], input=build_poll_script(kernels),
                                         capture_output=True, text=True, timeout=20).stdout)

    assert polled({pid: folder, 999999: folder}) == {pid}
    assert polled({pid: str(tmp_path / "other")}) == set()  # a reused pid is not ours
    assert sh(build_signal_script(pid, 15)) == 0
    assert sh(build_stop_script(pid, folder, 1.0)) == 0
    assert polled({pid: folder}) == set()
    assert not (tmp_path / "k1").exists()
