"""The pure parts behind /api/pools, /metrics, the dashboard, the admin CLI and the logs,
tested against literal data with no backend."""
from __future__ import annotations

import json
import logging

from poolgate.admin import drain_targets, kernel_rows, render_status, table
from poolgate.gateway.api.pools import ClusterState, build_kernel, build_pool, build_worker
from poolgate.gateway.channels.hooks import WsStats
from poolgate.gateway.dashboard import duration, totals
from poolgate.gateway.metrics import launch_durations
from poolgate.gateway.tally import Ending, classify
from poolgate.workers.config import PoolConfig
from poolgate.workers.logs import JsonFormatter, KernelFields, bound, mask
from poolgate.workers.protocol import KernelStatus
from poolgate.workers.registry import KernelRecord

NOW = 1_800_000_000.0


def record(kid: str, pool: str, status: KernelStatus, user: str = "", age: float = 60.0,
           **kw: object) -> KernelRecord:
    return KernelRecord(id=kid, name="python3", pool=pool, status=status, user=user,
                        created=NOW - age, last_activity="2027-01-15T08:00:00.000000Z",
                        worker="local-1@h", execution_state="idle", **kw)  # type: ignore[arg-type]


def test_build_worker_states() -> None:
    beat = {"name": "gpu-1@h", "host": "h", "pools": ["gpu"], "slots": 2, "used": 2,
            "accepting": False, "draining": [], "kernels": 2, "time": NOW - 2}
    assert build_worker(beat, "gpu", NOW) == {
        "name": "gpu-1@h", "host": "h", "slots": 2, "used": 2, "free": 0, "state": "full",
        "draining": False, "kernels": 2, "last_seen": 2.0, "warm": {}, "warm_rss": {}}
    # a worker from before issue 24 listed its kernels' ids: counted the same
    assert build_worker(dict(beat, kernels=["a", "b"]), "gpu", NOW)["kernels"] == 2
    warm = dict(beat, warm={"gpu/python3": 2, "local/python3": 1, "gpu/r": 1})
    assert build_worker(warm, "gpu", NOW)["warm"] == {"python3": 2, "r": 1}
    rss = dict(warm, warm_rss={"gpu/python3": 2 * 50 << 20, "local/python3": 1})
    assert build_worker(rss, "gpu", NOW)["warm_rss"] == {"python3": 100 << 20}
    drained = dict(beat, used=1, accepting=True, draining=["gpu"])
    assert build_worker(drained, "gpu", NOW)["state"] == "draining"
    assert build_worker(dict(beat, used=0, accepting=True), "gpu", NOW)["state"] == "accepting"


def test_build_kernel_shows_owner_age_and_activity_but_no_secrets() -> None:
    rec = record("k1", "local", KernelStatus.RUNNING, user="alice", age=125.0,
                 env={"KERNEL_TOKEN": "s3cret"})
    model = build_kernel(rec, NOW)
    assert model == {
        "id": "k1", "kernelspec": "python3", "user": "alice", "status": "RUNNING",
        "execution_state": "idle", "worker": "local-1@h", "host": "",
        "created": "2027-01-15T07:57:55Z", "age": 125.0,
        "last_activity": "2027-01-15T08:00:00.000000Z", "idle": 0.0, "connections": 0}
    assert "s3cret" not in json.dumps(model)
    queued = build_kernel(record("k2", "local", KernelStatus.QUEUED), NOW, position=3)
    assert queued["execution_state"] == "starting" and queued["queue_position"] == 3


