"""The operator's commands: ``poolgate status | kernels | drain | flower``.

Rule: ``status`` and ``kernels`` read the registry with the builders behind ``/api/pools``, so
they agree with the gateway and work with no gateway running; ``drain`` reaches workers only
through the ``poolgate_drain`` Celery control command; ``flower`` is Flower on the configured
broker, read-only unless asked. Each prints a table, or with ``--json`` the data.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Callable
from typing import Any

from .serve import data_dir, running
from .workers.config import Config, load_config
from .workers.errors import BadRequest, GatewayError, UnknownPool

COMMANDS = ("status", "kernels", "drain", "flower")


def add_parsers(sub: Any, common: Callable[[argparse.ArgumentParser], None]) -> None:
    """Add the admin subcommands to ``poolgate``'s subparsers (called by poolgate/cli.py)."""
    st = sub.add_parser("status", help="pools, workers, capacity, queue depth and kernels")
    kn = sub.add_parser("kernels", help="the kernels, with owner and age")
    dr = sub.add_parser("drain", help="stop a pool's workers (or one) from taking launches; "
                                      "running kernels stay")
    dr.add_argument("pool", help="the pool to drain")
    dr.add_argument("worker", nargs="?", default=None,
                    help="one worker (its full name, or the part before '@'); default: all")
    dr.add_argument("--resume", action="store_true", help="take launches again (undo a drain)")
    dr.add_argument("--timeout", type=float, default=5.0, help="seconds to wait for replies")
    kn.add_argument("--pool", default=None, help="only this pool's kernels")
    for p in (st, kn, dr):
        common(p)
        p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    fl = sub.add_parser("flower", help="Flower on the configured broker, read-only by default")
    common(fl)
    for p in (st, kn, dr, fl):
        p.add_argument("--data-dir", default=None,
                       help="read the registry of the poolgate serve using this folder (default: "
                            "$POOLGATE_DATA_DIR or ~/.local/share/poolgate, when a serve runs "
                            "there and neither --config nor POOLGATE_REGISTRY_URL is given)")
    fl.add_argument("--address", default="127.0.0.1", help="address to listen on")
    fl.add_argument("--port", type=int, default=5555, help="port to listen on (default 5555)")
    fl.add_argument("--allow-control", action="store_true",
                    help="allow Flower's control actions (shut down workers, revoke tasks)")
    fl.add_argument("flower_args", nargs=argparse.REMAINDER,
                    help="more Flower options, after '--' (e.g. -- --basic-auth=user:pass)")


def find_registry(args: argparse.Namespace) -> tuple[Config, str]:
    """The configuration to read, and where its registry came from: a running ``poolgate
    serve``'s private Redis (its data folder) unless --config or POOLGATE_REGISTRY_URL says
    otherwise, or --data-dir names that folder."""
    explicit = args.config or os.environ.get("POOLGATE_REGISTRY_URL")
    if args.data_dir or not explicit:
        folder = data_dir(args.data_dir, create=False)
        found = running(folder)
        if found is not None:
            url = found["registry_url"]
            env = dict(os.environ, POOLGATE_BROKER_URL=url, POOLGATE_REGISTRY_URL=url)
            return (load_config(args.config or found.get("config"), environ=env),
                    f"the poolgate serve using {folder}")
        if args.data_dir:
            raise GatewayError(f"no poolgate serve is running with --data-dir {folder}")
    config = load_config(args.config)
    return config, str(config.source)


def run(args: argparse.Namespace) -> int:
    """Run one admin command; returns the exit status."""
    import redis

    from .workers.logs import mask

    try:
        config, source = find_registry(args)
    except GatewayError as exc:
        print(f"poolgate {args.command}: {exc.message}", file=sys.stderr)
        return 2
    if args.command == "flower":
        return flower(config, args)
    handler = {"status": status, "kernels": kernels, "drain": drain}[args.command]
    try:
        data, text = handler(config, args)
    except GatewayError as exc:
        print(f"poolgate {args.command}: {exc.message}", file=sys.stderr)
        return 2
    except redis.RedisError as exc:
        print(f"poolgate {args.command}: cannot reach the registry at "
              f"{mask(config.registry_url)} (from {source}): {exc}", file=sys.stderr)
        return 3
    if not args.json and _empty(data):
        text += f"\n(registry: {mask(config.registry_url)}, from {source})"
    print(json.dumps(data, indent=2) if args.json else text)
    return 1 if isinstance(data, dict) and data.get("failed") else 0


