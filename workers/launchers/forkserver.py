"""Fork server for local ipykernel kernels: a process that has imported ipykernel once and
forks a kernel for each request, so a kernel starts without paying the ~0.3 s of CPU its
imports cost (most of an ipykernel's start on a small machine).

Run by the local launcher as ``<python> forkserver.py FD`` with the kernelspec's own
interpreter; FD is one end of a socket pair. It uses only the standard library and what the
kernel imports, so any Python with ipykernel can run it. One JSON object a line each way:

  -> {"op": "spawn", "argv": [...], "env": {...}, "cwd": "...", "log": "...", "lean": true}
  <- {"pid": 1234} | {"error": "..."}
  -> {"op": "status", "pid": 1234}
  <- {"code": 0} | {"code": null}      (null: still running, or not one of ours)

The first line it writes is {"ready": true} once the imports are done (or {"error": ...}).
It exits when the other end closes (the worker is gone); the kernels it forked live on, in
sessions of their own, as kernels started with Popen do.

A forked child becomes what ``<python> -m ipykernel_launcher ...`` would have been: its own
session, stdio on the kernel's log, the kernel's environment and working directory,
``sys.argv`` and ``sys.path[0]`` as ``-m`` sets them, and its command line and environment
in /proc rewritten to the kernel's (``ps``, psutil and process finders see a kernel). What a
fork cannot change (hash seed, interpreter flags, variables read at interpreter start) the
launcher checks before it asks for a fork; see ``workers/launchers/local.py``.
"""
import ctypes
import gc
import json
import os
import select
import signal
import socket
import sqlite3
import sys
import threading
import time
from collections.abc import Callable
from typing import Any

try:
    from .shellforward import forward_shell_in_c
except ImportError:  # run as a script (the launcher's way): this folder is sys.path[0]
    from shellforward import forward_shell_in_c  # type: ignore[no-redef]


def _preload() -> None:
    import runpy  # noqa: F401

    import ipykernel.ipkernel  # noqa: F401
    import ipykernel.kernelapp  # noqa: F401
    import ipykernel.zmqshell  # noqa: F401


def _lean(history: bool = True, calls: bool = True) -> None:
    """A forked kernel's flushes without the waits that carry nothing (option ``lean_execute``,
    README "Forked kernels"). After each execute ipykernel flushes stdout and stderr, each flush
    a hand-off to its iopub thread and back even when nothing was written, then sleeps 0.5 ms
    (``Kernel._execute_sleep``, a config trait; its comment: a mitigation, not understood).
    Here a flush with nothing buffered, nothing scheduled and no echo returns at once: all that
    was written is with the iopub thread already, and what that thread sends (this output,
    then the status idle) keeps its order. A flush with something to send hands the iopub
    thread one callback that sends and then wakes the caller, where ipykernel hands it two (the
    send, then the wake-up): the same order, one hand-off fewer for every flushed write. A flush
    that finds the iopub thread inside a timed flush of its own (the buffer taken, its message
    not yet queued) waits for it too, or the cell's idle could overtake that output. The
    sleep's default becomes 0; a kernel config that sets it still wins. Only ipykernel versions
    with the attributes used are changed; anything else takes ipykernel's own flush. And the
    kernel's IPython history commits without fsync and gathers cells (``_lean_history``),
    and two lookups IPython and ipykernel repeat for every execute are done once
    (``_lean_calls``), whatever ipykernel."""
    if history:  # False only for bench.kernel_pairs, which measures the history part apart
        _lean_history()
    if calls:  # likewise
        _lean_calls()
    try:
        from ipykernel import iostream, kernelbase
        stock = iostream.OutStream.flush
        sleep = kernelbase.Kernel.class_traits()["_execute_sleep"]
    except (ImportError, AttributeError, KeyError):
        return
    needed = ("_buffer_lock", "_buffers", "_flush_pending", "_subprocess_flush_pending", "echo",
              "pub_thread", "flush_timeout", "_flush")
    stock_inner = iostream.OutStream._flush

    def inner(self: Any) -> None:
        # Set before ipykernel clears _flush_pending, cleared once the message is queued: a
        # flush that reads _flush_pending, then this, both false, has nothing in between.
        self._lean_flushing += 1
        try:
            stock_inner(self)  # type: ignore[no-untyped-call]
        finally:
            self._lean_flushing -= 1

    def flush(self: Any) -> None:
        thread = getattr(getattr(self, "pub_thread", None), "thread", None)
        if not all(hasattr(self, name) for name in needed) or thread is None \
                or not thread.is_alive() or thread.ident == threading.get_ident():
            stock(self)  # type: ignore[no-untyped-call]
            return
        if self.echo is None and not self._flush_pending and not self._subprocess_flush_pending \
                and not self._lean_flushing:
            with self._buffer_lock:
                if not any(buf.tell() for buf in self._buffers.values()):
                    return
        sent = threading.Event()

        def send_then_wake() -> None:
            try:
                self._flush()
            finally:
                sent.set()

        self.pub_thread.schedule(send_then_wake)
        if not sent.wait(self.flush_timeout):
            print("IOStream.flush timed out", file=sys.__stderr__)

    flush.__doc__ = stock.__doc__
    inner.__doc__ = stock_inner.__doc__
    iostream.OutStream._lean_flushing = 0  # type: ignore[attr-defined]
    iostream.OutStream._flush = inner  # type: ignore[method-assign]
    iostream.OutStream.flush = flush  # type: ignore[method-assign]
    sleep.default_value = 0.0


