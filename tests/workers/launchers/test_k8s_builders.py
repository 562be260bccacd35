"""The kubernetes builders against literal manifests; no API server."""
from __future__ import annotations

from typing import Any

import pytest

from poolgate.workers.config import PoolConfig, build
from poolgate.workers.errors import ConfigError, LaunchRejected
from poolgate.workers.launchers import resolve
from poolgate.workers.launchers.k8s_builders import (
    KubernetesOptions,
    admit,
    build_namespace,
    build_pod_manifest,
    build_secret,
    choose_namespace,
    label_value,
    namespace_refusal,
    slug,
)
from poolgate.workers.protocol import LaunchRequest

KID = "3f2a9c1e-8b7d-4e6f-a5b4-c3d2e1f0a9b8"
NAME = f"poolgate-{KID}"
REPLY = {"POOLGATE_RESPONSE_ADDRESS": "10.0.0.5:40000", "POOLGATE_RESPONSE_KEY": "k",
         "POOLGATE_RESPONSE_TOKEN": "t", "POOLGATE_LAUNCH_ID": "l", "POOLGATE_KERNEL_ID": KID}
ARGV = ("python", "-m", "ipykernel_launcher", "-f", "{connection_file}")
COMMAND = ["python3", "-m", "poolgate.kernel_launcher", "--ip", "$(POD_IP)", "--bind-ip",
           "$(POD_IP)", "--", "python3", "-m", "ipykernel_launcher", "-f", "{connection_file}"]
LABELS = {"poolgate.managed": "true", "poolgate.kernel_id": KID, "poolgate.pool": "k8s",
          "poolgate.user": "alice", "poolgate.kernelspec": "python3-k8s"}
POD_IP = {"name": "POD_IP", "valueFrom": {"fieldRef": {"fieldPath": "status.podIP"}}}
SECRET_ENV = [{"name": k, "valueFrom": {"secretKeyRef": {"name": NAME, "key": k}}}
              for k in ("POOLGATE_RESPONSE_KEY", "POOLGATE_RESPONSE_TOKEN")]
PLAIN_REPLY = [{"name": "POOLGATE_RESPONSE_ADDRESS", "value": "10.0.0.5:40000"},
               {"name": "POOLGATE_LAUNCH_ID", "value": "l"},
               {"name": "POOLGATE_KERNEL_ID", "value": KID}]


def request(env: dict[str, str] | None = None, user: str = "alice",
            **resources: Any) -> LaunchRequest:
    return LaunchRequest(kernel_id=KID, pool="k8s", spec_name="python3-k8s", argv=ARGV,
                         env={"KERNEL_USERNAME": user, **(env or {})}, user=user,
                         resources={"resource_dir": "/specs/x", **resources})


def options(**kw: Any) -> KubernetesOptions:
    return build(KubernetesOptions, {"image": "poolgate/kernel:latest", **kw}, "pools.k.options")


def test_registry_resolves_kubernetes() -> None:
    assert resolve("kubernetes").Options is KubernetesOptions


def test_pod_minimal() -> None:
    pod = build_pod_manifest(request(), options(), "default", REPLY)
    assert pod == {
        "apiVersion": "v1", "kind": "Pod",
        "metadata": {"name": NAME, "namespace": "default", "labels": LABELS},
        "spec": {
            "restartPolicy": "Never", "terminationGracePeriodSeconds": 2,
            "automountServiceAccountToken": False, "enableServiceLinks": False,
            "securityContext": {"runAsNonRoot": True},
            "containers": [{
                "name": "kernel", "image": "poolgate/kernel:latest",
                "imagePullPolicy": "IfNotPresent", "command": COMMAND,
                "env": [POD_IP, {"name": "KERNEL_USERNAME", "value": "alice"},
                        {"name": "KERNEL_ID", "value": KID}, *PLAIN_REPLY, *SECRET_ENV],
                "securityContext": {"allowPrivilegeEscalation": False},
            }],
        },
    }


