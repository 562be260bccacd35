"""yarn launcher, pure half: options, the ResourceManager's query parameters, the submission body.

Nothing here talks to a ResourceManager. :func:`build_yarn_app` returns the JSON body of
``POST /ws/v1/cluster/apps`` (Hadoop's "Cluster Applications API (Submit Application)"), so
tests compare it with literal dicts.

Every kernel is one YARN application whose ApplicationMaster container runs
``python3 -m poolgate.kernel_launcher -- <kernelspec argv>``: the kernel launcher reports where
the kernel listens through workers/launchers/reply.py, so the worker needs no route to the
NodeManager; it also registers with the RM as the application's AM (``POOLGATE_YARN_AM=1``,
poolgate/yarn_am.py) and heartbeats until the kernel ends. Each application carries the tag
``poolgate.kernel_id:<id>`` (YARN lowercases tags; ids are lowercase UUIDs), which is how
stop() and a restarted worker find it.
"""
from __future__ import annotations

import math
import re
import shlex
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from ..errors import LaunchRejected
from ..protocol import LaunchRequest
from .docker_builders import BARE_PYTHON, check_reporting, resource_name

AUTH_KINDS = ("none", "simple", "kerberos")
SUBMIT_KINDS = ("rest", "spark-submit")
KERNEL_TAG = "poolgate.kernel_id:"   # + the kernel id: one tag per application
POOL_TAG = "poolgate.pool:"
USER = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.@-]{0,63}$")  # a Hadoop user name, roughly
TAG_MAX = 100                        # YARN refuses longer tags
#: YARN's own log redirection: the NodeManager replaces <LOG_DIR> with the container's log dir.
LOG_REDIRECT = "1><LOG_DIR>/stdout 2><LOG_DIR>/stderr"
#: Tells the kernel launcher it is the application's ApplicationMaster (poolgate/yarn_am.py).
AM_ENV = "POOLGATE_YARN_AM"


@dataclass(frozen=True)
class YarnOptions:
    """Options of a ``launcher: yarn`` pool (an application per kernel, on one cluster)."""

    rm_address: str = ""              # the ResourceManager's web address: http(s)://rm:8088
    alternate_rm_address: str = ""    # the other RM of an HA pair (tried on failure or standby)
    queue: str = "default"            # KERNEL_QUEUE may not change it: the pool's queue is policy
    memory_mb: int = 1024             # per kernel unless the spec or KERNEL_MEMORY asks
    vcores: int = 1                   # per kernel unless the spec or KERNEL_CPUS asks
    max_cpus_per_kernel: float = 0.0
    max_memory_per_kernel: str = ""
    auth: str = "none"                # none | simple (user.name=) | kerberos (SPNEGO)
    user: str = "poolgate"            # simple auth: the user the worker submits as
    impersonation: bool = False       # submit as KERNEL_USERNAME (doAs=; a Hadoop proxy user)
    application_type: str = "POOLGATE"
    max_app_attempts: int = 1         # a second attempt would be a second, unannounced kernel
    env: Mapping[str, str] = field(default_factory=dict)   # for every kernel
    python: str = "python3"           # replaces a bare "python" in the kernelspec's argv
    kernel_launcher: str = "python3 -m poolgate.kernel_launcher"
    response_address: str = ""        # where kernel launchers reach this worker ("": auto)
    response_port: int = 0            # the worker's reply listener (0: any free port)
    response_bind: str = "0.0.0.0"
    poll_interval: float = 3.0        # seconds between RM polls of a running kernel
    api_timeout: float = 30.0         # seconds one RM request may take
    ca_file: str = ""                 # https: the CA bundle to trust ("": the system's)
    stop_grace: float = 5.0           # seconds a killed application gets to end
    submit: str = "rest"              # rest | spark-submit (Spark's AM runs the kernel launcher)
    spark_submit: str = "spark-submit"  # the command, with the worker's HADOOP_CONF_DIR
    spark_conf: Mapping[str, str] = field(default_factory=dict)  # --properties-file entries

    def __post_init__(self) -> None:
        for name in ("rm_address", "alternate_rm_address"):
            value = getattr(self, name)
            if (value or name == "rm_address") and not re.match(r"^https?://[^/\s]+/?$", value):
                raise ValueError(f"{name}: expected http(s)://host:port of a ResourceManager, "
                                 f"got {value!r}")
        if self.submit not in SUBMIT_KINDS:
            raise ValueError(f"submit: expected one of {', '.join(SUBMIT_KINDS)}, got "
                             f"{self.submit!r}")
        if self.submit == "spark-submit" and not shlex.split(self.spark_submit):
            raise ValueError("spark_submit: expected a command")
        if self.auth not in AUTH_KINDS:
            raise ValueError(f"auth: expected one of {', '.join(AUTH_KINDS)}, got {self.auth!r}")
        if self.impersonation and self.auth == "none":
            raise ValueError("impersonation: needs auth simple or kerberos (the RM must know "
                             "who asks to act for KERNEL_USERNAME)")
        if self.auth == "simple" and not USER.match(self.user):
            raise ValueError(f"user: expected a user name, got {self.user!r}")
        if not self.queue or not re.match(r"^[\w.-]+$", self.queue):
            raise ValueError(f"queue: expected a queue name, got {self.queue!r}")
        for name in ("memory_mb", "vcores", "max_app_attempts"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name}: expected an integer >= 1, got {getattr(self, name)}")
        check_reporting(self)

    @property
    def rm_addresses(self) -> tuple[str, ...]:
        """The RM addresses to try, the configured active one first."""
        found = (self.rm_address, self.alternate_rm_address)
        return tuple(a.rstrip("/") for a in found if a)