def _empty(data: Any) -> bool:
    """No worker and no kernel in what was read: then the output names the registry, in case
    it is the wrong one (pure)."""
    if not isinstance(data, list):  # drain's answer
        return False
    if data and "worker_list" in data[0]:  # status: one entry per pool
        return all(not p["worker_list"] and not p["kernels"] for p in data)
    return not data  # kernels: one entry per kernel


# -- reading ----------------------------------------------------------------------------------


def _snapshot(config: Config) -> list[dict[str, Any]]:
    from .gateway.api.pools import snapshot
    from .workers.registry import Registry

    return snapshot(config, Registry(config.registry_url, config.registry_secret))


def table(rows: list[list[Any]], header: list[str]) -> str:
    """Rows as left-aligned columns under a header (pure)."""
    cells = [header] + [["" if c is None else str(c) for c in row] for row in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(header))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in cells)


def age(seconds: Any) -> str:
    from .gateway.dashboard import duration

    return duration(seconds)


def render_status(pools: list[dict[str, Any]]) -> str:
    """The text of ``poolgate status`` (pure)."""
    head = ["POOL", "LAUNCHER", "QUEUE", "WORKERS", "SLOTS", "USED", "FREE", "WAITING",
            "RUNNING", "FAILURES"]
    rows = [[p["name"], p["launcher"], p["queue"], p["workers"], p["slots"], p["used"], p["free"],
             p["waiting"], p["running"], p["failures_total"]] for p in pools]
    out = [table(rows, head), ""]
    wrows = [[w["name"], p["name"], f'{w["used"]}/{w["slots"]}', w["state"], w["kernels"]]
             for p in pools for w in p["worker_list"]]
    out.append(table(wrows, ["WORKER", "POOL", "SLOTS", "STATE", "KERNELS"]) if wrows
               else "No live workers.")
    waits = [f'  {p["name"]}: ' + ", ".join(f'#{w["position"]} {w["kernel_id"]}'
                                            for w in p["waiting_launches"])
             for p in pools if p["waiting_launches"]]
    if waits:
        out += ["", "Waiting launches:", *waits]
    live = sum(len(p["kernels"]) for p in pools)
    out += ["", f"{live} kernel{'' if live == 1 else 's'} ({sum(p['running'] for p in pools)} running, "
                f"{sum(p['waiting'] for p in pools)} waiting)"]
    return "\n".join(out)


def status(config: Config, args: argparse.Namespace) -> tuple[Any, str]:
    pools = _snapshot(config)
    return pools, render_status(pools)


def kernel_rows(pools: list[dict[str, Any]], pool: str | None = None) -> list[dict[str, Any]]:
    """Every live kernel with its pool, oldest first (pure)."""
    rows = [dict(k, pool=p["name"]) for p in pools for k in p["kernels"]
            if pool is None or p["name"] == pool]
    return sorted(rows, key=lambda k: k["created"])


def kernels(config: Config, args: argparse.Namespace) -> tuple[Any, str]:
    if args.pool and args.pool not in config.pools:
        raise UnknownPool(f"no pool named {args.pool!r}; pools: {', '.join(config.pools)}")
    rows = kernel_rows(_snapshot(config), args.pool)
    text = table([[k["id"], k["pool"], k["user"] or "anonymous", k["execution_state"]
                   if k["status"] == "RUNNING" else k["status"].lower(), age(k["age"]),
                   age(k["idle"]), k["connections"], k["worker"]] for k in rows],
                 ["KERNEL", "POOL", "USER", "STATE", "AGE", "IDLE", "CLIENTS", "WORKER"])
    return rows, text if rows else "No kernels."


