"""Kernels forked from the local launcher's fork server: they must be what an exec'd kernel
is (own session, environment, working directory, argv, /proc entries, exit codes), and the
launcher must exec instead wherever a fork cannot give the kernel what it asked for."""
from __future__ import annotations

import os
import signal
import sqlite3
import sys
import time
from pathlib import Path
from typing import Any

import psutil
import pytest
from jupyter_client.blocking.client import BlockingKernelClient

from poolgate.workers import launchers
from poolgate.workers.config import PoolConfig
from poolgate.workers.launchers.forking import why_not
from poolgate.workers.launchers.local import LocalLauncher
from poolgate.workers.protocol import KernelHandle, LaunchRequest

ARGV = ("python", "-m", "ipykernel_launcher", "-f", "{connection_file}")


@pytest.fixture
def launcher(tmp_path: Path) -> LocalLauncher:
    pool = PoolConfig(name="local", launcher="local", queue="local")
    made = launchers.create(pool, str(tmp_path))
    assert isinstance(made, LocalLauncher)
    made.prepare()
    assert made._forkserver(sys.executable).wait_ready(60)
    yield made
    made.close()


def launcher_with(folder: Path, options: dict[str, object]) -> LocalLauncher:
    """A local launcher of a pool with these options, its fork server ready."""
    folder.mkdir()
    made = launchers.create(PoolConfig(name="local", launcher="local", queue="local",
                                       options=options), str(folder))
    assert isinstance(made, LocalLauncher)
    made.prepare()
    assert made._forkserver(sys.executable).wait_ready(60)
    return made


def forked(handle: KernelHandle, launcher: LocalLauncher) -> bool:
    """Whether the kernel is a child of the launcher's fork server (forked, not exec'd)."""
    server = launcher._forkserver(sys.executable)._proc
    return server is not None and psutil.Process(int(handle.data["pid"])).ppid() == server.pid


def run(handle: KernelHandle, code: str) -> str:
    """``code``'s printed output, run in the kernel over its own ZMQ sockets."""
    kc = BlockingKernelClient()
    kc.load_connection_info(handle.connection.to_dict())  # type: ignore[union-attr]
    kc.start_channels()
    try:
        out: list[str] = []
        kc.execute_interactive(code, timeout=30,
                               output_hook=lambda m: out.append(m["content"].get("text", "")))
        return "".join(out)
    finally:
        kc.stop_channels()


def ended(launcher: LocalLauncher, handle: KernelHandle, timeout: float = 10) -> None:
    """Wait up to ``timeout`` for the launcher to see the kernel gone."""
    deadline = time.monotonic() + timeout
    while launcher.poll(handle) is None and time.monotonic() < deadline:
        time.sleep(0.05)


def start(launcher: LocalLauncher, kid: str, tmp_path: Path, **kw: object) -> KernelHandle:
    req = LaunchRequest(kid, "local", "python3", kw.pop("argv", ARGV), launch_timeout=60,
                        working_dir=str(tmp_path), **kw)  # type: ignore[arg-type]
    return list(launcher.launch(req))[-1]


