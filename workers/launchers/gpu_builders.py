"""Pure parts of the ``gpu`` launcher: its options, how many kernels a GPU and a worker take,
and the variables that show a kernel its GPUs.

Loading queues.yaml checks a gpu pool's options here (workers/launcher_options.py) without
importing the launcher.
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from ..errors import LaunchRejected
from ..gpus import GPU, MODES
from ..resources import parse_gpus
from .local_builders import LocalOptions


@dataclass(frozen=True)
class GPUOptions(LocalOptions):
    """Options of a ``launcher: gpu`` pool (and those of ``local``)."""

    discover: str = "auto"            # auto | nvidia-smi | env | list (see workers/gpus.py)
    gpus: tuple[str, ...] = ()        # the GPUs to hand out: indices, UUIDs or MIG ids
    share: bool = False               # may kernels share a GPU?
    kernels_per_gpu: int = 2          # with share: true, how many kernels one GPU takes
    gpus_per_kernel: int = 1          # what a kernel gets when neither spec nor KERNEL_GPUS says
    max_gpus_per_kernel: int = 1      # the most a kernel may ask for

    def __post_init__(self) -> None:
        """Cross-field rules; config.build turns a ValueError into the option's full path."""
        if self.discover not in MODES:
            raise ValueError(f"discover: expected one of {', '.join(MODES)}, got {self.discover!r}")
        if self.discover == "list" and not self.gpus:
            raise ValueError("gpus: 'discover: list' needs the list of GPUs, e.g. gpus: ['0', '1']")
        if self.kernels_per_gpu < 1:
            raise ValueError(f"kernels_per_gpu: expected an integer >= 1, "
                             f"got {self.kernels_per_gpu}")
        if self.max_gpus_per_kernel < 1:
            raise ValueError(f"max_gpus_per_kernel: expected an integer >= 1, "
                             f"got {self.max_gpus_per_kernel}")
        if not 0 <= self.gpus_per_kernel <= self.max_gpus_per_kernel:
            raise ValueError(f"gpus_per_kernel: expected 0 to max_gpus_per_kernel "
                             f"({self.max_gpus_per_kernel}), got {self.gpus_per_kernel}")


def per_gpu(options: GPUOptions) -> int:
    """How many kernels may hold one GPU at once."""
    return options.kernels_per_gpu if options.share else 1


def slots_for(gpus: int, per: int, max_per_kernel: int) -> int:
    """Kernels a worker can host so that any mix of requests fits: 0 if the largest cannot."""
    return 0 if max_per_kernel > gpus else gpus * per // max_per_kernel


def build_gpu_env(gpus: Sequence[GPU], source: str) -> dict[str, str]:
    """The variables that show a kernel its GPUs, and only those."""
    ids = ",".join(g.id for g in gpus)
    env = {"CUDA_VISIBLE_DEVICES": ids, "NVIDIA_VISIBLE_DEVICES": ids or "void"}
    if source == "nvidia-smi":  # nvidia-smi's indices are in PCI order; CUDA's default is not
        env["CUDA_DEVICE_ORDER"] = "PCI_BUS_ID"
    return env


def wanted_gpus(resources: dict[str, object], options: GPUOptions) -> int:
    """The GPUs a launch asks for (admitted by the gateway; checked again here)."""
    raw = resources.get("gpus")
    count = options.gpus_per_kernel if raw in (None, "") else parse_gpus(raw, "gpus")
    if count > options.max_gpus_per_kernel:
        raise LaunchRejected(f"the kernel asks for {count} GPUs; the pool allows "
                             f"{options.max_gpus_per_kernel} (max_gpus_per_kernel)")
    return count
