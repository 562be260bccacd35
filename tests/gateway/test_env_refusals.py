"""POST /api/kernels refuses, with a JSON 400 and before anything is queued, env values the
pool's launcher cannot pass on as written (gateway/kernels.py SCRIPTED_ENV), KERNEL_* values
the kernel or launcher would refuse later (check_kernel_values: a Dask kernel's sizes, a
spark-submit pool's client options and values Spark would trim), and a kernelspec name that is
not a string. No worker is needed: the answer comes before the pool is asked, and a request
that passes meets the 503 of a pool with no worker (so nothing was queued or submitted)."""
from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis
import yaml
from flask.testing import FlaskClient

from tests.conftest import DB_BASE, REDIS, need_redis

ARGV = ["python", "-m", "ipykernel_launcher", "-f", "{connection_file}"]
DASK_ARGV = ["python", "-m", "poolgate.dask_kernel", "-f", "{connection_file}"]
DASK_ENV = {"DASK_YARN_ENVIRONMENT": "python:///opt/conda/bin/python",
            "DASK_YARN_MAX_WORKERS": "8"}


@pytest.fixture
def client(tmp_path: Path) -> Iterator[FlaskClient]:
    from poolgate.gateway.app import create_app
    from poolgate.gateway.state import state

    need_redis()
    for name, pool, argv, env in (
            ("py-ssh", "ssh", ARGV, {}), ("py-yarn", "yarn", ARGV, {}),
            ("py-spark", "spark", ARGV, {}), ("dask-yarn", "yarn", DASK_ARGV, DASK_ENV)):
        (tmp_path / "specs" / name).mkdir(parents=True)
        (tmp_path / "specs" / name / "kernel.json").write_text(json.dumps({
            "argv": argv, "display_name": name, "language": "python", "env": env,
            "metadata": {"poolgate": {"pool": pool}}}))
    url = f"{REDIS}/{DB_BASE + 28}"
    redis.Redis.from_url(url).flushdb()
    cfg = tmp_path / "queues.yaml"
    cfg.write_text(yaml.safe_dump({
        "broker_url": "memory://", "registry_url": url,
        "kernelspec_dirs": [str(tmp_path / "specs")],
        "pools": {"local": {"launcher": "local"},
                  "ssh": {"launcher": "ssh", "options": {
                      "hosts": [{"name": "a", "address": "127.0.0.1"}],
                      "port_range": "50000-50999"}},
                  "yarn": {"launcher": "yarn", "options": {"rm_address": "http://127.0.0.1:1"}},
                  "spark": {"launcher": "yarn", "options": {
                      "rm_address": "http://127.0.0.1:1", "submit": "spark-submit"}}}}))
    app = create_app({"CONFIG_PATH": str(cfg)})
    yield app.test_client()
    state(app).close()  # its background threads


@pytest.mark.parametrize("spec,value", [("py-ssh", "a\nb"), ("py-yarn", "a\r\nb"),
                                        ("py-yarn", "{{HOME}}")])
def test_refused_before_anything_is_queued(client: FlaskClient, spec: str, value: str) -> None:
    r = client.post("/api/kernels", json={"name": spec, "env": {"KERNEL_X": value}})
    assert r.status_code == 400 and r.json is not None
    assert r.json["reason"] == "bad_request" and "env.KERNEL_X" in r.json["message"]
    assert client.get("/api/kernels").json == []


@pytest.mark.parametrize("name", [["python3"], {"a": 1}, 3])
def test_a_name_that_is_not_a_string_is_a_400(client: FlaskClient, name: object) -> None:
    r = client.post("/api/kernels", json={"name": name})
    assert r.status_code == 400 and r.json is not None and "'name'" in r.json["message"]


def refused(client: FlaskClient, spec: str, env: dict[str, str]) -> str:
    """The message of a 400 that left no kernel behind."""
    r = client.post("/api/kernels", json={"name": spec, "env": env})
    assert r.status_code == 400 and r.json is not None, r.get_data(as_text=True)
    assert r.json["reason"] == "bad_request"
    assert client.get("/api/kernels").json == []
    return str(r.json["message"])


def passed(client: FlaskClient, spec: str, env: dict[str, str]) -> None:
    """Past every check: the pool has no worker, and says so."""
    r = client.post("/api/kernels", json={"name": spec, "env": env})
    assert r.status_code == 503 and r.json is not None, r.get_data(as_text=True)
    assert "no worker serves pool" in r.json["message"]


@pytest.mark.parametrize("env,why", [
    ({"KERNEL_DASK_WORKERS": "two"}, "env.KERNEL_DASK_WORKERS='two': expected a whole number"),
    ({"KERNEL_DASK_WORKERS": "-1"}, "env.KERNEL_DASK_WORKERS='-1': expected a number >= 0"),
    ({"KERNEL_DASK_WORKERS": "9"}, "env.KERNEL_DASK_WORKERS=9: this kernelspec allows at most 8"),
    ({"KERNEL_DASK_WORKER_VCORES": "0"}, "env.KERNEL_DASK_WORKER_VCORES='0': expected a number"),
    ({"KERNEL_DASK_WORKER_MEMORY": "1.5g"}, "env.KERNEL_DASK_WORKER_MEMORY='1.5g': expected a "
                                            "whole number"),
])
def test_a_dask_kernels_bad_sizes_are_a_400(client: FlaskClient, env: dict[str, str],
                                            why: str) -> None:
    assert why in refused(client, "dask-yarn", env)


def test_a_dask_kernels_sizes_within_its_spec_pass(client: FlaskClient) -> None:
    passed(client, "dask-yarn", {"KERNEL_DASK_WORKERS": "8", "KERNEL_DASK_WORKER_VCORES": "2",
                                 "KERNEL_DASK_WORKER_MEMORY": "4096"})
    passed(client, "py-yarn", {"KERNEL_DASK_WORKERS": "99"})  # not a Dask kernel: not its business


@pytest.mark.parametrize("opts,why", [
    ("--master local[2]", "--master is not an option a client may set here"),
    ("--conf spark.yarn.queue=prod", "a key the pool does not set"),
    ("--driver-memory", "expected option value pairs"),
    ("--conf 'a=b", "No closing quotation"),
])
def test_spark_submit_options_a_client_may_not_pass_are_a_400(client: FlaskClient, opts: str,
                                                               why: str) -> None:
    msg = refused(client, "py-spark", {"KERNEL_EXTRA_SPARK_OPTS": opts})
    assert msg.startswith("env.KERNEL_EXTRA_SPARK_OPTS: ") and why in msg


@pytest.mark.parametrize("value", [" lead", "trail ", "tab\t", "\tboth "])
def test_values_spark_would_trim_are_a_400_on_a_spark_submit_pool(client: FlaskClient,
                                                                  value: str) -> None:
    msg = refused(client, "py-spark", {"KERNEL_NOTE": value})
    assert msg.startswith("env.KERNEL_NOTE: ") and "Spark strips" in msg
    passed(client, "py-yarn", {"KERNEL_NOTE": value})  # the REST submit keeps it as it is


def test_spark_submit_options_and_inner_spaces_pass(client: FlaskClient) -> None:
    passed(client, "py-spark", {"KERNEL_EXTRA_SPARK_OPTS": " --driver-memory 1g --conf "
                                "'spark.poolgate.note=a b' ", "KERNEL_NOTE": "a  b"})
