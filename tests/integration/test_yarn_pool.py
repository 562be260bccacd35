"""yarn pools through the gateway's REST and WebSocket API, against tests/yarn_rm.py.

No ResourceManager can run here: two FakeResourceManagers (an active one and a standby that
redirects to it) stand in, and really run each application's AM command, so a kernel really
starts, reports back through the kernel launcher, runs code, and is killed. Each test checks
that no application is left alive.
"""
from __future__ import annotations

import json
import shutil
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import RUN_ID, STACKS, PrivateRedis, Stack, free_port
from tests.yarn_rm import FakeResourceManager

ROOT = str(Path(__file__).resolve().parents[2])
ARGV = ["python", "-m", "ipykernel_launcher", "-f", "{connection_file}"]
EG = "enterprise_gateway.services.processproxies."
#: Debian's r-cran-irkernel kernelspec (/usr/share/jupyter/kernels/ir/kernel.json)
R_ARGV = ["R", "--slave", "-e", "IRkernel::main()", "--args", "{connection_file}"]
#: the shipped Spark kernelspec (poolgate.spark_kernel, local mode), with pyspark's Python
SPARK_SPEC = json.loads((Path(ROOT) / "examples/kernelspecs/spark_python_local/kernel.json")
                        .read_text())
SPARK_ENV = {**SPARK_SPEC["env"], "PYSPARK_PYTHON": sys.executable,
             "PYSPARK_DRIVER_PYTHON": sys.executable}
#: the shipped Dask-on-YARN kernelspec (an EG YarnClusterProcessProxy spec: routes to yarn)
DASK_SPEC = json.loads((Path(ROOT) / "examples/kernelspecs/dask_python_yarn/kernel.json")
                       .read_text())
#: what a client may add: the test checks both reach Spark
SPARK_OPTS = "--driver-memory 512m --conf 'spark.poolgate.note=a b'"


class YarnStack:
    def __init__(self, stack: Stack, active: FakeResourceManager,
                 standby: FakeResourceManager) -> None:
        self.stack, self.active, self.standby = stack, active, standby


def pool(celery_queue: str, rm: str, alternate: str, timeout: float,
         **options: Any) -> dict[str, Any]:
    return {"launcher": "yarn", "queue": celery_queue, "heartbeat_ttl": 3.0, "slots": 4,
            "launch_timeout": timeout, "max_restarts": 1, "options": {
                "rm_address": rm, "alternate_rm_address": alternate,
                "response_address": "127.0.0.1", "response_bind": "127.0.0.1",
                "python": sys.executable, "poll_interval": 0.5,
                # an eager Spark kernel on a busy machine needs more than the 120 s default
                "kernel_launcher": f"{sys.executable} -m poolgate.kernel_launcher "
                                   "--ready-timeout 300",
                "env": {"PYTHONPATH": ROOT, "POOLGATE_TEST_RUN": RUN_ID}, **options}}


@pytest.fixture(scope="module")
def yarn(tmp_path_factory: pytest.TempPathFactory) -> Iterator[YarnStack]:
    """A private Redis, a gateway, and a worker each for two yarn pools: ``yarn`` lists the
    standby RM first (every call it makes first meets a 307), ``yarn-full`` an address
    nothing listens on; both have the active RM as the alternate."""
    tmp = tmp_path_factory.mktemp("yarn-stack")
    active = FakeResourceManager(tmp / "rm1", queues={"default": 8, "full": 0}).start()
    standby = FakeResourceManager(tmp / "rm2", active=active).start()
    server = PrivateRedis(tmp)
    server.start()
    url = f"redis://127.0.0.1:{server.port}"
    tag = f"t{RUN_ID}y"
    nowhere = f"http://127.0.0.1:{free_port()}"
    pools = {"local": {"launcher": "local", "queue": f"{tag}-local", "slots": 1},
             "yarn": pool(f"{tag}-yarn", standby.url, active.url, 30, auth="simple",
                          user="poolgate", impersonation=True),
             "yarn-full": pool(f"{tag}-yarn-full", nowhere, active.url, 6, queue="full")}
    stack = Stack(tmp, url, db=1, redis_url=url, pools=pools)
    specs = tmp / "specs"
    for name, meta, argv in (
            ("py-yarn", {"process_proxy": {"class_name": EG + "yarn.YarnClusterProcessProxy"}},
             ARGV),
            ("py-yarn-full", {"poolgate": {"pool": "yarn-full"}}, ARGV),
            ("dies-yarn", {"poolgate": {"pool": "yarn"}}, ["bash", "-c", "kill -9 $PPID"]),
            ("broken-yarn", {"poolgate": {"pool": "yarn"}},
             ["python", "-c", "import sys; sys.stderr.write('boom: no module frobnicate\\n'); "
              "sys.exit(3)"]),
            ("py-k8s", {"process_proxy": {"class_name": EG + "k8s.KubernetesProcessProxy"}},
             ARGV),
            ("ir-yarn", {"poolgate": {"pool": "yarn"}}, R_ARGV),
            ("ir-local", {"poolgate": {"pool": "local"}}, R_ARGV),
            ("spark-yarn", {"poolgate": {"pool": "yarn"}}, SPARK_SPEC["argv"]),
            ("dask-yarn", DASK_SPEC["metadata"], DASK_SPEC["argv"])):
        (specs / name).mkdir()
        env = {"spark-yarn": SPARK_ENV, "dask-yarn": {
            **DASK_SPEC["env"], "DASK_YARN_ENVIRONMENT": f"python://{sys.executable}"}}
        (specs / name / "kernel.json").write_text(json.dumps({
            "argv": argv, "display_name": name, "metadata": meta,
            "language": "R" if argv is R_ARGV else "python", "env": env.get(name, {})}))
    (specs / "tiny-py" / "kernel.json").unlink()  # routes to a pool this stack lacks
    (specs / "tiny-py").rmdir()
    try:
        stack.start_worker("local")
        stack.start_worker("yarn")
        stack.start_worker("yarn-full")
        stack.start_gateway(stack.port)
    except BaseException:
        stack.stop()
        server.kill()
        active.close()
        standby.close()
        raise
    STACKS.append(stack)
    yield YarnStack(stack, active, standby)
    stack.stop()
    STACKS.remove(stack)
    server.kill()
    active.close()
    standby.close()