def test_forked_kernel_is_what_an_execd_one_is(launcher: LocalLauncher, tmp_path: Path) -> None:
    server = launcher._forkserver(sys.executable)
    a = start(launcher, "fa", tmp_path, env={"KERNEL_X": "req"}, spec_env={"SPEC_Y": "spec"})
    b = start(launcher, "fb", tmp_path)
    try:
        proc = psutil.Process(int(a.data["pid"]))
        assert proc.ppid() == server._proc.pid  # type: ignore[union-attr]  # forked, not exec'd
        assert proc.cmdline()[:3] == [sys.executable, "-m", "ipykernel_launcher"]
        assert proc.cmdline()[-1].endswith("fa/connection.json")
        assert proc.environ()["KERNEL_ID"] == "fa" and proc.environ()["SPEC_Y"] == "spec"
        assert os.getsid(proc.pid) == proc.pid
        code = ("import os, sys, random; print(os.getcwd(), os.environ['KERNEL_X'], "
                "os.environ['KERNEL_ID'], sys.argv[1:], __name__, random.random(), sep='|')")
        cwd, x, kid, argv, name, rand_a = run(a, code).strip().split("|")
        assert (cwd, x, kid, name) == (str(tmp_path), "req", "fa", "__main__")
        assert argv.startswith("['-f',") and "fa/connection.json" in argv
        rand_b = run(b, code).strip().split("|")[-1]
        assert rand_a != rand_b  # the random module is reseeded in each fork
        assert "KERNEL_X" not in run(b, "import os; print(sorted(os.environ))")
        # the fork server's objects are frozen (pages stay shared), the kernel's collected
        assert run(b, "import gc; print(gc.isenabled(), gc.get_freeze_count() > 10000)"
                   ).strip() == "True True"
        # interrupt reaches the forked kernel as it reaches an exec'd one
        kc = BlockingKernelClient()
        kc.load_connection_info(a.connection.to_dict())  # type: ignore[union-attr]
        kc.start_channels()
        try:
            mid = kc.execute("print('running', flush=True); import time; time.sleep(30)")
            while True:  # until the cell prints: it is running
                msg = kc.get_iopub_msg(timeout=30)
                if msg["msg_type"] == "stream" and msg["parent_header"].get("msg_id") == mid:
                    break
            launcher.send_signal(a, signal.SIGINT)
            reply = kc.get_shell_msg(timeout=10)
            assert reply["parent_header"]["msg_id"] == mid
            assert reply["content"]["ename"] == "KeyboardInterrupt"
        finally:
            kc.stop_channels()
    finally:
        launcher.stop(a, grace=0)
        launcher.stop(b, grace=0)
    assert not psutil.pid_exists(int(a.data["pid"])) or \
        psutil.Process(int(a.data["pid"])).status() == psutil.STATUS_ZOMBIE


# In a cell: how many hand-offs to the iopub thread a flush of empty stdout and one after a
# write take, and the sleep after each execute (forkserver.py: _lean).
HANDOFFS = """\
import sys
pub, seen = sys.stdout.pub_thread, []
pub.schedule = lambda f, _s=pub.schedule: (seen.append(f), _s(f))[1]
sys.stdout.flush(); empty = len(seen)
print('x', end=''); sys.stdout.flush(); written = len(seen) - empty
del pub.schedule
print('|', empty, written, get_ipython().kernel._execute_sleep)"""


SLOW_FLUSH = """\
import sys, time
class Slow:  # stdout's session, sending 'late' a moment after the buffer was taken
    def __init__(self, session):
        self.session = session
    def __getattr__(self, name):
        return getattr(self.session, name)
    def send(self, stream, msg, *args, **kw):
        if isinstance(msg, dict) and 'late' in str(msg.get('content', {}).get('text')):
            time.sleep(0.4)
        return self.session.send(stream, msg, *args, **kw)
sys.stdout.session = Slow(sys.stdout.session)"""


def test_lean_execute_skips_empty_waits(launcher: LocalLauncher, tmp_path: Path) -> None:
    """A forked kernel's flush of nothing hands nothing to ipykernel's iopub thread, a flush
    after a write hands it one callback where ipykernel hands two, and its execute does not
    sleep after. Every output of a cell still reaches the client before the cell's idle
    (execute_interactive stops there)."""
    h = start(launcher, "le", tmp_path)
    try:
        mark, empty, written, sleep = run(h, HANDOFFS).split()
        assert (mark, empty, sleep) == ("x|", "0", "0.0") and int(written) >= 1
        kc = BlockingKernelClient()
        kc.load_connection_info(h.connection.to_dict())  # type: ignore[union-attr]
        kc.start_channels()
        try:
            for i in range(30):  # stdout's and stderr's order between them is ipykernel's
                got = {"stdout": "", "stderr": ""}

                def hook(msg: dict[str, Any]) -> None:
                    if msg["msg_type"] == "stream":
                        got[msg["content"]["name"]] += msg["content"]["text"]

                code = f"import sys; print('a{i}'); sys.stderr.write('b{i}'); print('c{i}', end='')"
                kc.execute_interactive(code, timeout=30, output_hook=hook)
                assert got == {"stdout": f"a{i}\nc{i}", "stderr": f"b{i}"}
        finally:
            kc.stop_channels()
        code = "import time; print('early'); time.sleep(0.3)"  # sent before the cell ends
        assert run(h, code) == "early\n"
        # The iopub thread's timed flush caught in the middle, between taking the buffer and
        # queueing its message (a session that sleeps holds it there): the cell's end
        # must wait for that message, which goes out before the idle.
        run(h, SLOW_FLUSH)
        assert run(h, "import time; print('late'); time.sleep(0.3)") == "late\n"
    finally:
        launcher.stop(h, grace=0)
    stock = launcher_with(tmp_path / "stock", {"lean_execute": False})
    h = start(stock, "ls", tmp_path)
    try:
        assert forked(h, stock)
        # stock ipykernel: two hand-offs for nothing, one more than above for a write
        assert run(h, HANDOFFS).split() == ["x|", "2", str(int(written) + 1), "0.0005"]
        assert run(h, SYNCHRONOUS).strip() == "2"  # IPython's history commits: FULL (fsync)
        run(h, SLOW_FLUSH)  # ipykernel's own flush keeps the order too
        assert run(h, "import time; print('late'); time.sleep(0.3)") == "late\n"
    finally:
        stock.stop(h, grace=0)
        stock.close()


