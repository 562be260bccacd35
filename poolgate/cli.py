"""The ``poolgate`` command: serve (everything on one machine), gateway, worker."""
from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path
from typing import Any

from workers.errors import ConfigError


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", help="queues.yaml (default: ./queues.yaml, then the packaged one)")
    p.add_argument("--log-level", default=os.environ.get("POOLGATE_LOG_LEVEL", "info"),
                   help="debug, info, warning or error")


def _gateway_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--ip", default="127.0.0.1", help="address to listen on (default 127.0.0.1)")
    p.add_argument("--port", type=int, default=8888, help="port to listen on (default 8888)")
    p.add_argument("--auth-token", default=None, help="require 'Authorization: token T'")
    p.add_argument("--base-url", default=None, help="prefix of every route, for reverse proxies")
    p.add_argument("--threads", type=int, default=None,
                   help="gateway threads: one per open WebSocket (default from queues.yaml)")


def parser() -> argparse.ArgumentParser:
    top = argparse.ArgumentParser(prog="poolgate", description=__doc__)
    sub = top.add_subparsers(dest="command", required=True)
    serve = sub.add_parser("serve", help="gateway + private Redis + a worker per runnable pool")
    _common(serve)
    _gateway_args(serve)
    serve.add_argument("--data-dir", default=None,
                       help="where the private Redis and kernel files live "
                            "(default $POOLGATE_DATA_DIR or ~/.local/share/poolgate)")
    serve.add_argument("--slots", type=int, default=None, help="kernel slots per worker")
    gw = sub.add_parser("gateway", help="the HTTP/WebSocket gateway alone")
    _common(gw)
    _gateway_args(gw)
    wk = sub.add_parser("worker", help="a Celery worker for one or more pools")
    _common(wk)
    wk.add_argument("--pool", action="append", required=True, help="pool to serve (repeatable)")
    wk.add_argument("--slots", type=int, default=None, help="kernels this worker hosts at once")
    wk.add_argument("--name", default=None, help="worker name (default <pool>-<index>@<host>)")
    wk.add_argument("--index", type=int, default=1, help="the n in <pool>-<n>@<host>")
    wk.add_argument("--runtime-dir", default=None, help="folder for kernels' connection files")
    return top


def setup_logging(level: str) -> None:
    logging.basicConfig(level=level.upper(),
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    try:
        if args.command == "serve":
            from poolgate.serve import serve

            return serve(args)
        if args.command == "gateway":
            return gateway(args)
        return worker(args)
    except ConfigError as exc:
        print(f"poolgate: configuration error: {exc}", file=sys.stderr)
        return 2


def gateway_overrides(args: argparse.Namespace) -> dict[str, Any]:
    out: dict[str, Any] = {}
    if args.auth_token is not None:
        out["auth_token"] = args.auth_token
    if args.base_url is not None:
        out["base_url"] = args.base_url
    return out


def gateway(args: argparse.Namespace) -> int:
    from gateway.server import run
    from workers.config import find_config, load_config

    setup_logging(args.log_level)
    config = load_config(args.config)  # fail here, with the message, not inside gunicorn
    settings = {"CONFIG_PATH": str(find_config(args.config)),
                "GATEWAY_OVERRIDES": gateway_overrides(args)}
    threads = args.threads or config.gateway.threads
    print(f"poolgate gateway listening on http://{args.ip}:{args.port}", flush=True)
    run(settings, args.ip, args.port, threads)
    return 0


def worker(args: argparse.Namespace) -> int:
    from workers.celery_app import make_celery
    from workers.config import load_config

    config = load_config(args.config)
    for name in args.pool:
        if name not in config.pools:
            raise ConfigError(f"--pool: no pool {name!r} in {config.source} "
                              f"(pools: {', '.join(config.pools)})")
    pools = [config.pools[n] for n in args.pool]
    slots = args.slots or pools[0].slots
    if slots < 1:
        raise ConfigError("--slots: expected an integer >= 1")
    name = args.name or f"{'+'.join(args.pool)}-{args.index}@%h"
    runtime_dir = args.runtime_dir or str(Path(os.environ.get("POOLGATE_DATA_DIR") or
                                               Path.home() / ".local/share/poolgate") / "kernels")
    app = make_celery(config, slots=slots, runtime_dir=runtime_dir)
    queues = ",".join(p.queue for p in pools)
    app.worker_main(["worker", "-Q", queues, "-n", name, "-c", str(slots), "-P", "threads", "-E",
                     "--without-gossip", "--without-mingle", "-l", args.log_level.upper()])
    return 0
