"""Names in a kernel's namespace that create what they stand for on first use.

A kernel that offers an expensive object (a SparkSession, a Dask cluster on YARN) without
making every kernel start pay for it puts a :class:`Lazy` under each name; the first
attribute, repr or dir() of any of them calls ``create`` once, which returns the real objects
by name, and they replace the placeholders in the namespace. Standard library only.
"""
from __future__ import annotations

from collections.abc import Callable, MutableMapping
from typing import Any


class Lazy:
    """Stands for ``ns[name]`` until first used."""

    def __init__(self, name: str, create: Callable[[], dict[str, Any]],
                 ns: MutableMapping[str, Any]) -> None:
        self._name, self._create, self._ns = name, create, ns

    def _real(self) -> Any:
        if isinstance(self._ns.get(self._name), Lazy):
            self._ns.update(self._create())
        return self._ns[self._name]

    def __getattr__(self, attr: str) -> Any:
        if attr.startswith("_ipython_canary"):  # IPython's display probe: not a use
            raise AttributeError(attr)
        return getattr(self._real(), attr)

    def __repr__(self) -> str:
        return repr(self._real())

    def __dir__(self) -> list[str]:
        return dir(self._real())


def lazy_names(names: tuple[str, ...], create: Callable[[], dict[str, Any]],
               ns: MutableMapping[str, Any]) -> None:
    """Put a :class:`Lazy` under each of ``names`` in ``ns``, all made by one ``create``."""
    for name in names:
        ns[name] = Lazy(name, create, ns)
