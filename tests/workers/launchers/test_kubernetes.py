"""The kubernetes launcher's I/O half against FakeKubernetes: the pod watch (410 relist), the
error mapping, and state() on the pod JSON the API returns."""
from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from workers.config import PoolConfig, build
from workers.errors import BackendUnavailable, LaunchRejected
from workers.launchers.k8s_builders import KubernetesOptions
from workers.launchers.kubernetes import KubernetesLauncher, api_errors
from workers.protocol import KernelHandle
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
    assert watcher.synced.wait(5)
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