def _without_subshells() -> None:
    """The kernel runs without ipykernel's shell-channel thread (option ``subshells: false``).
    ipykernel 7 reads the shell socket in a thread of its own, for kernel subshells (JEP 91),
    and hands every request to the main thread and every reply back through a pair of inproc
    sockets: two more thread hand-offs per request, which under parallel load are where round
    trips wait. Without the thread ipykernel reads the shell socket on its main thread, as
    ipykernel 6 did, and its kernel_info_reply no longer lists "kernel subshells", so clients
    (JupyterLab's comms, its subshell consoles) do not ask for them."""
    try:
        from ipykernel import kernelapp
    except ImportError:
        return
    if hasattr(kernelapp, "ShellChannelThread"):  # ipykernel 7: with None, no thread is made
        kernelapp.ShellChannelThread = lambda *args, **kwargs: None


def _lean_calls() -> None:
    """Work that an execute repeats and whose answer cannot change, done once. About a tenth
    of the main thread's CPU for a ``1+1`` (README "Lean execute"):

    - ipykernel asks, for every execute, which of ``cell_id`` and ``cell_meta`` the shell's
      ``run_cell`` takes (``_accepts_parameters``: ``inspect.signature`` of the method each
      time). A function's parameters are fixed, so the answer is kept per function; a shell
      whose ``run_cell`` is replaced by another function is asked afresh.
    - IPython 8's formatters are wrapped by ``catch_format_error``, made with the
      ``decorator`` package, whose wrapper binds every call's arguments to the method's
      signature before it calls the decorator's own code: twelve bindings per displayed
      result (IPython 9 wraps them with ``functools.wraps``, which does not bind, and is
      left as it is). A call with just the object (``formatter(obj)``, how IPython's display
      calls all but one) goes to the same code without the binding; any other call goes
      through the ``decorator`` wrapper as before.

    Only what has the shape this was written for is changed (ipykernel's module function,
    wrappers made by ``decorator.decorate`` around ``(self, obj, ...)`` methods)."""
    try:
        from ipykernel import ipkernel as kernel_module
        module: Any = kernel_module
        stock_accepts = module._accepts_parameters
    except (ImportError, AttributeError):
        pass
    else:
        known: dict[tuple[Any, tuple[str, ...]], dict[str, bool]] = {}

        def accepts(meth: Any, param_names: Any) -> Any:
            try:
                key = (getattr(meth, "__func__", meth), tuple(param_names))
                answer = known.get(key)
            except TypeError:  # an unhashable callable
                return stock_accepts(meth, param_names)
            if answer is None:
                answer = known[key] = stock_accepts(meth, param_names)
            return dict(answer)

        accepts.__doc__ = stock_accepts.__doc__
        module._accepts_parameters = accepts
    try:
        from IPython.core import formatters
    except ImportError:
        return
    for cls in list(vars(formatters).values()):
        if isinstance(cls, type) and callable(cls.__dict__.get("__call__")):
            fast = _unbound_call(cls.__dict__["__call__"])
            if fast is not None:
                cls.__call__ = fast  # type: ignore[method-assign]


