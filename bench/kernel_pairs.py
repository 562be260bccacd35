"""Kernels in parallel, driven directly: what a kernel variant does to the round trip's tail when
many kernels are busy at once, with no gateway in the way.

    python -m bench.kernel_pairs --pairs 3 --kernels 8 --seconds 10 [--variants stock,lean,...]

Each of ``--kernels`` kernels gets a client process of its own (jupyter_client, as a user's
notebook server or nbclient is one client per kernel), and every client runs ``1+1`` round
trips in a closed loop for ``--seconds``; p50, p99 and the slowest round trip over all of them.
A *pair* is one such run of each variant, in turn, so variants are compared minutes apart at
most (a single run on this kind of machine moves by ×2 between minutes). Variants:

- ``stock``: ipykernel as it is (the floor's kernels, exec'd kernels);
- ``lean``: a forked kernel's by default: lean execute (workers/launchers/forkserver.py
  ``_lean``), and the shell channel forwarded in C until a subshell is asked for
  (shellforward.py);
- ``lean-python-shell``: lean execute alone, with ipykernel's shell channel thread as it is;
- ``lean-no-history``: lean execute without its history part (``_lean(history=False)``), to
  show what committing IPython's history without fsync is worth on its own;
- ``lean-nosubshells``: lean, and no shell-channel thread (``_without_subshells``, a pool's
  ``subshells: false``);
- ``lean-history-each-cell``: lean, but IPython's history thread commits each cell as it
  comes, as IPython's does, instead of gathering them (``HISTORY_GATHER = 0``);
- ``lean-stock-calls``: lean without ``_lean_calls`` (ipykernel's signature lookup and the
  ``decorator`` package's argument binding on every execute, as they are).

Kernels start with the caller's environment, so all of them share the one IPython history
file, as every kernel of a user does.
"""

from __future__ import annotations

import argparse
import json
import queue
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import psutil

VARIANTS = {
    "stock": "",
    "lean": "from poolgate.workers.launchers.forkserver import _lean, forward_shell_in_c\n"
            "_lean()\nforward_shell_in_c()\n",
    "lean-python-shell": "from poolgate.workers.launchers.forkserver import _lean; _lean()\n",
    "lean-no-history": "from poolgate.workers.launchers.forkserver import _lean, "
                       "forward_shell_in_c\n_lean(history=False)\nforward_shell_in_c()\n",
    "lean-nosubshells": "from poolgate.workers.launchers.forkserver import _lean, "
                        "_without_subshells\n_lean()\n_without_subshells()\n",
    "lean-history-each-cell": "from poolgate.workers.launchers import forkserver\n"
                              "forkserver.HISTORY_GATHER = 0\nforkserver._lean()\n"
                              "forkserver.forward_shell_in_c()\n",
    "lean-stock-calls": "from poolgate.workers.launchers.forkserver import _lean, "
                        "forward_shell_in_c\n_lean(calls=False)\nforward_shell_in_c()\n",
}
KERNEL = "{prelude}from ipykernel import kernelapp\nkernelapp.launch_new_instance()\n"


def drive(connection_file: str, kernel_pid: int, start_at: float, seconds: float,
          out: str) -> None:
    """One client: wait for the kernel, warm up, then round trips from ``start_at`` for
    ``seconds``; their durations (s) go to ``out`` as JSON."""
    from jupyter_client import BlockingKernelClient

    kc = BlockingKernelClient(connection_file=connection_file)
    kc.load_connection_file()
    kc.start_channels()

    def idle(mid: str, timeout: float) -> None:
        """Until request ``mid``'s status idle comes on iopub."""
        while True:
            msg = kc.get_iopub_msg(timeout=timeout)
            if msg["parent_header"].get("msg_id") == mid and msg["msg_type"] == "status" \
                    and msg["content"]["execution_state"] == "idle":
                return

    def reply(mid: str, timeout: float) -> None:
        """Until request ``mid``'s reply comes on shell."""
        while kc.get_shell_msg(timeout=timeout)["parent_header"].get("msg_id") != mid:
            pass

    # Ready once a request's status reaches iopub: a kernel_info reply alone does not show
    # that the iopub subscription is in place, and what is published before it is lost.
    # No heartbeat check: a kernel starting on a busy machine misses it.
    for _ in range(40):
        mid = kc.kernel_info()
        try:
            idle(mid, 3)
            break
        except queue.Empty:
            if psutil.Process(kernel_pid).status() == psutil.STATUS_ZOMBIE:
                raise RuntimeError("the kernel exited before it answered") from None
    else:
        raise RuntimeError("the kernel did not answer kernel_info on iopub")

    def round_trip() -> None:
        mid = kc.execute("1+1")
        idle(mid, 60)
        reply(mid, 60)

    for _ in range(10):
        round_trip()
    while time.time() < start_at:
        round_trip()
    took: list[float] = []
    while time.time() < start_at + seconds:
        began = time.perf_counter()
        round_trip()
        took.append(time.perf_counter() - began)
    kc.stop_channels()
    Path(out).write_text(json.dumps(took))


