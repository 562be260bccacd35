"""The kubernetes launcher's I/O half against FakeKubernetes: the pod watch (410 relist), the
error mapping, and state() on the pod JSON the API returns."""
from __future__ import annotations

import json
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from poolgate.workers.config import PoolConfig, build
from poolgate.workers.errors import BackendUnavailable, LaunchRejected
from poolgate.workers.launchers.docker_builders import resource_name
from poolgate.workers.launchers.k8s_builders import (
    KubernetesOptions,
    build_labels,
    build_namespace,
    build_secret,
)
from poolgate.workers.launchers.kubernetes import KubernetesLauncher, api_errors
from poolgate.workers.protocol import KernelHandle, LaunchRequest
from tests.k8s_api import FakeKubernetes

POD = {"apiVersion": "v1", "kind": "Pod",
       "metadata": {"name": "poolgate-k1", "labels": {"poolgate.kernel_id": "k1",
                                                      "poolgate.pool": "k8s"}},
       "spec": {"restartPolicy": "Never",
                "containers": [{"name": "kernel", "image": "img:1",
                                "command": ["sleep", "30"]}]}}


@pytest.fixture
def api(tmp_path: Path) -> Iterator[FakeKubernetes]:
    server = FakeKubernetes(tmp_path, {"img:1": {"PATH": "/usr/bin:/bin"}}).start()
    yield server
    server.stop()


@pytest.fixture
def launcher(api: FakeKubernetes, tmp_path: Path) -> Iterator[KubernetesLauncher]:
    opts = build(KubernetesOptions, {"kubeconfig": str(api.kubeconfig(tmp_path / "kc")),
                                     "watch_timeout": 2}, "pools.k8s.options")
    lau = KubernetesLauncher(PoolConfig(name="k8s", launcher="kubernetes"), opts, str(tmp_path))
    yield lau
    lau.close()


def wait(cond: object, timeout: float = 10) -> None:
    deadline = time.monotonic() + timeout
    while not cond() and time.monotonic() < deadline:  # type: ignore[operator]
        time.sleep(0.05)


def test_watch_follows_pods_and_lists_again_after_410(api: FakeKubernetes,
                                                       launcher: KubernetesLauncher) -> None:
    watcher = launcher.watcher
    assert watcher.synced.wait(30)  # the first list imports the client: slow on a busy machine
    api.create("pods", "default", POD)
    wait(lambda: watcher.pods.get("k1", {}).get("status", {}).get("phase") == "Running")
    assert watcher.pods["k1"]["status"]["podIP"].startswith("127.")
    wait(lambda: api.expire_watches() > 0)
    api.delete("pods", "default", "poolgate-k1", 0)
    wait(lambda: "k1" not in watcher.pods)
    assert "k1" not in watcher.pods and watcher.relists == 1
    watches = [r for r in api.requests if "watch=true" in r]
    assert watches and all("resourceVersion=" in r for r in watches)
    reads = [r for r in api.requests if r.startswith("GET /api/v1/namespaces/default/pods/")]
    assert reads == []  # watched, not polled


def test_state_reads_the_pods_status(api: FakeKubernetes, launcher: KubernetesLauncher) -> None:
    handle = KernelHandle("k1", "k8s", host="", data={"pod": "poolgate-k1",
                                                       "namespace": "default"})
    assert launcher.state(handle)[0] == "its pod poolgate-k1 is gone"
    api.create("pods", "default", {**POD, "spec": {**POD["spec"],  # type: ignore[dict-item]
                                                   "nodeSelector": {"gpu": "h100"}}})
    wait(lambda: "Unschedulable" in str(launcher.state(handle)[1]))
    why, word = launcher.state(handle)
    assert why is None and "didn't match Pod's node affinity/selector" in word
    assert "FailedScheduling" in launcher.timeout_reason(handle, word)
    assert launcher.remove_labelled("k1", grace=0) == 1
    assert api.list("pods") == []


def test_errors_are_mapped() -> None:
    with pytest.raises(LaunchRejected, match="409 Conflict: pods \"x\" already exists"):
        with api_errors("kernel k1"):
            raise _exc(409, "Conflict", 'pods "x" already exists')
    with pytest.raises(BackendUnavailable, match="503"):
        with api_errors("kernel k1"):
            raise _exc(503, "Service Unavailable", "etcd is down")
    with pytest.raises(BackendUnavailable, match="unreachable"):
        with api_errors("kernel k1"):
            raise ConnectionRefusedError("refused")


def _exc(code: int, reason: str, message: str) -> Exception:
    import json

    import kubernetes

    exc = kubernetes.client.ApiException(status=code, reason=reason)
    exc.body = json.dumps({"kind": "Status", "message": message, "code": code})
    return exc  # type: ignore[no-any-return]


