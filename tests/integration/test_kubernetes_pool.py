"""kubernetes pools through the gateway's REST and WebSocket API, against tests/k8s_api.py.

No Kubernetes API server can run on the project's machines, so the worker's official kubernetes
client talks to FakeKubernetes, started here: its pods' commands run as local processes with
loopback pod IPs, so each kernel really starts through the kernel launcher, reports back,
runs code and is removed. Each test checks that no pod, secret or per-user namespace is left.
"""
from __future__ import annotations

import contextlib
import json
import os
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlparse

import pytest
import redis
import yaml

from tests.client import Gateway
from tests.conftest import RUN_ID, STACKS, PrivateRedis, Stack
from tests.k8s_api import FakeKubernetes

IMAGE = "poolgate/kernel:latest"
KERNEL_ARGV = ["python", "-m", "ipykernel_launcher", "-f", "{connection_file}"]
ROOT = Path(__file__).resolve().parents[2]
TEST_LABEL = f"poolgate.test_run={RUN_ID}"


def pool(queue: str, kubeconfig: Path, timeout: float = 60, **options: Any) -> dict[str, Any]:
    return {"launcher": "kubernetes", "queue": queue, "heartbeat_ttl": 3.0, "slots": 4,
            "launch_timeout": timeout, "max_restarts": 1,
            "options": {"image": IMAGE, "labels": {"poolgate.test_run": RUN_ID},
                        "kubeconfig": str(kubeconfig), "response_address": "127.0.0.1",
                        "response_bind": "127.0.0.1", "poll_interval": 1, "watch_timeout": 5,
                        **options}}


class K8sStack(Stack):
    api: FakeKubernetes


@contextlib.contextmanager
def fake_cluster(tmp: Path) -> Iterator[tuple[FakeKubernetes, Path, str]]:
    """FakeKubernetes (its kubelet running the test image's kernels under ``tmp``) and a private
    Redis: (api, kubeconfig, Redis URL); both stopped afterwards."""
    (tmp / "kubelet").mkdir()
    image_env = {"PATH": f"{os.path.dirname(sys.executable)}:/usr/bin:/bin",
                 "PYTHONPATH": str(ROOT), "HOME": str(tmp), "POOLGATE_TEST_RUN": RUN_ID}
    api = FakeKubernetes(tmp / "kubelet", {IMAGE: image_env}, cpu="4", memory="16Gi").start()
    server = PrivateRedis(tmp)
    try:
        server.start()
        yield api, api.kubeconfig(tmp / "kubeconfig"), f"redis://127.0.0.1:{server.port}"
    finally:
        server.kill()
        api.stop()


def running(stack: K8sStack, pools: list[str]) -> Iterator[K8sStack]:
    """``stack`` with a worker for each of ``pools`` and a gateway, for a module's tests."""
    try:
        for name in pools:
            stack.start_worker(name)
        stack.start_gateway(stack.port)
    except BaseException:
        stack.stop()
        raise
    STACKS.append(stack)
    try:
        yield stack
    finally:
        stack.stop()
        STACKS.remove(stack)


@pytest.fixture(scope="module")
def k8s_stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[K8sStack]:
    """A private Redis, FakeKubernetes, a gateway, and workers for two kubernetes pools."""
    with fake_cluster(tmp_path_factory.mktemp("k8s-stack")) as (api, kubeconfig, url):
        yield from k8s_pools_stack(api, kubeconfig, url)


def k8s_pools_stack(api: FakeKubernetes, kubeconfig: Path, url: str) -> Iterator[K8sStack]:
    tmp = kubeconfig.parent
    tag = f"t{RUN_ID}k"
    pools = {"local": {"launcher": "local", "queue": f"{tag}-local", "slots": 1},
             "k8s": pool(f"{tag}-k8s", kubeconfig, namespace="kernels"),
             "k8s-user": pool(f"{tag}-k8s-user", kubeconfig, per_user_namespace=True,
                              network_policy_namespace="poolgate")}
    api.create("namespaces", "", {"metadata": {"name": "kernels"}})
    stack = K8sStack(tmp, url, db=1, redis_url=url, pools=pools)
    stack.api = api
    specs = tmp / "specs"
    for name, target, argv, image in (
            ("py-k8s", "k8s", KERNEL_ARGV, None),
            ("py-k8s-user", "k8s-user", KERNEL_ARGV, None),
            ("noimage-k8s", "k8s", KERNEL_ARGV, "poolgate/no-such-image:1")):
        (specs / name).mkdir()
        resources = {"image": image} if image else {}
        (specs / name / "kernel.json").write_text(json.dumps({
            "argv": argv, "display_name": name, "language": "python",
            "metadata": {"poolgate": {"pool": target, "resources": resources}}}))
    (specs / "tiny-py" / "kernel.json").unlink()  # routes to a pool this stack lacks
    (specs / "tiny-py").rmdir()
    redis.Redis.from_url(stack.registry_url).flushdb()
    yield from running(stack, ["k8s", "k8s-user"])


