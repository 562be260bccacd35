"""kubernetes launcher, pure half: options, names, and the pod, secret and namespace manifests.

Nothing here talks to an API server. Every builder returns the JSON body the Kubernetes API
takes (camelCase keys, as ``kubectl apply -f`` would send), so tests compare them with literal
dicts and the launcher passes them to the official client unchanged.

A kernel's pod runs ``python3 -m poolgate.kernel_launcher --ip $(POD_IP) --bind-ip $(POD_IP) --
<kernelspec argv>``: the kubelet expands ``$(POD_IP)`` from the downward API, so the kernel
listens on its pod's IP only and reports it to the worker (workers/launchers/reply.py). The
reply's key and token travel in a Secret of the kernel's own, never in the pod spec.
"""
from __future__ import annotations

import base64
import hashlib
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from ..errors import LaunchRejected
from ..protocol import LaunchRequest
from ..resources import parse_memory
from .docker_builders import KERNEL_LABEL, UID, build_command, check_reporting, choose_image, resource_name

if TYPE_CHECKING:
    from ..config import PoolConfig

MANAGED_LABEL = "poolgate.managed"
POOL_LABEL = "poolgate.pool"
USER_LABEL = "poolgate.user"
CONTAINER = "kernel"
SECRET_KEYS = ("POOLGATE_RESPONSE_KEY", "POOLGATE_RESPONSE_TOKEN")  # env from the Secret
PULL_POLICIES = ("Always", "IfNotPresent", "Never")
TOLERATION_OPERATORS = ("Equal", "Exists")
TAINT_EFFECTS = ("", "NoSchedule", "PreferNoSchedule", "NoExecute")
DNS_LABEL = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")
LABEL_VALUE = re.compile(r"^(([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9])?$")


@dataclass(frozen=True)
class Toleration:
    """One pod toleration (the Kubernetes fields, snake_case)."""

    key: str = ""
    operator: str = "Equal"
    value: str = ""
    effect: str = ""
    toleration_seconds: int = -1      # -1: not set

    def __post_init__(self) -> None:
        if self.operator not in TOLERATION_OPERATORS:
            raise ValueError(f"operator: expected Equal or Exists, got {self.operator!r}")
        if self.effect not in TAINT_EFFECTS:
            raise ValueError(f"effect: expected one of {', '.join(TAINT_EFFECTS[1:])}, "
                             f"got {self.effect!r}")

    def manifest(self) -> dict[str, Any]:
        out: dict[str, Any] = {"operator": self.operator}
        for name, value in (("key", self.key), ("value", self.value), ("effect", self.effect)):
            if value:
                out[name] = value
        if self.toleration_seconds >= 0:
            out["tolerationSeconds"] = self.toleration_seconds
        return out


@dataclass(frozen=True)
class Volume:
    """A volume every kernel of the pool mounts: exactly one of host_path, claim, config_map,
    secret or empty_dir."""

    name: str
    mount_path: str
    host_path: str = ""
    claim: str = ""                   # a PersistentVolumeClaim in the kernel's namespace
    config_map: str = ""
    secret: str = ""
    empty_dir: bool = False
    read_only: bool = False
    sub_path: str = ""

    def __post_init__(self) -> None:
        if not DNS_LABEL.match(self.name):
            raise ValueError(f"name: expected a DNS label (a-z, 0-9, '-'), got {self.name!r}")
        if not self.mount_path.startswith("/"):
            raise ValueError(f"mount_path: expected an absolute path, got {self.mount_path!r}")
        sources = [s for s in ("host_path", "claim", "config_map", "secret", "empty_dir")
                   if getattr(self, s)]
        if len(sources) != 1:
            raise ValueError(f"{self.name}: expected exactly one of host_path, claim, "
                             f"config_map, secret, empty_dir; got {sources or 'none'}")

    def manifest(self) -> dict[str, Any]:
        if self.host_path:
            source: dict[str, Any] = {"hostPath": {"path": self.host_path}}
        elif self.claim:
            source = {"persistentVolumeClaim": {"claimName": self.claim,
                                                "readOnly": self.read_only}}
        elif self.config_map:
            source = {"configMap": {"name": self.config_map}}
        elif self.secret:
            source = {"secret": {"secretName": self.secret}}
        else:
            source = {"emptyDir": {}}
        return {"name": self.name, **source}

    def mount(self) -> dict[str, Any]:
        out: dict[str, Any] = {"name": self.name, "mountPath": self.mount_path}
        if self.read_only:
            out["readOnly"] = True
        if self.sub_path:
            out["subPath"] = self.sub_path
        return out


