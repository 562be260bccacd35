"""docker/kubernetes/: the manifests that run poolgate on a cluster, checked without a cluster.

- Schema: every document deserializes into the official client's model for its kind, with no
  field the model does not know (a misspelt key would be dropped by the client and refused or
  ignored by a real API server) and every required field present.
- Config: the ConfigMap's queues.yaml and kernelspecs load with poolgate's own loader; every
  pool has one worker Deployment; every image is one docker/build-images.sh builds.
- RBAC: the Role and ClusterRole grant exactly the calls the launcher makes (kubernetes.py and
  k8s_namespaces.py in workers/launchers/)
  (what it is seen to call at run time: tests/integration/test_kubernetes_pool.py).
- NetworkPolicy: its selectors pick the labels the launcher puts on kernel pods and the labels
  of the gateway and worker pods, and no other poolgate pod.
"""
from __future__ import annotations

import functools
import re
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import pytest
import yaml

from poolgate.workers.config import load_config
from poolgate.workers.launchers.k8s_builders import (
    KubernetesOptions,
    build_network_policy,
    build_pod_manifest,
)
from poolgate.workers.protocol import LaunchRequest

ROOT = Path(__file__).resolve().parents[2]
FOLDER = ROOT / "docker" / "kubernetes"
LAUNCHER = [ROOT / "workers" / "launchers" / f for f in ("kubernetes.py", "k8s_namespaces.py")]
SECRET_KEYS = {"auth-token", "registry-secret", "redis-password"}

#: CoreV1Api methods the launcher calls -> (verb, resource, needs a cluster-wide grant)
CALLS: dict[str, tuple[str, str]] = {
    "create_namespaced_pod": ("create", "pods"),
    "read_namespaced_pod": ("get", "pods"),
    "list_namespaced_pod": ("list", "pods"),
    "list_pod_for_all_namespaces": ("list", "pods"),
    "delete_namespaced_pod": ("delete", "pods"),
    "read_namespaced_pod_log": ("get", "pods/log"),
    "create_namespaced_secret": ("create", "secrets"),
    "list_namespaced_secret": ("list", "secrets"),
    "delete_namespaced_secret": ("delete", "secrets"),
    "list_namespaced_event": ("list", "events"),
    "create_namespace": ("create", "namespaces"),
    "read_namespace": ("get", "namespaces"),
    "patch_namespace": ("patch", "namespaces"),
    "delete_namespace": ("delete", "namespaces"),
    "create_namespaced_network_policy": ("create", "networkpolicies"),  # networking.k8s.io
}
GROUPS = {"networkpolicies": "networking.k8s.io"}  # else core ""


@functools.lru_cache(maxsize=1)
def documents() -> tuple[tuple[str, dict[str, Any]], ...]:
    """(file name, document) of every manifest, parsed once (tests only read them)."""
    return tuple((path.name, doc) for path in sorted(FOLDER.glob("*.yaml"))
                 if path.name != "kustomization.yaml"
                 for doc in yaml.safe_load_all(path.read_text()) if doc)


def objects(kind: str) -> list[dict[str, Any]]:
    return [d for _, d in documents() if d["kind"] == kind]


def one(kind: str, name: str) -> dict[str, Any]:
    found = [d for d in objects(kind) if d["metadata"]["name"] == name]
    assert len(found) == 1, f"{kind}/{name}: {len(found)} found"
    return found[0]


# -- schema -----------------------------------------------------------------------------------


def model(name: str) -> Any:
    import kubernetes.client

    return getattr(kubernetes.client, name)