def left(api: FakeKubernetes) -> list[str]:
    """This run's pods, secrets and per-user namespaces still there."""
    out = [f"{o['kind'] if 'kind' in o else kind}/{o['metadata'].get('namespace', '')}/"
           f"{o['metadata']['name']}" for kind in ("pods", "secrets")
           for o in api.list(kind, labels=TEST_LABEL)]
    return out + [f"namespace/{o['metadata']['name']}" for o in
                  api.list("namespaces", labels="poolgate.managed=true")]


@pytest.fixture(autouse=True)
def nothing_left(k8s_stack: K8sStack) -> Iterator[None]:
    yield
    deadline = time.monotonic() + 20
    while left(k8s_stack.api) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not left(k8s_stack.api), "left behind"


def pid_of(gw: Gateway, kid: str) -> str:
    ch = gw.channel(kid)
    try:
        res = ch.execute("import os; print(os.getpid(), os.environ['KERNEL_ID'])")
        assert res.status == "ok", res
        return res.stdout.split()[0]
    finally:
        ch.close()


def test_launch_run_interrupt_restart_shutdown(k8s_stack: K8sStack) -> None:
    gw, api = k8s_stack.gw, k8s_stack.api
    t0 = time.monotonic()
    kid = gw.start("py-k8s")["id"]
    launched = time.monotonic() - t0
    try:
        pods = api.list("pods", "kernels", f"poolgate.kernel_id={kid}")
        assert [p["status"]["phase"] for p in pods] == ["Running"]
        model = gw.get(f"/api/kernels/{kid}").json()
        assert model["poolgate"]["host"] == pods[0]["status"]["podIP"]  # the pod's own IP
        assert api.list("secrets", "kernels", f"poolgate.kernel_id={kid}")
        ch = gw.channel(kid)
        res = ch.execute("import time\nfor i in range(3):\n    print('tick', i, flush=True)\n"
                         "    time.sleep(0.3)")
        assert res.stdout.split() == ["tick", "0", "tick", "1", "tick", "2"]
        names = ch.execute("import os; print(sorted(os.environ))").stdout
        for secret in ("POOLGATE_RESPONSE_KEY", "POOLGATE_RESPONSE_TOKEN", "REDIS", "BROKER"):
            assert secret not in names, names
        mid = ch.start_cell()  # returns once the cell runs
        assert gw.post(f"/api/kernels/{kid}/interrupt").status_code == 204
        res = ch.collect(mid, timeout=20)
        assert res.error and res.error["ename"] == "KeyboardInterrupt"
        assert ch.execute("x = 5; x").result == "5"
        ch.close()
        before = pid_of(gw, kid), pods[0]["metadata"]["uid"]
        r = gw.post(f"/api/kernels/{kid}/restart")
        assert r.status_code == 200, r.text
        ch = gw.channel(kid)
        assert ch.execute("'x' in dir()", timeout=30).result == "False"
        ch.close()
        pods = api.list("pods", "kernels", f"poolgate.kernel_id={kid}")
        assert len(pods) == 1 and pods[0]["metadata"]["uid"] != before[1]  # a new pod
    finally:
        gw.shutdown(kid)
    deadline = time.monotonic() + 20
    while left(api) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not left(api)
    print(f"launched in {launched:.1f}s")


def test_per_user_namespace_is_created_and_removed(k8s_stack: K8sStack) -> None:
    gw, api = k8s_stack.gw, k8s_stack.api
    kids = [gw.start("py-k8s-user", env={"KERNEL_USERNAME": "alice"})["id"] for _ in range(2)]
    try:
        assert [p["metadata"]["namespace"] for p in api.list("pods", labels=TEST_LABEL)] == \
            ["poolgate-alice"] * 2
        [policy] = api.list("networkpolicies", "poolgate-alice")  # made with the namespace
        assert policy["spec"]["ingress"][0]["from"][0]["namespaceSelector"] == {
            "matchLabels": {"kubernetes.io/metadata.name": "poolgate"}}
        ch = gw.channel(kids[0])
        assert ch.execute("6*7").result == "42"
        ch.close()
        gw.shutdown(kids[0])
        assert [n["metadata"]["name"] for n in api.list(
            "namespaces", labels="poolgate.managed=true")] == ["poolgate-alice"]  # one kernel left
    finally:
        for kid in kids:
            gw.shutdown(kid)