@pytest.fixture(autouse=True)
def nothing_left(yarn: YarnStack) -> Iterator[None]:
    yield
    deadline = time.monotonic() + 20
    while yarn.active.live() and time.monotonic() < deadline:
        time.sleep(0.2)
    left = [(a.id, a.state) for a in yarn.active.live()]
    assert not left, f"applications left alive: {left}"


def apps_of(yarn: YarnStack, kid: str) -> list[Any]:
    return [a for a in yarn.active.apps.values() if f"poolgate.kernel_id:{kid}" in a.tags]


def ended_by_request(app: Any) -> bool:
    """Killed by the worker, or unregistered by its AM when the kernel's own shutdown_request
    (sent first) got to the RM before the kill did: a real RM has the same race."""
    return bool(app.state == "KILLED" or (app.state, app.final_status) == ("FINISHED",
                                                                            "SUCCEEDED"))


def test_launch_run_interrupt_restart_shutdown(yarn: YarnStack) -> None:
    gw = yarn.stack.gw
    t0 = time.monotonic()
    model = gw.start("py-yarn", env={"KERNEL_USERNAME": "alice"})
    launched = time.monotonic() - t0
    kid = model["id"]
    try:
        assert model["poolgate"]["pool"] == "yarn"  # routed by its EG process proxy
        (app,) = apps_of(yarn, kid)
        assert app.state == "RUNNING" and app.user == "alice" and app.queue == "default"
        assert yarn.active.am is not None  # RUNNING because its AM registered (Hadoop RPC)
        assert len(yarn.active.am.of(app.attempt, "register")) == 1
        ch = gw.channel(kid)
        res = ch.execute("import os\nfor i in range(3): print('tick', i, flush=True)\n"
                         "print(os.environ['CONTAINER_ID'])")
        assert res.stdout.split()[:6] == ["tick", "0", "tick", "1", "tick", "2"]
        assert res.stdout.split()[6].startswith("container_")  # it runs in the AM container
        names = ch.execute("import os; print(sorted(os.environ))").stdout
        for secret in ("POOLGATE_RESPONSE_KEY", "POOLGATE_RESPONSE_TOKEN", "REDIS", "BROKER"):
            assert secret not in names
        mid = ch.start_cell()  # returns once the cell runs
        assert gw.post(f"/api/kernels/{kid}/interrupt").status_code == 204
        res = ch.collect(mid, timeout=20)
        assert res.error and res.error["ename"] == "KeyboardInterrupt"
        assert ch.execute("x = 5; x").result == "5"
        r = gw.post(f"/api/kernels/{kid}/restart")
        assert r.status_code == 200, r.text
        assert ch.execute("'x' in dir()", timeout=30).result == "False"
        ch.close()
        first, second = sorted(apps_of(yarn, kid), key=lambda a: a.id)
        assert ended_by_request(first) and second.state == "RUNNING"
    finally:
        gw.shutdown(kid)
    deadline = time.monotonic() + 20
    while any(a.state not in ("KILLED", "FAILED", "FINISHED") for a in apps_of(yarn, kid)) \
            and time.monotonic() < deadline:
        time.sleep(0.2)
    assert [ended_by_request(a) for a in apps_of(yarn, kid)] == [True, True]
    assert ("GET", "/ws/v1/cluster/info") not in yarn.standby.requests
    assert any(p.startswith("/ws/v1/cluster/apps") for _, p in yarn.standby.requests)
    print(f"yarn: launched in {launched:.1f}s")


