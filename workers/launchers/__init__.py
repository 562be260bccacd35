"""The launcher registry: a launcher key names a class, imported only when used.

``"local"`` → ``poolgate.workers.launchers.local:LocalLauncher`` and so on. An unknown key is a
ConfigError with a suggestion; a missing backend library is an ImportError naming the extra.
A pool may also name a launcher class by import path, ``"package.module:Class"`` (the scale
bench's test launcher, bench/cheap/launcher.py, which the default config never names).
"""
from __future__ import annotations

from typing import TYPE_CHECKING

from ..errors import ConfigError
from ..launcher_options import from_table, import_path
from ..typed import build

if TYPE_CHECKING:
    from ..config import PoolConfig
    from .base import Launcher

LAUNCHERS: dict[str, str] = {
    "local": "poolgate.workers.launchers.local:LocalLauncher",
    "gpu": "poolgate.workers.launchers.gpu:GPULauncher",
    "ssh": "poolgate.workers.launchers.ssh:SSHLauncher",
    "docker": "poolgate.workers.launchers.docker_container:DockerLauncher",
    "docker-swarm": "poolgate.workers.launchers.docker_swarm:SwarmLauncher",
    "yarn": "poolgate.workers.launchers.yarn:YarnLauncher",
    "kubernetes": "poolgate.workers.launchers.kubernetes:KubernetesLauncher",
}


def resolve(name: str) -> type[Launcher]:
    """The launcher class for a key of ``LAUNCHERS`` or an import path ``module:Class``."""
    if ":" in name:
        return _by_path(name)
    cls: type[Launcher] = from_table(LAUNCHERS, name)
    return cls


def _by_path(path: str) -> type[Launcher]:
    """The Launcher subclass at ``module:Class``; a ConfigError saying why where there is none."""
    from .base import Launcher

    cls = import_path(path)
    if not (isinstance(cls, type) and issubclass(cls, Launcher)):
        raise ConfigError(f"launcher {path!r} is not a Launcher subclass")
    return cls


def default_slots(pool: PoolConfig) -> int | None:
    """What ``pool``'s launcher says a worker can host (Launcher.default_slots), or None."""
    cls = resolve(pool.launcher)
    return cls.default_slots(build(cls.Options, dict(pool.options), f"pools.{pool.name}.options"))


def create(pool: PoolConfig, runtime_dir: str) -> Launcher:
    """A launcher for ``pool``, its options built into the launcher's dataclass."""
    cls = resolve(pool.launcher)
    return cls(pool, build(cls.Options, dict(pool.options), f"pools.{pool.name}.options"),
               runtime_dir)