def run_variant(variant: str, kernels: int, seconds: float, work: Path) -> dict[str, float]:
    """Start ``kernels`` kernels of ``variant``, drive them all at once; the figures (ms)."""
    from jupyter_client.connect import write_connection_file

    code = KERNEL.format(prelude=VARIANTS[variant])
    procs, clients = [], []
    start_at = time.time() + 5 + 0.8 * kernels  # every kernel is up and warm by then
    try:
        for i in range(kernels):
            # IPC, not TCP: 32 kernels picking free ports at once can pick the same one
            cf, _ = write_connection_file(str(work / f"{variant}-{i}.json"), transport="ipc",
                                          ip=str(work / f"{variant}-{i}-ipc"))
            procs.append(subprocess.Popen([sys.executable, "-c", code, "-f", cf],
                                          stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
            clients.append(subprocess.Popen(
                [sys.executable, "-m", "bench.kernel_pairs", "--drive", cf, str(procs[-1].pid),
                 str(start_at), str(seconds), str(work / f"{variant}-{i}.out")]))
        for c in clients:
            if c.wait() != 0:
                raise RuntimeError(f"{variant}: a client failed (exit code {c.returncode})")
    finally:
        for p in procs:
            p.kill()
            p.wait()
        for c in clients:
            c.kill()
            c.wait()
    took = sorted(1000 * t for i in range(kernels)
                  for t in json.loads((work / f"{variant}-{i}.out").read_text()))
    return summary(took)


def summary(took_ms: list[float]) -> dict[str, float]:
    """p50, p99 and the slowest of sorted round trips (ms), and how many there were."""
    if not took_ms:
        raise ValueError("no round trips")
    n = len(took_ms)
    return {"round_trips": float(n), "p50_ms": took_ms[n // 2],
            "p99_ms": took_ms[min(n - 1, int(n * 0.99))], "max_ms": took_ms[-1]}


def table(runs: dict[str, list[dict[str, float]]]) -> str:
    """One row per variant: each pair's p50 / p99 / slowest, and the medians over pairs."""
    lines = ["| variant | round trips | p50 ms | p99 ms | slowest ms | median p50 / p99 |",
             "|---|---|---|---|---|---|"]
    for variant, figures in runs.items():
        def each(key: str) -> str:
            return ", ".join(f"{f[key]:.0f}" for f in figures)
        lines.append(f"| {variant} | {each('round_trips')} | {each('p50_ms')} | "
                     f"{each('p99_ms')} | {each('max_ms')} | "
                     f"{statistics.median(f['p50_ms'] for f in figures):.1f} / "
                     f"{statistics.median(f['p99_ms'] for f in figures):.1f} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["--drive"]:
        cf, pid, start_at, seconds, out = argv[1:6]
        drive(cf, int(pid), float(start_at), float(seconds), out)
        return 0
    p = argparse.ArgumentParser(prog="python -m bench.kernel_pairs", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--variants", default="lean-no-history,lean",
                   help=f"comma-separated, of {', '.join(VARIANTS)}")
    p.add_argument("--pairs", type=int, default=3)
    p.add_argument("--kernels", type=int, default=8)
    p.add_argument("--seconds", type=float, default=10.0)
    args = p.parse_args(argv)
    variants = args.variants.split(",")
    if unknown := [v for v in variants if v not in VARIANTS]:
        p.error(f"unknown variant(s): {', '.join(unknown)}")
    runs: dict[str, list[dict[str, Any]]] = {v: [] for v in variants}
    with tempfile.TemporaryDirectory(prefix="poolgate-kernel-pairs-") as tmp:
        for pair in range(args.pairs):
            for variant in variants:
                figures = run_variant(variant, args.kernels, args.seconds, Path(tmp))
                runs[variant].append(figures)
                print(f"[bench] pair {pair + 1}/{args.pairs} {variant}: "
                      f"{figures['round_trips']:.0f} round trips, p50 {figures['p50_ms']:.1f}"
                      f" ms, p99 {figures['p99_ms']:.1f} ms, slowest {figures['max_ms']:.0f} ms",
                      flush=True)
    print(table(runs))
    return 0


if __name__ == "__main__":
    sys.exit(main())
