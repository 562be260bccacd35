"""A Spark kernel: ipykernel with ``spark`` and ``sc`` ready, as Enterprise Gateway's are.

Run by a kernelspec as ``python -m poolgate.spark_kernel [--init-mode MODE] -f
{connection_file}``. What the client's start request may set (both are ``KERNEL_*``, so the
gateway passes them on):

- ``KERNEL_SPARK_CONTEXT_INIT_MODE``: ``eager`` creates the SparkSession before the kernel
  answers; ``lazy`` creates it the first time a cell touches ``spark`` or ``sc`` (in YARN
  cluster mode: at once, in the background, see :func:`background`); ``none`` defines neither
  (in cluster mode Spark then ends the application after ``spark.yarn.am.waitTime``). It
  overrides the spec's ``--init-mode`` (default ``lazy``).
- ``KERNEL_EXTRA_SPARK_OPTS``: spark-submit options (``--conf k=v``, ``--driver-memory 1g``,
  ...) added to ``PYSPARK_SUBMIT_ARGS`` before the JVM starts. Where the JVM already runs
  (``spark-submit --deploy-mode cluster`` started this process, see
  workers/launchers/spark_builders.py) they were on that command line instead.

An interrupt cancels the Spark jobs the cell started (``SparkContext.cancelAllJobs``) and the
cell ends with KeyboardInterrupt, so the executors are free (see :func:`spark_kernel_class`).
ipykernel alone only raises KeyboardInterrupt, which leaves the job running in the JVM.

The rule of this module: the standard library at import; ipykernel and pyspark only once the
kernel starts, so it imports (and its pure parts test) anywhere.
"""
from __future__ import annotations

import argparse
import os
import shlex
import sys
import threading
from collections.abc import Callable, Mapping
from types import FrameType
from typing import Any

from .lazy import lazy_names

MODES = ("eager", "lazy", "none")
SHELL = "pyspark-shell"


def init_mode(env: Mapping[str, str], spec_default: str) -> str:
    """The mode the client asked for (KERNEL_SPARK_CONTEXT_INIT_MODE), else the spec's."""
    mode = (env.get("KERNEL_SPARK_CONTEXT_INIT_MODE") or spec_default).strip().lower()
    if mode not in MODES:
        raise ValueError(f"KERNEL_SPARK_CONTEXT_INIT_MODE={mode!r}: expected one of "
                         f"{', '.join(MODES)}")
    return mode


def submit_args(env: Mapping[str, str]) -> str:
    """``PYSPARK_SUBMIT_ARGS`` with ``KERNEL_EXTRA_SPARK_OPTS`` added: pyspark hands these to
    spark-submit when it starts the JVM, and wants ``pyspark-shell`` last."""
    words = shlex.split(env.get("PYSPARK_SUBMIT_ARGS", ""))
    if words[-1:] == [SHELL]:
        words.pop()
    words += shlex.split(env.get("KERNEL_EXTRA_SPARK_OPTS", ""))
    return shlex.join([*words, SHELL])


def app_name(env: Mapping[str, str]) -> str:
    return env.get("KERNEL_ID") or "poolgate-spark"


def make_session(env: Mapping[str, str]) -> Any:
    """The SparkSession (created, or the one the driver already has)."""
    from pyspark.sql import SparkSession

    builder = SparkSession.builder
    if "--name" not in shlex.split(env.get("PYSPARK_SUBMIT_ARGS", "")):
        builder = builder.appName(app_name(env))
    return builder.getOrCreate()


def background(create: Callable[[], dict[str, Any]]) -> Callable[[], dict[str, Any]]:
    """Start ``create`` now in a thread; the returned callable waits for its result.

    In YARN cluster mode Spark's ApplicationMaster fails the application when no SparkContext
    exists after ``spark.yarn.am.waitTime`` (100 s), so "lazy" there means: the kernel answers
    at once, the session is being made meanwhile, and the first cell using it waits for it
    (as Enterprise Gateway does)."""
    done: dict[str, Any] = {}

    def run() -> None:
        try:
            done["names"] = create()
        except BaseException as exc:  # handed to the cell that first uses spark
            done["error"] = exc

    thread = threading.Thread(target=run, name="spark-session", daemon=True)
    thread.start()

    def wait() -> dict[str, Any]:
        thread.join()
        if "error" in done:
            raise done["error"]
        return dict(done["names"])

    return wait


