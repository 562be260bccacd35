"""queues.yaml and kernelspecs, loaded once into frozen, validated objects.

Every message names the YAML path and the rule, e.g.
``pools.gpu.slots: expected an integer >= 1, got "one"``; an unknown key gets a suggestion.
Nothing here reads ``os.environ`` at import: :func:`load_config` takes the environment.
"""
from __future__ import annotations

import dataclasses
import difflib
import json
import os
import sys
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from .errors import ConfigError
from .launcher_options import validate_options
from .resources import check_config
from .typed import _coerce
from .typed import build as build  # launchers and tests build their options with it

#: Enterprise Gateway process proxies and the launcher type they stand for.
EG_PROCESS_PROXIES = {
    "enterprise_gateway.services.processproxies.processproxy.LocalProcessProxy": "local",
    "enterprise_gateway.services.processproxies.distributed.DistributedProcessProxy": "ssh",
    "enterprise_gateway.services.processproxies.yarn.YarnClusterProcessProxy": "yarn",
    "enterprise_gateway.services.processproxies.k8s.KubernetesProcessProxy": "kubernetes",
    "enterprise_gateway.services.processproxies.docker_swarm.DockerSwarmProcessProxy": "docker-swarm",
    "enterprise_gateway.services.processproxies.docker_swarm.DockerProcessProxy": "docker",
    "enterprise_gateway.services.processproxies.conductor.ConductorClusterProcessProxy":
        "conductor",
    "enterprise_gateway.services.processproxies.spark_operator.SparkOperatorProcessProxy":
        "spark-operator",
    "enterprise_gateway.services.processproxies.crd.CustomResourceProcessProxy": "crd",
}
#: gateway_provisioners' kernel provisioners (``metadata.kernel_provisioner.provisioner_name``).
PROVISIONERS = {
    "local-provisioner": "local",
    "distributed-provisioner": "ssh",
    "yarn-provisioner": "yarn",
    "kubernetes-provisioner": "kubernetes",
    "docker-swarm-provisioner": "docker-swarm",
    "docker-provisioner": "docker",
}
#: Where a spec asks for these, any pool will do: they only say "start it here".
RUNS_ANYWHERE = ("local",)
#: Launchers whose pools may keep warm kernels (workers/warm.py).
WARM_LAUNCHERS = ("local", "ssh", "docker", "docker-swarm", "kubernetes")


@dataclass(frozen=True)
class PoolConfig:
    """One resource pool: a queue, a launcher and its limits."""

    name: str
    launcher: str
    queue: str = ""
    slots: int = 4
    launch_timeout: float = 60.0
    max_launch_timeout: float = 600.0
    max_kernels: int = 0
    kernelspecs: tuple[str, ...] = ()
    allowed_users: tuple[str, ...] = ()
    denied_users: tuple[str, ...] = ()  # refused even when allowed_users would let them in
    max_restarts: int = 5
    heartbeat_ttl: float = 15.0
    max_kernels_per_user: int = 0      # live kernels of one KERNEL_USERNAME in this pool
    max_lifetime: float = 0.0          # seconds a kernel may live; 0: no limit
    cull_idle_timeout: float = 0.0     # Jupyter Server's knobs, per pool (0: no culling)
    cull_interval: float = 60.0
    cull_connected: bool = False
    cull_busy: bool = False
    replay_buffer: int = 2000          # iopub messages kept outside the gateways (0: off)
    replay_buffer_mb: float = 32.0     # ...and at most this many MB of them, per kernel
    warm: Mapping[str, int] = field(default_factory=dict)  # kernelspec -> ready kernels per worker
    wait_for_workers: bool = False     # queue launches while no worker serves the pool
    options: Mapping[str, Any] = field(default_factory=dict)


AUTH_KINDS = ("token", "header", "jupyterhub")


