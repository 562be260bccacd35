"""Nothing from a request reaches a shell unquoted (issue 21): hostile env values and working
folders go through the ssh and yarn launchers' script builders and are run by a real sh/bash,
as the remote host and a NodeManager run them; each value arrives as written and no command in
it runs. What a launcher cannot pass on as written is a 400 at the gateway."""
from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

from poolgate.gateway.kernels import check_env_for, validate_env
from poolgate.workers.config import PoolConfig, build
from poolgate.workers.errors import BadRequest, LaunchRejected
from poolgate.workers.launchers.ssh_builders import (
    SSHHost,
    SSHOptions,
    build_env,
    build_start_script,
    choose_user,
    parse_pid,
)
from poolgate.workers.launchers.yarn_builders import YarnOptions, build_yarn_app, submitting_user
from poolgate.workers.protocol import LaunchRequest

#: Program that records what it got: its environment, its folder and its argv.
DUMP = ("import json, os, sys; json.dump({'env': dict(os.environ), 'cwd': os.getcwd(), "
        "'argv': sys.argv[1:]}, open(os.environ['OUT'], 'w'))")


def hostile(marker: Path) -> dict[str, str]:
    m = str(marker)
    return {"KERNEL_SUBST": f"$(touch {m})", "KERNEL_TICKS": f"`touch {m}`",
            "KERNEL_SEMI": f"x; touch {m}", "KERNEL_SQ": f"'; touch {m}; '",
            "KERNEL_DQ": f'"; touch {m}; "', "KERNEL_VAR": "$HOME ${HOME} $$",
            "KERNEL_BS": "a\\\\b\\", "KERNEL_AMP": f"& touch {m} &", "KERNEL_PIPE": f"| touch {m}",
            "KERNEL_GLOB": "* ? [a]", "KERNEL_HEREDOC": "POOLGATE_CONNECTION_EOF"}


def test_ssh_start_script_passes_values_as_written(tmp_path: Path) -> None:
    marker = tmp_path / "pwned"
    values = {**hostile(marker), "KERNEL_NL": f"a\ntouch {marker}\nb"}  # refused at the gateway too
    workdir = tmp_path / "w $(touch pwned) `touch pwned` ';"
    workdir.mkdir()
    out = tmp_path / "out.json"
    req = LaunchRequest(kernel_id="k1", pool="ssh", spec_name="s", argv=(sys.executable, "-c", DUMP),
                        env={**values, "OUT": str(out)}, working_dir=str(workdir))
    script = build_start_script([sys.executable, "-c", DUMP, f"$(touch {marker})"], build_env(req),
                                str(tmp_path / "k1"), "{}", str(workdir))
    run = subprocess.run(["sh", "-s"], input=script, capture_output=True, text=True, timeout=20)
    assert parse_pid(run.stdout), run.stderr
    got = _wait_json(out)
    assert {k: got["env"][k] for k in values} == values
    assert got["cwd"] == str(workdir) and got["argv"] == [f"$(touch {marker})"]
    assert not marker.exists() and not list(tmp_path.rglob("pwned"))


def test_ssh_user_names_are_checked_before_any_script() -> None:
    opts = build(SSHOptions, {"hosts": [{"name": "a", "address": "h"}], "allow_impersonation": True,
                                "port_range": "50000-50999"},
                 "pools.ssh.options")
    for name in ("al; rm -rf /", "$(id)", "-oProxyCommand=x", "a b"):
        with pytest.raises(LaunchRejected):
            choose_user(name, SSHHost(name="a", address="h"), opts, "svc")


def nodemanager_script(body: dict[str, object], log_dir: Path) -> str:
    """launch_container.sh as a NodeManager writes it (Hadoop's UnixShellScriptBuilder):
    export NAME="value" for each entry, {{NAME}} as $NAME, then the command."""
    am = body["am-container-spec"]  # type: ignore[index]
    exports = "".join('export %s="%s"\n' % (e["key"], re.sub(r"\{\{(\w+)\}\}", r"$\1", e["value"]))
                      for e in am["environment"]["entry"])  # type: ignore[index]
    return exports + am["commands"]["command"].replace("<LOG_DIR>", str(log_dir))  # type: ignore[index]