def test_never_accepted_app_is_killed_at_the_launch_timeout(yarn: YarnStack) -> None:
    t0 = time.monotonic()
    r = yarn.stack.gw.post("/api/kernels", json={"name": "py-yarn-full"})
    took = time.monotonic() - t0
    assert r.status_code == 503, r.text
    msg = r.json()["message"]
    assert "which was ACCEPTED" in msg and "Queue's AM resource limit exceeded" in msg, msg
    assert took < 6 + 3, f"took {took:.0f}s for a launch timeout of 6s"
    assert [a.state for a in yarn.active.apps.values() if a.queue == "full"] == ["KILLED"]
    # the first RM address refuses connections: the worker said so, and used the alternate
    assert "unreachable" in yarn.stack.log("worker-yarn-full")
    assert yarn.stack.live_kernels() == []


def test_app_that_ends_early_fails_with_its_diagnostics(yarn: YarnStack) -> None:
    t0 = time.monotonic()
    r = yarn.stack.gw.post("/api/kernels", json={"name": "dies-yarn",
                                                 "env": {"KERNEL_USERNAME": "bob"}})
    assert r.status_code == 500, r.text
    msg = r.json()["message"]
    assert "ended FAILED (final status FAILED)" in msg and "exitCode: 137" in msg, msg
    assert time.monotonic() - t0 < 30
    r = yarn.stack.gw.post("/api/kernels", json={"name": "broken-yarn",
                                                 "env": {"KERNEL_USERNAME": "bob"}})
    assert r.status_code == 500, r.text
    msg = r.json()["message"]
    assert "boom: no module frobnicate" in msg and "exited with status 3" in msg, msg
    assert yarn.stack.live_kernels() == []


def test_impersonation_needs_a_user(yarn: YarnStack) -> None:
    r = yarn.stack.gw.post("/api/kernels", json={"name": "py-yarn"})
    assert r.status_code == 500, r.text
    assert "has no KERNEL_USERNAME" in r.json()["message"]


def test_spec_whose_process_proxy_has_no_pool_is_refused(yarn: YarnStack) -> None:
    gw = yarn.stack.gw
    r = gw.post("/api/kernels", json={"name": "py-k8s"})
    assert r.status_code == 400, r.text
    assert r.json()["reason"] == "kernelspec_unserved"
    assert "KubernetesProcessProxy" in r.json()["message"] and "process_proxy_map" in \
        r.json()["message"]
    specs = gw.get("/api/kernelspecs").json()["kernelspecs"]
    assert "py-k8s" not in specs and "py-yarn" in specs
    assert yarn.stack.live_kernels() == []


def test_restarted_worker_adopts_its_application(yarn: YarnStack) -> None:
    gw = yarn.stack.gw
    kid = gw.start("py-yarn", env={"KERNEL_USERNAME": "alice"})["id"]
    try:
        yarn.stack.kill_worker("yarn")
        yarn.stack.start_worker("yarn")
        ch = gw.channel(kid)
        assert ch.execute("6*7").result == "42"
        ch.close()
        assert "adopted by worker" in yarn.stack.log("worker-yarn")
        assert [a.state for a in apps_of(yarn, kid)] == ["RUNNING"]
    finally:
        gw.shutdown(kid)


def test_application_that_ends_is_restarted_then_dead(yarn: YarnStack) -> None:
    """The RM gives up on a kernel's AM (or loses its node): the supervisor sees the
    application FAILED, starts the kernel again in a new application (max_restarts: 1), and
    the second time marks it dead with the RM's diagnostics."""
    gw = yarn.stack.gw
    kid = gw.start("py-yarn", env={"KERNEL_USERNAME": "alice"})["id"]
    try:
        (first,) = apps_of(yarn, kid)
        yarn.active.expire(first.id)
        deadline = time.monotonic() + 30
        while len(apps_of(yarn, kid)) < 2 and time.monotonic() < deadline:
            time.sleep(0.2)
        second = max(apps_of(yarn, kid), key=lambda a: a.id)
        ch = gw.channel(kid)
        assert ch.execute("6*7", timeout=30).result == "42"  # the same kernel id, a new app
        ch.close()
        yarn.active.expire(second.id)
        gw.wait_state(kid, "dead", timeout=30)
        assert "timed out. Failing the application" in yarn.stack.log("worker-yarn")
        assert [a.state for a in apps_of(yarn, kid)] == ["FAILED", "FAILED"]
    finally:
        gw.shutdown(kid)


