"""The installed distribution: one top-level import package, poolgate, and it works from outside
the checkout (the repository's gateway/ and workers/ folders install as poolgate.gateway and
poolgate.workers)."""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("wheel")
    # a copy of the working tree without what builds leave behind: pip builds in place, and a
    # stale build/ (say, from before a package moved) would go into the wheel as it is
    src = tmp_path_factory.mktemp("src") / "poolgate"
    shutil.copytree(ROOT, src, ignore=shutil.ignore_patterns(
        ".git", "build", "*.egg-info", "__pycache__", ".mypy_cache", ".ruff_cache", "wheels",
        ".pytest_cache", ".venvs"))
    subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps",
                    "-w", str(out), str(src)], check=True, cwd=out, timeout=240)
    [whl] = out.glob("poolgate-*.whl")
    return whl


def test_one_top_level_import_package(wheel: Path) -> None:
    with zipfile.ZipFile(wheel) as z:
        names = z.namelist()
        [top_level] = [n for n in names if n.endswith(".dist-info/top_level.txt")]
        assert z.read(top_level).decode().split() == ["poolgate"]
    code = {n.split("/")[0] for n in names if ".dist-info/" not in n and ".data/" not in n}
    assert code == {"poolgate"}
    assert {"poolgate/gateway/app.py", "poolgate/workers/celery.py",
            "poolgate/workers/launchers/local.py", "poolgate/gateway/templates/pools.html",
            "poolgate/_data/queues.yaml"} <= set(names)


def test_installed_package_imports_outside_the_checkout(wheel: Path, tmp_path: Path) -> None:
    target = tmp_path / "site"
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--target",
                    str(target), str(wheel)], check=True, timeout=240)
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    probe = (
        "import importlib.util, poolgate, poolgate.gateway.app, poolgate.workers.celery\n"
        "print(poolgate.__file__); print(poolgate.gateway.app.__file__)\n"
        "print(poolgate.workers.celery.app.main)\n"
        "print([n for n in ('gateway', 'workers') if importlib.util.find_spec(n)])\n")
    # -I -S: no checkout on the path and no .pth files (an editable install's finders); the
    # dependencies come from site-packages, poolgate only from the wheel
    paths = [str(target), sysconfig.get_paths()["purelib"], sysconfig.get_paths()["platlib"]]
    out = subprocess.run([sys.executable, "-I", "-S", "-c", f"import sys; sys.path[:0] = {paths!r}\n"
                          + probe], env=env, cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    assert lines[0].startswith(str(target / "poolgate")) and lines[1].startswith(str(target / "poolgate"))
    assert lines[2] == "poolgate" and lines[3] == "[]"
