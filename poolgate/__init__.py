"""poolgate: a Jupyter kernel gateway whose kernels are long-running Celery tasks.

Installed, its parts are subpackages: ``poolgate.gateway`` (the Flask front end) and
``poolgate.workers`` (the Celery side). The repository keeps them at its top level as
``gateway/`` and ``workers/`` (setup.cfg maps them with ``package_dir``). When poolgate runs
from a source checkout (an editable install, or ``PYTHONPATH`` set to the checkout), a small
finder maps exactly those two names to the checkout's folders; nothing else is added.
"""
import importlib.abc as _abc
import importlib.util as _util
import os as _os
import sys as _sys

__version__ = "0.1.0"

_HERE = _os.path.dirname(_os.path.abspath(__file__))
_ROOT = _os.path.dirname(_HERE)
_PARTS = ("gateway", "workers")


class _CheckoutLayout(_abc.MetaPathFinder):
    """Finds poolgate.gateway and poolgate.workers in the checkout's gateway/ and workers/."""

    def find_spec(self, name, path=None, target=None):  # type: ignore[no-untyped-def]
        top, _, part = name.partition(".")
        if top != __name__ or part not in _PARTS:
            return None
        folder = _os.path.join(_ROOT, part)
        return _util.spec_from_file_location(name, _os.path.join(folder, "__init__.py"),
                                             submodule_search_locations=[folder])


if not _os.path.isdir(_os.path.join(_HERE, "gateway")) and all(
        _os.path.isfile(_os.path.join(_ROOT, p, "__init__.py")) for p in _PARTS):
    _sys.meta_path.insert(0, _CheckoutLayout())  # before an editable install of another checkout
