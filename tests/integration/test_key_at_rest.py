"""A kernel's HMAC key is never at rest in clear (issue 21): not in the registry, not in the
broker's or Celery's result backend's keys (all one Redis here), not in the logs; and it is
encrypted by default, with no registry secret configured."""
from __future__ import annotations

import json
import time
from pathlib import Path

import psutil
import redis

from tests.conftest import Stack


def connection_file_key(kid: str) -> str:
    """The key in the kernel process's own connection file (ipykernel -f FILE)."""
    for p in psutil.process_iter(["cmdline", "environ"]):
        try:
            if (p.info.get("environ") or {}).get("KERNEL_ID") != kid:
                continue
            argv = p.info.get("cmdline") or []
        except psutil.Error:
            continue
        if "-f" in argv:
            return str(json.loads(Path(argv[argv.index("-f") + 1]).read_text())["key"])
    raise AssertionError(f"no kernel process with KERNEL_ID={kid}")


def everything_in(r: redis.Redis) -> bytes:
    """Every key's name and value in the database, whatever its type."""
    out = []
    for key in r.scan_iter(count=1000):
        kind = r.type(key).decode()
        value = {"string": lambda: r.get(key), "hash": lambda: r.hgetall(key),
                 "list": lambda: r.lrange(key, 0, -1), "set": lambda: r.smembers(key),
                 "zset": lambda: r.zrange(key, 0, -1),
                 "stream": lambda: r.xrange(key)}.get(kind, lambda: b"")()
        out.append(key + b"=" + repr(value).encode())
    return b"\n".join(out)


def test_the_key_is_nowhere_in_clear(fresh_stack: Stack) -> None:
    gw = fresh_stack.gw
    kid = gw.start()["id"]
    key = connection_file_key(kid)
    assert len(key) >= 16
    ch = gw.channel(kid)  # the gateway read the key from the registry to sign this
    try:
        assert ch.execute("print(6 * 7)").stdout == "42\n"
    finally:
        ch.close()
    r = redis.Redis.from_url(fresh_stack.registry_url)
    live = everything_in(r)  # while the record holds the connection info
    conn = json.loads(r.hget(f"pg:k:{kid}", "conn") or b"{}")
    assert conn["key"].startswith("enc:") and key.encode() not in live
    gw.shutdown(kid)
    deadline = time.monotonic() + 20  # the kernels.host task's result, once it has returned
    while not any(r.scan_iter("celery-task-meta-*")) and time.monotonic() < deadline:
        time.sleep(0.1)
    dump = everything_in(r)
    assert b"celery-task-meta-" in dump and kid.encode() in dump
    assert key.encode() not in dump
    logs = "".join(p.read_text(errors="replace") for p in fresh_stack.logs.iterdir())
    assert kid in logs and key not in logs
    assert "registry secret is not the one" not in logs  # gateway and worker share it
    secret = fresh_stack.tmp / "data" / "secret"  # no registry_secret: the generated one
    assert secret.stat().st_mode & 0o077 == 0