def test_pod_gpu_kernel_with_selector_and_tolerations() -> None:
    opts = options(node_selector={"accelerator": "h100"}, cpus=0.5, memory="1Gi",
                   tolerations=[{"key": "nvidia.com/gpu", "operator": "Exists",
                                 "effect": "NoSchedule"}],
                   service_account="kernels", annotations={"team": "ml"})
    pod = build_pod_manifest(request(gpus=2, cpus=4.0), opts, "default", REPLY)
    want = {"cpu": "4000m", "memory": str(2**30), "nvidia.com/gpu": "2"}
    assert pod["spec"]["containers"][0]["resources"] == {"requests": want, "limits": want}
    assert pod["spec"]["nodeSelector"] == {"accelerator": "h100"}
    assert pod["spec"]["tolerations"] == [{"operator": "Exists", "key": "nvidia.com/gpu",
                                           "effect": "NoSchedule"}]
    assert pod["spec"]["serviceAccountName"] == "kernels"
    assert pod["spec"]["automountServiceAccountToken"] is True
    assert pod["metadata"]["annotations"] == {"team": "ml"}


def test_pod_volumes() -> None:
    opts = options(volumes=[
        {"name": "home", "mount_path": "/home/jovyan/work", "claim": "homes", "sub_path": "a"},
        {"name": "data", "mount_path": "/data", "host_path": "/srv/data", "read_only": True},
        {"name": "scratch", "mount_path": "/scratch", "empty_dir": True}])
    pod = build_pod_manifest(request(), opts, "default", REPLY)
    assert pod["spec"]["volumes"] == [
        {"name": "home", "persistentVolumeClaim": {"claimName": "homes", "readOnly": False}},
        {"name": "data", "hostPath": {"path": "/srv/data"}},
        {"name": "scratch", "emptyDir": {}}]
    assert pod["spec"]["containers"][0]["volumeMounts"] == [
        {"name": "home", "mountPath": "/home/jovyan/work", "subPath": "a"},
        {"name": "data", "mountPath": "/data", "readOnly": True},
        {"name": "scratch", "mountPath": "/scratch"}]


def test_security_context() -> None:
    opts = options(allow_kernel_uid=True, run_as_user=1000, fs_group=100)
    pod = build_pod_manifest(request({"KERNEL_UID": "1234", "KERNEL_GID": "100"}), opts, "d",
                             REPLY)
    assert pod["spec"]["securityContext"] == {"runAsNonRoot": True, "runAsUser": 1234,
                                              "runAsGroup": 100, "fsGroup": 100}
    with pytest.raises(LaunchRejected, match="does not run kernels as root"):
        build_pod_manifest(request({"KERNEL_UID": "0"}), opts, "d", REPLY)
    with pytest.raises(LaunchRejected, match="expected a number"):
        build_pod_manifest(request({"KERNEL_UID": "root"}), opts, "d", REPLY)
    # KERNEL_UID is ignored where the pool does not allow it; root pools drop runAsNonRoot
    pod = build_pod_manifest(request({"KERNEL_UID": "1234"}), options(allow_root=True), "d",
                             REPLY)
    assert "securityContext" not in pod["spec"]


def test_per_user_namespace() -> None:
    opts = options(per_user_namespace=True)
    assert choose_namespace(request(), opts) == ("poolgate-alice", True)
    ns, created = choose_namespace(request(user="Bob.Smith@example.com"), opts)
    assert ns.startswith("poolgate-bob-smith-example-com-") and len(ns) <= 63 and created
    assert build_namespace("poolgate-alice", request()) == {
        "apiVersion": "v1", "kind": "Namespace",
        "metadata": {"name": "poolgate-alice",
                     "labels": {"poolgate.managed": "true", "poolgate.user": "alice"}}}
    with pytest.raises(LaunchRejected, match="names no user"):
        choose_namespace(request(user=""), opts)
    assert choose_namespace(request(), options(namespace="kernels")) == ("kernels", False)


def test_kernel_namespace_only_from_the_allow_list() -> None:
    opts = options(allow_kernel_namespace=True, allowed_namespaces=["team-a"])
    assert choose_namespace(request({"KERNEL_NAMESPACE": "team-a"}), opts) == ("team-a", False)
    with pytest.raises(LaunchRejected, match="is not a namespace pool"):
        choose_namespace(request({"KERNEL_NAMESPACE": "kube-system"}), opts)
    with pytest.raises(LaunchRejected, match="does not let kernels pick their namespace"):
        choose_namespace(request({"KERNEL_NAMESPACE": "team-a"}), options())