@dataclass(frozen=True)
class AuthConfig:
    """``gateway.auth``: who may call the gateway (gateway/auth.py reads it)."""

    kind: str = "token"                      # token | header | jupyterhub
    admin_users: tuple[str, ...] = ()        # see and drive every kernel, and /api/pools
    metrics_token: str = ""                  # also opens /metrics, /api/pools and /pools
    user_header: str = "X-Forwarded-User"    # header: the proxy's header naming the user
    trusted_proxies: tuple[str, ...] = ()    # header: addresses or networks of the proxy
    hub_api_url: str = ""                    # jupyterhub: e.g. http://hub:8081/hub/api
    hub_scopes: tuple[str, ...] = ()         # jupyterhub: scopes a token must carry
    cache_seconds: float = 30.0              # jupyterhub: how long the Hub's answer is kept

    def __post_init__(self) -> None:
        import ipaddress

        if self.kind not in AUTH_KINDS:
            close = difflib.get_close_matches(self.kind, AUTH_KINDS, 1)
            hint = f"; did you mean {close[0]!r}?" if close else ""
            raise ValueError(f"kind: expected one of {', '.join(AUTH_KINDS)}, got "
                             f"{self.kind!r}{hint}")
        if self.kind == "header" and not self.trusted_proxies:
            raise ValueError("trusted_proxies: the header authenticator needs the addresses of "
                             "the proxy that sets the header (anyone else could set it)")
        for net in self.trusted_proxies:
            try:
                ipaddress.ip_network(net, strict=False)
            except ValueError:
                raise ValueError(f"trusted_proxies: {net!r} is not an address or network") from None
        if self.kind == "jupyterhub" and not self.hub_api_url.startswith(("http://", "https://")):
            raise ValueError(f"hub_api_url: the jupyterhub authenticator needs the Hub API's "
                             f"URL (http(s)://hub:8081/hub/api), got {self.hub_api_url!r}")
        if self.cache_seconds < 0:
            raise ValueError(f"cache_seconds: expected a number >= 0, got {self.cache_seconds}")


@dataclass(frozen=True)
class GatewayConfig:
    """Settings of the HTTP front end."""

    base_url: str = "/"
    ws_ping_interval: float = 30.0
    auth_token: str = ""
    auth: AuthConfig = field(default_factory=AuthConfig)
    allow_origin: str = ""  # CORS and the WebSocket Origin check: "*", or origins, space-separated
    certfile: str = ""      # TLS: the gateway's certificate chain (PEM)
    keyfile: str = ""       # TLS: its private key
    client_ca: str = ""     # TLS: require client certificates signed by this CA
    control_timeout: float = 20.0
    threads: int = 1024
    session_buffer_seconds: float = 300.0
    ws_compression: bool = False  # accept permessage-deflate when a client offers it


@dataclass(frozen=True)
class KernelSpec:
    """An ordinary Jupyter kernelspec, plus the pool it routes to."""

    name: str
    resource_dir: str
    argv: tuple[str, ...]
    display_name: str
    language: str
    env: Mapping[str, str]
    metadata: Mapping[str, Any]
    interrupt_mode: str
    pool: str
    unserved: str = ""  # why no pool can start it (an EG process proxy with no pool); "" if one can

    def to_model(self) -> dict[str, Any]:
        """The spec as ``GET /api/kernelspecs`` shows it."""
        files = sorted(p.name for p in Path(self.resource_dir).iterdir() if p.name != "kernel.json")
        spec = {
            "argv": list(self.argv),
            "display_name": self.display_name,
            "language": self.language,
            "env": dict(self.env),
            "metadata": dict(self.metadata),
            "interrupt_mode": self.interrupt_mode,
        }
        resources = {f.rsplit(".", 1)[0]: f"/kernelspecs/{self.name}/{f}" for f in files}
        return {"name": self.name, "spec": spec, "resources": resources}

    @property
    def resources(self) -> dict[str, Any]:
        meta = self.metadata.get("poolgate") or {}
        return dict(meta.get("resources") or {}) if isinstance(meta, dict) else {}

    def users(self, which: str) -> tuple[str, ...]:
        """``metadata.poolgate.allowed_users`` or ``denied_users`` (checked at load)."""
        meta = self.metadata.get("poolgate") or {}
        return tuple(meta.get(which) or ()) if isinstance(meta, dict) else ()


@dataclass(frozen=True)
class Config:
    """Everything queues.yaml says, with the kernelspecs it routes."""

    broker_url: str
    registry_url: str
    pools: Mapping[str, PoolConfig]
    kernelspecs: Mapping[str, KernelSpec]
    default_pool: str
    default_kernelspec: str
    env_allowlist: tuple[str, ...]
    gateway: GatewayConfig
    registry_secret: tuple[str, ...] = ()  # the first encrypts, all decrypt (workers/keyring.py)
    source: str = ""
    max_kernels: int = 0               # live kernels at most, all pools together
    max_kernels_per_user: int = 0      # live kernels of one KERNEL_USERNAME, all pools
    reconcile_interval: float = 15.0   # seconds between the maintenance worker's reconcile passes

    def pool_of(self, spec_name: str) -> PoolConfig:
        return self.pools[self.kernelspecs[spec_name].pool]