def kernel_tag(kernel_id: str) -> str:
    """The application tag that finds a kernel's applications (YARN keeps tags lowercase)."""
    return (KERNEL_TAG + kernel_id).lower()[:TAG_MAX]


def submitting_user(req: LaunchRequest, options: YarnOptions) -> str:
    """Whom the application runs as: KERNEL_USERNAME with impersonation, else the pool's user
    (auth none: whoever the RM says, its static user)."""
    if not options.impersonation:
        return options.user if options.auth == "simple" else ""
    user = req.user or req.env.get("KERNEL_USERNAME", "")
    if not user:
        raise LaunchRejected(f"pool {req.pool!r} submits kernels as their user "
                             "(impersonation), and this launch has no KERNEL_USERNAME")
    if not USER.match(user):
        raise LaunchRejected(f"KERNEL_USERNAME={user!r} is not a user name YARN takes")
    return user


def rm_params(options: YarnOptions, as_user: str = "") -> dict[str, str]:
    """Query parameters of every RM request: ``user.name`` (simple auth) and ``doAs`` (a
    proxy user) where the pool impersonates ``as_user``."""
    params: dict[str, str] = {}
    if options.auth == "simple":
        params["user.name"] = options.user
    if options.impersonation and as_user:
        params["doAs"] = as_user
    return params


def resources(req: LaunchRequest, options: YarnOptions) -> dict[str, int]:
    """The AM container's ``resource``: MB and vcores from the request, else the pool's."""
    memory = req.resources.get("memory")
    cpus = req.resources.get("cpus")
    return {"memory": math.ceil(int(memory) / 2**20) if memory else options.memory_mb,
            "vCores": max(1, math.ceil(float(cpus))) if cpus else options.vcores}


def check_capability(asked: Mapping[str, int], new_app: Mapping[str, Any], pool: str) -> None:
    """LaunchRejected when the cluster's largest container is smaller than the kernel asks."""
    most = new_app.get("maximum-resource-capability") or {}
    for key, unit in (("memory", "MB"), ("vCores", "vcores")):
        limit = int(most.get(key) or 0)
        if limit and asked[key] > limit:
            raise LaunchRejected(f"pool {pool!r}: the kernel asks for {asked[key]} {unit}, and "
                                 f"the cluster's largest container has {limit} {unit}")


def build_command(req: LaunchRequest, options: YarnOptions) -> str:
    """The AM container's command line: the kernel launcher wrapping the spec's argv, with
    YARN's log redirection (the container runs it with bash)."""
    argv = [a.replace("{resource_dir}", "") for a in req.argv]
    if argv and BARE_PYTHON.match(argv[0]):
        argv[0] = options.python
    words = [*shlex.split(options.kernel_launcher), "--", *argv]
    cd = f"cd {shlex.quote(req.working_dir)} && " if req.working_dir else ""
    return f"{cd}{shlex.join(words)} {LOG_REDIRECT}"


def shell_inert(value: str) -> str:
    """A request's env value as the NodeManager's launch script must get it to mean itself.

    The NodeManager writes each entry as ``export NAME="value"`` into ``launch_container.sh``
    and runs it with bash, so ``$(…)``, backticks, ``$VAR`` and quotes in a value would run or
    expand there. A backslash before each of ``\\ " $ ` `` keeps them literal in double quotes;
    newlines and ``{{``/``}}`` (which YARN turns into ``$``) are refused by the gateway
    (gateway/kernels.py SCRIPTED_ENV). The pool's and the kernelspec's env, written by operators,
    keep YARN's expansion.
    """
    return re.sub(r'([\\"$`])', r"\\\1", value)


def build_env(req: LaunchRequest, options: YarnOptions,
              reply_env: Mapping[str, str], user: str) -> dict[str, str]:
    """The container's environment: pool, spec, request, then KERNEL_ID, the user and the
    reply's (these last cannot be overridden by a client)."""
    env = {**dict(options.env), **req.spec_env, **{k: shell_inert(v) for k, v in req.env.items()}}
    env["KERNEL_ID"] = req.kernel_id
    if user or req.user:
        env["KERNEL_USERNAME"] = user or req.user
    env.update(reply_env)
    return env


def build_tags(req: LaunchRequest) -> list[str]:
    return ["poolgate", kernel_tag(req.kernel_id), (POOL_TAG + req.pool).lower()[:TAG_MAX]]


def build_yarn_app(req: LaunchRequest, new_app: Mapping[str, Any], options: YarnOptions,
                   reply_env: Mapping[str, str], user: str = "") -> dict[str, Any]:
    """The body of ``POST /ws/v1/cluster/apps`` for one kernel.

    ``new_app`` is the RM's answer to ``POST /ws/v1/cluster/apps/new-application`` (its
    application id and largest container); ``user`` is :func:`submitting_user`.
    """
    asked = resources(req, options)
    check_capability(asked, new_app, req.pool)
    env = build_env(req, options, reply_env, user)
    env[AM_ENV] = "1"  # the kernel launcher registers as the AM (spark-submit's: Spark's AM)
    return {
        "application-id": str(new_app["application-id"]),
        "application-name": resource_name(req.kernel_id),
        "queue": options.queue,
        "application-type": options.application_type,
        "application-tags": {"tag": build_tags(req)},
        "am-container-spec": {
            "commands": {"command": build_command(req, options)},
            "environment": {"entry": [{"key": k, "value": v} for k, v in env.items()]},
        },
        "unmanaged-AM": False,
        "max-app-attempts": options.max_app_attempts,
        "keep-containers-across-application-attempts": False,
        "resource": asked,
    }