def test_yarn_container_gets_values_as_written(tmp_path: Path) -> None:
    marker = tmp_path / "pwned"
    values = hostile(marker)
    workdir = tmp_path / "w $(touch pwned) ';"
    workdir.mkdir()
    out = tmp_path / "out.json"
    dump = tmp_path / "dump.py"
    dump.write_text(DUMP)
    opts = build(YarnOptions, {"rm_address": "http://rm:8088",
                               "kernel_launcher": f"{sys.executable} {dump}"}, "pools.y.options")
    req = LaunchRequest(kernel_id="k1", pool="y", spec_name="s", argv=("python", "-c", "x"),
                        env={**values, "OUT": str(out)}, working_dir=str(workdir),
                        spec_env={"SPEC_HOME": "{{HOME}}"})  # the operator's env keeps expansion
    body = build_yarn_app(req, {"application-id": "application_1_0001"}, opts, {})
    run = subprocess.run(["bash", "-c", nodemanager_script(body, tmp_path)], capture_output=True,
                         text=True, timeout=20, env={"HOME": "/home/nm", "PATH": "/usr/bin:/bin"})
    assert run.returncode == 0, (run.stderr, (tmp_path / "stderr").read_text())
    got = json.loads(out.read_text())
    assert {k: got["env"][k] for k in values} == values
    assert got["env"]["SPEC_HOME"] == "/home/nm" and got["cwd"] == str(workdir)
    assert not marker.exists() and not list(tmp_path.rglob("pwned"))


def test_yarn_user_names_are_checked() -> None:
    opts = build(YarnOptions, {"rm_address": "http://rm:8088", "impersonation": True,
                               "auth": "simple", "user": "svc"},
                 "pools.y.options")
    for name in ("al;id", "$(id)", "a b", "a\nb"):
        req = LaunchRequest(kernel_id="k1", pool="y", spec_name="s", argv=("x",), user=name)
        with pytest.raises(LaunchRejected):
            submitting_user(req, opts)


@pytest.mark.parametrize("launcher,value,refused", [
    ("ssh", "a\nb", True), ("ssh", "a\rb", True), ("yarn", "a\nb", True),
    ("yarn", "{{HOME}}", True), ("yarn", "x}}", True), ("local", "a\nb", False),
    ("docker", "{{x}}", False), ("ssh", "$(touch /tmp/x) `y` '; rm", False),
    ("yarn", "$(touch /tmp/x) `y` \"; rm", False),
])
def test_gateway_refuses_what_a_launcher_cannot_pass(launcher: str, value: str,
                                                     refused: bool) -> None:
    env = validate_env({"KERNEL_X": value}, ())
    pool = PoolConfig(name="p", launcher=launcher)
    if refused:
        with pytest.raises(BadRequest, match=r"env.KERNEL_X: pool 'p' \(" + launcher):
            check_env_for(env, pool)
    else:
        check_env_for(env, pool)


@pytest.mark.parametrize("env,message", [
    ({"KERNEL_X": "a\x00b"}, "NUL"), ({"KERNEL_X": "x" * 4097}, "at most 4096"),
    ({"KERNEL_X\n": "1"}, "not a valid variable name"), ({"A=B": "1"}, "not a valid variable name"),
    ({"KERNEL_X": 1}, "expected a string"),
])
def test_values_are_checked_for_every_launcher(env: dict[str, object], message: str) -> None:
    with pytest.raises(BadRequest, match=message):
        validate_env(env, ())


def _wait_json(path: Path, timeout: float = 20) -> dict[str, object]:
    """The dump written by the kernel the script started in the background (setsid -f)."""
    import time

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            return json.loads(path.read_text())  # type: ignore[no-any-return]
        except (OSError, ValueError):
            time.sleep(0.05)
    raise AssertionError(f"{path} was not written")