def unknown_fields(value: Any, type_name: str, where: str) -> Iterator[str]:
    """Paths in ``value`` that the client's model ``type_name`` has no field for."""
    inner = re.match(r"^(?:List\[|list\[)(.*)\]$", type_name)
    if inner:
        assert isinstance(value, list), f"{where}: expected a list"
        for i, item in enumerate(value):
            yield from unknown_fields(item, inner[1], f"{where}[{i}]")
        return
    inner = re.match(r"^(?:Dict\[str, |dict\(str, )(.*)[\])]$", type_name)
    if inner:
        assert isinstance(value, dict), f"{where}: expected a mapping"
        for key, item in value.items():
            yield from unknown_fields(item, inner[1], f"{where}.{key}")
        return
    if not type_name.startswith("V1"):
        return  # str, int, bool, object (IntOrString, quantities), datetime
    cls = model(type_name)
    assert isinstance(value, dict), f"{where}: expected a mapping ({type_name})"
    by_key = {json_key: attr for attr, json_key in cls.attribute_map.items()}
    for key, item in value.items():
        if key not in by_key:
            yield f"{where}.{key} ({type_name} has no such field)"
        else:
            yield from unknown_fields(item, cls.openapi_types[by_key[key]], f"{where}.{key}")


def test_kustomization_lists_every_manifest() -> None:
    listed = yaml.safe_load((FOLDER / "kustomization.yaml").read_text())["resources"]
    files = sorted(p.name for p in FOLDER.glob("*.yaml") if p.name != "kustomization.yaml")
    assert sorted(listed) == files


@pytest.mark.parametrize("where,doc", list(documents()),
                         ids=[f"{f}:{d['kind']}/{d['metadata']['name']}" for f, d in documents()])
def test_every_document_is_its_kinds_model(where: str, doc: dict[str, Any]) -> None:
    group = doc["apiVersion"].split("/")[0] if "/" in doc["apiVersion"] else ""
    assert group in ("", "apps", "rbac.authorization.k8s.io", "networking.k8s.io"), group
    assert doc["apiVersion"].endswith("/v1") or doc["apiVersion"] == "v1"
    name = "V1" + doc["kind"]
    assert list(unknown_fields(doc, name, f"{where}:{doc['kind']}")) == []
    model(name).from_dict(doc)  # types and required fields (raises on a missing one)


def test_unknown_and_missing_fields_are_caught() -> None:
    """The two checks above can fail: a misspelt key and a missing required one."""
    deployment = one("Deployment", "poolgate-gateway")
    bad = yaml.safe_load(yaml.safe_dump(deployment))
    bad["spec"]["template"]["spec"]["containers"][0]["imagePullPolicyy"] = "Never"
    assert list(unknown_fields(bad, "V1Deployment", "d")) == [
        "d.spec.template.spec.containers[0].imagePullPolicyy (V1Container has no such field)"]
    del bad["spec"]["template"]["spec"]["containers"][0]["name"]
    with pytest.raises(Exception, match="name"):
        model("V1Deployment").from_dict(bad)


def test_every_namespaced_object_names_a_namespace_the_manifests_make() -> None:
    spaces = {d["metadata"]["name"] for d in objects("Namespace")}
    cluster_kinds = {"Namespace", "ClusterRole", "ClusterRoleBinding"}
    for where, doc in documents():
        ns = doc["metadata"].get("namespace")
        assert (ns is None) == (doc["kind"] in cluster_kinds), (where, doc["metadata"])
        assert ns is None or ns in spaces, (where, ns)


# -- configuration, images, secrets -----------------------------------------------------------


def config_map() -> dict[str, str]:
    data: dict[str, str] = one("ConfigMap", "poolgate-config")["data"]
    return data


def deployments() -> dict[str, dict[str, Any]]:
    return {d["metadata"]["name"]: d for d in objects("Deployment")}


def pod_spec(deployment: Mapping[str, Any]) -> dict[str, Any]:
    spec: dict[str, Any] = deployment["spec"]["template"]["spec"]
    return spec