SYNCHRONOUS = "print(get_ipython().history_manager.db.execute('pragma synchronous').fetchone()[0])"


def test_lean_history_is_kept_without_waiting_for_the_disk(launcher: LocalLauncher,
                                                         tmp_path: Path) -> None:
    """A lean kernel's IPython history connections commit without fsync (synchronous OFF; the
    stock setting, FULL, is checked in the test above), and every cell still reaches the
    history database, where `%history -g` and a console's up-arrow find it."""
    h = start(launcher, "lh", tmp_path, env={"IPYTHONDIR": str(tmp_path / "ipython")})
    db = tmp_path / "ipython" / "profile_default" / "history.sqlite"

    def stored() -> list[str]:
        with sqlite3.connect(db) as conn:
            return [r[0] for r in conn.execute("SELECT source_raw FROM history")
                    if r[0].startswith("marker_")]

    try:
        assert run(h, SYNCHRONOUS).strip() == "0"
        flag = "print(type(get_ipython().history_manager.save_flag).__name__)"
        assert run(h, flag).strip() == "_GatheringFlag"
        cells = [f"marker_{i} = {i}" for i in range(20)]
        for code in cells:
            run(h, code)
        deadline = time.monotonic() + 10
        while stored() != cells and time.monotonic() < deadline:
            time.sleep(0.1)  # IPython's history thread writes the cells a moment after they ran
        assert stored() == cells
        # The history thread gathers cells into one commit; what it holds when the kernel
        # is asked to shut down is still written, and the shutdown does not wait for it.
        kc = BlockingKernelClient()
        kc.load_connection_info(h.connection.to_dict())  # type: ignore[union-attr]
        kc.start_channels()
        try:
            more = [f"marker_{i} = {i}" for i in range(20, 30)]
            for code in more:
                kc.execute_interactive(code, timeout=30)
            kc.shutdown()
            asked = time.monotonic()
            ended(launcher, h)
            assert launcher.poll(h) is not None and time.monotonic() - asked < 5
        finally:
            kc.stop_channels()
        assert stored() == cells + more
    finally:
        launcher.stop(h, grace=0)


# Results as IPython displays them: a plain value, rich reprs, a repr that declines
# (NotImplementedError: no output, no error) and one that fails (its traceback, and the other
# formats still shown), through the execute result and through display().
DISPLAYS = [
    "1+1",
    """\
class Rich:
    def _repr_html_(self): return '<b>rich</b>'
    def _repr_markdown_(self): return '**rich**'
    def _repr_latex_(self): raise NotImplementedError
    def _repr_json_(self): return {'a': 1}, {'expanded': True}
    def __repr__(self): return 'Rich()'
class Broken:
    def _repr_html_(self): raise ValueError('no html today')
    def __repr__(self): return 'Broken()'
Rich()""",
    "Broken()",
    "display(Rich(), Broken(), 3.5); print('after')",
    "from IPython.display import HTML; HTML('<i>x</i>')",
]
# Whether a formatter call binds its arguments to a signature (IPython 8 wraps formatters with
# the decorator package, which does; IPython 9 with functools.wraps, which does not), and
# whether ipykernel's signature lookup is the lean kernel's.
SHORTCUTS = """\
from IPython.core import formatters
import ipykernel.ipkernel
print(formatters.BaseFormatter.__call__.__code__.co_filename.endswith('decorator.py'),
      ipykernel.ipkernel._accepts_parameters.__code__.co_filename.endswith('forkserver.py'))"""


