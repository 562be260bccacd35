"""Pure parts of the ``local`` launcher: its options and the connection file it writes.

Loading queues.yaml checks a local pool's options here (workers/launcher_options.py) without
importing the launcher, which needs psutil and zmq; ssh builds its kernels' connection files
with the same function.
"""
from __future__ import annotations

from dataclasses import dataclass

from ..errors import ConfigError

CHANNELS = ("shell", "iopub", "stdin", "control", "hb")


@dataclass(frozen=True)
class LocalOptions:
    """Options of a ``launcher: local`` pool."""

    ip: str = "127.0.0.1"          # where kernels listen; the address gateways reach them at
    port_range: str = ""           # "9000-9999": kernel ports come from this range
    transport: str = "tcp"
    max_cpus_per_kernel: float = 0.0   # most cpus a kernel may ask (KERNEL_CPUS); 0: no limit
    max_memory_per_kernel: str = ""    # most memory a kernel may ask, e.g. "8Gi"; "": no limit
    fork_kernels: bool = True      # ipykernel kernels forked from a process that imported it
    lean_execute: bool = True      # forked kernels skip ipykernel's empty waits after an execute
    #                                and forward the shell channel in C until a subshell is asked
    subshells: bool = True         # false: forked kernels run without ipykernel's shell-channel
    #                                thread, so without kernel subshells, one hand-off fewer each way


def parse_port_range(text: str) -> tuple[int, int] | None:
    """``"9000-9999"`` → (9000, 9999); ``""`` → None (any free port)."""
    if not text:
        return None
    try:
        lo, hi = (int(p) for p in text.split("-", 1))
    except ValueError:
        raise ConfigError(f"port_range: expected 'LOW-HIGH', got {text!r}") from None
    if not 1024 <= lo < hi <= 65535 or hi - lo < 5:
        raise ConfigError(f"port_range: expected 1024 <= LOW < HIGH <= 65535 with at least "
                          f"5 ports, got {text!r}")
    return lo, hi


def build_connection(ip: str, key: str, ports: list[int] | None, transport: str) -> dict[str, object]:
    """The connection file a local kernel starts from (ports 0: the kernel picks and writes them)."""
    ports = ports or [0] * 5
    data: dict[str, object] = {f"{c}_port": p for c, p in zip(CHANNELS, ports)}
    data.update(ip=ip, key=key, transport=transport, signature_scheme="hmac-sha256")
    return data