# -- drain ------------------------------------------------------------------------------------


def drain_targets(workers: list[dict[str, Any]], pool: str, worker: str | None) -> list[str]:
    """The names of the live workers to drain (pure); raises BadRequest for an unknown one."""
    names = sorted(str(w.get("name")) for w in workers if pool in w.get("pools", ()))
    if worker is None:
        return names
    exact = [n for n in names if n == worker or n.split("@", 1)[0] == worker]
    if len(exact) != 1:
        raise BadRequest(f"no single live worker {worker!r} serves pool {pool!r}; its workers: "
                          f"{', '.join(names) or 'none'}")
    return exact


def drain(config: Config, args: argparse.Namespace) -> tuple[Any, str]:
    from .workers.celery_app import make_celery
    from .workers.registry import Registry

    if args.pool not in config.pools:
        raise UnknownPool(f"no pool named {args.pool!r}; pools: {', '.join(config.pools)}")
    registry = Registry(config.registry_url, config.registry_secret)
    targets = drain_targets(registry.workers(), args.pool, args.worker)
    if not targets:
        data = {"pool": args.pool, "workers": {}, "failed": True}
        return data, f"Pool {args.pool} has no live workers."
    replies = make_celery(config).control.broadcast(
        "poolgate_drain", arguments={"pool": args.pool, "resume": args.resume},
        destination=targets, reply=True, timeout=args.timeout)
    answers: dict[str, Any] = {}
    for reply in replies or []:
        answers.update(reply)
    verb = "resumed" if args.resume else "draining"
    lines, failed = [], False
    for name in targets:
        got = answers.get(name)
        if got is None:
            answers[name] = {"ok": False, "message": "no reply"}
            failed = True
            lines.append(f"{name}: no reply within {args.timeout:.0f}s")
        elif not got.get("ok"):
            failed = True
            lines.append(f"{name}: {got.get('message', got)}")
        else:
            lines.append(f"{name}: {verb} (pool {args.pool}; {got.get('kernels', 0)} kernels "
                         f"keep running)")
    return {"pool": args.pool, "resume": args.resume, "workers": answers, "failed": failed}, \
        "\n".join(lines)


# -- flower -----------------------------------------------------------------------------------


def read_only_flower() -> type:
    """Flower's app class, refusing every request that could change something (not GET)."""
    import tornado.web
    from flower.app import Flower

    class Refuse(tornado.web.RequestHandler):
        def check_xsrf_cookie(self) -> None:  # refused anyway: say why, not "xsrf missing"
            return None

        def prepare(self) -> None:
            self.set_status(403)
            self.finish({"reason": "forbidden", "message": "this Flower is read-only; start "
                         "it with 'poolgate flower --allow-control' to control workers"})

    class ReadOnlyFlower(Flower):  # type: ignore[misc]
        def find_handler(self, request: Any, **kwargs: Any) -> Any:
            if request.method not in ("GET", "HEAD", "OPTIONS"):
                return self.get_handler_delegate(request, Refuse)
            return super().find_handler(request, **kwargs)

    return ReadOnlyFlower


def flower(config: Config, args: argparse.Namespace) -> int:
    """Start Flower in this process on the configured broker; returns when it stops."""
    try:
        import flower.command
    except ImportError:
        print("poolgate flower needs Flower: pip install 'poolgate[flower]'", file=sys.stderr)
        return 2
    from .workers.celery_app import make_celery

    extra = [a for a in args.flower_args if a != "--"]
    if not args.allow_control:
        flower.command.Flower = read_only_flower()
        # Read-only, so its API may answer without a login (Flower 2 refuses it otherwise).
        os.environ.setdefault("FLOWER_UNAUTHENTICATED_API", "true")
    app = make_celery(config)
    print(f"poolgate flower on http://{args.address}:{args.port} "
          f"({'control allowed' if args.allow_control else 'read-only'})", flush=True)
    app.start(["flower", f"--address={args.address}", f"--port={args.port}", *extra])
    return 0