# -- per-user namespaces: a launch and the last kernel's clean-up, racing --------------------

USER_NS = "poolgate-alice"


@pytest.fixture
def per_user(api: FakeKubernetes, tmp_path: Path) -> Iterator[KubernetesLauncher]:
    opts = build(KubernetesOptions, {"kubeconfig": str(api.kubeconfig(tmp_path / "kc2")),
                                     "watch_timeout": 2, "per_user_namespace": True,
                                     "image": "img:1", "api_timeout": 20}, "pools.k8s.options")
    lau = KubernetesLauncher(PoolConfig(name="k8s", launcher="kubernetes"), opts, str(tmp_path))
    yield lau
    lau.close()


def manifests(launcher: KubernetesLauncher, kid: str) -> tuple[LaunchRequest, dict[str, Any],
                                                                   dict[str, Any]]:
    """A kernel's request, Secret and pod (a sleep: these tests are about the namespace)."""
    req = LaunchRequest(kernel_id=kid, pool="k8s", spec_name="py", argv=("sleep", "30"),
                        user="alice")
    reply = {"POOLGATE_RESPONSE_KEY": "k", "POOLGATE_RESPONSE_TOKEN": "t"}
    secret = build_secret(req, launcher.options, USER_NS, reply)
    pod = {**POD, "metadata": {"name": resource_name(kid), "namespace": USER_NS,
                               "labels": build_labels(req, launcher.options)}}
    return req, secret, pod


def handle(kid: str) -> KernelHandle:
    return KernelHandle(kid, "k8s", host="", data={"pod": resource_name(kid),
                                                   "namespace": USER_NS, "owned": True})


def namespace(api: FakeKubernetes) -> dict[str, Any] | None:
    found = api.list("namespaces", labels="poolgate.managed=true")
    return found[0] if found else None


def test_a_launch_into_a_terminating_namespace_waits_and_makes_it_again(
        api: FakeKubernetes, per_user: KubernetesLauncher) -> None:
    req, secret, pod = manifests(per_user, "k1")
    per_user._create_in_user_namespace(USER_NS, req, secret, pod)
    old = namespace(api)
    assert old and old["metadata"]["annotations"]["poolgate.last-launch"].endswith(" k1")
    api.namespace_linger = 1.5  # a real namespace controller takes seconds
    per_user.stop(handle("k1"), grace=0)
    assert namespace(api)["status"]["phase"] == "Terminating"  # type: ignore[index]
    req, secret, pod = manifests(per_user, "k2")
    per_user._create_in_user_namespace(USER_NS, req, secret, pod)
    new = namespace(api)
    assert new and new["status"]["phase"] == "Active"
    assert new["metadata"]["uid"] != old["metadata"]["uid"]  # made again, not the dying one
    assert [p["metadata"]["name"] for p in api.list("pods", USER_NS)] == [resource_name("k2")]
    per_user.stop(handle("k2"), grace=0)
    wait(lambda: namespace(api) is None)
    assert namespace(api) is None and api.list("pods") == []


def test_the_cleanup_keeps_a_namespace_a_kernel_is_being_launched_into(
        api: FakeKubernetes, per_user: KubernetesLauncher,
        monkeypatch: pytest.MonkeyPatch) -> None:
    """k1's clean-up finds no kernel in the namespace; before it deletes it, k2 is launched
    there. The delete's precondition (the resourceVersion it found) fails on k2's claim."""
    req, secret, pod = manifests(per_user, "k1")
    per_user._create_in_user_namespace(USER_NS, req, secret, pod)
    client = per_user.client
    real_list = client.list_namespaced_secret
    launched: list[str] = []

    def list_then_launch(ns: str, **kw: Any) -> Any:
        found = real_list(ns, **kw)
        if kw.get("label_selector") == "poolgate.managed=true" and not launched:
            launched.append("k2")  # between the clean-up's look and its delete
            per_user._create_in_user_namespace(USER_NS, *manifests(per_user, "k2"))
        return found

    monkeypatch.setattr(client, "list_namespaced_secret", list_then_launch)
    per_user.stop(handle("k1"), grace=0)
    assert launched == ["k2"]
    assert namespace(api)["status"]["phase"] == "Active"  # type: ignore[index]
    wait(lambda: [p["status"]["phase"] for p in api.list("pods", USER_NS)] == ["Running"])
    assert [p["metadata"]["name"] for p in api.list("pods", USER_NS)] == [resource_name("k2")]
    monkeypatch.undo()
    per_user.stop(handle("k2"), grace=0)
    wait(lambda: namespace(api) is None)
    assert namespace(api) is None


