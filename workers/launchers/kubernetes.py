"""kubernetes: a pod per kernel, placed by the Kubernetes scheduler.

The pod runs the kernel launcher, which reports the kernel's pod IP and ports through the
one-shot sealed reply (workers/launchers/reply.py); the launch, its wait, signals through the
launcher's command port and stop-by-label are EngineLauncher's (docker_common.py), shared with
the docker launchers. This module only creates, watches and deletes pods, their Secrets and
per-user namespaces, and maps the client's ApiException into poolgate's errors.

The rule of this module: pods are watched, not polled. One watch per launcher lists the pool's
pods (label ``poolgate.pool``), then watches from the list's resourceVersion, renewing the
watch where it ended; an expired resourceVersion (410 Gone) lists again. poll() reads that
cache; only a pod the watch has not seen yet is read with a GET. A restarted worker's first
list finds the pods its kernels run in by label.
"""
from __future__ import annotations

import contextlib
import json
import logging
import socket
import threading
import time
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

from ..errors import BackendUnavailable, LaunchRejected
from ..protocol import KernelHandle, LaunchRequest
from .docker_builders import KERNEL_LABEL, choose_image, resource_name
from .docker_common import EngineLauncher, labelled
from .k8s_builders import (
    POOL_LABEL,
    KubernetesOptions,
    build_pod_manifest,
    build_secret,
    build_security_context,
    choose_namespace,
    label_value,
)
from .k8s_namespaces import UserNamespaces, is_status
from .reply import Expectation

if TYPE_CHECKING:
    from ..config import PoolConfig

log = logging.getLogger(__name__)

#: Container waiting reasons that do not pass by themselves: the launch fails at once.
CANNOT_START = frozenset({"ErrImagePull", "ImagePullBackOff", "InvalidImageName",
                          "CreateContainerConfigError", "CreateContainerError",
                          "ErrImageNeverPull"})


def kubernetes_module() -> Any:
    """The kubernetes client, or an ImportError that names the extra to install."""
    try:
        import kubernetes
    except ImportError as exc:
        raise ImportError("the kubernetes launcher needs the kubernetes client: "
                          "pip install 'poolgate[kubernetes]'") from exc
    return kubernetes


def status_message(exc: Any) -> str:
    """The API server's own words from an ApiException (its Status object's message)."""
    try:
        return str(json.loads(exc.body).get("message") or exc.reason)
    except (TypeError, ValueError, AttributeError):
        return str(getattr(exc, "reason", "") or exc)


@contextlib.contextmanager
def api_errors(what: str) -> Iterator[None]:
    """Map the client's errors into poolgate's: the API server unreachable, overloaded or
    failing is BackendUnavailable; anything it refuses (403 RBAC, 422 invalid, 409) is
    LaunchRejected with its message."""
    k8s = kubernetes_module()
    import urllib3

    try:
        yield
    except k8s.client.ApiException as exc:
        code = int(exc.status or 0)
        msg = f"{what}: the Kubernetes API answered {code} {exc.reason}: {status_message(exc)}"
        if code == 0 or code == 429 or code >= 500:
            raise BackendUnavailable(msg) from exc
        raise LaunchRejected(msg) from exc
    except (urllib3.exceptions.HTTPError, OSError) as exc:
        raise BackendUnavailable(f"{what}: the Kubernetes API is unreachable ({exc})") from exc
    except k8s.config.ConfigException as exc:
        raise BackendUnavailable(f"{what}: no Kubernetes configuration ({exc})") from exc