def shown(res: Any) -> str:
    """What a cell showed as text (IRkernel sends display_data where ipykernel sends
    execute_result)."""
    for m in res.messages:
        if m["msg_type"] in ("execute_result", "display_data"):
            return str(m["content"]["data"].get("text/plain", ""))
    return ""


@pytest.mark.parametrize("pool_name", ["local", "yarn"])
def test_r_kernel(yarn: YarnStack, pool_name: str) -> None:
    if shutil.which("R") is None:
        pytest.fail("R is not installed; .ci/run installs r-cran-irkernel")
    gw = yarn.stack.gw
    kid = gw.start(f"ir-{pool_name}", env={"KERNEL_USERNAME": "alice"})["id"]
    try:
        ch = gw.channel(kid)
        assert shown(ch.execute("6 * 7", timeout=60)) == "[1] 42"
        res = ch.execute("for (i in 1:3) cat('tick', i, '\\n')")
        assert res.stdout.split() == ["tick", "1", "tick", "2", "tick", "3"]
        mid = ch.start_cell("cat('sleeping\\n'); flush(stdout()); Sys.sleep(60)", timeout=60)
        t0 = time.monotonic()
        assert gw.post(f"/api/kernels/{kid}/interrupt").status_code == 204
        ch.collect(mid, timeout=20)
        assert time.monotonic() - t0 < 20
        assert shown(ch.execute("x <- 5; x")) == "[1] 5"
        r = gw.post(f"/api/kernels/{kid}/restart")
        assert r.status_code == 200, r.text
        assert shown(ch.execute("exists('x')", timeout=60)) == "[1] FALSE"
        ch.close()
    finally:
        gw.shutdown(kid)


def stdout_until(ch: Any, mid: str, text: str, timeout: float) -> Any:
    """Read request ``mid``'s messages until its stdout shows ``text``; collect() goes on
    from the returned Result."""
    from tests.client import Result

    res = Result()
    deadline = time.monotonic() + timeout
    while text not in res.stdout:
        msg = ch.recv(max(0.1, deadline - time.monotonic()))
        assert time.monotonic() < deadline, f"no {text!r} in {timeout}s: {res.stdout!r}"
        if msg.get("parent_header", {}).get("msg_id") != mid:
            continue
        res.messages.append(msg)
        if msg["msg_type"] == "stream" and msg["content"]["name"] == "stdout":
            res.out.append(msg["content"]["text"])
        assert msg["msg_type"] != "execute_reply", f"the cell ended: {msg['content']}"
    return res


def start_spark(gw: Any, mode: str) -> str:
    """A Spark kernel on the yarn pool, with this test's extra options. A JVM takes its time
    on a busy machine (up to 191 s seen for eager under load): the launch may take 300 s."""
    if shutil.which("java") is None:
        pytest.fail("java is not installed; .ci/run installs default-jre-headless")
    r = gw.post("/api/kernels", timeout=330, json={"name": "spark-yarn", "env": {
        "KERNEL_USERNAME": "alice", "KERNEL_EXTRA_SPARK_OPTS": SPARK_OPTS,
        "KERNEL_SPARK_CONTEXT_INIT_MODE": mode, "KERNEL_LAUNCH_TIMEOUT": "300"}})
    assert r.status_code == 201, r.text
    return str(r.json()["id"])


@pytest.mark.timeout(900)  # a JVM on this loaded machine: up to 191 s to start, seen
@pytest.mark.parametrize("mode", ["eager", "lazy"])
def test_spark_kernel_runs_a_job(yarn: YarnStack, mode: str) -> None:
    """KERNEL_SPARK_CONTEXT_INIT_MODE: eager has the SparkContext before the first cell, lazy
    creates it when a cell first touches ``spark``; KERNEL_EXTRA_SPARK_OPTS reach spark-submit."""
    gw = yarn.stack.gw
    kid = start_spark(gw, mode)
    try:
        ch = gw.channel(kid)
        res = ch.execute("from pyspark import SparkContext\n"
                         "print(SparkContext._active_spark_context is not None)", timeout=300)
        assert res.stdout.split() == [str(mode == "eager")], res.stdout
        res = ch.execute("print(spark.range(1000).selectExpr('sum(id)').first()[0], sc.master, "
                         "sc.parallelize(range(1000), 4).map(lambda x: x * x).sum(), "
                         "sc.appName == KERNEL_ID, sc.getConf().get('spark.driver.memory'), "
                         "repr(sc.getConf().get('spark.poolgate.note')))".replace(
                             "KERNEL_ID", repr(kid)), timeout=300)
        assert res.status == "ok", (res.error or {}).get("evalue", "")[:3000]
        assert res.stdout.split() == ["499500", "local[2]", "332833500", "True", "512m",
                                      "'a", "b'"], res.stdout
        ch.close()
    finally:
        gw.shutdown(kid)