def test_a_launch_whose_namespace_is_deleted_after_its_secret_starts_again(
        api: FakeKubernetes, per_user: KubernetesLauncher,
        monkeypatch: pytest.MonkeyPatch) -> None:
    """The other order: a clean-up that looked before k2's Secret deletes the namespace before
    k2's claim (its precondition still holds). k2's claim sees Terminating; k2 waits it out,
    makes the namespace again and creates its Secret and pod there."""
    req, secret, pod = manifests(per_user, "k2")
    api.create("namespaces", "", build_namespace(USER_NS, req))
    api.namespace_linger = 1.0
    real_claim = per_user._claim
    claims: list[str] = []

    def deleted_first(name: str, r: LaunchRequest) -> bool:
        if not claims:
            api.delete("namespaces", "", name, None)
        claims.append(api.list("namespaces", labels="poolgate.managed=true")[0]["status"]
                      ["phase"] if namespace(api) else "Gone")
        return real_claim(name, r)

    monkeypatch.setattr(per_user, "_claim", deleted_first)
    per_user._create_in_user_namespace(USER_NS, req, secret, pod)
    assert claims == ["Terminating", "Active"]
    wait(lambda: [p["status"]["phase"] for p in api.list("pods", USER_NS)] == ["Running"])
    assert [s["metadata"]["name"] for s in api.list("secrets", USER_NS)] == [resource_name("k2")]
    per_user.stop(handle("k2"), grace=0)
    wait(lambda: namespace(api) is None)
    assert namespace(api) is None


def test_fake_api_server_models_a_terminating_namespace(api: FakeKubernetes,
                                                        per_user: KubernetesLauncher) -> None:
    """As a real API server answers: 409 for a namespace that exists, 403 Forbidden
    (NamespaceTerminating) for anything created in one being deleted, 409 for a second delete
    and for a delete whose precondition no longer holds."""
    import kubernetes

    client, ApiException = per_user.client, kubernetes.client.ApiException
    req, secret, pod = manifests(per_user, "k1")
    client.create_namespace(build_namespace(USER_NS, req))
    with pytest.raises(ApiException) as exc:
        client.create_namespace(build_namespace(USER_NS, req))
    assert exc.value.status == 409 and "AlreadyExists" in exc.value.body
    version = client.read_namespace(USER_NS).metadata.resource_version
    per_user._claim(USER_NS, req)
    stale = kubernetes.client.V1DeleteOptions(
        preconditions=kubernetes.client.V1Preconditions(resource_version=version))
    with pytest.raises(ApiException) as exc:
        client.delete_namespace(USER_NS, body=stale)
    assert exc.value.status == 409 and "Precondition failed" in exc.value.body
    api.namespace_linger = 1.0
    client.delete_namespace(USER_NS)
    with pytest.raises(ApiException) as exc:
        client.create_namespaced_pod(USER_NS, pod)
    body = json.loads(exc.value.body)
    assert exc.value.status == 403 and body["reason"] == "Forbidden"
    assert "because it is being terminated" in body["message"]
    assert body["details"]["causes"][0]["reason"] == "NamespaceTerminating"
    with pytest.raises(ApiException) as exc:
        client.delete_namespace(USER_NS)
    assert exc.value.status == 409 and "ensuring all content is removed" in exc.value.body
    wait(lambda: namespace(api) is None)
    assert namespace(api) is None


class FakeExpectation:
    """What create() reads from a reply expectation: the kernel launcher's env."""

    def env(self) -> dict[str, str]:
        return {"POOLGATE_RESPONSE_KEY": "k", "POOLGATE_RESPONSE_TOKEN": "t",
                "POOLGATE_RESPONSE_ADDRESS": "127.0.0.1:1"}


def test_a_refused_pod_leaves_no_secret_and_no_namespace(
        api: FakeKubernetes, per_user: KubernetesLauncher,
        monkeypatch: pytest.MonkeyPatch) -> None:
    """create() fails after the namespace and Secret exist; no handle was yielded, so no stop()
    will come: create() removes them itself."""
    import kubernetes

    def refused(ns: str, body: Any) -> Any:
        raise kubernetes.client.ApiException(status=422, reason="Unprocessable Entity")

    monkeypatch.setattr(per_user.client, "create_namespaced_pod", refused)
    req = LaunchRequest(kernel_id="k1", pool="k8s", spec_name="py", argv=("python3", "-c", "1"),
                        user="alice")
    per_user._namespaces["k1"] = (USER_NS, True)
    with pytest.raises(kubernetes.client.ApiException):
        per_user.create(req, FakeExpectation())  # type: ignore[arg-type]
    assert api.list("secrets") == []
    wait(lambda: namespace(api) is None)
    assert namespace(api) is None