def displays(handle: KernelHandle) -> list[list[tuple[str, Any]]]:
    """What each of DISPLAYS puts on iopub: (type, content) of every message between busy
    and idle (an error's traceback left out: it names the kernel's own temporary files), and
    the status of its execute_reply."""
    kc = BlockingKernelClient()
    kc.load_connection_info(handle.connection.to_dict())  # type: ignore[union-attr]
    kc.start_channels()
    try:
        cells = []
        for code in DISPLAYS:
            got: list[tuple[str, Any]] = []

            def hook(msg: dict[str, Any], into: list[tuple[str, Any]] = got) -> None:
                content = {k: v for k, v in msg["content"].items() if k != "traceback"}
                if msg["msg_type"] != "status":
                    into.append((msg["msg_type"], content))

            reply = kc.execute_interactive(code, timeout=30, output_hook=hook)
            got.append(("execute_reply", reply["content"]["status"]))
            cells.append(got)
        return cells
    finally:
        kc.stop_channels()


def test_lean_kernel_displays_what_ipykernel_displays(launcher: LocalLauncher,
                                                      tmp_path: Path) -> None:
    """A lean kernel skips work IPython and ipykernel repeat for every execute (forkserver.py:
    _lean_calls): every result, rich repr, declining repr and failing repr still reaches the
    client exactly as from stock ipykernel."""
    stock = launcher_with(tmp_path / "stock", {"lean_execute": False})
    lean_kernel = start(launcher, "ld", tmp_path)
    stock_kernel = start(stock, "sd", tmp_path)
    try:
        assert run(lean_kernel, SHORTCUTS).split() == ["False", "True"]
        assert run(stock_kernel, SHORTCUTS).split()[1] == "False"
        lean, stocks = displays(lean_kernel), displays(stock_kernel)
        assert lean == stocks
        n = lean[0][0][1]["execution_count"]
        assert lean[0] == [("execute_input", {"code": "1+1", "execution_count": n}),
                           ("execute_result", {"data": {"text/plain": "2"}, "metadata": {},
                                               "execution_count": n}),
                           ("execute_reply", "ok")]
        rich = lean[1][-2][1]
        assert rich["data"] == {"text/plain": "Rich()", "text/html": "<b>rich</b>",
                                "text/markdown": "**rich**", "application/json": {"a": 1}}
        assert rich["metadata"] == {"application/json": {"expanded": True}}
        error, result, _ = lean[2][1:]
        assert error[0] == "error" and error[1]["evalue"] == "no html today"
        assert result[1]["data"] == {"text/plain": "Broken()"}
        assert [m[0] for m in lean[3][1:-1]] == ["display_data", "error", "display_data",
                                                 "display_data", "stream"]
    finally:
        launcher.stop(lean_kernel, grace=0)
        stock.stop(stock_kernel, grace=0)
        stock.close()


def test_exit_code_of_a_forked_kernel(launcher: LocalLauncher, tmp_path: Path) -> None:
    h = start(launcher, "fc", tmp_path)
    try:
        assert launcher._procs[int(h.data["pid"])].__class__.__name__ == "Forked"
        kc = BlockingKernelClient()
        kc.load_connection_info(h.connection.to_dict())  # type: ignore[union-attr]
        kc.start_channels()
        kc.execute("import os; os._exit(3)")
        ended(launcher, h)
        kc.stop_channels()
        assert launcher.poll(h) == "the kernel process exited with code 3"
    finally:
        launcher.stop(h, grace=0)


