"""The poolgate command: serve (everything on one machine), gateway, worker, maintenance, and the
operator's status, kernels, drain and flower."""
from __future__ import annotations

import argparse
import dataclasses
import logging
import os
import re
import socket
import sys
from pathlib import Path
from typing import Any

from . import admin
from .gateway_options import check_port, gateway_overrides
from .workers.errors import BackendUnavailable, ConfigError, GatewayError


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", help="queues.yaml (default: ./queues.yaml, then the packaged one)")
    p.add_argument("--log-level", default=os.environ.get("POOLGATE_LOG_LEVEL", "info"),
                   help="debug, info, warning or error")
    p.add_argument("--log-format", choices=("text", "json"),
                   default=os.environ.get("POOLGATE_LOG_FORMAT", "text"),
                   help="text, or json: one object a line with kernel_id, pool and user")


def _gateway_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--ip", default="127.0.0.1", help="address to listen on (default 127.0.0.1)")
    p.add_argument("--port", type=int, default=8888, help="port to listen on (default 8888)")
    p.add_argument("--auth-token", default=os.environ.get("POOLGATE_AUTH_TOKEN"),
                   help="require 'Authorization: token T' (default $POOLGATE_AUTH_TOKEN, which "
                        "other local users cannot read in the process list)")
    p.add_argument("--base-url", default=None, help="prefix of every route, for reverse proxies")
    p.add_argument("--threads", type=int, default=None,
                   help="gateway threads: one per open WebSocket (default from queues.yaml)")
    p.add_argument("--certfile", default=None, help="TLS: serve https/wss with this certificate "
                                                    "chain (PEM)")
    p.add_argument("--keyfile", default=None, help="TLS: the certificate's private key (PEM)")
    p.add_argument("--client-ca", default=None,
                   help="TLS: require client certificates signed by this CA (PEM)")


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
    wk.add_argument("--name", default=None, help="worker name (default <pool>-<index>@<host>, plus "
                    "-<container id> in a container named after its host)")
    wk.add_argument("--index", type=int, default=1, help="the n in <pool>-<n>@<host>")
    wk.add_argument("--runtime-dir", default=None, help="folder for kernels' connection files")
    mt = sub.add_parser("maintenance", help="the maintenance worker with Celery beat: "
                                            "reconciles the registry every 15 s")
    _common(mt)
    mt.add_argument("--schedule", default=None, help="beat's schedule file")
    admin.add_parsers(sub, _common)  # status, kernels, drain, flower (poolgate/admin.py)
    return top


def setup_logging(level: str) -> None:
    from .workers import logs

    logs.setup(level, os.environ.get("POOLGATE_LOG_FORMAT", "text"))


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    if argv is None and args.command in ("gateway", "worker"):
        # a thread per WebSocket, per slot and per kernel: glibc's caches per thread held memory
        from .workers.threadcache import no_thread_caches

        no_thread_caches()  # executes this command again, once
    os.environ["POOLGATE_LOG_FORMAT"] = args.log_format  # also for the processes serve starts
    try:
        if args.command == "serve":
            from .serve import serve

            return serve(args)
        if args.command == "gateway":
            return gateway(args)
        if args.command in admin.COMMANDS:
            return admin.run(args)
        if args.command == "maintenance":
            return maintenance(args)
        return worker(args)
    except ConfigError as exc:
        print(f"poolgate: configuration error: {exc}", file=sys.stderr)
        return 2
    except GatewayError as exc:  # checked before announcing anything: one clear line
        print(f"poolgate {args.command}: {exc.message}", file=sys.stderr)
        return 1


def check_registry(url: str) -> None:
    """Refuse to start a gateway whose registry does not answer."""
    import redis

    from .workers.logs import mask
    from .workers.registry import Registry

    try:
        Registry(url).r.ping()
    except (redis.RedisError, OSError) as exc:
        raise BackendUnavailable(f"cannot reach the registry at {mask(url)}: {exc}; start Redis "
                                 f"or set POOLGATE_REGISTRY_URL") from None


def tls_options(gw: Any) -> dict[str, Any]:
    """gunicorn's TLS settings from ``gateway.certfile``/``keyfile``/``client_ca``; checked
    here, so a missing file is a configuration error and not a server that never starts."""
    import ssl

    for key in ("certfile", "keyfile", "client_ca"):
        value = getattr(gw, key)
        if value and not Path(value).is_file():
            raise ConfigError(f"gateway.{key} (--{key.replace('_', '-')}): {value} is not a file")
    if (gw.keyfile or gw.client_ca) and not gw.certfile:
        raise ConfigError("gateway.certfile (--certfile): TLS needs the gateway's certificate")
    if not gw.certfile:
        return {}
    out: dict[str, Any] = {"certfile": gw.certfile}
    if gw.keyfile:
        out["keyfile"] = gw.keyfile
    if gw.client_ca:
        out.update(ca_certs=gw.client_ca, cert_reqs=ssl.CERT_REQUIRED)
    return out


def gateway(args: argparse.Namespace) -> int:
    from .gateway.server import run
    from .workers.config import find_config, load_config

    setup_logging(args.log_level)
    config = load_config(args.config)  # fail here, with the message, not inside gunicorn
    overrides = gateway_overrides(args)
    tls = tls_options(dataclasses.replace(config.gateway, **overrides))
    check_port(args.ip, args.port)
    check_registry(config.registry_url)
    settings = {"CONFIG_PATH": str(find_config(args.config)), "GATEWAY_OVERRIDES": overrides}
    threads = args.threads or config.gateway.threads
    scheme = "https" if tls else "http"
    logging.getLogger("poolgate.gateway").info("poolgate gateway listening on %s://%s:%d",
                                               scheme, args.ip, args.port)
    run(settings, args.ip, args.port, threads, tls)
    return 0