def _positive(value: float, path: str, minimum: float = 0, strict: bool = True) -> None:
    if value < minimum or (strict and value == minimum):
        rule = f"> {minimum}" if strict else f">= {minimum}"
        raise ConfigError(f"{path}: expected a number {rule}, got {value}")


# -- kernelspecs ----------------------------------------------------------------------------


def _route(name: str, raw: dict[str, Any], pools: Mapping[str, PoolConfig],
           proxy_map: Mapping[str, str], default_pool: str) -> tuple[str, str]:
    """Pick a spec's pool: metadata.poolgate.pool, else its EG process proxy (or kernel
    provisioner), else the default. Returns (pool, why it cannot run): a spec whose process
    proxy no pool serves is routed nowhere, so a launch is refused rather than run elsewhere."""
    meta = raw.get("metadata") or {}
    meta = meta if isinstance(meta, dict) else {}
    pg = meta.get("poolgate") or {}
    if isinstance(pg, dict) and pg.get("pool"):
        pool = str(pg["pool"])
        if pool not in pools:
            close = difflib.get_close_matches(pool, list(pools), 1)
            hint = f"; did you mean {close[0]!r}?" if close else ""
            raise ConfigError(f"kernelspecs.{name}.metadata.poolgate.pool: no pool {pool!r}{hint}")
        return pool, ""
    proxy = meta.get("process_proxy") or {}
    proxy = str(proxy.get("class_name") or "") if isinstance(proxy, dict) else ""
    prov = meta.get("kernel_provisioner") or {}
    prov = str(prov.get("provisioner_name") or "") if isinstance(prov, dict) else ""
    asked, target = "", ""
    if proxy:
        asked, target = f"process proxy {proxy}", proxy_map.get(proxy) or \
            EG_PROCESS_PROXIES.get(proxy, "")
    elif prov:
        asked, target = f"kernel provisioner {prov}", proxy_map.get(prov) or \
            PROVISIONERS.get(prov, "")
    if not asked:
        return default_pool, ""
    if target in pools:
        return target, ""
    for candidate in pools.values():  # a launcher type maps to the first pool using it
        if candidate.launcher == target:
            return candidate.name, ""
    if target in RUNS_ANYWHERE:
        return default_pool, ""
    kind = f"a pool with launcher {target!r}" if target else "a pool for it"
    return default_pool, (
        f"kernelspec {name!r} asks for {asked}, and no pool of this gateway serves it: add "
        f"{kind} to queues.yaml, or map the class to a pool in process_proxy_map")


def load_kernelspecs(dirs: list[Path], pools: Mapping[str, PoolConfig],
                     proxy_map: Mapping[str, str], default_pool: str) -> dict[str, KernelSpec]:
    """Read every ``<dir>/<name>/kernel.json``; a later directory wins over an earlier one."""
    specs: dict[str, KernelSpec] = {}
    for base in dirs:
        if not base.is_dir():
            raise ConfigError(f"kernelspec_dirs: {base} is not a directory")
        for sub in sorted(base.iterdir()):
            path = sub / "kernel.json"
            if not path.is_file():
                continue
            try:
                raw = json.loads(path.read_text())
            except ValueError as exc:
                raise ConfigError(f"{path}: not valid JSON ({exc})") from exc
            _check_users(raw, f"{path}: metadata.poolgate")
            argv = raw.get("argv")
            if not isinstance(argv, list) or not argv or not all(isinstance(a, str) for a in argv):
                raise ConfigError(f"{path}: 'argv' must be a non-empty list of strings")
            pool, unserved = _route(sub.name, raw, pools, proxy_map, default_pool)
            specs[sub.name] = KernelSpec(
                name=sub.name,
                resource_dir=str(sub),
                argv=tuple(argv),
                display_name=str(raw.get("display_name", sub.name)),
                language=str(raw.get("language", "")),
                env={str(k): str(v) for k, v in (raw.get("env") or {}).items()},
                metadata=dict(raw.get("metadata") or {}),
                interrupt_mode=str(raw.get("interrupt_mode", "signal")),
                pool=pool,
                unserved=unserved,
            )
    return specs


def _check_users(raw: dict[str, Any], where: str) -> None:
    meta = raw.get("metadata") or {}
    pg = meta.get("poolgate") if isinstance(meta, dict) else None
    for key in ("allowed_users", "denied_users"):
        value = pg.get(key) if isinstance(pg, dict) else None
        if value is not None and not (isinstance(value, list)
                                      and all(isinstance(v, str) for v in value)):
            raise ConfigError(f"{where}.{key}: expected a list of user names, got "
                              f"{json.dumps(value)}")


