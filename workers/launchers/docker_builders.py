"""docker and docker-swarm launchers, pure half: options, names, and the engine specs.

Nothing here talks to an engine. :func:`build_container_spec` returns the keyword arguments of
docker-py's ``containers.create`` and :func:`build_service_spec` those of ``services.create``
(``resources``, ``restart_policy`` and ``endpoint_spec`` as plain dicts of the matching
``docker.types`` constructors), so tests compare them with literal dicts.

Every kernel runs ``python3 -m poolgate.kernel_launcher … -- <kernelspec argv>`` in its image;
the launcher reports where the kernel listens through workers/launchers/reply.py.
"""
from __future__ import annotations

import hashlib
import re
import shlex
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from ..errors import LaunchRejected
from ..protocol import LaunchRequest
from ..resources import parse_memory

LABEL = "poolgate"                  # every label poolgate sets starts with "poolgate."
KERNEL_LABEL = "poolgate.kernel_id"
ENDPOINT_MODES = ("dnsrr", "vip")
BARE_PYTHON = re.compile(r"^python(\d+(\.\d+)?)?$")
UID = re.compile(r"^\d{1,10}$")
MOUNT = re.compile(r"^[^:]+:/[^:]*(:(ro|rw))?$")


def check_reporting(opts: Any, also_positive: tuple[str, ...] = ()) -> None:
    """The options every launcher whose kernel reports back through the kernel launcher shares
    (docker, docker-swarm, yarn, kubernetes): the reply port, the launcher command, timings."""
    if not 0 <= opts.response_port <= 65535:
        raise ValueError(f"response_port: expected 0..65535, got {opts.response_port}")
    if not shlex.split(opts.kernel_launcher):
        raise ValueError("kernel_launcher: expected a command")
    for name in ("poll_interval", "api_timeout", "stop_grace", *also_positive):
        if getattr(opts, name) <= 0:
            raise ValueError(f"{name}: expected a number > 0, got {getattr(opts, name)}")


@dataclass(frozen=True)
class DockerOptions:
    """Options of a ``launcher: docker`` pool (one engine, a container per kernel)."""

    image: str = ""                   # default image; kernelspec resources.image wins
    allow_kernel_image: bool = False  # KERNEL_IMAGE may pick the image...
    allowed_images: tuple[str, ...] = ()  # ...among these only
    network: str = "bridge"           # a docker network the worker reaches, or "host"
    response_address: str = ""        # where kernel launchers reach this worker ("": auto)
    response_port: int = 0            # the worker's reply listener (0: any free port)
    response_bind: str = "0.0.0.0"
    mounts: tuple[str, ...] = ()      # "source:/target[:ro]"
    env: Mapping[str, str] = field(default_factory=dict)   # for every kernel
    labels: Mapping[str, str] = field(default_factory=dict)
    user: str = ""                    # container user ("": the image's)
    allow_kernel_uid: bool = False    # KERNEL_UID / KERNEL_GID pick the container user
    allow_root: bool = False          # ...and may pick uid or gid 0
    cpus: float = 0.0                 # per kernel unless KERNEL_CPUS asks (0: no limit)
    memory: str = ""                  # per kernel unless KERNEL_MEMORY asks ("": no limit)
    max_cpus_per_kernel: float = 0.0
    max_memory_per_kernel: str = ""
    python: str = "python3"           # replaces a bare "python" in the kernelspec's argv
    kernel_launcher: str = "python3 -m poolgate.kernel_launcher"
    docker_url: str = ""              # "": DOCKER_HOST or the local socket
    poll_interval: float = 2.0        # seconds between engine polls of a running kernel
    api_timeout: float = 30.0
    stop_grace: float = 2.0           # seconds a stopped kernel gets before SIGKILL

    def __post_init__(self) -> None:
        if self.allowed_images and not self.allow_kernel_image:
            raise ValueError("allowed_images: set allow_kernel_image: true too, or drop it")
        if self.allow_kernel_image and not self.allowed_images:
            raise ValueError("allowed_images: required with allow_kernel_image (the images "
                             "KERNEL_IMAGE may name)")
        for m in self.mounts:
            if not MOUNT.match(m):
                raise ValueError(f"mounts: expected 'source:/target[:ro|rw]', got {m!r}")
        if self.user and not re.match(r"^[\w.-]+(:[\w.-]+)?$", self.user):
            raise ValueError(f"user: expected 'uid[:gid]' or a user name, got {self.user!r}")
        check_reporting(self)
        if self.cpus < 0:
            raise ValueError(f"cpus: expected a number >= 0, got {self.cpus}")