class PodWatcher:
    """The pool's pods, kept current by list + watch (resourceVersion, bookmarks, 410 relist)."""

    def __init__(self, launcher: KubernetesLauncher) -> None:
        self.launcher = launcher
        self.pods: dict[str, dict[str, Any]] = {}   # kernel id -> pod (API JSON)
        self.synced = threading.Event()
        self.relists = 0
        self._stop = threading.Event()
        self._watch: Any = None
        self._thread = threading.Thread(target=self._run, daemon=True, name="pod-watch")

    def start(self) -> PodWatcher:
        self._thread.start()
        return self

    def close(self) -> None:
        self._stop.set()
        if self._watch is not None:
            self._watch.stop()

    def _list(self, **kw: Any) -> Any:
        api, opts = self.launcher.client, self.launcher.options
        selector = f"{POOL_LABEL}={label_value(self.launcher.pool.name)}"
        if opts.per_user_namespace or opts.allow_kernel_namespace:
            return api.list_pod_for_all_namespaces, (), {"label_selector": selector, **kw}
        return api.list_namespaced_pod, (opts.namespace,), {"label_selector": selector, **kw}

    def _run(self) -> None:
        k8s = kubernetes_module()
        while not self._stop.is_set():
            try:
                func, args, kw = self._list()
                listed = func(*args, **kw)
                ser = self.launcher.client.api_client.sanitize_for_serialization
                self.pods = {p["metadata"]["labels"][KERNEL_LABEL]: p
                             for p in map(ser, listed.items)
                             if KERNEL_LABEL in (p["metadata"].get("labels") or {})}
                self.synced.set()
                self._follow(k8s, func, args, kw, str(listed.metadata.resource_version))
            except Exception as exc:  # noqa: BLE001 - the watch must outlive API trouble
                if self._stop.is_set():
                    return
                if is_status(exc, 410):
                    self.relists += 1
                    log.info("Pool %s: pod watch expired (410 Gone); listing pods again",
                             self.launcher.pool.name)
                    continue
                log.warning("Pool %s: pod watch failed (%s); listing again in 2s",
                            self.launcher.pool.name, exc)
                self._stop.wait(2.0)

    def _follow(self, k8s: Any, func: Any, args: tuple[Any, ...], kw: dict[str, Any],
                version: str) -> None:
        """Watch from ``version`` until stopped; raises on 410 (and other errors)."""
        ser = self.launcher.client.api_client.sanitize_for_serialization
        while not self._stop.is_set():
            self._watch = k8s.watch.Watch()
            for event in self._watch.stream(func, *args, **kw, resource_version=version,
                                            allow_watch_bookmarks=True,
                                            timeout_seconds=self.launcher.options.watch_timeout):
                kind = event["type"]
                obj = event["raw_object"] if kind == "BOOKMARK" else ser(event["object"])
                version = str(obj["metadata"].get("resourceVersion") or version)
                kid = (obj["metadata"].get("labels") or {}).get(KERNEL_LABEL)
                if kind == "BOOKMARK" or not kid:
                    continue
                log.debug("Pool %s: pod %s %s", self.launcher.pool.name,
                          obj["metadata"]["name"], kind)
                if kind == "DELETED":
                    self.pods.pop(kid, None)
                else:
                    self.pods[kid] = obj
                if self._stop.is_set():
                    return