@dataclass(frozen=True)
class KubernetesOptions:
    """Options of a ``launcher: kubernetes`` pool (a pod per kernel)."""

    namespace: str = "default"        # where kernels run, unless per_user_namespace
    per_user_namespace: bool = False  # one namespace per user, created and removed when empty
    namespace_prefix: str = "poolgate-"
    network_policy_namespace: str = ""  # per_user_namespace: where poolgate's gateways and
    # workers run; each user's namespace then gets a NetworkPolicy admitting only them ("": none)
    allow_kernel_namespace: bool = False  # KERNEL_NAMESPACE may pick an existing namespace...
    allowed_namespaces: tuple[str, ...] = ()  # ...among these only
    image: str = ""                   # default image; kernelspec resources.image wins
    allow_kernel_image: bool = False  # KERNEL_IMAGE may pick the image...
    allowed_images: tuple[str, ...] = ()  # ...among these only
    image_pull_policy: str = "IfNotPresent"
    service_account: str = ""         # "": no API token is mounted into kernels
    node_selector: Mapping[str, str] = field(default_factory=dict)
    tolerations: tuple[Toleration, ...] = ()
    volumes: tuple[Volume, ...] = ()
    env: Mapping[str, str] = field(default_factory=dict)
    labels: Mapping[str, str] = field(default_factory=dict)
    annotations: Mapping[str, str] = field(default_factory=dict)
    run_as_user: int = -1             # -1: the image's user
    run_as_group: int = -1
    fs_group: int = -1
    allow_kernel_uid: bool = False    # KERNEL_UID / KERNEL_GID pick the user...
    allow_root: bool = False          # ...and may pick 0; without it pods are runAsNonRoot
    cpus: float = 0.0                 # per kernel unless KERNEL_CPUS asks (0: no limit)
    memory: str = ""                  # per kernel unless KERNEL_MEMORY asks ("": no limit)
    gpus: int = 0                     # per kernel unless KERNEL_GPUS asks
    gpu_resource: str = "nvidia.com/gpu"
    max_cpus_per_kernel: float = 0.0
    max_memory_per_kernel: str = ""
    max_gpus_per_kernel: int = 0
    python: str = "python3"           # replaces a bare "python" in the kernelspec's argv
    kernel_launcher: str = "python3 -m poolgate.kernel_launcher"
    kubeconfig: str = ""              # "": in-cluster config (the worker's service account)
    context: str = ""                 # a kubeconfig context ("": its current one)
    response_address: str = ""        # where kernel launchers reach this worker ("": auto)
    response_port: int = 0
    response_bind: str = "0.0.0.0"
    poll_interval: float = 2.0        # seconds between looks at a running kernel's pod
    watch_timeout: int = 60           # seconds a watch request lasts before it is renewed
    api_timeout: float = 30.0
    stop_grace: float = 2.0           # the pod's termination grace period

    def __post_init__(self) -> None:
        for flag, names in (("allow_kernel_image", "allowed_images"),
                            ("allow_kernel_namespace", "allowed_namespaces")):
            if bool(getattr(self, flag)) != bool(getattr(self, names)):
                raise ValueError(f"{names}: set both {flag}: true and {names} (the values "
                                 "a kernel may ask for), or neither")
        if self.network_policy_namespace and not self.per_user_namespace:
            raise ValueError("network_policy_namespace: only with per_user_namespace: true (for "
                             "the pool's own namespace, apply docker/kubernetes/"
                             "network-policies.yaml)")
        for ns in (self.namespace, *self.allowed_namespaces,
                   *filter(None, [self.network_policy_namespace])):
            if not DNS_LABEL.match(ns) or len(ns) > 63:
                raise ValueError(f"namespace: expected a DNS label (a-z, 0-9, '-'), got {ns!r}")
        if not re.match(r"^[a-z0-9][-a-z0-9]{0,20}$", self.namespace_prefix):
            raise ValueError(f"namespace_prefix: expected up to 21 of a-z, 0-9, '-', got "
                             f"{self.namespace_prefix!r}")
        if self.image_pull_policy not in PULL_POLICIES:
            raise ValueError(f"image_pull_policy: expected one of {', '.join(PULL_POLICIES)}, "
                             f"got {self.image_pull_policy!r}")
        check_reporting(self, also_positive=("watch_timeout",))
        for name in ("cpus", "gpus"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name}: expected a number >= 0, got {getattr(self, name)}")
        if self.run_as_user == 0 and not self.allow_root:
            raise ValueError("run_as_user: 0 is root; set allow_root: true too")
        volume_names = [v.name for v in self.volumes]
        if len(set(volume_names)) != len(volume_names):
            raise ValueError(f"volumes: names must be unique, got {volume_names}")