@dataclass(frozen=True)
class SwarmOptions(DockerOptions):
    """Options of a ``launcher: docker-swarm`` pool (a Swarm service per kernel)."""

    network: str = "host"             # "host", or an overlay network the worker is on
    endpoint_mode: str = "dnsrr"      # no IPVS needed; kernels are reached by their own IP
    constraints: tuple[str, ...] = ()  # placement constraints, e.g. "node.labels.kernels==yes"
    reserve: bool = True              # reserve the cpus/memory a kernel asks (scheduling)

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.endpoint_mode not in ENDPOINT_MODES:
            raise ValueError(f"endpoint_mode: expected one of {', '.join(ENDPOINT_MODES)}, "
                             f"got {self.endpoint_mode!r}")


def resource_name(kernel_id: str, prefix: str = "poolgate-") -> str:
    """The container or service name of a kernel.

    Rules: lower-case letters, digits and '-' (what both container and service names accept),
    at most 63 characters; anything else becomes '-', and a name that had to change gets 8 hex
    digits of the id's hash, so two ids never share a name. A UUID passes unchanged.
    """
    slug = re.sub(r"[^a-z0-9-]", "-", kernel_id.lower()).strip("-")
    name = prefix + slug
    if slug != kernel_id or len(name) > 63:
        digest = hashlib.sha256(kernel_id.encode()).hexdigest()[:8]
        name = f"{name[:54].rstrip('-')}-{digest}"
    return name


def build_labels(req: LaunchRequest, options: DockerOptions) -> dict[str, str]:
    """Labels on every resource of a kernel: how stop() and a restarted worker find it."""
    return {**dict(options.labels), "poolgate.managed": "true", KERNEL_LABEL: req.kernel_id,
            "poolgate.pool": req.pool, "poolgate.user": req.user or req.env.get(
                "KERNEL_USERNAME", ""), "poolgate.kernelspec": req.spec_name}


def choose_image(req: LaunchRequest, options: DockerOptions) -> str:
    """KERNEL_IMAGE where the pool allows it and lists it; else the spec's; else the pool's."""
    asked = req.env.get("KERNEL_IMAGE", "")
    if asked:
        if not options.allow_kernel_image:
            raise LaunchRejected(f"KERNEL_IMAGE={asked!r}: pool {req.pool!r} does not let "
                                 "kernels pick their image")
        if asked not in options.allowed_images:
            raise LaunchRejected(f"KERNEL_IMAGE={asked!r} is not an image pool {req.pool!r} "
                                 f"allows ({', '.join(options.allowed_images)})")
        return asked
    image = str(req.resources.get("image") or options.image)
    if not image:
        raise LaunchRejected(f"kernelspec {req.spec_name!r} names no image (metadata.poolgate."
                             f"resources.image) and pool {req.pool!r} has no default image")
    return image


def choose_user(req: LaunchRequest, options: DockerOptions) -> str:
    """``uid:gid`` from KERNEL_UID/KERNEL_GID where the pool allows it; else the pool's user."""
    uid, gid = req.env.get("KERNEL_UID", ""), req.env.get("KERNEL_GID", "")
    if not (uid or gid) or not options.allow_kernel_uid:
        return options.user
    for name, value in (("KERNEL_UID", uid), ("KERNEL_GID", gid)):
        if value and not UID.match(value):
            raise LaunchRejected(f"{name}={value!r}: expected a number")
        if value and int(value) == 0 and not options.allow_root:
            raise LaunchRejected(f"{name}=0: pool {req.pool!r} does not run kernels as root")
    if gid and not uid:
        raise LaunchRejected("KERNEL_GID: set KERNEL_UID too")
    return f"{uid}:{gid}" if gid else uid