# -- queues.yaml ----------------------------------------------------------------------------


def packaged_data() -> Path:
    """Where the default queues.yaml and kernelspecs/ live (installed, or this checkout)."""
    import poolgate

    installed = Path(poolgate.__file__).parent / "_data"
    return installed if (installed / "queues.yaml").is_file() else Path(__file__).parent.parent


def find_config(explicit: str | None = None) -> Path:
    """``--config``, else ``./queues.yaml``, else the packaged default."""
    if explicit:
        path = Path(explicit)
        if not path.is_file():
            raise ConfigError(f"--config: {path} does not exist")
        return path
    local = Path.cwd() / "queues.yaml"
    return local if local.is_file() else packaged_data() / "queues.yaml"


_TOP_KEYS = {
    "broker_url", "registry_url", "default_pool", "default_kernelspec", "kernelspec_dirs",
    "env_allowlist", "process_proxy_map", "registry_secret", "gateway", "pools",
    "max_kernels", "max_kernels_per_user", "reconcile_interval",
}


def load_config(path: str | Path | None = None, environ: Mapping[str, str] | None = None,
                overrides: Mapping[str, Any] | None = None) -> Config:
    """Load and validate queues.yaml; ``environ`` supplies POOLGATE_* overrides."""
    env = dict(os.environ if environ is None else environ)
    cfg_path = find_config(str(path) if path else None)
    try:
        raw = yaml.safe_load(cfg_path.read_text()) or {}
    except yaml.YAMLError as exc:
        raise ConfigError(f"{cfg_path}: not valid YAML ({exc})") from exc
    if not isinstance(raw, dict):
        raise ConfigError(f"{cfg_path}: expected a mapping at the top level")
    raw.update(overrides or {})
    for key in raw:
        if key not in _TOP_KEYS:
            close = difflib.get_close_matches(str(key), sorted(_TOP_KEYS), 1)
            hint = f"; did you mean {close[0]!r}?" if close else ""
            raise ConfigError(f"{key}: unknown key{hint} (in {cfg_path})")

    pools_raw = raw.get("pools") or {}
    if not isinstance(pools_raw, dict) or not pools_raw:
        raise ConfigError(f"pools: expected at least one pool (in {cfg_path})")
    pools: dict[str, PoolConfig] = {}
    queues: dict[str, str] = {}
    for name, body in pools_raw.items():
        where = f"pools.{name}"
        pool = build(PoolConfig, body, where, name=str(name))
        if not pool.queue:
            pool = dataclasses.replace(pool, queue=str(name))
        _positive(pool.slots, f"{where}.slots", 1, strict=False)
        _positive(pool.launch_timeout, f"{where}.launch_timeout")
        _positive(pool.heartbeat_ttl, f"{where}.heartbeat_ttl")
        _positive(pool.replay_buffer, f"{where}.replay_buffer", 0, strict=False)
        _positive(pool.replay_buffer_mb, f"{where}.replay_buffer_mb", 0, strict=False)
        if pool.max_launch_timeout < pool.launch_timeout:
            raise ConfigError(f"{where}.max_launch_timeout: must be >= launch_timeout "
                              f"({pool.launch_timeout}), got {pool.max_launch_timeout}")
        if pool.queue in queues:
            raise ConfigError(f"{where}.queue: {pool.queue!r} is already the queue of pool "
                              f"{queues[pool.queue]!r}; every pool needs its own queue")
        queues[pool.queue] = pool.name
        opts = validate_options(pool.launcher, pool.options, f"{where}")
        pools[pool.name] = dataclasses.replace(pool, options=opts)

    default_pool = str(raw.get("default_pool") or next(iter(pools)))
    if default_pool not in pools:
        raise ConfigError(f"default_pool: no pool {default_pool!r} (pools: {', '.join(pools)})")
    proxy_map = raw.get("process_proxy_map") or {}
    if not isinstance(proxy_map, dict):
        raise ConfigError("process_proxy_map: expected a mapping of class name to pool")

    dirs = [packaged_data() / "kernelspecs"]
    for d in _coerce(raw.get("kernelspec_dirs") or [], tuple[str, ...], "kernelspec_dirs"):
        p = Path(d).expanduser()
        dirs.append(p if p.is_absolute() else cfg_path.parent / p)
    specs = load_kernelspecs(dirs, pools, proxy_map, default_pool)
    default_spec = str(raw.get("default_kernelspec") or "python3")
    if default_spec not in specs:
        raise ConfigError(f"default_kernelspec: no kernelspec {default_spec!r} "
                          f"(found: {', '.join(sorted(specs)) or 'none'})")
    if specs[default_spec].unserved:
        raise ConfigError(f"default_kernelspec: {specs[default_spec].unserved}")
    for pool in pools.values():
        for spec in pool.kernelspecs:
            if spec not in specs:
                raise ConfigError(f"pools.{pool.name}.kernelspecs: no kernelspec {spec!r}")
    for pool in pools.values():
        for spec, count in pool.warm.items():
            where = f"pools.{pool.name}.warm.{spec}"
            if spec not in specs or specs[spec].pool != pool.name or specs[spec].unserved:
                raise ConfigError(f"{where}: no kernelspec {spec!r} routed to this pool")
            if not isinstance(count, int) or isinstance(count, bool) or count < 0:
                raise ConfigError(f"{where}: expected an integer >= 0, got {count!r}")
            if pool.launcher not in WARM_LAUNCHERS:
                raise ConfigError(f"{where}: warm kernels need launcher "
                                  f"{' or '.join(map(repr, WARM_LAUNCHERS))}, not "
                                  f"{pool.launcher!r} (resources such as GPUs are given at "
                                  f"process start)")
            if pool.options.get("per_user_namespace"):
                raise ConfigError(f"{where}: warm kernels run in the pool's namespace, and this "
                                  f"pool's kernels in their user's (per_user_namespace)")
    check_config(pools, specs)  # per-kernel limits parse; each spec's own request is within them

    default_url = "redis://127.0.0.1:6379/0"
    broker = env.get("POOLGATE_BROKER_URL") or str(raw.get("broker_url") or default_url)
    registry = env.get("POOLGATE_REGISTRY_URL") or str(raw.get("registry_url") or "")
    if not registry:
        registry = broker if broker.startswith(("redis", "unix")) else default_url
    if not registry.startswith(("redis://", "rediss://", "redis+socket://", "unix://")):
        raise ConfigError(f"registry_url: expected a redis:// URL, got {registry!r}")
    gateway = build(GatewayConfig, raw.get("gateway"), "gateway")
    _positive(gateway.control_timeout, "gateway.control_timeout")
    return Config(
        broker_url=broker,
        registry_url=registry,
        pools=pools,
        kernelspecs=specs,
        default_pool=default_pool,
        default_kernelspec=default_spec,
        env_allowlist=_coerce(raw.get("env_allowlist") or [], tuple[str, ...], "env_allowlist"),
        gateway=gateway,
        registry_secret=_secrets(env.get("POOLGATE_REGISTRY_SECRET") or raw.get("registry_secret")),
        source=str(cfg_path),
        max_kernels=_limit(raw.get("max_kernels"), "max_kernels"),
        max_kernels_per_user=_limit(raw.get("max_kernels_per_user"), "max_kernels_per_user"),
        reconcile_interval=_interval(raw.get("reconcile_interval", Config.reconcile_interval)),
    )


def _secrets(value: Any) -> tuple[str, ...]:
    """``registry_secret``: one string or a list of them (newest first)."""
    from . import keyring

    if isinstance(value, (list, tuple)) and not all(isinstance(v, str) for v in value) or \
            not isinstance(value, (list, tuple, str, type(None))):
        raise ConfigError("registry_secret: expected a string or a list of strings (the first "
                          "encrypts, all decrypt)")
    return keyring.parse(value)


def _interval(value: Any) -> float:
    """``reconcile_interval``: seconds, > 0."""
    seconds = float(_coerce(value, float, "reconcile_interval"))
    _positive(seconds, "reconcile_interval")
    return seconds


def _limit(value: Any, path: str) -> int:
    value = _coerce(value if value is not None else 0, int, path)
    if value < 0:
        raise ConfigError(f"{path}: expected an integer >= 0 (0: no limit), got {value}")
    return int(value)


def python_argv(argv: tuple[str, ...]) -> list[str]:
    """A kernelspec's argv with a bare ``python`` replaced by this interpreter, as jupyter_client does."""
    names = {"python", f"python{sys.version_info[0]}", "python%i.%i" % sys.version_info[:2]}
    return [sys.executable, *argv[1:]] if argv and argv[0] in names else list(argv)