# -- names ----------------------------------------------------------------------------------


def slug(value: str, limit: int = 63) -> str:
    """``value`` as a DNS label part (namespace names, label values).

    Rules: lower-case letters, digits and '-'; every other character becomes '-', runs of '-'
    become one, none at either end; at most ``limit`` characters. A value that had to change
    gets '-' and 8 hex digits of its hash, so 'Alice' and 'alice' never share a slug. An empty
    value becomes 'x' + the hash.
    """
    clean = re.sub(r"-+", "-", re.sub(r"[^a-z0-9-]", "-", value.lower())).strip("-")
    if clean == value and 0 < len(clean) <= limit:
        return clean
    digest = hashlib.sha256(value.encode()).hexdigest()[:8]
    return f"{clean[:limit - 9].rstrip('-') or 'x'}-{digest}"


def label_value(value: str) -> str:
    """``value`` as a label value: unchanged where Kubernetes takes it, else its :func:`slug`."""
    return value if LABEL_VALUE.match(value) and len(value) <= 63 else slug(value)


def kernel_user(req: LaunchRequest) -> str:
    return req.user or req.env.get("KERNEL_USERNAME", "")


def namespace_refusal(pool: str, options: KubernetesOptions, env: Mapping[str, str],
                      user: str) -> str:
    """Why a launch on ``pool`` cannot run in the namespace it would get; '' where it can.

    The gateway asks first (:func:`admit`: a 400 before anything is queued); the worker asks
    again in :func:`choose_namespace`, for launches queued by an older gateway.
    """
    asked = env.get("KERNEL_NAMESPACE", "")
    if asked:
        if not DNS_LABEL.match(asked) or len(asked) > 63:
            return (f"KERNEL_NAMESPACE={asked!r} is not a namespace name: expected a DNS-1123 "
                    "label (up to 63 of a-z, 0-9 and '-', starting and ending with a letter or "
                    "digit)")
        if not options.allow_kernel_namespace:
            return (f"KERNEL_NAMESPACE={asked!r}: pool {pool!r} does not let kernels pick "
                    "their namespace")
        if asked not in options.allowed_namespaces:
            return (f"KERNEL_NAMESPACE={asked!r} is not a namespace pool {pool!r} allows "
                    f"({', '.join(options.allowed_namespaces)})")
    elif options.per_user_namespace and not user:
        return (f"pool {pool!r} runs each user's kernels in a namespace of their own, and this "
                "launch names no user")
    return ""


def admit(pool: PoolConfig, env: Mapping[str, str], user: str) -> str:
    """Called by the gateway before a launch on a kubernetes pool is queued: why it is refused
    (a namespace it may not have), or ''. Pure: imports no Kubernetes client."""
    from ..config import build

    options = build(KubernetesOptions, dict(pool.options), f"pools.{pool.name}.options")
    return namespace_refusal(pool.name, options, env, user)


