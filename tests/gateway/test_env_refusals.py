"""POST /api/kernels refuses, with a JSON 400 and before anything is queued, env values the
pool's launcher cannot pass on as written (gateway/kernels.py SCRIPTED_ENV), and a kernelspec
name that is not a string. No worker is needed: the answer comes before the pool is asked."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import redis
import yaml
from flask.testing import FlaskClient

from tests.conftest import DB_BASE, REDIS, need_redis

ARGV = ["python", "-m", "ipykernel_launcher", "-f", "{connection_file}"]


@pytest.fixture
def client(tmp_path: Path) -> FlaskClient:
    from poolgate.gateway.app import create_app

    need_redis()
    for name, pool in (("py-ssh", "ssh"), ("py-yarn", "yarn")):
        (tmp_path / "specs" / name).mkdir(parents=True)
        (tmp_path / "specs" / name / "kernel.json").write_text(json.dumps({
            "argv": ARGV, "display_name": name, "language": "python",
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
                  "yarn": {"launcher": "yarn", "options": {"rm_address": "http://127.0.0.1:1"}}}}))
    return create_app({"CONFIG_PATH": str(cfg)}).test_client()


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
