"""A Dask-on-YARN kernel: ipykernel with ``cluster`` (a dask_yarn.YarnCluster) and ``client``.

What Enterprise Gateway's ``dask_python_yarn`` kernelspec gives, run as ``python -m
poolgate.dask_kernel -f {connection_file}`` on any pool (its own spec routes to the yarn pool).
The names are lazy: the first cell that touches ``cluster`` or ``client`` submits the Dask
workers as a YARN application of their own (skein, through dask-yarn), with the scheduler in
the kernel (``deploy_mode="local"``). That application carries the kernel's tag
``poolgate.kernel_id:<id>``, so when the kernel's own YARN application is stopped, the yarn
launcher, which kills every live application with that tag, ends the Dask workers too.

What it reads (the spec's ``env`` sets the DASK_YARN_* ones, a client's start request the
KERNEL_* ones, within the spec's maximum):
  DASK_YARN_ENVIRONMENT   the workers' Python: a packed environment (conda-pack, venv-pack:
                          ``hdfs:///envs/dask.tar.gz``) or ``python:///opt/conda/bin/python``
  DASK_YARN_QUEUE         the workers' queue (default ``default``); clients cannot change it
  DASK_YARN_MAX_WORKERS   the most workers a client may ask for (default 16)
  KERNEL_DASK_WORKERS, KERNEL_DASK_WORKER_VCORES, KERNEL_DASK_WORKER_MEMORY (MiB)
                          defaults 2, 1, 2048 (or DASK_YARN_WORKERS, _WORKER_VCORES, _MEMORY)
  KERNEL_ID, KERNEL_USERNAME (the workers run as this user where DASK_YARN_AS_KERNEL_USER=true;
                          the kernel's Hadoop user must be allowed to act for it)

The rule of this module: the standard library at import; dask-yarn (``pip install
'poolgate[dask-yarn]'`` on the kernel's nodes) only when the cluster is first used.
"""
from __future__ import annotations

import sys
from collections.abc import Mapping, Sequence
from typing import Any

from .lazy import lazy_names

TAG = "poolgate.kernel_id:"


#: what a client's start request may size, with the least each may be
CLIENT_COUNTS = (("KERNEL_DASK_WORKERS", "DASK_YARN_WORKERS", 2, 0),
                 ("KERNEL_DASK_WORKER_VCORES", "DASK_YARN_WORKER_VCORES", 1, 1),
                 ("KERNEL_DASK_WORKER_MEMORY", "DASK_YARN_WORKER_MEMORY", 2048, 256))


def _count(env: Mapping[str, str], name: str, fallback: str, default: int, low: int) -> int:
    raw = env.get(name) or env.get(fallback) or str(default)
    try:
        value = int(raw)
    except ValueError:
        raise ValueError(f"{name}={raw!r}: expected a whole number") from None
    if value < low:
        raise ValueError(f"{name}={raw!r}: expected a number >= {low}")
    return value


def _sizes(env: Mapping[str, str]) -> dict[str, int]:
    """The workers' count, vcores and memory (MiB), within the spec's maximum."""
    most = _count(env, "DASK_YARN_MAX_WORKERS", "", 16, 0)
    sizes = {name: _count(env, name, fallback, default, low)
             for name, fallback, default, low in CLIENT_COUNTS}
    if sizes["KERNEL_DASK_WORKERS"] > most:
        raise ValueError(f"KERNEL_DASK_WORKERS={sizes['KERNEL_DASK_WORKERS']}: this kernelspec "
                         f"allows at most {most}")
    return sizes


def is_dask_spec(argv: Sequence[str], spec_env: Mapping[str, str]) -> bool:
    """Whether a kernelspec runs this kernel (its argv names it, or its env sizes Dask)."""
    return "poolgate.dask_kernel" in argv or any(k.startswith("DASK_YARN_") for k in spec_env)


def client_problem(env: Mapping[str, str], spec_env: Mapping[str, str]) -> str | None:
    """What is wrong with the KERNEL_DASK_* values of a start request (``env``) for a kernel
    whose spec sets ``spec_env``, or None. The gateway answers it with a 400 before anything
    is queued; only values the client sent are judged (a spec's own bad DASK_YARN_* values
    fail the kernel's start, with their reason, as before)."""
    if not any(env.get(name) for name, *_ in CLIENT_COUNTS):
        return None
    try:
        _count(spec_env, "DASK_YARN_MAX_WORKERS", "", 16, 0)
    except ValueError:
        return None  # the operator's mistake: the kernel's start says so
    try:
        _sizes({**spec_env, **env})
    except ValueError as exc:
        return str(exc)
    return None


def build_dask_cluster_args(env: Mapping[str, str]) -> dict[str, Any]:
    """The keyword arguments of ``dask_yarn.YarnCluster`` for this kernel (ValueError with
    the variable's name for a bad value)."""
    environment = env.get("DASK_YARN_ENVIRONMENT", "")
    if not environment:
        raise ValueError("DASK_YARN_ENVIRONMENT: the kernelspec must say which Python the "
                         "workers run (a packed environment or python:///path/to/python)")
    sizes = _sizes(env)
    kid = env.get("KERNEL_ID", "")
    args: dict[str, Any] = {
        "environment": environment,
        "n_workers": sizes["KERNEL_DASK_WORKERS"],
        "worker_vcores": sizes["KERNEL_DASK_WORKER_VCORES"],
        "worker_memory": f"{sizes['KERNEL_DASK_WORKER_MEMORY']} MiB",
        "worker_restarts": -1,
        "deploy_mode": "local",
        "name": f"poolgate-dask-{kid}" if kid else "poolgate-dask",
        "queue": env.get("DASK_YARN_QUEUE") or "default",
        "tags": ["poolgate", "poolgate.dask", *([(TAG + kid).lower()] if kid else [])],
    }
    if env.get("DASK_YARN_AS_KERNEL_USER", "").lower() == "true" and env.get("KERNEL_USERNAME"):
        args["user"] = env["KERNEL_USERNAME"]
    return args


def make_cluster(env: Mapping[str, str]) -> dict[str, Any]:
    """Submit the workers and connect: ``{"cluster": ..., "client": ...}``."""
    args = build_dask_cluster_args(env)
    try:
        from dask.distributed import Client
        from dask_yarn import YarnCluster
    except ImportError as exc:
        raise ImportError(f"this kernel needs dask-yarn ({exc}): pip install "
                          "'poolgate[dask-yarn]' where the kernel runs") from exc
    cluster = YarnCluster(**args)
    return {"cluster": cluster, "client": Client(cluster)}


def main(argv: list[str] | None = None) -> int:
    import os

    env = dict(os.environ)
    try:
        build_dask_cluster_args(env)  # a bad value fails the start, with its reason
    except ValueError as exc:
        print(f"poolgate.dask_kernel: {exc}", file=sys.stderr)
        return 2
    ns: dict[str, Any] = {}
    lazy_names(("cluster", "client"), lambda: make_cluster(env), ns)
    from ipykernel.kernelapp import IPKernelApp

    app = IPKernelApp.instance(user_ns=ns)
    app.initialize(sys.argv[1:] if argv is None else argv)  # type: ignore[no-untyped-call]
    app.start()  # type: ignore[no-untyped-call]
    return 0


if __name__ == "__main__":
    sys.exit(main())
