"""The targets a bench run can measure, by name."""

from __future__ import annotations

from bench.targets.base import RunContext, Target, TargetUnavailable
from bench.targets.floor import FloorTarget
from bench.targets.poolgate import (
                                    PoolgateBeforeTarget,
                                    PoolgateNoSubshellsTarget,
                                    PoolgateRedisTarget,
                                    PoolgateTarget,
                                    PoolgateWarmTarget,
)
from bench.targets.reference import EnterpriseGatewayTarget, KernelGatewayTarget
from bench.targets.ssh import PoolgateSSHTarget, PoolgateSSHWarmTarget

TARGETS: dict[str, type[Target]] = {
    "floor": FloorTarget,
    "poolgate": PoolgateTarget,
    "poolgate-before": PoolgateBeforeTarget,
    "poolgate-redis": PoolgateRedisTarget,
    "poolgate-warm": PoolgateWarmTarget,
    "poolgate-nosubshells": PoolgateNoSubshellsTarget,
    "poolgate-ssh": PoolgateSSHTarget,
    "poolgate-ssh-warm": PoolgateSSHWarmTarget,
    "eg": EnterpriseGatewayTarget,
    "kg": KernelGatewayTarget,
}

__all__ = ["TARGETS", "RunContext", "Target", "TargetUnavailable"]
