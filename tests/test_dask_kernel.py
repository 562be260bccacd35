"""poolgate/dask_kernel.py: the dask_yarn.YarnCluster arguments a kernel asks for, literally.

No YARN that skein could reach (Hadoop RPC) runs here: tests/integration/test_yarn_pool.py
starts the kernel on the yarn pool and checks what it can without one."""
from __future__ import annotations

import pytest

from poolgate.dask_kernel import build_dask_cluster_args, client_problem, is_dask_spec

KID = "3f2a9c1e-8b7d-4e6f-a5b4-c3d2e1f0a9b8"
SPEC = {"DASK_YARN_ENVIRONMENT": "hdfs:///envs/dask.tar.gz", "KERNEL_ID": KID}


def test_defaults() -> None:
    assert build_dask_cluster_args(SPEC) == {
        "environment": "hdfs:///envs/dask.tar.gz", "n_workers": 2, "worker_vcores": 1,
        "worker_memory": "2048 MiB", "worker_restarts": -1, "deploy_mode": "local",
        "name": f"poolgate-dask-{KID}", "queue": "default",
        "tags": ["poolgate", "poolgate.dask", f"poolgate.kernel_id:{KID}"]}


def test_client_sizes_within_the_spec_and_the_user() -> None:
    env = {**SPEC, "DASK_YARN_QUEUE": "science", "DASK_YARN_MAX_WORKERS": "8",
           "DASK_YARN_AS_KERNEL_USER": "true", "KERNEL_USERNAME": "alice",
           "KERNEL_DASK_WORKERS": "8", "KERNEL_DASK_WORKER_VCORES": "4",
           "KERNEL_DASK_WORKER_MEMORY": "8192", "DASK_YARN_WORKERS": "3"}
    args = build_dask_cluster_args(env)
    assert (args["n_workers"], args["worker_vcores"], args["worker_memory"], args["queue"],
            args["user"]) == (8, 4, "8192 MiB", "science", "alice")
    assert build_dask_cluster_args({**SPEC, "DASK_YARN_WORKERS": "3"})["n_workers"] == 3
    assert "user" not in build_dask_cluster_args({**SPEC, "KERNEL_USERNAME": "alice"})


@pytest.mark.parametrize("env, why", [
    ({"KERNEL_ID": KID}, "DASK_YARN_ENVIRONMENT: the kernelspec must say"),
    ({**SPEC, "KERNEL_DASK_WORKERS": "17"}, "KERNEL_DASK_WORKERS=17: this kernelspec allows at "
                                            "most 16"),
    ({**SPEC, "KERNEL_DASK_WORKERS": "two"}, "KERNEL_DASK_WORKERS='two': expected a whole"),
    ({**SPEC, "KERNEL_DASK_WORKER_MEMORY": "100"}, "expected a number >= 256"),
    ({**SPEC, "KERNEL_DASK_WORKER_VCORES": "0"}, "expected a number >= 1"),
])
def test_bad_values_name_their_variable(env: dict[str, str], why: str) -> None:
    with pytest.raises(ValueError) as err:
        build_dask_cluster_args(env)
    assert why in str(err.value)


def test_the_gateway_judges_only_what_a_client_sent() -> None:
    """client_problem is the gateway's check (a 400 at POST /api/kernels): the client's
    KERNEL_DASK_* values against the spec's maximum; the spec's own values are not its to judge."""
    spec = {"DASK_YARN_ENVIRONMENT": "python:///usr/bin/python3", "DASK_YARN_MAX_WORKERS": "4"}
    assert client_problem({}, spec) is None
    assert client_problem({"KERNEL_DASK_WORKERS": "4"}, spec) is None
    assert client_problem({"KERNEL_DASK_WORKERS": "5"}, spec) == \
        "KERNEL_DASK_WORKERS=5: this kernelspec allows at most 4"
    assert client_problem({"KERNEL_DASK_WORKER_VCORES": "x"}, spec) == \
        "KERNEL_DASK_WORKER_VCORES='x': expected a whole number"
    assert client_problem({"KERNEL_DASK_WORKERS": "1"}, {"DASK_YARN_MAX_WORKERS": "lots"}) is None
    assert is_dask_spec(("python", "-m", "poolgate.dask_kernel", "-f", "{connection_file}"), {})
    assert is_dask_spec(("bash", "run.sh"), {"DASK_YARN_QUEUE": "q"})
    assert not is_dask_spec(("python", "-m", "ipykernel_launcher"), {})
