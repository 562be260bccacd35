"""The two launcher registries agree: loading queues.yaml checks a pool's options against the
same dataclass the launcher is later built with (workers/launcher_options.py)."""
from __future__ import annotations

import pytest

from poolgate.workers import launchers
from poolgate.workers.errors import ConfigError
from poolgate.workers.launcher_options import OPTIONS, options_class


def test_every_launcher_has_its_options_in_a_pure_module() -> None:
    assert set(OPTIONS) == set(launchers.LAUNCHERS)
    for name in launchers.LAUNCHERS:
        cls = options_class(name)
        assert launchers.resolve(name).Options is cls, name
        assert cls.__module__.endswith(("_builders",)), (name, cls.__module__)


def test_unknown_launcher_options_suggest() -> None:
    with pytest.raises(ConfigError, match="did you mean 'docker-swarm'"):
        options_class("docker-swam")
