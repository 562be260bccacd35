"""``poolgate worker --log-format json``: every line the worker writes, to stdout or stderr, is
one JSON object, its stop included (Celery writes "worker: Warm shutdown (MainProcess)" straight
to stdout: workers/logs.py say_as_log makes it a log line)."""
from __future__ import annotations

import json
import signal
from pathlib import Path

from tests.conftest import DB_BASE, REDIS, STACKS, Stack, need_redis


def test_a_json_worker_writes_only_json_lines_up_to_its_stop(tmp_path: Path) -> None:
    need_redis()
    stack = Stack(tmp_path, REDIS, db=DB_BASE + 20)
    stack.env["POOLGATE_LOG_FORMAT"] = "json"
    STACKS.append(stack)
    try:
        stack.start_worker("local")
        proc = stack.workers["local"]
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(30) == 0
    finally:
        stack.stop()
        STACKS.remove(stack)
    text = (stack.logs / "worker-local.log").read_text()  # its stdout and stderr
    lines = [line for line in text.splitlines() if line.strip()]
    assert lines, "the worker wrote nothing"
    records = []
    for line in lines:
        try:
            records.append(json.loads(line))
        except ValueError:
            raise AssertionError(f"not a JSON line: {line!r}\n{text[-3000:]}") from None
    assert any("Warm shutdown" in r["message"] for r in records), text[-3000:]