class KubernetesLauncher(UserNamespaces, EngineLauncher):
    """Starts each kernel as a pod that the kubelet never restarts."""

    Options = KubernetesOptions  # type: ignore[assignment]
    kind = "pod"
    backend = "Kubernetes"

    def __init__(self, pool: PoolConfig, options: KubernetesOptions, runtime_dir: str) -> None:
        super().__init__(pool, options, runtime_dir)  # type: ignore[arg-type]
        self.options: KubernetesOptions = options  # type: ignore[assignment]
        self._watcher: PodWatcher | None = None
        self._namespaces: dict[str, tuple[str, bool]] = {}  # kernel id -> (namespace, ours)

    @classmethod
    def runs_here(cls, options: KubernetesOptions) -> str | None:  # type: ignore[override]
        return "it needs a Kubernetes cluster; start its workers with 'poolgate worker'"

    def errors(self, what: str) -> contextlib.AbstractContextManager[None]:
        return api_errors(what)

    @property
    def client(self) -> Any:
        """The CoreV1Api: a kubeconfig file where options name one, else in-cluster config."""
        with self._lock:
            if self._client is None:
                k8s = kubernetes_module()
                cfg = k8s.client.Configuration()
                with api_errors(f"pool {self.pool.name}"):
                    if self.options.kubeconfig:
                        k8s.config.load_kube_config(config_file=self.options.kubeconfig,
                                                    context=self.options.context or None,
                                                    client_configuration=cfg)
                    else:
                        k8s.config.load_incluster_config(client_configuration=cfg)
                self._client = k8s.client.CoreV1Api(k8s.client.ApiClient(cfg))
            return self._client

    @property
    def watcher(self) -> PodWatcher:
        if self._watcher is None:
            self._watcher = PodWatcher(self).start()
        return self._watcher

    def prepare(self) -> None:
        super().prepare()
        self.watcher.synced.wait(self.options.api_timeout)

    def close(self) -> None:
        if self._watcher is not None:
            self._watcher.close()
        self._replies.close()
        if self._client is not None:
            self._client.api_client.close()

    def response_host(self) -> str:
        # in a pod, the host name resolves to the pod's IP, which other pods reach
        return self.options.response_address or socket.gethostbyname(socket.gethostname())

    # -- namespaces -------------------------------------------------------------------------

    def launch(self, req: LaunchRequest,
               previous: KernelHandle | None = None) -> Iterator[KernelHandle]:
        self._namespaces[req.kernel_id] = choose_namespace(req, self.options)
        yield from super().launch(req, previous)

    def _namespace(self, handle: KernelHandle) -> str:
        ns = str(handle.data.get("namespace") or "")
        if ns:
            self._namespaces.setdefault(labelled(handle), (ns, bool(handle.data.get("owned"))))
            return ns
        return self._where(labelled(handle))[0]

    def _where(self, kernel_id: str) -> tuple[str, bool]:
        """(namespace, ours) of a kernel: known from its launch, seen by the watch, or the
        pool's namespace."""
        if kernel_id in self._namespaces:
            return self._namespaces[kernel_id]
        pod = self.watcher.pods.get(kernel_id)
        if pod is not None:
            ns = str(pod["metadata"]["namespace"])
            return ns, ns.startswith(self.options.namespace_prefix) and \
                self.options.per_user_namespace
        return self.options.namespace, False

    # -- warm kernels (workers/warm.py) -------------------------------------------------------

    def warm_fits(self, warm: KernelHandle, started_for: LaunchRequest,
                  req: LaunchRequest) -> str:
        """A warm pod keeps its namespace, image and securityContext: a request for another
        (KERNEL_NAMESPACE, KERNEL_IMAGE, KERNEL_UID/KERNEL_GID) starts cold."""
        try:
            ns = choose_namespace(req, self.options)[0]
            image = choose_image(req, self.options)  # type: ignore[arg-type]
            ctx = build_security_context(req, self.options)
        except LaunchRejected as exc:
            return exc.message
        if ns != warm.data.get("namespace"):
            return (f"the request's namespace is {ns!r}; warm kernels run in "
                    f"{warm.data.get('namespace')!r}")
        if image != warm.data.get("image"):
            return (f"the request asks for image {image!r}; warm kernels run "
                    f"{warm.data.get('image')!r}")
        if ctx != build_security_context(started_for, self.options):
            return ("the request asks for another user (KERNEL_UID/KERNEL_GID) than warm "
                    "kernels run as")
        return ""

    # -- EngineLauncher's hooks -------------------------------------------------------------

    def create(self, req: LaunchRequest, exp: Expectation) -> dict[str, Any]:
        ns, ours = self._namespaces.get(req.kernel_id) or choose_namespace(req, self.options)
        reply = exp.env()
        pod = build_pod_manifest(req, self.options, ns, reply)
        secret = build_secret(req, self.options, ns, reply)
        try:
            if ours:
                self._create_in_user_namespace(ns, req, secret, pod)
            else:
                self.client.create_namespaced_secret(ns, secret)
                self.client.create_namespaced_pod(ns, pod)
        except BaseException:
            # no handle was yielded, so no stop() follows: remove the Secret (and the user's
            # namespace, if it is now empty) here
            with contextlib.suppress(Exception):
                self.remove_labelled(req.kernel_id, grace=0)
                if ours:
                    self._remove_namespace_if_empty(ns)
            raise
        return {"pod": pod["metadata"]["name"], "name": pod["metadata"]["name"],
                "namespace": ns, "owned": ours, "image": pod["spec"]["containers"][0]["image"]}

    def _pod(self, handle: KernelHandle) -> dict[str, Any] | None:
        """The kernel's pod: from the watch, else read (None where there is none)."""
        pod = self.watcher.pods.get(labelled(handle))
        name = str(handle.data.get("pod") or resource_name(labelled(handle)))
        if pod is not None and pod["metadata"]["name"] == name:
            return pod
        k8s = kubernetes_module()
        try:
            got = self.client.read_namespaced_pod(name, self._namespace(handle))
        except k8s.client.ApiException as exc:
            if is_status(exc, 404):
                return None
            raise
        out: dict[str, Any] = self.client.api_client.sanitize_for_serialization(got)
        return out

    def state(self, handle: KernelHandle) -> tuple[str | None, str]:
        pod = self._pod(handle)
        if pod is None:
            return f"its pod {handle.data.get('pod')} is gone", ""
        status = pod.get("status") or {}
        phase = str(status.get("phase") or "Pending")
        if pod["metadata"].get("deletionTimestamp"):
            return f"its pod {pod['metadata']['name']} is being deleted", phase
        for cs in status.get("containerStatuses") or []:
            st = cs.get("state") or {}
            if "terminated" in st:
                t = st["terminated"]
                why = (f"its pod ended ({phase}): the container exited with status "
                       f"{t.get('exitCode')} ({t.get('reason') or 'no reason'})")
                return why, why
            waiting = st.get("waiting") or {}
            if waiting.get("reason") in CANNOT_START:
                why = f"its pod cannot start: {waiting['reason']}: {waiting.get('message', '')}"
                return why, why
        if phase in ("Succeeded", "Failed"):
            return f"its pod ended ({phase}): {status.get('message') or status.get('reason')}", ""
        for cond in status.get("conditions") or []:
            if cond.get("status") == "False" and cond.get("reason"):
                return None, f"pod {phase}: {cond['reason']}: {cond.get('message', '')}"
        return None, f"pod {phase}"

    def timeout_reason(self, handle: KernelHandle, last: str) -> str:
        """The pod's warning events (FailedScheduling, BackOff, ...): why it is still Pending."""
        name = str(handle.data.get("pod") or resource_name(labelled(handle)))
        events = self.client.list_namespaced_event(
            self._namespace(handle), field_selector=f"involvedObject.name={name}").items
        warnings = [f"{e.reason}: {e.message}" for e in events if e.type == "Warning"]
        return "; ".join(dict.fromkeys(warnings[-3:])) or last

    def remove_labelled(self, kernel_id: str, grace: float) -> int:
        k8s = kubernetes_module()
        ns = self._where(kernel_id)[0]
        selector = f"{KERNEL_LABEL}={kernel_id}"
        pods = self.client.list_namespaced_pod(ns, label_selector=selector).items
        for pod in pods:
            with contextlib.suppress(k8s.client.ApiException):  # gone already
                self.client.delete_namespaced_pod(pod.metadata.name, ns,
                                                  grace_period_seconds=int(grace))
        for secret in self.client.list_namespaced_secret(ns, label_selector=selector).items:
            with contextlib.suppress(k8s.client.ApiException):
                self.client.delete_namespaced_secret(secret.metadata.name, ns)
        # a pod's name is the kernel's: a restart can create the new one only once it is gone
        deadline = time.monotonic() + grace + 30
        while pods and self.client.list_namespaced_pod(ns, label_selector=selector).items:
            if time.monotonic() > deadline:
                log.warning("Kernel %s: its pod in %s outlived its grace period", kernel_id, ns)
                break
            time.sleep(0.2)
        return len(pods)

    def stop(self, handle: KernelHandle, grace: float = 5.0) -> None:
        """Remove the kernel's pod and Secret, then (per_user_namespace) its namespace if no
        other kernel is in it or being launched into it. Not on a launch's own clean-up of an
        earlier try (remove_labelled), which would delete the namespace it is about to use."""
        ns = self._namespace(handle)
        ours = self._where(labelled(handle))[1]
        try:
            super().stop(handle, grace)
            if ours:
                with self.errors(f"kernel {handle.kernel_id}"):
                    self._remove_namespace_if_empty(ns)
        finally:
            self._namespaces.pop(labelled(handle), None)

    def logs(self, handle: KernelHandle) -> str:
        name = str(handle.data.get("pod") or resource_name(labelled(handle)))
        try:
            return str(self.client.read_namespaced_pod_log(name, self._namespace(handle),
                                                           tail_lines=40))
        except kubernetes_module().client.ApiException:
            return ""