def test_queues_yaml_and_kernelspecs_load_as_the_pods_mount_them(tmp_path: Path) -> None:
    etc = tmp_path / "etc"
    for d in deployments().values():
        if d["metadata"]["name"] == "poolgate-redis":
            continue
        mounts = pod_spec(d)["containers"][0]["volumeMounts"]
        assert {"name": "config", "mountPath": "/etc/poolgate", "readOnly": True} in mounts
        volume = next(v for v in pod_spec(d)["volumes"] if v["name"] == "config")
        items = volume["configMap"]["items"]
        assert volume["configMap"]["name"] == "poolgate-config"
        assert sorted(i["key"] for i in items) == sorted(config_map())  # every key mounted
        for item in items:
            (etc / item["path"]).parent.mkdir(parents=True, exist_ok=True)
            (etc / item["path"]).write_text(config_map()[item["key"]].replace(
                "/etc/poolgate/", f"{etc}/"))
    cfg = load_config(etc / "queues.yaml", environ={})
    assert sorted(cfg.pools) == ["k8s", "k8s-user", "local"]
    assert {s.name: s.pool for s in cfg.kernelspecs.values()} == {
        "python3": "local", "python3-k8s": "k8s", "python3-k8s-user": "k8s-user"}
    assert cfg.pools["k8s"].options["namespace"] == "poolgate-kernels"
    # a user named "kernels" must not get the k8s pool's namespace
    assert not "poolgate-kernels".startswith(cfg.pools["k8s-user"].options["namespace_prefix"])


def worker_pools() -> dict[str, dict[str, Any]]:
    """pool -> its worker Deployment (the --pool argument of ``poolgate worker``)."""
    out: dict[str, dict[str, Any]] = {}
    for d in deployments().values():
        command = " ".join(pod_spec(d)["containers"][0]["command"])
        m = re.search(r"poolgate worker .*--pool (\S+)", command)
        if m:
            assert m[1] not in out, f"two worker Deployments for pool {m[1]}"
            out[m[1]] = d
            assert d["spec"]["template"]["metadata"]["labels"]["poolgate.pool"] == m[1]
    return out


def test_one_worker_deployment_per_pool_and_the_other_roles() -> None:
    pools = yaml.safe_load(config_map()["queues.yaml"])["pools"]
    assert sorted(worker_pools()) == sorted(pools)
    commands = {name: " ".join(pod_spec(d)["containers"][0]["command"])
                for name, d in deployments().items()}
    assert "poolgate gateway --config /etc/poolgate/queues.yaml" in commands["poolgate-gateway"]
    assert "poolgate maintenance" in commands["poolgate-maintenance"]
    assert deployments()["poolgate-maintenance"]["spec"]["replicas"] == 1  # one beat
    assert "redis-server" in commands["poolgate-redis"]
    service = one("Service", "poolgate-gateway")
    gateway = deployments()["poolgate-gateway"]
    assert service["spec"]["selector"].items() <= \
        gateway["spec"]["template"]["metadata"]["labels"].items()
    redis = one("Service", "poolgate-redis")
    assert redis["spec"]["selector"].items() <= \
        deployments()["poolgate-redis"]["spec"]["template"]["metadata"]["labels"].items()


def test_images_are_the_ones_build_images_builds() -> None:
    script = (ROOT / "docker" / "build-images.sh").read_text()
    built = set(re.findall(r"poolgate/(?:kernel|poolgate):latest", script))
    assert built == {"poolgate/kernel:latest", "poolgate/poolgate:latest"}
    for d in deployments().values():
        for c in pod_spec(d)["containers"]:
            assert c["image"] in built and c["imagePullPolicy"] == "IfNotPresent"
    pools = yaml.safe_load(config_map()["queues.yaml"])["pools"]
    for name, pool in pools.items():
        if pool["launcher"] == "kubernetes":
            assert pool["options"]["image"] in built, name
    # the worker image's client: the wheelhouse has it, and the image installs every wheel there
    assert "kubernetes" in re.search(r"pip wheel .*", script)[0]
    assert "/tmp/wheels/*.whl" in (ROOT / "docker" / "poolgate.Dockerfile").read_text()