def test_start_time_environment_is_execd(launcher: LocalLauncher, tmp_path: Path) -> None:
    """PYTHONPATH is read when an interpreter starts: such a kernel is exec'd, and it works."""
    (tmp_path / "lib").mkdir()
    (tmp_path / "lib" / "onpath.py").write_text("WHERE = 'lib'\n")
    h = start(launcher, "fd", tmp_path, spec_env={"PYTHONPATH": str(tmp_path / "lib")})
    try:
        assert psutil.Process(int(h.data["pid"])).ppid() == os.getpid()
        assert run(h, "import onpath; print(onpath.WHERE)").strip() == "lib"
    finally:
        launcher.stop(h, grace=0)


def test_other_commands_and_option_off_are_execd(tmp_path: Path) -> None:
    pool = PoolConfig(name="local", launcher="local", queue="local",
                      options={"fork_kernels": False})
    off = launchers.create(pool, str(tmp_path / "off"))
    off.prepare()
    h = start(off, "fe", tmp_path)
    try:
        assert psutil.Process(int(h.data["pid"])).ppid() == os.getpid()
        assert not off._forkservers  # type: ignore[attr-defined]
    finally:
        off.stop(h, grace=0)
    env = {"PATH": "/bin"}
    assert why_not([sys.executable, "-m", "ipykernel_launcher", "-f", "c"], env, env) is None
    assert why_not([sys.executable, "-m", "ipykernel", "-f", "c"], env, env) is None
    assert "not '<python> -m ipykernel_launcher" in str(
        why_not([sys.executable, "/opt/launch_ipykernel.py", "c"], env, env))
    for name in ("PYTHONPATH", "LD_LIBRARY_PATH", "LC_ALL", "LANG", "PYTHONHASHSEED"):
        assert name in str(why_not([sys.executable, "-m", "ipykernel_launcher"],
                                   {**env, name: "x"}, env))
    assert "LD_PRELOAD" in str(why_not([sys.executable, "-m", "ipykernel_launcher"],
                                       env, {**env, "LD_PRELOAD": "x"}))


def test_lost_fork_server_execs_then_comes_back(launcher: LocalLauncher, tmp_path: Path) -> None:
    server = launcher._forkserver(sys.executable)
    before = start(launcher, "ff", tmp_path)
    old = server._proc
    assert old is not None
    old.kill()
    old.wait()
    handles = [before]
    try:
        # The kernel it forked lives on (its own session); the next launch notices the loss,
        # execs, and a new server takes the launches after it.
        assert launcher.poll(before) is None
        h = start(launcher, "fg", tmp_path)
        handles.append(h)
        assert psutil.Process(int(h.data["pid"])).ppid() == os.getpid()
        assert server.wait_ready(60) and server._proc is not old
        h2 = start(launcher, "fh", tmp_path)
        handles.append(h2)
        assert psutil.Process(int(h2.data["pid"])).ppid() == server._proc.pid  # type: ignore[union-attr]
        assert run(before, "print(6*7)").strip() == "42"
        launcher.send_signal(before, signal.SIGKILL)
        ended(launcher, before)
        assert launcher.poll(before) == "the kernel process exited"  # its reaper is gone
    finally:
        for handle in handles:
            launcher.stop(handle, grace=0)


def test_fork_server_ends_with_its_worker(launcher: LocalLauncher, tmp_path: Path) -> None:
    """The worker's end of the socket closing (worker killed) ends the server; the kernels it
    forked stay, for the worker's next life to adopt."""
    server = launcher._forkserver(sys.executable)
    h = start(launcher, "fi", tmp_path)
    proc = server._proc
    assert proc is not None
    server._sock.close()  # type: ignore[union-attr]  # what the kernel does for a dead worker
    assert proc.wait(timeout=5) == 0
    try:
        assert launcher.poll(h) is None and run(h, "print(1+1)").strip() == "2"
    finally:
        launcher.stop(h, grace=0)


