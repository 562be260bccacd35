"""Build hook: ship the top-level queues.yaml and kernelspecs/ inside the poolgate package.

The repository keeps them at the top level, where operators look for them; an installed
`poolgate` finds them in `poolgate/_data/` (see poolgate/paths.py).
"""
import shutil
from pathlib import Path

from setuptools import find_packages, setup
from setuptools.command.build_py import build_py


class BuildWithDefaults(build_py):
    def run(self) -> None:
        super().run()
        here = Path(__file__).parent
        target = Path(self.build_lib) / "poolgate" / "_data"
        if target.exists():
            shutil.rmtree(target)
        target.mkdir(parents=True)
        shutil.copy2(here / "queues.yaml", target / "queues.yaml")
        shutil.copytree(here / "kernelspecs", target / "kernelspecs")


def packages() -> list[str]:
    """poolgate, and the repository's gateway/ and workers/ trees under it (setup.cfg's package_dir)."""
    found = ["poolgate"]
    for top in ("gateway", "workers"):
        found += [f"poolgate.{top}"] + [f"poolgate.{top}.{p}" for p in find_packages(top)]
    return found


setup(packages=packages(), cmdclass={"build_py": BuildWithDefaults})