def _unbound_call(wrapper: Any) -> Any:
    """For a method wrapped by ``decorator.decorate`` (no extras, no kwsyntax), a wrapper
    that calls the same caller for ``(self, obj)`` without binding the arguments to the
    signature, and the original wrapper for anything else; None for anything else."""
    import functools
    import inspect

    code = getattr(wrapper, "__code__", None)
    if code is None or getattr(wrapper, "__wrapped__", None) is None or wrapper.__closure__ is None \
            or inspect.iscoroutinefunction(wrapper) or inspect.isgeneratorfunction(wrapper):
        return None
    cells = dict(zip(code.co_freevars, wrapper.__closure__, strict=False))
    if not {"caller", "func", "extras", "kwsyntax", "sig"} <= cells.keys():
        return None
    try:
        caller, func = cells["caller"].cell_contents, cells["func"].cell_contents
        extras, kwsyntax = cells["extras"].cell_contents, cells["kwsyntax"].cell_contents
        params = list(inspect.signature(func).parameters.values())
    except (ValueError, TypeError):  # an empty cell, a signature that cannot be read
        return None
    positional = (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)
    if extras != () or kwsyntax or len(params) < 2 or params[0].kind not in positional \
            or params[1].kind not in positional \
            or any(p.default is p.empty for p in params[2:] if p.kind in positional):
        return None

    def call(self: Any, *args: Any, **kwargs: Any) -> Any:
        if len(args) == 1 and not kwargs:
            return caller(func, self, args[0])
        return wrapper(self, *args, **kwargs)

    return functools.update_wrapper(call, wrapper)