def test_build_pool_counts_workers_slots_queue_and_kernels() -> None:
    pool = PoolConfig(name="local", launcher="local", queue="q-local")
    workers = [
        {"name": "local-2@h", "pools": ["local"], "slots": 4, "used": 1, "accepting": True,
         "draining": ["local"], "kernels": ["k1"], "time": NOW},
        {"name": "local-1@h", "pools": ["local"], "slots": 4, "used": 2, "accepting": True,
         "draining": [], "kernels": ["k2", "k3"], "time": NOW, "warm": {"local/python3": 1},
         "warm_rss": {"local/python3": 60 << 20, "gpu/python3": 1}},
        {"name": "gpu-1@h", "pools": ["gpu"], "slots": 1, "used": 0, "time": NOW},
    ]
    records = [record("k1", "local", KernelStatus.RUNNING, "alice"),
               record("k2", "local", KernelStatus.RUNNING, "bob"),
               record("k3", "local", KernelStatus.STARTING, "bob"),
               record("k4", "local", KernelStatus.QUEUED, "carol"),
               record("k5", "local", KernelStatus.FAILED, "dave"),
               record("g1", "gpu", KernelStatus.RUNNING, "erin")]
    state = ClusterState(workers=workers, records=records, queued={"local": ["k4"]},
                         failures={"local": [{"time": NOW, "kernel_id": "k5", "user": "dave",
                                              "kind": "crashed", "reason": "died"}]},
                         tallies={("failures", "local", "crashed"): 2,
                                  ("culls", "local", "idle"): 1,
                                  ("failures", "gpu", "worker_lost"): 5},
                         now=NOW)
    model = build_pool(pool, state)
    assert {k: model[k] for k in ("name", "launcher", "queue", "workers", "slots", "used",
                                  "free", "waiting", "running", "failures_total")} == {
        "name": "local", "launcher": "local", "queue": "q-local", "workers": 2, "slots": 8,
        "used": 3, "free": 2, "waiting": 1, "running": 2, "failures_total": 2}
    assert model["waiting_launches"] == [{"kernel_id": "k4", "position": 1}]
    assert model["warm_ready"] == {"python3": 1}
    # each warm kernel holds a slot; its memory is what the workers' heartbeats say
    assert model["warm_cost"] == {"slots": 1, "rss_bytes": 60 << 20, "kernelspecs": {
        "python3": {"kernels": 1, "slots": 1, "rss_bytes": 60 << 20}}}
    assert [w["name"] for w in model["worker_list"]] == ["local-1@h", "local-2@h"]
    assert [k["id"] for k in model["kernels"]] == ["k1", "k2", "k3", "k4"]
    assert model["kernels"][3]["queue_position"] == 1
    assert model["kernels_by_status"] == {"QUEUED": 1, "STARTING": 1, "RUNNING": 2,
                                          "RESTARTING": 0, "STOPPING": 0, "STOPPED": 0,
                                          "FAILED": 1}
    assert model["failures_by_kind"] == {"crashed": 2} and model["culls_by_kind"] == {"idle": 1}
    assert model["recent_failures"] == [{"time": "2027-01-15T08:00:00Z", "kernel_id": "k5",
                                         "user": "dave", "kind": "crashed", "reason": "died"}]


def test_classify_endings() -> None:
    assert classify("FAILED", "the kernel exited while starting", "STARTING") == \
        Ending("failures", "launch_failed")
    assert classify("FAILED", "launch failed: no such image") == Ending("failures", "launch_failed")
    assert classify("FAILED", "oops", "RESTARTING") == Ending("failures", "restart_failed")
    assert classify("FAILED", "worker w lost: no heartbeat for 15s; the kernel is considered "
                    "dead") == Ending("failures", "worker_lost")
    # a worker stopped cleanly (Ctrl-C) ends its kernels, but that is no failure of the pool
    assert classify("FAILED", "worker w shut down", "RUNNING") is None
    assert classify("FAILED", "worker w restarted; its earlier kernels were stopped",
                    "RUNNING") == Ending("failures", "worker_shutdown")
    assert classify("FAILED", "the kernel died 6 times in a row (exit 1); not restarting it "
                    "again") == Ending("failures", "crashed")
    assert classify("FAILED", "supervisor error: boom", "RUNNING") == Ending("failures", "error")
    assert classify("STOPPED", "launch timed out in the queue") == \
        Ending("failures", "launch_timeout")
    assert classify("STOPPED", "culled: idle for 600s") == Ending("culls", "idle")
    assert classify("STOPPED", "culled: running longer than max_age") == Ending("culls", "max_age")
    assert classify("STOPPED", "shut down") is None
    assert classify("RUNNING", "") is None


def test_launch_durations() -> None:
    assert launch_durations({"queued": 100.0, "taken": 103.25, "launch": 1.5}) == (3.25, 1.5)
    assert launch_durations({"queued": 100.0, "launch": 1.5}) is None
    assert launch_durations({"queued": 100.0, "taken": 101.0}) is None


def test_ws_stats_counts_messages_and_bytes() -> None:
    stats = WsStats()
    stats.add("kernel_to_client", "iopub", 100)
    stats.add("kernel_to_client", "iopub", 50)
    stats.add("client_to_kernel", "shell", 7)
    assert stats.counts == {("kernel_to_client", "iopub"): [2, 150],
                            ("client_to_kernel", "shell"): [1, 7]}


def test_duration_and_totals() -> None:
    assert [duration(s) for s in (None, 0, 59.9, 61, 3600, 3 * 86400 + 7200)] == \
        ["", "0s", "59s", "1m 01s", "1h 00m", "3d 02h"]
    pools = [{"workers": 1, "slots": 4, "used": 1, "running": 1, "waiting": 0, "failures_total": 2},
             {"workers": 2, "slots": 2, "used": 2, "running": 1, "waiting": 3, "failures_total": 0}]
    assert totals(pools) == {"workers": 3, "slots": 6, "used": 3, "running": 2, "waiting": 3,
                             "failures_total": 2}


