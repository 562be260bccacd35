"""Each launcher key's options dataclass, imported from the pure module beside its launcher.

The rule of this module: loading queues.yaml (workers/config.py) checks a pool's ``options``
here, without importing the launcher itself, so a gateway process never imports docker,
kubernetes, paramiko, psutil or zmq. ``poolgate.workers.launchers.LAUNCHERS`` names the launcher classes;
each class's ``Options`` is the dataclass named here (tests/workers/launchers/test_registry.py).
"""
from __future__ import annotations

import difflib
import importlib
from collections.abc import Mapping
from typing import Any

from .errors import ConfigError
from .typed import build

OPTIONS: dict[str, str] = {
    "local": "poolgate.workers.launchers.local_builders:LocalOptions",
    "gpu": "poolgate.workers.launchers.gpu_builders:GPUOptions",
    "ssh": "poolgate.workers.launchers.ssh_builders:SSHOptions",
    "docker": "poolgate.workers.launchers.docker_builders:DockerOptions",
    "docker-swarm": "poolgate.workers.launchers.docker_builders:SwarmOptions",
    "yarn": "poolgate.workers.launchers.yarn_builders:YarnOptions",
    "kubernetes": "poolgate.workers.launchers.k8s_builders:KubernetesOptions",
}


def options_class(name: str) -> type[Any]:
    """The options dataclass of launcher ``name``; an unknown name is a ConfigError with a
    suggestion. A launcher named by import path (``module:Class``, see workers/launchers) is
    imported here: its options are its class's ``Options``."""
    if ":" in name:
        options = getattr(import_path(name), "Options", None)
        if not isinstance(options, type):
            raise ConfigError(f"launcher {name!r} has no Options dataclass")
        return options
    cls: type[Any] = from_table(OPTIONS, name)
    return cls


def from_table(table: Mapping[str, str], name: str) -> Any:
    """The object a launcher key names in ``table`` (``module:attr``), imported now; an unknown
    key is a ConfigError with a suggestion. Used for LAUNCHERS and OPTIONS alike."""
    try:
        target = table[name]
    except KeyError:
        close = difflib.get_close_matches(name, list(table), 1)
        hint = f"; did you mean {close[0]!r}?" if close else ""
        raise ConfigError(f"unknown launcher {name!r}{hint} (known: {', '.join(table)})") from None
    module, _, attr = target.partition(":")
    return getattr(importlib.import_module(module), attr)


def import_path(path: str) -> Any:
    """The object at ``module:attr`` (a launcher named by import path; only such a pool imports
    its launcher when the configuration loads); a ConfigError saying why where there is none."""
    module, _, attr = path.partition(":")
    try:
        return getattr(importlib.import_module(module), attr)
    except (ImportError, AttributeError) as exc:
        raise ConfigError(f"launcher {path!r} cannot be imported: {exc}") from None


def validate_options(name: str, options: Mapping[str, Any], path: str) -> Mapping[str, Any]:
    """Check a pool's ``options`` against its launcher's options dataclass."""
    try:
        cls = options_class(name)
    except ConfigError as exc:
        raise ConfigError(f"{path}.launcher: {exc}") from None
    build(cls, options, f"{path}.options")
    return dict(options)