def choose_namespace(req: LaunchRequest, options: KubernetesOptions) -> tuple[str, bool]:
    """(the kernel's namespace, whether poolgate creates it and removes it when empty).

    KERNEL_NAMESPACE where the pool allows it and lists it (an existing namespace; never
    created or removed); else ``<namespace_prefix><slug(user)>`` with per_user_namespace (as
    Enterprise Gateway's per-kernel namespaces, but one per user); else the pool's namespace.
    """
    why = namespace_refusal(req.pool, options, req.env, kernel_user(req))
    if why:
        raise LaunchRejected(why)
    asked = req.env.get("KERNEL_NAMESPACE", "")
    if asked:
        return asked, False
    if options.per_user_namespace:
        user = kernel_user(req)
        return options.namespace_prefix + slug(user, 63 - len(options.namespace_prefix)), True
    return options.namespace, False


# -- manifests ------------------------------------------------------------------------------


def build_labels(req: LaunchRequest, options: KubernetesOptions) -> dict[str, str]:
    """Labels on every object of a kernel: how stop() and a restarted worker find them."""
    return {**dict(options.labels), MANAGED_LABEL: "true", KERNEL_LABEL: req.kernel_id,
            POOL_LABEL: label_value(req.pool), USER_LABEL: label_value(kernel_user(req)),
            "poolgate.kernelspec": label_value(req.spec_name)}


def build_namespace(name: str, req: LaunchRequest) -> dict[str, Any]:
    """A per-user namespace poolgate creates (and removes once it holds no kernel)."""
    return {"apiVersion": "v1", "kind": "Namespace",
            "metadata": {"name": name, "labels": {MANAGED_LABEL: "true",
                                                  USER_LABEL: label_value(kernel_user(req))}}}


def build_network_policy(namespace: str, options: KubernetesOptions) -> dict[str, Any]:
    """The NetworkPolicy of a per-user namespace: its kernel pods accept connections only from
    poolgate's gateway and worker pods in ``options.network_policy_namespace`` (the spec of
    docker/kubernetes/network-policies.yaml's ``poolgate-kernels``, for the pool namespace)."""
    peer = {"namespaceSelector": {"matchLabels": {
                "kubernetes.io/metadata.name": options.network_policy_namespace}},
            "podSelector": {"matchLabels": {"app.kubernetes.io/name": "poolgate"},
                            "matchExpressions": [{"key": "app.kubernetes.io/component",
                                                  "operator": "In",
                                                  "values": ["gateway", "worker"]}]}}
    return {"apiVersion": "networking.k8s.io/v1", "kind": "NetworkPolicy",
            "metadata": {"name": "poolgate-kernels", "namespace": namespace,
                         "labels": {MANAGED_LABEL: "true"}},
            "spec": {"podSelector": {"matchLabels": {MANAGED_LABEL: "true"}},
                     "policyTypes": ["Ingress"], "ingress": [{"from": [peer]}]}}


def build_secret(req: LaunchRequest, options: KubernetesOptions, namespace: str,
                 reply_env: Mapping[str, str]) -> dict[str, Any]:
    """The kernel's Secret: the reply's key and token, read by the pod's env."""
    data = {k: base64.b64encode(reply_env[k].encode()).decode() for k in SECRET_KEYS}
    return {"apiVersion": "v1", "kind": "Secret", "type": "Opaque",
            "metadata": {"name": resource_name(req.kernel_id), "namespace": namespace,
                         "labels": build_labels(req, options)},
            "data": data}


def resources(req: LaunchRequest, options: KubernetesOptions) -> dict[str, str]:
    """The kernel's requests (= limits): cpu in millicores, memory in bytes, GPUs."""
    out: dict[str, str] = {}
    cpus = float(req.resources.get("cpus") or options.cpus or 0)
    memory = int(req.resources.get("memory") or (
        parse_memory(options.memory, "memory") if options.memory else 0))
    gpus = int(req.resources.get("gpus") or options.gpus or 0)
    if cpus:
        out["cpu"] = f"{round(cpus * 1000)}m"
    if memory:
        out["memory"] = str(memory)
    if gpus:
        out[options.gpu_resource] = str(gpus)
    return out