def test_forking_with_fds_past_1024(launcher: LocalLauncher, tmp_path: Path) -> None:
    """A worker hosting a hundred kernels has fds past select()'s 1024: forking, polling and
    exit codes must not use select (they did, and 41 of 200 kernels failed to start)."""
    import resource

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < 1300:
        resource.setrlimit(resource.RLIMIT_NOFILE, (min(hard, 4096), hard))
    held = [os.open(os.devnull, os.O_RDONLY) for _ in range(1100)]
    h = None
    try:
        h = start(launcher, "fj", tmp_path)
        assert int(h.data["pid"]) in launcher._procs
        assert launcher.poll(h) is None
        assert run(h, "print(2+2)").strip() == "4"
        launcher.send_signal(h, signal.SIGKILL)
        ended(launcher, h)
        assert launcher.poll(h) == "the kernel process exited with code -9"
    finally:
        if h is not None:
            launcher.stop(h, grace=0)
        for fd in held:
            os.close(fd)


THREADS = "import threading; print(sorted(t.name for t in threading.enumerate()))"


def subshell_session(handle: KernelHandle) -> tuple[list[str], str | None]:
    """The kernel's supported_features, and what a cell run in a new subshell printed (None
    where it offers none: clients must not ask then, and ipykernel would not answer)."""
    kc = BlockingKernelClient()
    kc.load_connection_info(handle.connection.to_dict())  # type: ignore[union-attr]
    kc.start_channels()
    try:
        info = kc.kernel_info(reply=True, timeout=30)
        features = list(info["content"].get("supported_features", []))
        if "kernel subshells" not in features:
            return features, None
        kc.control_channel.send(kc.session.msg("create_subshell_request", {}))
        reply = kc.control_channel.get_msg(timeout=30)["content"]
        assert reply.get("status") == "ok", reply
        msg = kc.session.msg("execute_request", {"code": "import threading; "
                             "print(threading.current_thread().name)", "silent": False})
        msg["header"]["subshell_id"] = reply["subshell_id"]
        kc.shell_channel.send(msg)
        out = ""
        while True:
            m = kc.get_iopub_msg(timeout=30)
            if m["parent_header"].get("msg_id") != msg["header"]["msg_id"]:
                continue
            if m["msg_type"] == "stream":
                out += m["content"]["text"]
            if m["msg_type"] == "status" and m["content"]["execution_state"] == "idle":
                return features, out
    finally:
        kc.stop_channels()


def test_subshells_are_kept_unless_a_pool_turns_them_off(launcher: LocalLauncher,
                                                         tmp_path: Path) -> None:
    """By default a forked kernel is ipykernel's: it offers kernel subshells (JEP 91), which
    JupyterLab uses for widgets' comms, and runs a subshell's cell in a thread of its own.
    With ``subshells: false`` the kernel has no shell-channel thread and says it has no
    subshells (so clients do not ask), and cells run as before, output in order."""
    h = start(launcher, "ss", tmp_path)
    try:
        assert "'Shell channel'" in run(h, THREADS)
        features, out = subshell_session(h)
        assert "kernel subshells" in features
        assert out is not None and out.startswith("subshell-")
    finally:
        launcher.stop(h, grace=0)
    off = launcher_with(tmp_path / "off", {"subshells": False})
    h = start(off, "so", tmp_path)
    try:
        assert forked(h, off)
        assert "'Shell channel'" not in run(h, THREADS)
        assert subshell_session(h) == ([f for f in features if f != "kernel subshells"], None)
        for i in range(20):
            assert run(h, f"print('a{i}'); print('b{i}')") == f"a{i}\nb{i}\n"
        assert run(h, "import time; print('early'); time.sleep(0.3)") == "early\n"
    finally:
        off.stop(h, grace=0)
        off.close()


FORWARDING = "print(get_ipython().kernel.shell_channel_thread.forwarding)"