def build_command(req: LaunchRequest, options: DockerOptions) -> list[str]:
    """The kernel launcher wrapping the spec's argv (a bare ``python`` becomes options.python)."""
    argv = [a.replace("{resource_dir}", "") for a in req.argv]
    if argv and BARE_PYTHON.match(argv[0]):
        argv[0] = options.python
    return [*shlex.split(options.kernel_launcher), "--", *argv]


def build_env(req: LaunchRequest, options: DockerOptions,
              reply_env: Mapping[str, str]) -> dict[str, str]:
    """The container's environment: pool, spec, request, then KERNEL_ID and the reply's."""
    env = {**dict(options.env), **req.spec_env, **req.env}
    env.pop("KERNEL_IMAGE", None)
    env["KERNEL_ID"] = req.kernel_id
    env.update(reply_env)
    return env


def limits(req: LaunchRequest, options: DockerOptions) -> tuple[int, int]:
    """(nano cpus, memory bytes) of a kernel: what it asked for, else the pool's default."""
    cpus = float(req.resources.get("cpus") or options.cpus or 0)
    memory = req.resources.get("memory") or (
        parse_memory(options.memory, "memory") if options.memory else 0)
    return int(cpus * 1e9), int(memory)


def build_container_spec(req: LaunchRequest, options: DockerOptions,
                         reply_env: Mapping[str, str]) -> dict[str, Any]:
    """Keyword arguments of ``docker.from_env().containers.create`` for one kernel."""
    nano, memory = limits(req, options)
    spec: dict[str, Any] = {
        "image": choose_image(req, options),
        "command": build_command(req, options),
        "name": resource_name(req.kernel_id),
        "labels": build_labels(req, options),
        "environment": build_env(req, options, reply_env),
        "init": True,  # reaps the kernel's orphans, forwards signals to the kernel launcher
        "detach": True,
        "network": options.network,
    }
    if options.network == "host":
        spec["network_mode"] = spec.pop("network")
    if options.mounts:
        spec["volumes"] = list(options.mounts)
    user = choose_user(req, options)
    if user:
        spec["user"] = user
    if req.working_dir:
        spec["working_dir"] = req.working_dir
    if nano:
        spec["nano_cpus"] = nano
    if memory:
        spec["mem_limit"] = memory
    return spec


def build_service_spec(req: LaunchRequest, options: SwarmOptions, image: str,
                       reply_env: Mapping[str, str]) -> dict[str, Any]:
    """Keyword arguments of ``docker.from_env().services.create`` for one kernel.

    ``image`` is what :func:`choose_image` chose, resolved to an image ID where the worker's
    engine has it (a tag would make the engine ask a registry for its digest).
    """
    nano, memory = limits(req, options)
    labels = build_labels(req, options)
    env = build_env(req, options, reply_env)
    spec: dict[str, Any] = {
        "image": image,
        "command": build_command(req, options),
        "name": resource_name(req.kernel_id),
        "labels": labels,
        "container_labels": labels,
        "env": [f"{k}={v}" for k, v in env.items()],
        "init": True,
        "networks": [options.network],
        "restart_policy": {"condition": "none"},  # a dead kernel is the supervisor's business
        "endpoint_spec": {"mode": options.endpoint_mode},
        "stop_grace_period": int(options.stop_grace * 1e9),
    }
    if options.constraints:
        spec["constraints"] = list(options.constraints)
    if options.mounts:
        spec["mounts"] = list(options.mounts)
    user = choose_user(req, options)
    if user:
        spec["user"] = user
    if req.working_dir:
        spec["workdir"] = req.working_dir
    resources: dict[str, int] = {}
    if nano:
        resources["cpu_limit"] = nano
    if memory:
        resources["mem_limit"] = memory
    if options.reserve:
        resources.update({k.replace("limit", "reservation"): v for k, v in resources.items()})
    if resources:
        spec["resources"] = resources
    return spec