def build_security_context(req: LaunchRequest, options: KubernetesOptions) -> dict[str, Any]:
    """The pod's securityContext: KERNEL_UID/KERNEL_GID where allowed, runAsNonRoot unless the
    pool allows root."""
    uid, gid = options.run_as_user, options.run_as_group
    asked_uid, asked_gid = req.env.get("KERNEL_UID", ""), req.env.get("KERNEL_GID", "")
    if (asked_uid or asked_gid) and options.allow_kernel_uid:
        for name, value in (("KERNEL_UID", asked_uid), ("KERNEL_GID", asked_gid)):
            if value and not UID.match(value):
                raise LaunchRejected(f"{name}={value!r}: expected a number")
            if value and int(value) == 0 and not options.allow_root:
                raise LaunchRejected(f"{name}=0: pool {req.pool!r} does not run kernels as root")
        uid = int(asked_uid) if asked_uid else uid
        gid = int(asked_gid) if asked_gid else gid
    ctx: dict[str, Any] = {}
    if not options.allow_root:
        ctx["runAsNonRoot"] = True
    if uid >= 0:
        ctx["runAsUser"] = uid
    if gid >= 0:
        ctx["runAsGroup"] = gid
    if options.fs_group >= 0:
        ctx["fsGroup"] = options.fs_group
    return ctx


def build_env(req: LaunchRequest, options: KubernetesOptions, secret: str,
              reply_env: Mapping[str, str]) -> list[dict[str, Any]]:
    """The container's env: POD_IP (downward API), pool, spec, request, KERNEL_ID, the reply's
    address and ids, and its key and token from the kernel's Secret."""
    plain = {**dict(options.env), **req.spec_env, **req.env}
    for name in ("KERNEL_IMAGE", "KERNEL_NAMESPACE", "POD_IP"):
        plain.pop(name, None)
    plain["KERNEL_ID"] = req.kernel_id
    plain.update({k: v for k, v in reply_env.items() if k not in SECRET_KEYS})
    env: list[dict[str, Any]] = [
        {"name": "POD_IP", "valueFrom": {"fieldRef": {"fieldPath": "status.podIP"}}}]
    env += [{"name": k, "value": v} for k, v in plain.items()]
    env += [{"name": k, "valueFrom": {"secretKeyRef": {"name": secret, "key": k}}}
            for k in SECRET_KEYS]
    return env


def build_pod_manifest(req: LaunchRequest, options: KubernetesOptions, namespace: str,
                       reply_env: Mapping[str, str]) -> dict[str, Any]:
    """The kernel's Pod: never restarted by the kubelet (a dead kernel is the supervisor's
    business), reached at its pod IP."""
    name = resource_name(req.kernel_id)
    command = build_command(req, options)  # type: ignore[arg-type]
    cut = command.index("--")  # the kernel launcher's own options go before the kernel's argv
    command[cut:cut] = ["--ip", "$(POD_IP)", "--bind-ip", "$(POD_IP)"]
    container: dict[str, Any] = {
        "name": CONTAINER,
        "image": choose_image(req, options),  # type: ignore[arg-type]
        "imagePullPolicy": options.image_pull_policy,
        "command": command,
        "env": build_env(req, options, name, reply_env),
        "securityContext": {"allowPrivilegeEscalation": False},
    }
    limits = resources(req, options)
    if limits:
        container["resources"] = {"requests": dict(limits), "limits": dict(limits)}
    if req.working_dir:
        container["workingDir"] = req.working_dir
    if options.volumes:
        container["volumeMounts"] = [v.mount() for v in options.volumes]
    spec: dict[str, Any] = {
        "restartPolicy": "Never",
        "terminationGracePeriodSeconds": max(1, round(options.stop_grace)),
        "automountServiceAccountToken": bool(options.service_account),
        "enableServiceLinks": False,
        "containers": [container],
    }
    ctx = build_security_context(req, options)
    if ctx:
        spec["securityContext"] = ctx
    if options.service_account:
        spec["serviceAccountName"] = options.service_account
    if options.node_selector:
        spec["nodeSelector"] = dict(options.node_selector)
    if options.tolerations:
        spec["tolerations"] = [t.manifest() for t in options.tolerations]
    if options.volumes:
        spec["volumes"] = [v.manifest() for v in options.volumes]
    metadata: dict[str, Any] = {"name": name, "namespace": namespace,
                                "labels": build_labels(req, options)}
    if options.annotations:
        metadata["annotations"] = dict(options.annotations)
    return {"apiVersion": "v1", "kind": "Pod", "metadata": metadata, "spec": spec}