def test_secrets_come_from_one_documented_secret_and_only_workers_get_api_tokens() -> None:
    readme = (FOLDER / "README.md").read_text()
    accounts = {d["metadata"]["name"] for d in objects("ServiceAccount")}
    for name, d in deployments().items():
        spec = pod_spec(d)
        for c in spec["containers"]:
            for e in c.get("env", []):
                ref = (e.get("valueFrom") or {}).get("secretKeyRef")
                if ref:
                    assert ref["name"] == "poolgate" and ref["key"] in SECRET_KEYS, ref
        account = spec.get("serviceAccountName")
        if account:
            assert account in accounts and name.startswith("poolgate-worker-k8s"), name
        else:
            assert spec["automountServiceAccountToken"] is False, name
        assert spec["securityContext"]["runAsNonRoot"] is True
    for key in SECRET_KEYS:
        assert f"--from-literal={key}=" in readme


# -- RBAC -------------------------------------------------------------------------------------


def launcher_calls() -> set[tuple[str, str]]:
    """(verb, resource) of every Kubernetes API call in the launcher's source."""
    source = "\n".join(path.read_text() for path in LAUNCHER)
    methods = set(re.findall(r"\b(?:client|api|networking)\.(\w+)\(?", source)) & (
        set(dir(model("CoreV1Api"))) | set(dir(model("NetworkingV1Api"))))
    unknown = {m for m in methods if not m.startswith(("api_client",)) and m not in CALLS}
    assert not unknown, f"add {unknown} to CALLS and the Role in docker/kubernetes/rbac.yaml"
    used = {CALLS[m] for m in methods if m in CALLS}
    assert "watch.Watch()" in source  # the pod list is also watched
    return used | {("watch", "pods")}


def granted(role: Mapping[str, Any]) -> set[tuple[str, str]]:
    out = set()
    for rule in role["rules"]:
        assert "resourceNames" not in rule
        for r in rule["resources"]:
            assert rule["apiGroups"] == [GROUPS.get(r, "")], rule
        out |= {(v, r) for r in rule["resources"] for v in rule["verbs"]}
    assert "*" not in {v for v, _ in out} | {r for _, r in out}
    return out


def test_the_roles_grant_exactly_what_the_launcher_calls() -> None:
    used = launcher_calls()
    namespaced = {c for c in used if c[1] not in ("namespaces", "networkpolicies")}
    assert granted(one("Role", "poolgate-worker-k8s")) == namespaced
    assert granted(one("ClusterRole", "poolgate-worker-k8s-user")) == used


def test_each_kubernetes_worker_is_bound_to_its_role_where_its_pool_runs_kernels() -> None:
    pools = yaml.safe_load(config_map()["queues.yaml"])["pools"]
    workers = worker_pools()
    k8s, user = pod_spec(workers["k8s"]), pod_spec(workers["k8s-user"])
    binding = one("RoleBinding", "poolgate-worker-k8s")
    assert binding["metadata"]["namespace"] == pools["k8s"]["options"]["namespace"]
    assert binding["roleRef"] == {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role",
                                  "name": "poolgate-worker-k8s"}
    assert binding["subjects"] == [{"kind": "ServiceAccount", "name": k8s["serviceAccountName"],
                                    "namespace": "poolgate"}]
    assert pools["k8s-user"]["options"]["per_user_namespace"] is True
    cluster = one("ClusterRoleBinding", "poolgate-worker-k8s-user")
    assert cluster["roleRef"]["kind"] == "ClusterRole"
    assert cluster["roleRef"]["name"] == "poolgate-worker-k8s-user"
    assert cluster["subjects"] == [{"kind": "ServiceAccount",
                                    "name": user["serviceAccountName"], "namespace": "poolgate"}]
    assert "serviceAccountName" not in pod_spec(workers["local"])


# -- NetworkPolicy ----------------------------------------------------------------------------


def matches(selector: Mapping[str, Any], labels: Mapping[str, str]) -> bool:
    """A LabelSelector (matchLabels, matchExpressions In/NotIn/Exists/DoesNotExist) on labels."""
    if any(labels.get(k) != v for k, v in (selector.get("matchLabels") or {}).items()):
        return False
    for e in selector.get("matchExpressions") or []:
        have, key = labels.get(e["key"]), e["key"]
        ok = {"In": have in e.get("values", []), "NotIn": have not in e.get("values", []),
              "Exists": key in labels, "DoesNotExist": key not in labels}[e["operator"]]
        if not ok:
            return False
    return True