def test_unschedulable_pod_fails_at_the_launch_timeout_with_the_events_reason(
        k8s_stack: K8sStack) -> None:
    t0 = time.monotonic()
    r = k8s_stack.gw.post("/api/kernels", json={"name": "py-k8s", "env": {
        "KERNEL_MEMORY": "4096Gi", "KERNEL_LAUNCH_TIMEOUT": "8"}})
    took = time.monotonic() - t0
    assert r.status_code == 503, r.text  # did not start in time (README, "The API")
    msg = r.json()["message"]
    assert "FailedScheduling" in msg and "Insufficient memory" in msg, msg
    assert 5 < took < 8 + 2, f"took {took:.0f}s for a launch timeout of 8s"
    assert k8s_stack.live_kernels() == []


def test_missing_image_fails_at_once_with_the_pull_error(k8s_stack: K8sStack) -> None:
    t0 = time.monotonic()
    r = k8s_stack.gw.post("/api/kernels", json={"name": "noimage-k8s"})
    assert r.status_code == 500, r.text  # a launch that failed (README, "The API")
    msg = r.json()["message"]
    assert "ErrImagePull" in msg and "poolgate/no-such-image:1" in msg, msg
    assert time.monotonic() - t0 < 20
    assert k8s_stack.live_kernels() == []


def test_expired_watch_is_listed_again_and_followed(k8s_stack: K8sStack) -> None:
    gw, api = k8s_stack.gw, k8s_stack.api
    kid = gw.start("py-k8s")["id"]
    try:
        deadline = time.monotonic() + 10
        while not api.expire_watches() and time.monotonic() < deadline:
            time.sleep(0.2)  # the worker's watch may be between two requests
        deadline = time.monotonic() + 10
        while "listing pods again" not in k8s_stack.log("worker-k8s") and \
                time.monotonic() < deadline:
            time.sleep(0.2)
        assert "watch expired (410 Gone); listing pods again" in k8s_stack.log("worker-k8s")
        # the kernel's pod dies behind the worker's back: the renewed watch tells it
        pod = api.kubelet[("kernels", f"poolgate-{kid}")]
        os.killpg(pod.proc.pid, 9)
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            rec = gw.get(f"/api/kernels/{kid}").json()
            if rec["execution_state"] in ("dead", "restarting") or \
                    rec.get("poolgate", {}).get("restarts"):
                break
            time.sleep(0.2)
        assert "its pod ended (Failed)" in k8s_stack.log("worker-k8s")
    finally:
        gw.shutdown(kid)


def test_restarted_worker_adopts_its_kernels(k8s_stack: K8sStack) -> None:
    gw = k8s_stack.gw
    kid = gw.start("py-k8s")["id"]
    try:
        k8s_stack.kill_worker("k8s")
        k8s_stack.start_worker("k8s")
        ch = gw.channel(kid)
        assert ch.execute("6*7").result == "42"
        ch.close()
        assert k8s_stack.api.list("pods", "kernels", f"poolgate.kernel_id={kid}")
        assert "adopted by worker" in k8s_stack.log("worker-k8s")
    finally:
        gw.shutdown(kid)


def test_bad_kernel_namespace_is_refused_by_the_gateway(k8s_stack: K8sStack) -> None:
    """Refused with a 400 and the reason before anything is queued: no pod, no record."""
    gw, api = k8s_stack.gw, k8s_stack.api
    before = len(api.requests)
    for asked, reason in (("Team_A", "is not a namespace name: expected a DNS-1123 label"),
                          ("kube-system", "pool 'k8s' does not let kernels pick their namespace")):
        r = gw.post("/api/kernels", json={"name": "py-k8s", "env": {"KERNEL_NAMESPACE": asked}})
        assert r.status_code == 400, r.text
        message = r.json()["message"]
        assert message.startswith(f"env.KERNEL_NAMESPACE={asked!r}") and reason in message
    assert not [r for r in api.requests[before:] if r.startswith("POST")]
    assert gw.kernels() == [] and k8s_stack.live_kernels() == []


def test_a_users_kernel_starts_while_their_last_one_stops(k8s_stack: K8sStack) -> None:
    """The last kernel's stop deletes the user's namespace while the next one is launched into
    it: the new kernel still starts (in the namespace kept, or made again) and runs code."""
    gw, api = k8s_stack.gw, k8s_stack.api
    api.namespace_linger = 1.0  # Terminating lasts a while, as on a real cluster
    try:
        kid = gw.start("py-k8s-user", env={"KERNEL_USERNAME": "carol"})["id"]
        for _ in range(2):
            stopping = threading.Thread(target=gw.shutdown, args=(kid,))
            stopping.start()
            try:
                kid = gw.start("py-k8s-user", env={"KERNEL_USERNAME": "carol"})["id"]
            finally:
                stopping.join()
            ch = gw.channel(kid)
            assert ch.execute("6*7").result == "42"
            ch.close()
            pods = api.list("pods", "poolgate-carol", f"poolgate.kernel_id={kid}")
            assert [p["status"]["phase"] for p in pods] == ["Running"]
        gw.shutdown(kid)
    finally:
        api.namespace_linger = 0.0