class Requests:
    """Execute requests sent on one client without waiting, and their outcomes as they come
    (replies and output are kept by request, whatever order they arrive in)."""

    def __init__(self, kc: BlockingKernelClient) -> None:
        self.kc = kc
        self.replies: dict[str, dict[str, Any]] = {}
        self.out: dict[str, str] = {}
        self.idle: set[str] = set()

    def send(self, code: str, subshell: str | None = None) -> str:
        msg = self.kc.session.msg("execute_request", {"code": code, "silent": False,
                                                      "stop_on_error": True})
        if subshell is not None:
            msg["header"]["subshell_id"] = subshell
        self.kc.shell_channel.send(msg)
        return str(msg["header"]["msg_id"])

    def read(self, timeout: float) -> None:
        """What each channel has, waiting up to ``timeout`` on each."""
        for get in (self.kc.get_iopub_msg, self.kc.get_shell_msg):
            try:
                m = get(timeout=timeout)
            except Exception:  # noqa: BLE001 - queue.Empty: nothing there
                continue
            parent = m["parent_header"].get("msg_id", "")
            if m["msg_type"] == "stream":
                self.out[parent] = self.out.get(parent, "") + m["content"]["text"]
            elif m["msg_type"] == "status" and m["content"]["execution_state"] == "idle":
                self.idle.add(parent)
            elif m["msg_type"].endswith("_reply"):
                self.replies[parent] = m

    def outcome(self, msg_id: str) -> tuple[str, str, str]:
        """The reply's status and ename, and what the request printed, once its idle came."""
        deadline = time.monotonic() + 30
        while msg_id not in self.replies or msg_id not in self.idle:
            assert time.monotonic() < deadline, f"no reply and idle for {msg_id}"
            self.read(0.02)
        content = self.replies[msg_id]["content"]
        return content["status"], content.get("ename", ""), self.out.get(msg_id, "")


def test_shell_forwarded_in_c_until_a_subshell_is_asked_for(launcher: LocalLauncher,
                                                            tmp_path: Path) -> None:
    """A forked kernel's shell channel thread forwards in C until a client asks for a subshell
    (shellforward.py), and the kernel behaves as ipykernel's throughout: a request for a
    subshell that is not there gets the "unknown subshell" error; after an error the executes
    already queued are aborted and the next one runs; a subshell asked for while the main
    shell runs a cell comes at once and runs its own cell meanwhile, and the main shell's cell
    still gets its reply; the same behaviour after; and the kernel shuts down on request."""
    h = start(launcher, "cf", tmp_path)
    kc = BlockingKernelClient()
    kc.load_connection_info(h.connection.to_dict())  # type: ignore[union-attr]
    kc.start_channels()
    r = Requests(kc)
    try:
        kc.kernel_info(reply=True, timeout=30)
        for forwarding in ("True", "False"):
            assert r.outcome(r.send(FORWARDING)) == ("ok", "", forwarding + "\n")
            # the error comes after the next request is in (ipykernel aborts what it has
            # received when an error ends a cell, not what comes after)
            failing = r.send("import time; time.sleep(0.5); 1/0")
            queued = r.send("print('aborted')")
            assert r.outcome(failing)[:2] == ("error", "ZeroDivisionError")
            assert r.outcome(queued) == ("aborted", "", "")
            assert r.outcome(r.send("print('next')")) == ("ok", "", "next\n")
            assert r.outcome(r.send("print('x')", subshell="nope")) == \
                ("error", "UnknownSubshellError", "")
            if forwarding == "False":
                break
            busy = r.send("import time; time.sleep(1.5); print('main')")
            kc.control_channel.send(kc.session.msg("create_subshell_request", {}))
            reply = kc.control_channel.get_msg(timeout=30)["content"]
            assert reply["status"] == "ok"
            side = r.send("import threading; print(threading.current_thread().name)",
                          subshell=reply["subshell_id"])
            status, _, out = r.outcome(side)
            assert (status, out.startswith("subshell-")) == ("ok", True)
            r.read(0)
            assert busy not in r.replies  # the main shell's cell still runs
            assert r.outcome(busy) == ("ok", "", "main\n")
        kc.shutdown()
        ended(launcher, h)
        assert launcher.poll(h) is not None
    finally:
        kc.stop_channels()
        launcher.stop(h, grace=0)
    h = start(launcher, "cs", tmp_path)  # shut down while it forwards in C
    try:
        assert run(h, FORWARDING) == "True\n"
        kc = BlockingKernelClient()
        kc.load_connection_info(h.connection.to_dict())  # type: ignore[union-attr]
        kc.start_channels()
        kc.shutdown()
        ended(launcher, h)
        kc.stop_channels()
        assert launcher.poll(h) is not None
    finally:
        launcher.stop(h, grace=0)