class _NoSyncConnection(sqlite3.Connection):
    """A connection that commits without waiting for the disk (``PRAGMA synchronous=OFF``)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        try:
            self.execute("PRAGMA synchronous=OFF")
        except sqlite3.Error:
            pass  # a history file that cannot take it is written as IPython would


#: How long IPython's history thread, woken by a cell, waits before it writes (``_lean_history``)
HISTORY_GATHER = 0.05


class _GatheringFlag(threading.Event):
    """IPython's history save flag (``HistoryManager.save_flag``), set by the kernel's main
    thread after each cell and waited on by the history thread alone. Once it is set, the
    waiter stays away ``HISTORY_GATHER`` seconds more before it writes, so cells that follow
    each other within that time share one commit and one wake-up of the thread, unless the
    thread is being stopped (then it goes at once, as IPython's does)."""

    def __init__(self, stopping: Callable[[], bool]) -> None:
        super().__init__()
        self._stopping = stopping

    def wait(self, timeout: float | None = None) -> bool:
        flagged = super().wait(timeout)
        if flagged and HISTORY_GATHER > 0 and not self._stopping():
            time.sleep(HISTORY_GATHER)
        return flagged


def _lean_history() -> None:
    """IPython stores each cell's input in its history database (``history.sqlite`` in the
    profile, one file for every kernel of a user) from a thread of its own, one commit per
    cell, and holds the lock on its input cache while it commits, so the next cell waits for
    the last one's commit. By default each commit waits for the disk twice (fsync of the
    journal and of the file), and kernels that share the file wait for each other's: under
    parallel load that is where round trips stalled (README "Lean execute"). A lean kernel's
    history connections skip the fsync: a kernel that crashes loses no commit (the data is with
    the OS); a machine that loses power may lose the last cells' history or leave a file that
    IPython moves aside as corrupt and starts afresh. And its history thread gathers the
    cells of ``HISTORY_GATHER`` seconds into one commit (``_GatheringFlag``): a kernel
    running cells back to back (a loop of small requests, a notebook run top to bottom)
    wakes that thread and commits a few times a second, not once a cell. What IPython reads
    from the database (``%history -g``, a console's up-arrow) it writes out first from the
    main thread, so nothing waiting in the cache is missed; a kernel killed outright loses
    what its last 0.05 s stored, where IPython's own loses what its thread had not yet run
    for. How: the shell makes its history manager from the name ``HistoryManager`` in
    IPython.core.interactiveshell (IPython 8 and 9); that name becomes a subclass whose
    default ``connection_options`` (the keyword arguments of both of its ``sqlite3.connect``
    calls, a config trait) add a connection factory, and whose save flag (the manager's in
    IPython 8, its thread's in 9) becomes a ``_GatheringFlag`` when the thread is made, before
    it starts. A config that sets ``HistoryManager.connection_options`` still wins."""
    try:
        from IPython.core import history, interactiveshell
        from traitlets import default, validate
    except ImportError:
        return
    if getattr(interactiveshell, "HistoryManager", None) is not history.HistoryManager:
        return  # a layout this was not written for: IPython's own history

    class LeanHistoryManager(history.HistoryManager):
        @default("connection_options")
        def _lean_connection_options(self) -> dict[str, Any]:
            stock = getattr(super(), "_default_connection_options", None)
            options: dict[str, Any] = dict(stock()) if callable(stock) else {}
            options["factory"] = _NoSyncConnection
            return options

        @validate("save_thread")
        def _lean_save_thread(self, proposal: Any) -> Any:
            thread = proposal["value"]  # set before the thread starts, in IPython 8 and 9
            if thread is None:
                return thread

            def stopping() -> bool:  # IPython 8 names it stop_now, 9 _stop_now
                return bool(getattr(thread, "stop_now", False)
                            or getattr(thread, "_stop_now", False))

            # The flag is the manager's (a trait) in IPython 8, the thread's in IPython 9.
            owner = thread if "save_flag" in vars(thread) else self
            if type(getattr(owner, "save_flag", None)) is threading.Event:
                owner.save_flag = _GatheringFlag(stopping)
            return thread

    interactiveshell.HistoryManager = LeanHistoryManager  # type: ignore[attr-defined]


def _stat_fields() -> list[str]:
    with open("/proc/self/stat") as f:
        text = f.read()
    return text[text.rindex(")") + 2:].split()  # fields from 3 on (state); see proc(5)


def _rewrite(start: int, end: int, data: bytes) -> bool:
    """Write ``data`` over the memory [start, end) of this process, NUL-padded."""
    size = end - start
    if start <= 0 or size <= 0 or len(data) > size:
        return False
    ctypes.memmove(start, data + b"\0" * (size - len(data)), size)
    return True


def _retitle(argv: list[str], env: dict[str, str]) -> None:
    """Make /proc/self/cmdline and /proc/self/environ show the kernel's, as an exec'd kernel's
    would: both are read from this process's original argv and environment memory, which the
    launcher reserved room in when it started this server (forking.py: ROOM_ARG, ROOM_ENV)."""
    try:
        fields = _stat_fields()
        # arg_start, arg_end, env_start, env_end: fields 48-51 of proc(5), i.e. 45-48 here
        arg_start, arg_end, env_start, env_end = (int(x) for x in fields[45:49])
    except (OSError, ValueError, IndexError):
        return
    # The C environment pointed into that memory until the caller cleared os.environ and
    # refilled it: every live string is on the heap now, so the memory is free to rewrite.
    title = " ".join(argv).encode(errors="replace")
    if len(title) >= arg_end - arg_start:
        title = title[:arg_end - arg_start - 2]
    # No NUL at the end of the arguments: Linux then reads the command line as one string up
    # to its first NUL (as for setproctitle), and psutil splits it on spaces.
    _rewrite(arg_start, arg_end, title + b"\0" + b" " * (arg_end - arg_start - len(title) - 2)
             + b"x")
    block = b"".join(f"{k}={v}".encode(errors="replace") + b"\0" for k, v in env.items())
    _rewrite(env_start, env_end, block)


def _child(req: dict[str, Any], sock: socket.socket) -> None:
    """Runs in the forked child: become the kernel. Never returns into the server's loop."""
    code: object = 1
    try:
        sock.detach()  # its fd is closed below; the object must not close a reused number
        gc.enable()
        os.setsid()
        for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGCHLD, signal.SIGPIPE, signal.SIGHUP):
            signal.signal(sig, signal.SIG_DFL)
        null = os.open(os.devnull, os.O_RDONLY)
        out = os.open(req["log"], os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
        os.dup2(null, 0)
        os.dup2(out, 1)
        os.dup2(out, 2)
        os.closerange(3, 65536)
        if req.get("cwd"):
            os.chdir(req["cwd"])
        os.environ.clear()
        os.environ.update(req["env"])
        import time
        time.tzset()
        argv = req["argv"]
        _retitle(argv, req["env"])
        # What `python -m MODULE ARGS` sets up: sys.path[0] is the working directory and
        # sys.argv[0] the module's file (runpy sets it).
        sys.path[0] = os.getcwd()
        sys.argv = ["-m", *argv[3:]]
        sys.orig_argv = list(argv)
        if req.get("lean"):
            _lean()
        if req.get("subshells") is False:
            _without_subshells()
        elif req.get("lean"):
            forward_shell_in_c()
        import runpy
        runpy.run_module(argv[2], run_name="__main__", alter_sys=True)
        code = 0
    except SystemExit as exc:
        code = exc.code
    except BaseException:  # noqa: BLE001 - the kernel's own failure goes to its log
        import traceback
        traceback.print_exc()
        code = 1
    # A normal interpreter exit from here: atexit handlers run, as in an exec'd kernel.
    raise SystemExit(code)


def _reap(codes: dict[int, int]) -> None:
    while True:
        try:
            pid, status = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return
        if pid == 0:
            return
        codes[pid] = os.waitstatus_to_exitcode(status)
        if len(codes) > 10000:
            codes.pop(next(iter(codes)))


def main() -> None:
    # Run as a script, sys.path[0] is this file's folder: not a place to import from.
    sys.path[0] = os.getcwd()
    sock = socket.socket(fileno=int(sys.argv[1]))
    rfile = sock.makefile("r")

    def send(obj: dict[str, Any]) -> None:
        sock.sendall(json.dumps(obj).encode() + b"\n")

    # As the gc docs advise for fork without exec: no collection in the server (no holes in
    # its pages), everything it imported frozen before the forks (collections in the kernels
    # never touch those objects, so their pages stay shared and each collection scans only the
    # kernel's own objects), and gc enabled again in each child.
    gc.disable()
    try:
        _preload()
    except Exception as exc:  # noqa: BLE001 - reported to the launcher, which execs instead
        send({"error": f"cannot import ipykernel: {exc!r}"})
        return
    import threading
    if threading.active_count() > 1:
        send({"error": "importing ipykernel started threads: forking is not safe"})
        return
    gc.freeze()
    send({"ready": True, "pid": os.getpid()})
    try:
        _serve(sock, rfile, send)
    except (OSError, KeyboardInterrupt):  # the worker stopped (a reset socket, a Ctrl-C that
        return  # reached its whole process group): nothing to report, its kernels live on


def _serve(sock: socket.socket, rfile: Any, send: Any) -> None:
    """Fork a kernel for each request until the launcher closes the socket."""
    codes: dict[int, int] = {}
    poller = select.poll()  # not select(): the fd the worker passed may be past 1024
    poller.register(sock.fileno(), select.POLLIN)
    while True:
        ready = poller.poll(200)
        _reap(codes)
        if not ready:
            continue
        line = rfile.readline()
        if not line:
            return  # the launcher is gone
        req = json.loads(line)
        if req.get("op") == "status":
            _reap(codes)
            send({"code": codes.get(int(req["pid"]))})
            continue
        sys.stdout.flush()
        sys.stderr.flush()
        try:
            pid = os.fork()
        except OSError as exc:
            send({"error": f"fork failed: {exc.strerror}"})
            continue
        if pid == 0:
            _child(req, sock)
        send({"pid": pid})


if __name__ == "__main__":
    main()