# -- RBAC: what the workers really call, against docker/kubernetes/rbac.yaml -----------------


def api_call(line: str) -> tuple[str, str, str]:
    """(verb, resource, namespace) of one request the fake API server logged."""
    method, url = line.split(" ", 1)
    path, query = urlparse(url).path, parse_qs(urlparse(url).query)
    parts = path.split("/")[4 if path.startswith("/apis/") else 3:]  # after the group/version
    ns = ""
    if parts[0] == "namespaces" and len(parts) > 2:
        ns, parts = parts[1], parts[2:]
    resource = parts[0] + ("/" + parts[2] if len(parts) > 2 else "")
    named = len(parts) > 1
    verb = {"POST": "create", "DELETE": "delete", "PATCH": "patch", "PUT": "update"}.get(method)
    if verb is None:
        verb = "get" if named else "watch" if query.get("watch") in (["true"], ["True"],
                                                                      ["1"]) else "list"
    return verb, resource, ns


def rules(kind: str, name: str) -> set[tuple[str, str]]:
    docs = yaml.safe_load_all((ROOT / "docker" / "kubernetes" / "rbac.yaml").read_text())
    [role] = [d for d in docs if d["kind"] == kind and d["metadata"]["name"] == name]
    return {(v, r) for rule in role["rules"] for r in rule["resources"] for v in rule["verbs"]}


def test_rbac_grants_what_the_workers_call(k8s_stack: K8sStack) -> None:
    """Pool k8s (one namespace, a Role there) and pool k8s-user (namespaces per user, a
    ClusterRole): every call their workers make during launches, interrupt, restart, failed
    launches and shutdowns is granted, and what is granted is called. The one grant a run may
    not show is ``get pods``: the launcher reads a pod only when its watch has not seen it yet."""
    gw, api = k8s_stack.gw, k8s_stack.api
    before = len(api.requests)
    kid = gw.start("py-k8s")["id"]
    try:
        assert gw.post(f"/api/kernels/{kid}/interrupt").status_code == 204
        assert gw.post(f"/api/kernels/{kid}/restart").status_code == 200
    finally:
        gw.shutdown(kid)
    user_kid = gw.start("py-k8s-user", env={"KERNEL_USERNAME": "dave"})["id"]
    gw.shutdown(user_kid)
    r = gw.post("/api/kernels", json={"name": "noimage-k8s"})  # reads the pod's log
    assert r.status_code in (500, 503) and "ErrImagePull" in r.text, r.text
    r = gw.post("/api/kernels", json={"name": "py-k8s", "env": {  # lists the pod's events
        "KERNEL_MEMORY": "4096Gi", "KERNEL_LAUNCH_TIMEOUT": "3"}})
    assert r.status_code in (500, 503) and "FailedScheduling" in r.text, r.text
    deadline = time.monotonic() + 20
    while left(api) and time.monotonic() < deadline:
        time.sleep(0.2)  # the failed launches' clean-up is part of what is called
    calls = {api_call(line) for line in api.requests[before:]}
    pool_ns = k8s_stack.pools["k8s"]["options"]["namespace"]
    in_pool_ns = {(v, r) for v, r, ns in calls if ns == pool_ns}
    elsewhere = {(v, r) for v, r, ns in calls if ns != pool_ns}
    role = rules("Role", "poolgate-worker-k8s")
    cluster_role = rules("ClusterRole", "poolgate-worker-k8s-user")
    assert in_pool_ns <= role, in_pool_ns - role
    assert role - in_pool_ns <= {("get", "pods")}, role - in_pool_ns
    assert elsewhere <= cluster_role, elsewhere - cluster_role
    assert {(v, r) for v, r, ns in calls if ns.startswith("poolgate-dave") or r == "namespaces"}
    assert cluster_role - (elsewhere | in_pool_ns) <= {("get", "pods")}
    assert ("watch", "pods", "") in calls  # the per-user pool watches every namespace
    assert all(ns for v, r, ns in calls if r != "namespaces" and (v, r) != ("list", "pods")
               and (v, r) != ("watch", "pods"))  # nothing else cluster-wide