def cancel_spark_jobs() -> None:
    """Cancel every job of the live SparkContext, if there is one (called on interrupt), from
    a thread of its own: the interrupted thread's connection to the JVM is busy."""
    from pyspark import SparkContext

    sc = SparkContext._active_spark_context
    if sc is not None:
        threading.Thread(target=sc.cancelAllJobs, name="spark-cancel", daemon=True).start()


def waiting_on_jvm(frame: FrameType | None) -> bool:
    """Whether the interrupted code is inside a py4j call (waiting for the JVM's answer)."""
    while frame is not None:
        if str(frame.f_globals.get("__name__", "")).startswith("py4j."):
            return True
        frame = frame.f_back
    return False


def spark_kernel_class() -> type:
    """IPythonKernel whose interrupt cancels the cell's Spark jobs.

    A first SIGINT that finds the cell waiting on the JVM cancels the jobs and lets the JVM
    answer: the job's call then fails, and that error is shown as KeyboardInterrupt (raised
    from it). KeyboardInterrupt is not raised inside py4j's read, which could leave its
    connection half-read. Any other SIGINT (pure Python code, a second one) raises it at once.
    """
    import signal

    from ipykernel.ipkernel import IPythonKernel

    cancelled = threading.Event()

    def interrupted(signum: int, frame: FrameType | None) -> None:
        if not cancelled.is_set() and waiting_on_jvm(frame):
            cancelled.set()
            cancel_spark_jobs()
            return
        raise KeyboardInterrupt

    class SparkKernel(IPythonKernel):
        implementation = "poolgate-spark"

        def __init__(self, **kwargs: Any) -> None:
            super().__init__(**kwargs)  # type: ignore[no-untyped-call]
            shell = self.shell
            assert shell is not None  # IPythonKernel makes it in __init__
            shown = shell.showtraceback

            def showtraceback(exc_tuple: Any = None, *args: Any, **kw: Any) -> Any:
                failed = sys.exc_info()[1] if exc_tuple is None else exc_tuple[1]
                if cancelled.is_set() and not isinstance(failed, KeyboardInterrupt):
                    try:
                        raise KeyboardInterrupt("the cell's Spark jobs were cancelled") \
                            from failed
                    except KeyboardInterrupt as exc:
                        return shown((KeyboardInterrupt, exc, exc.__traceback__), *args, **kw)
                return shown(exc_tuple, *args, **kw)

            shell.showtraceback = showtraceback

        def pre_handler_hook(self) -> None:  # ipykernel: around each shell message
            cancelled.clear()
            self.saved_sigint_handler = signal.signal(signal.SIGINT, interrupted)

    return SparkKernel


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m poolgate.spark_kernel")
    parser.add_argument("--init-mode", default="lazy", choices=MODES,
                        help="the spec's default; KERNEL_SPARK_CONTEXT_INIT_MODE overrides it")
    args, rest = parser.parse_known_args(argv)
    env = os.environ
    try:
        mode = init_mode(env, args.init_mode)
    except ValueError as exc:
        print(f"poolgate.spark_kernel: {exc}", file=sys.stderr)
        return 2
    if "PYSPARK_GATEWAY_PORT" not in env:  # no JVM yet: pyspark will run spark-submit
        env["PYSPARK_SUBMIT_ARGS"] = submit_args(env)
    ns: dict[str, Any] = {}
    if mode == "eager":
        session = make_session(env)
        ns.update(spark=session, sc=session.sparkContext)
    elif mode == "lazy":
        def create() -> dict[str, Any]:
            session = make_session(env)
            return {"spark": session, "sc": session.sparkContext}
        if "PYSPARK_GATEWAY_PORT" in env:  # cluster mode: see background()
            create = background(create)
        lazy_names(("spark", "sc"), create, ns)
    from ipykernel.kernelapp import IPKernelApp

    app = IPKernelApp.instance(kernel_class=spark_kernel_class(), user_ns=ns)
    app.initialize(rest)  # type: ignore[no-untyped-call]
    app.start()  # type: ignore[no-untyped-call]
    return 0


if __name__ == "__main__":
    sys.exit(main())