def kernel_pod_labels(pool: str) -> dict[str, str]:
    spec = yaml.safe_load(config_map()["queues.yaml"])["pools"][pool]
    opts = KubernetesOptions(**{k: v for k, v in spec["options"].items()
                                if k in ("namespace", "image")})
    req = LaunchRequest(kernel_id="5c3e4a1e-0000-4000-8000-000000000001", pool=pool,
                        spec_name="python3-k8s", argv=("python3", "-m", "ipykernel_launcher",
                                                       "-f", "{connection_file}"),
                        user="alice")
    reply = {"POOLGATE_RESPONSE_KEY": "k", "POOLGATE_RESPONSE_TOKEN": "t",
             "POOLGATE_RESPONSE_ADDRESS": "10.0.0.1:4000"}
    labels: dict[str, str] = build_pod_manifest(req, opts, opts.namespace, reply)[
        "metadata"]["labels"]
    return labels


def test_kernel_policy_admits_gateways_and_workers_only() -> None:
    policy = one("NetworkPolicy", "poolgate-kernels")
    pools = yaml.safe_load(config_map()["queues.yaml"])["pools"]
    assert policy["metadata"]["namespace"] == pools["k8s"]["options"]["namespace"]
    assert policy["spec"]["policyTypes"] == ["Ingress"]
    assert matches(policy["spec"]["podSelector"], kernel_pod_labels("k8s"))
    [rule] = policy["spec"]["ingress"]
    assert "ports" not in rule  # the kernel launcher picks its ports at random
    [peer] = rule["from"]
    home = one("Namespace", "poolgate")
    # kubernetes.io/metadata.name is set on every namespace by the API server (1.21+)
    assert matches(peer["namespaceSelector"], {**home["metadata"].get("labels", {}),
                                               "kubernetes.io/metadata.name": "poolgate"})
    admitted = {name for name, d in deployments().items()
                if matches(peer["podSelector"], d["spec"]["template"]["metadata"]["labels"])}
    assert admitted == {"poolgate-gateway", "poolgate-worker-local", "poolgate-worker-k8s",
                        "poolgate-worker-k8s-user"}
    assert not matches(peer["podSelector"], kernel_pod_labels("k8s"))  # not kernel to kernel


def test_redis_policy_admits_poolgate_only_and_never_kernels() -> None:
    policy = one("NetworkPolicy", "poolgate-redis")
    redis = deployments()["poolgate-redis"]["spec"]["template"]["metadata"]["labels"]
    assert matches(policy["spec"]["podSelector"], redis)
    [rule] = policy["spec"]["ingress"]
    assert rule["ports"] == [{"protocol": "TCP", "port": 6379}]
    [peer] = rule["from"]
    assert "namespaceSelector" not in peer  # its own namespace only: no kernel namespace
    admitted = {name for name, d in deployments().items()
                if matches(peer["podSelector"], d["spec"]["template"]["metadata"]["labels"])}
    assert admitted == set(deployments()) - {"poolgate-redis"}
    assert not matches(peer["podSelector"], kernel_pod_labels("k8s"))


def test_each_user_namespace_gets_the_kernel_namespaces_policy() -> None:
    """What the k8s-user worker creates in each namespace it makes is the policy applied to
    poolgate-kernels: the same selectors, so the same pods admitted."""
    pools = yaml.safe_load(config_map()["queues.yaml"])["pools"]
    options = pools["k8s-user"]["options"]
    assert options["network_policy_namespace"] == "poolgate"
    opts = KubernetesOptions(per_user_namespace=True,
                             network_policy_namespace=options["network_policy_namespace"])
    made = build_network_policy("pg-user-alice", opts)
    assert list(unknown_fields(made, "V1NetworkPolicy", "made")) == []
    assert made["spec"] == one("NetworkPolicy", "poolgate-kernels")["spec"]
    assert matches(made["spec"]["podSelector"], kernel_pod_labels("k8s-user"))