def test_drain_targets() -> None:
    beats = [{"name": "tiny-1@a", "pools": ["tiny"]}, {"name": "tiny-2@b", "pools": ["tiny"]},
             {"name": "local-1@a", "pools": ["local"]}]
    assert drain_targets(beats, "tiny", None) == ["tiny-1@a", "tiny-2@b"]
    assert drain_targets(beats, "tiny", "tiny-2") == ["tiny-2@b"]
    assert drain_targets(beats, "tiny", "tiny-1@a") == ["tiny-1@a"]
    import pytest

    from poolgate.workers.errors import BadRequest

    with pytest.raises(BadRequest, match="tiny-1@a, tiny-2@b"):
        drain_targets(beats, "tiny", "local-1")


def test_status_text_and_kernel_rows() -> None:
    pools = [{"name": "local", "launcher": "local", "queue": "local", "workers": 1, "slots": 4,
              "used": 1, "free": 3, "waiting": 1, "running": 1, "failures_total": 0,
              "worker_list": [{"name": "local-1@h", "used": 1, "slots": 4, "state": "accepting",
                               "kernels": 1}],
              "waiting_launches": [{"kernel_id": "k2", "position": 1}],
              "kernels": [{"id": "k1", "created": "2027-01-01T00:00:01Z"},
                          {"id": "k2", "created": "2027-01-01T00:00:00Z"}]}]
    text = render_status(pools)
    assert text.splitlines()[:2] == [
        "POOL   LAUNCHER  QUEUE  WORKERS  SLOTS  USED  FREE  WAITING  RUNNING  FAILURES",
        "local  local     local  1        4      1     3     1        1        0"]
    assert "local-1@h  local  1/4    accepting  1" in text
    assert "  local: #1 k2" in text and text.endswith("2 kernels (1 running, 1 waiting)")
    assert [k["id"] for k in kernel_rows(pools)] == ["k2", "k1"]
    assert kernel_rows(pools, "gpu") == []
    assert table([[1, None]], ["A", "B"]) == "A  B\n1"


def test_logs_mask_secrets_and_carry_kernel_fields() -> None:
    assert mask("broker redis://:hunter2@127.0.0.1:6379/0") == \
        "broker redis://:***@127.0.0.1:6379/0"
    assert mask("env {'KERNEL_TOKEN': 'abc', 'KERNEL_X': '1'}") == \
        "env {'KERNEL_TOKEN': '***', 'KERNEL_X': '1'}"
    assert mask("GET /api?token=s3cret&x=1") == "GET /api?token=***&x=1"
    assert mask("api_key:xyz PASSWORD = hunter2") == "api_key:*** PASSWORD = ***"
    # prose about a secret's name is left as written; only values are masked
    assert mask("Dropping env SECRET_TOKEN: not KERNEL_*") == \
        "Dropping env SECRET_TOKEN: not KERNEL_*"
    # kombu prints a Redis URL without a password as redis://:**@host; it is logged as itself
    from poolgate.workers.logs import known_url

    known_url("redis://127.0.0.1:6399/3")
    assert mask("Connected to redis://:**@127.0.0.1:6399/3") == \
        "Connected to redis://127.0.0.1:6399/3"
    kid = "0b5a4a3e-0c6d-4b8e-9f3a-1d2c3b4a5f6e"
    rec = logging.LogRecord("poolgate.gateway.kernels", logging.INFO, __file__, 1,
                            "Kernel %s queued, password=%s", (kid, "pw"), None)
    with bound(pool="gpu", user="alice"):
        assert KernelFields().filter(rec)
    line = json.loads(JsonFormatter().format(rec))
    assert line["message"] == f"Kernel {kid} queued, password=***"
    assert (line["kernel_id"], line["pool"], line["user"]) == (kid, "gpu", "alice")
    assert line["level"] == "INFO" and line["logger"] == "poolgate.gateway.kernels"


def test_idle_never_exceeds_age_for_a_fresh_kernel() -> None:
    """/pools shows a kernel's ``idle`` from its last_activity and its ``age`` from its creation,
    both to a tenth of a second: the fraction of a second counts in both."""
    from poolgate.gateway.api.pools import activity_age

    assert activity_age("2026-01-01T00:00:00.900000Z", 1767225601.0) == 0.1
    assert activity_age("2026-01-01T00:00:00Z", 1767225601.0) == 1.0
    assert activity_age("not a time", 1767225601.0) is None
