"""python -m bench: run the scenarios against each target and print medians and ×floor."""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import json
import os
import platform
import shlex
import shutil
import signal
import sys
import tempfile
import time
from pathlib import Path

from bench.config import FULL, QUICK, SCENARIOS, Sizes
from bench.procs import reap_all
from bench.progress import say
from bench.report import table, write_json
from bench.runner import TargetResult, run_target
from bench.targets import TARGETS, RunContext

DEFAULT_TARGETS = "floor,poolgate,poolgate-redis,eg,kg"
EXTRA_ARG_NAMES = ("eg", "kg", "poolgate", "poolgate-before", "poolgate-redis:worker",
                   "poolgate-redis:gateway")


def csv(text: str) -> list[str]:
    return [part.strip() for part in text.split(",") if part.strip()]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m bench", description=__doc__)
    p.add_argument("--targets", default=DEFAULT_TARGETS,
                   help=f"comma-separated, run in this order (default {DEFAULT_TARGETS})")
    p.add_argument("--rounds", type=int, default=None, help="rounds (default 3; --quick: 1)")
    p.add_argument("--quick", action="store_true", help="tiny sizes: a smoke run")
    p.add_argument("--scenarios", default=",".join(SCENARIOS),
                   help=f"comma-separated subset of {','.join(SCENARIOS)}")
    p.add_argument("--json", type=Path, help="write results as JSON to this file")
    p.add_argument("--kernel-name", default="python3", help="kernelspec name to request")
    p.add_argument("--token", default=None, help="gateway auth token (default: none)")
    p.add_argument("--ws-compress", action="store_true",
                   help="WebSocket clients offer permessage-deflate, as browsers and the "
                        "websockets library do (what the gateway accepts is its own choice)")
    p.add_argument("--keep-logs", action="store_true", help="keep the work folder with logs")
    p.add_argument("--args", action="append", default=[], metavar="NAME=ARGS",
                   help="extra arguments for one process, e.g. 'poolgate=--slots 128'; NAME "
                        "is eg, kg, poolgate, poolgate-before, poolgate-redis:worker or "
                        "poolgate-redis:gateway "
                        "(repeatable; default: none, as a user would start it)")
    for f in dataclasses.fields(Sizes):
        tuple_valued = isinstance(getattr(FULL, f.name), tuple)
        p.add_argument(f"--{f.name.replace('_', '-')}", dest=f"size_{f.name}", default=None,
                       metavar="K,K,..." if tuple_valued else "N",
                       help=f"size: {f.name} (default {getattr(FULL, f.name)}, --quick "
                            f"{getattr(QUICK, f.name)})")
    args = p.parse_args(argv)
    unknown = [t for t in csv(args.targets) if t not in TARGETS]
    unknown += [s for s in csv(args.scenarios) if s not in SCENARIOS]
    if unknown:
        p.error(f"unknown target or scenario: {', '.join(unknown)}")
    for item in args.args:
        if "=" not in item or item.split("=", 1)[0] not in EXTRA_ARG_NAMES:
            p.error(f"--args {item!r}: expected NAME=ARGS, NAME one of {EXTRA_ARG_NAMES}")
    return args


def sizes_from(args: argparse.Namespace) -> Sizes:
    base = QUICK if args.quick else FULL
    changes: dict[str, object] = {}
    for f in dataclasses.fields(Sizes):
        raw = getattr(args, f"size_{f.name}")
        if raw is None:
            continue
        current = getattr(base, f.name)
        if isinstance(current, tuple):
            changes[f.name] = tuple(int(x) for x in csv(raw))
        else:
            changes[f.name] = type(current)(raw)
    return dataclasses.replace(base, **changes)  # type: ignore[arg-type]


def write_kernelspec(root: Path, name: str) -> Path:
    """A kernelspec running ipykernel from this interpreter, so every target runs one kernel."""
    spec_dir = root / "kernels" / name
    spec_dir.mkdir(parents=True, exist_ok=True)
    spec = {"argv": [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"],
            "display_name": f"Python 3 (bench, {sys.executable})", "language": "python"}
    (spec_dir / "kernel.json").write_text(json.dumps(spec, indent=1))
    return root


def bench_workdir(prefix: str, kernel_name: str) -> tuple[Path, Path]:
    """A work folder and the kernelspec root in it. The floor runs in this process: the same
    kernelspec, its connection files in the work folder."""
    workdir = Path(tempfile.mkdtemp(prefix=prefix))
    spec_root = write_kernelspec(workdir / "jupyter", kernel_name)
    os.environ["JUPYTER_PATH"] = str(spec_root)
    os.environ["JUPYTER_RUNTIME_DIR"] = str(workdir / "floor-runtime")
    return workdir, spec_root


def extra_args(items: list[str]) -> dict[str, list[str]]:
    """--args NAME=ARGS, repeatable: the extra arguments of each named process."""
    extra: dict[str, list[str]] = {}
    for item in items:
        name, text = item.split("=", 1)
        extra[name] = [*extra.get(name, []), *shlex.split(text)]
    return extra


async def run_all(args: argparse.Namespace, ctx: RunContext, sizes: Sizes, rounds: int,
                  results: list[TargetResult]) -> None:
    """Round by round, each target in turn (started, measured, stopped): every target's round
    runs within minutes of the floor's, so a machine whose speed drifts over a long run moves
    all of a round's figures together, not one target's. A target that could not run is not
    tried again. SIGTERM and SIGHUP cancel the run like Ctrl-C does, so the targets' cleanup
    still runs."""
    task = asyncio.current_task()
    assert task is not None
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGHUP):
        loop.add_signal_handler(sig, task.cancel)
    names = csv(args.targets)
    for i in range(rounds):
        for name in names:
            if i == 0:
                results.append(TargetResult(name))  # first: an interrupted run shows it too
            result = next(r for r in results if r.name == name)
            if result.status != "ok":
                continue
            say(f"round {i + 1}/{rounds}: {name}")
            await run_target(TARGETS[name], ctx, sizes, 1, csv(args.scenarios), result)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    sizes = sizes_from(args)
    rounds = args.rounds or (1 if args.quick else 3)
    workdir, spec_root = bench_workdir("poolgate-bench-", args.kernel_name)
    extra = extra_args(args.args)
    ctx = RunContext(workdir=workdir, kernelspec_dir=spec_root, kernel_name=args.kernel_name,
                     token=args.token, extra_args=extra, ws_compress=args.ws_compress)
    t0 = time.time()
    results: list[TargetResult] = []
    try:
        asyncio.run(run_all(args, ctx, sizes, rounds, results))
    except (KeyboardInterrupt, asyncio.CancelledError):
        reap_all()
        print(table(results))
        say(f"interrupted; the table holds what was measured until then; logs kept in {workdir}")
        return 130
    finally:
        reap_all()
    print(table(results))
    if args.json:
        meta = {"started": t0, "seconds": time.time() - t0, "rounds": rounds,
                "quick": args.quick, "sizes": dataclasses.asdict(sizes),
                "python": sys.version, "platform": platform.platform(),
                "cpus": os.cpu_count(), "scenarios": csv(args.scenarios)}
        write_json(args.json, results, meta)
        say(f"results written to {args.json}")
    failed = any(r.status != "ok" or r.errors for r in results)
    if args.keep_logs or failed:
        say(f"logs kept in {workdir}")
    else:
        shutil.rmtree(workdir, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
