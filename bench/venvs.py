"""Private virtual environments for the reference gateways, made on first use.

Rule: each venv lives in bench/.venvs/<name> and is (re)built whenever its requirement list
below changes; a marker file records the list it was built from.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

from bench.progress import say

# Enterprise Gateway 3.x pins jupyter_client<7, jupyter_server<2 and pyzmq<25 itself. Name
# the major version: asking pip for extra pins (say ipykernel<7) made it backtrack to EG 2.5.
# No ipykernel here: every target runs the kernel from the bench's own environment, through
# the kernelspec that the bench writes and puts on JUPYTER_PATH.
REQUIREMENTS: dict[str, list[str]] = {
    "eg": ["jupyter-enterprise-gateway>=3.3,<4"],
    "kg": ["jupyter-kernel-gateway>=3.0.1,<4"],
}

VENV_ROOT = Path(__file__).resolve().parent / ".venvs"
MARKER = ".bench-requirements"


def venv_bin(name: str, root: Path = VENV_ROOT) -> Path:
    return root / name / "bin"


def ensure_venv(name: str, root: Path = VENV_ROOT) -> Path:
    """Return the bin/ folder of venv `name`, creating or rebuilding it as needed."""
    wanted = "\n".join(REQUIREMENTS[name]) + "\n"
    path = root / name
    marker = path / MARKER
    if marker.exists() and marker.read_text() == wanted:
        return path / "bin"
    say(f"creating venv {path} ({', '.join(REQUIREMENTS[name])}) ...")
    if path.exists():
        shutil.rmtree(path)
    subprocess.run([sys.executable, "-m", "venv", str(path)], check=True)
    pip = [str(path / "bin" / "python"), "-m", "pip", "install", "--quiet",
           "--disable-pip-version-check"]
    subprocess.run([*pip, "--upgrade", "pip"], check=True)
    result = subprocess.run([*pip, *REQUIREMENTS[name]], capture_output=True, text=True)
    if result.returncode != 0:
        raise RuntimeError(f"pip install into {path} failed:\n{result.stderr[-2000:]}")
    marker.write_text(wanted)
    return path / "bin"