@pytest.mark.parametrize("asked", ["Team-A", "team_a", "-team", "team-", "a" * 64, "a.b", "a b"])
def test_kernel_namespace_must_be_a_dns_label(asked: str) -> None:
    opts = options(allow_kernel_namespace=True, allowed_namespaces=["team-a"])
    why = namespace_refusal("k8s", opts, {"KERNEL_NAMESPACE": asked}, "alice")
    assert why.startswith(f"KERNEL_NAMESPACE={asked!r} is not a namespace name: expected a "
                          "DNS-1123 label")
    with pytest.raises(LaunchRejected, match="DNS-1123"):  # the worker refuses it too
        choose_namespace(request({"KERNEL_NAMESPACE": asked}), opts)


def test_gateway_admission_gives_the_workers_reasons_from_the_pools_options() -> None:
    """k8s_builders.admit: what the gateway calls (a 400) before queuing a launch."""
    pool = PoolConfig(name="k8s", launcher="kubernetes", options={
        "image": "img", "allow_kernel_namespace": True, "allowed_namespaces": ["team-a"]})
    assert admit(pool, {"KERNEL_NAMESPACE": "team-a"}, "alice") == ""
    assert "is not a namespace pool 'k8s' allows (team-a)" in admit(
        pool, {"KERNEL_NAMESPACE": "kube-system"}, "alice")
    assert "not a namespace name" in admit(pool, {"KERNEL_NAMESPACE": "Team A"}, "alice")
    closed = PoolConfig(name="k8s", launcher="kubernetes", options={"image": "img"})
    assert "does not let kernels pick their namespace" in admit(
        closed, {"KERNEL_NAMESPACE": "team-a"}, "alice")
    per_user = PoolConfig(name="k8s", launcher="kubernetes", options={
        "image": "img", "per_user_namespace": True})
    assert "names no user" in admit(per_user, {}, "")
    assert admit(per_user, {}, "alice") == ""


def test_secret_holds_the_reply_key_and_token() -> None:
    assert build_secret(request(), options(), "default", REPLY) == {
        "apiVersion": "v1", "kind": "Secret", "type": "Opaque",
        "metadata": {"name": NAME, "namespace": "default", "labels": LABELS},
        "data": {"POOLGATE_RESPONSE_KEY": "aw==", "POOLGATE_RESPONSE_TOKEN": "dA=="}}


def test_image_choice() -> None:
    opts = options(allow_kernel_image=True, allowed_images=["other:1"])
    pod = build_pod_manifest(request({"KERNEL_IMAGE": "other:1"}), opts, "d", REPLY)
    assert pod["spec"]["containers"][0]["image"] == "other:1"
    assert "KERNEL_IMAGE" not in str(pod["spec"]["containers"][0]["env"])
    pod = build_pod_manifest(request(image="spec:2"), opts, "d", REPLY)
    assert pod["spec"]["containers"][0]["image"] == "spec:2"
    with pytest.raises(LaunchRejected, match="does not let kernels pick"):
        build_pod_manifest(request({"KERNEL_IMAGE": "x:1"}), options(), "d", REPLY)


def test_slug_rules() -> None:
    assert slug("alice") == "alice"
    assert slug("Alice") != slug("alice")
    assert slug("Alice").startswith("alice-")
    assert slug("a--b") == "a-b-" + slug("a--b")[-8:]
    assert slug("") .startswith("x-")
    assert len(slug("x" * 100)) == 63
    assert label_value("Bob_Smith.1") == "Bob_Smith.1"
    assert label_value("bob@example.com").startswith("bob-example-com-")


@pytest.mark.parametrize("bad, msg", [
    ({"namespace": "Kernels"}, "namespace: expected a DNS label"),
    ({"allowed_images": ["x"]}, "set both allow_kernel_image"),
    ({"image_pull_policy": "Sometimes"}, "image_pull_policy"),
    ({"run_as_user": 0}, "0 is root"),
    ({"volumes": [{"name": "v", "mount_path": "/v"}]}, "exactly one of"),
    ({"volumes": [{"name": "v", "mount_path": "v", "empty_dir": True}]}, "absolute path"),
    ({"tolerations": [{"operator": "Maybe"}]}, "Equal or Exists"),
    ({"gpus": "one"}, "expected an integer"),
])
def test_options_are_checked(bad: dict[str, Any], msg: str) -> None:
    with pytest.raises(ConfigError, match=msg):
        options(**bad)