@pytest.mark.timeout(900)
def test_spark_interrupt_cancels_the_running_job(yarn: YarnStack) -> None:
    """An interrupt during a long Spark job ends the cell with KeyboardInterrupt, cancels the
    job in Spark (its job group's job FAILED, none active), and the kernel runs the next job."""
    gw = yarn.stack.gw
    kid = start_spark(gw, "eager")
    try:
        ch = gw.channel(kid)
        mid = ch.send("execute_request", {"silent": False, "code": (
            "import threading, time\n"
            "def say_when_running():\n"
            "    while not sc.statusTracker().getActiveJobsIds(): time.sleep(0.05)\n"
            "    print('job running', flush=True)\n"
            "threading.Thread(target=say_when_running).start()\n"
            "sc.setJobGroup('long', 'sleeps')\n"
            "sc.parallelize(range(2), 2).map(lambda x: time.sleep(300)).count()")})
        res = stdout_until(ch, mid, "job running", timeout=300)
        t0 = time.monotonic()
        assert gw.post(f"/api/kernels/{kid}/interrupt").status_code == 204
        res = ch.collect(mid, timeout=60, into=res)
        assert res.error and res.error["ename"] == "KeyboardInterrupt", res.error
        assert time.monotonic() - t0 < 30
        res = ch.execute("import time\nst = sc.statusTracker()\nids = st.getJobIdsForGroup("
                         "'long')\nend = time.time() + 30\nwhile st.getActiveJobsIds() and "
                         "time.time() < end: time.sleep(0.1)\n"
                         "print(len(ids), [st.getJobInfo(i).status for i in ids], "
                         "st.getActiveJobsIds())", timeout=300)
        assert res.stdout.split() == ["1", "['FAILED']", "[]"], res.stdout
        assert ch.execute("sc.parallelize(range(10)).sum()", timeout=300).result == "45"
        ch.close()
    finally:
        gw.shutdown(kid)


def test_dask_kernel_runs_on_yarn_and_its_cluster_is_tagged_with_the_kernel(
        yarn: YarnStack) -> None:
    """As far as the test RM goes: the dask_python_yarn spec routes to the yarn pool by its
    EG process proxy and its kernel runs there with ``cluster`` and ``client`` not yet made;
    the YarnCluster it would make carries the kernel's tag (so stopping the kernel kills the
    workers' application too) and the client's sizes. Making it needs skein's Hadoop RPC,
    which no server here speaks: without dask-yarn the cell says what to install."""
    gw = yarn.stack.gw
    model = gw.start("dask-yarn", env={"KERNEL_USERNAME": "alice", "KERNEL_DASK_WORKERS": "3"})
    kid = model["id"]
    try:
        assert model["poolgate"]["pool"] == "yarn"
        ch = gw.channel(kid)
        res = ch.execute("import os\nfrom poolgate.dask_kernel import build_dask_cluster_args\n"
                         "a = build_dask_cluster_args(os.environ)\n"
                         "print(type(cluster).__name__, a['n_workers'], a['tags'][-1])")
        assert res.stdout.split() == ["Lazy", "3", f"poolgate.kernel_id:{kid}"], res
        res = ch.execute("client.dashboard_link", timeout=120)
        assert res.error, res  # no YARN for skein here
        if res.error["ename"] == "ImportError":  # dask-yarn is an extra: not installed here
            assert "pip install 'poolgate[dask-yarn]'" in res.error["evalue"], res.error
        assert ch.execute("6*7").result == "42"
        ch.close()
        r = gw.post("/api/kernels", json={"name": "dask-yarn", "env": {
            "KERNEL_USERNAME": "alice", "KERNEL_DASK_WORKERS": "99"}})
        assert r.status_code == 400, r.text  # refused by the gateway: nothing queued
        assert "env.KERNEL_DASK_WORKERS=99: this kernelspec allows at most 16" in r.text
        assert [k["id"] for k in gw.get("/api/kernels").json()] == [kid]
    finally:
        gw.shutdown(kid)