def refuse_empty(pools: list[Any]) -> None:
    """A worker whose launcher can host no kernel here (a gpu worker with no GPUs) says why and
    does not start: it would take launches from the queue that it cannot serve."""
    from .workers import launchers
    from .workers.config import build

    for pool in pools:
        if launchers.default_slots(pool) == 0:
            cls = launchers.resolve(pool.launcher)
            why = cls.runs_here(build(cls.Options, dict(pool.options), f"pools.{pool.name}.options"))
            raise ConfigError(f"pool {pool.name!r}: {why or 'its launcher can host no kernel here'}"
                              f"; this worker would take launches it cannot serve, so it does not "
                              f"start")


# A container's /etc/hostname is a bind mount of a file in its engine's folder for it:
# docker's .../containers/<id>/hostname, podman's .../overlay-containers/<id>/userdata/hostname.
_CONTAINER_ID = re.compile(r"containers/([0-9a-f]{64})/(?:userdata/)?hostname /etc/hostname ")


def container_id(mountinfo: str = "/proc/self/mountinfo") -> str:
    """The id of the Docker or Podman container this process runs in; "" outside one."""
    try:
        text = Path(mountinfo).read_text()
    except OSError:
        return ""
    found = _CONTAINER_ID.search(text)
    return found.group(1) if found else ""


def default_worker_name(pools: list[str], index: int, hostname: str | None = None,
                        mountinfo: str = "/proc/self/mountinfo") -> str:
    """``<pools>-<index>@%h`` (Celery puts in the host name), and ``-<container id>`` after it
    in a container that is not named after its own id: with host networking every replica of a
    compose service has the host's name, and two workers of one name are one worker to Celery
    and /api/pools. The id, unlike a random part, stays the same when the container restarts,
    so the worker adopts its kernels again."""
    name = f"{'+'.join(pools)}-{index}@%h"
    cid = container_id(mountinfo)[:12]
    if cid and (hostname or socket.gethostname()) != cid:
        name += f"-{cid}"
    return name


def worker(args: argparse.Namespace) -> int:
    from .workers import launchers
    from .workers.celery_app import make_celery
    from .workers.config import load_config

    config = load_config(args.config)
    quiet_root()
    for name in args.pool:
        if name not in config.pools:
            raise ConfigError(f"--pool: no pool {name!r} in {config.source} "
                              f"(pools: {', '.join(config.pools)})")
    pools = [config.pools[n] for n in args.pool]
    refuse_empty(pools)
    slots = args.slots or launchers.default_slots(pools[0]) or pools[0].slots
    if slots < 1:
        raise ConfigError("--slots: expected an integer >= 1")
    name = args.name or default_worker_name(args.pool, args.index)
    runtime_dir = args.runtime_dir or str(Path(os.environ.get("POOLGATE_DATA_DIR") or
                                               Path.home() / ".local/share/poolgate") / "kernels")
    app = make_celery(config, slots=slots, runtime_dir=runtime_dir)
    from .workers.logs import for_worker

    for_worker(args.log_format, config.broker_url)  # JSON when asked, kernel fields, masking
    queues = ",".join(p.queue for p in pools)
    app.worker_main([*quiet(args), "worker", "-Q", queues, "-n", name, "-c", str(slots), "-P",
                     "threads", "-E", "--without-gossip", "--without-mingle", "-l",
                     args.log_level.upper()])
    return 0


def maintenance(args: argparse.Namespace) -> int:
    """One per cluster: a worker on the maintenance queue that also runs Celery beat."""
    from .workers.celery_app import MAINTENANCE_QUEUE, make_celery
    from .workers.config import load_config
    from .workers.logs import for_worker

    config = load_config(args.config)
    quiet_root()
    data = Path(os.environ.get("POOLGATE_DATA_DIR") or Path.home() / ".local/share/poolgate")
    data.mkdir(parents=True, exist_ok=True)
    app = make_celery(config, slots=1)
    for_worker(args.log_format, config.broker_url)
    # Celery logs every task it runs at INFO: three lines every 15 s for the reconciler
    logging.getLogger("celery.app.trace").setLevel(logging.WARNING)
    logging.getLogger("celery.worker.strategy").setLevel(logging.WARNING)
    app.worker_main([*quiet(args), "worker", "-Q", MAINTENANCE_QUEUE, "-n", "maintenance@%h",
                     "-c", "1", "-P", "threads", "-B", "-s",
                     args.schedule or str(data / "beat-schedule"), "--without-gossip",
                     "--without-mingle", "-l", args.log_level.upper()])
    return 0


def quiet_root() -> None:
    """Under ``poolgate serve``, which said once that it runs as root, each worker does not
    print Celery's warning about it again."""
    if os.environ.get("POOLGATE_ROOT_SAID"):
        import warnings

        from celery.exceptions import SecurityWarning

        warnings.filterwarnings("ignore", category=SecurityWarning)


def quiet(args: argparse.Namespace) -> list[str]:
    """Celery's banner is plain text on stdout: left out when log lines are JSON."""
    return ["--quiet"] if args.log_format == "json" else []
