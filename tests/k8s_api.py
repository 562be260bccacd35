"""FakeKubernetes: a small, API-faithful Kubernetes API server for the kubernetes launcher's tests.

What it serves (core/v1, plus networking.k8s.io/v1 NetworkPolicies stored but not enforced; JSON
only, as the official Python client calls it): pods (create, 409 AlreadyExists, get, list by
labelSelector, watch from a resourceVersion with bookmarks and timeoutSeconds, delete with a grace
period, 404, logs), namespaces (create, 409 AlreadyExists, get, list, merge-patch of labels and
annotations, delete with preconditions: Terminating, during which creating anything in it is 403
Forbidden (NamespaceTerminating) and another delete is 409, then gone with everything in it),
secrets and events. Errors are ``Status`` objects
with the API's reasons (NotFound, AlreadyExists, Forbidden, Expired, Unauthorized); every object
carries uid, resourceVersion and creationTimestamp; a list carries its resourceVersion.

Honest about what it is not: one node ("fake-node", allocatable cpu/memory/GPUs given to the
constructor), no taints, no admission, no securityContext enforcement (processes run as the test
user), and images are names in a dict whose value is the image's environment. The "kubelet"
runs each scheduled pod's single container as a local process in a session of its own, with the
pod's env (value, fieldRef, secretKeyRef) and ``$(VAR)`` expanded in its command, and gives the
pod a loopback address of its own as its pod IP (127.X.Y.Z), so a kernel really binds there.
A pod whose nodeSelector does not match or whose requests do not fit stays Pending with a
PodScheduled=False condition and a FailedScheduling event; an unknown image is ErrImagePull.
:meth:`FakeKubernetes.expire_watches` ends every open watch with a 410 Expired ERROR event and
compacts history, so a client must list again.
"""
from __future__ import annotations

import base64
import copy
import json
import os
import queue
import random
import re
import signal
import subprocess
import threading
import time
import uuid
from collections.abc import Mapping
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer  # noqa: F401
from pathlib import Path
from typing import Any

import psutil

from poolgate.workers.resources import parse_cpus, parse_memory

KINDS = {"pods": "Pod", "secrets": "Secret", "events": "Event", "namespaces": "Namespace",
         "networkpolicies": "NetworkPolicy"}
VERSIONS = {"networkpolicies": "networking.k8s.io/v1"}  # else core "v1"


def typed(kind: str, obj: dict[str, Any]) -> dict[str, Any]:
    """``obj`` (as stored) with its kind and apiVersion, as the API returns it."""
    return {"kind": KINDS[kind], "apiVersion": VERSIONS.get(kind, "v1"), **obj}
NODE = "fake-node"


def now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


def status(code: int, reason: str, message: str, **details: Any) -> dict[str, Any]:
    return {"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
            "message": message, "reason": reason, "details": details, "code": code}


class ApiError(Exception):
    def __init__(self, code: int, reason: str, message: str, **details: Any) -> None:
        super().__init__(message)
        self.body = status(code, reason, message, **details)


def selected(obj: Mapping[str, Any], labels: str, fields: str) -> bool:
    """Whether ``obj`` matches a labelSelector (k=v, k==v, k!=v, k, !k) and a fieldSelector
    (metadata.name, metadata.namespace, involvedObject.name, status.phase; = and !=)."""
    have = obj["metadata"].get("labels") or {}
    for term in filter(None, labels.split(",")):
        m = re.match(r"^(!?)([^=!]+)(?:(==|=|!=)(.*))?$", term.strip())
        if not m:
            raise ApiError(400, "BadRequest", f"unable to parse requirement: {term!r}")
        neg, key, op, value = m.groups()
        if op is None:
            if (key in have) == bool(neg):
                return False
        elif (have.get(key) == value) != (op != "!="):
            return False
    for term in filter(None, fields.split(",")):
        key, op, value = re.match(r"^([\w.]+)(==|=|!=)(.*)$", term).groups()  # type: ignore
        cur: Any = obj
        for part in key.split("."):
            cur = cur.get(part) if isinstance(cur, dict) else None
        if (str(cur) == value) != (op != "!="):
            return False
    return True


class Pod:
    """The kubelet's half of one pod: its process, and how to find all of its container's
    (HOSTNAME is the pod's name, as the kubelet sets it; the kernel launcher's kernel runs in a
    process group of its own, so the container's end is a sweep, as a PID namespace's is)."""

    def __init__(self, proc: subprocess.Popen[bytes], log: Path, name: str) -> None:
        self.proc, self.log, self.name, self.started = proc, log, name, time.time() - 1

    def sweep(self) -> None:
        """Kill whatever of the container is left (its PID 1 has ended, or is killed)."""
        for p in psutil.process_iter(["environ", "create_time"]):
            try:
                if (p.info["environ"] or {}).get("HOSTNAME") == self.name and \
                        p.info["create_time"] >= self.started:
                    p.kill()
            except psutil.Error:
                continue


class FakeKubernetes:
    """The API server, scheduler and kubelet, in one process (threads)."""

    def __init__(self, folder: Path, images: Mapping[str, Mapping[str, str]],
                 cpu: str = "4", memory: str = "8Gi", gpus: int = 0,
                 node_labels: Mapping[str, str] | None = None, token: str = "") -> None:
        self.folder, self.images, self.token = folder, dict(images), token or uuid.uuid4().hex
        self.allocatable = {"cpu": cpu, "memory": memory, "pods": "110",
                            "nvidia.com/gpu": str(gpus)}
        self.node_labels = {"kubernetes.io/hostname": NODE, "kubernetes.io/os": "linux",
                            **(node_labels or {})}
        self.objects: dict[tuple[str, str, str], dict[str, Any]] = {}  # (kind, ns, name)
        self.history: list[tuple[int, str, dict[str, Any]]] = []       # (rv, type, object)
        self.rv, self.floor = 1, 0
        self.watches: list[tuple[queue.Queue[Any], str, str, str, str]] = []
        self.kubelet: dict[tuple[str, str], Pod] = {}
        self.lock = threading.RLock()
        self.ips = (random.randint(10, 250), random.randint(0, 250), 2)
        self.requests: list[str] = []
        self.namespace_linger = 0.0  # seconds a deleted namespace stays Terminating when empty
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        self.server.daemon_threads = True
        self.port = self.server.server_address[1]
        self.url = f"http://127.0.0.1:{self.port}"
        for ns in ("default", "kube-system"):
            self._store("namespaces", "", {"metadata": {"name": ns},
                                           "status": {"phase": "Active"}})

    # -- lifecycle --------------------------------------------------------------------------

    def start(self) -> FakeKubernetes:
        threading.Thread(target=self.server.serve_forever, daemon=True, name="fake-k8s").start()
        return self

    def stop(self) -> None:
        self.server.shutdown()
        with self.lock:
            for pod in self.kubelet.values():
                self._kill(pod, signal.SIGKILL)
                pod.sweep()
            for q, *_ in self.watches:
                q.put(None)

    def kubeconfig(self, path: Path) -> Path:
        path.write_text(json.dumps({  # YAML is a superset of JSON
            "apiVersion": "v1", "kind": "Config", "current-context": "fake",
            "clusters": [{"name": "fake", "cluster": {"server": self.url}}],
            "users": [{"name": "poolgate", "user": {"token": self.token}}],
            "contexts": [{"name": "fake", "context": {"cluster": "fake", "user": "poolgate"}}]}))
        return path

    def expire_watches(self) -> int:
        """End every open watch with 410 Expired and compact history; how many there were."""
        with self.lock:
            self.floor = self.rv
            gone = status(410, "Expired", f"too old resource version: {self.rv - 1} ({self.rv})")
            for q, *_ in self.watches:
                q.put({"type": "ERROR", "object": gone})
            n = len(self.watches)
            self.watches.clear()
            return n

    def list(self, kind: str, ns: str = "", labels: str = "") -> list[dict[str, Any]]:
        with self.lock:
            return [copy.deepcopy(o) for (k, n, _), o in self.objects.items()
                    if k == kind and (not ns or n == ns) and selected(o, labels, "")]

    # -- the store --------------------------------------------------------------------------

    def _emit(self, kind: str, type_: str, obj: dict[str, Any]) -> None:
        snap = typed(kind, copy.deepcopy(obj))
        self.history.append((self.rv, type_, snap))
        for q, k, ns, labels, fields in list(self.watches):
            if k == kind and (not ns or ns == obj["metadata"].get("namespace", "")) and \
                    selected(snap, labels, fields):
                q.put({"type": type_, "object": snap})

    def _store(self, kind: str, ns: str, obj: dict[str, Any], type_: str = "") -> dict[str, Any]:
        with self.lock:
            meta = obj["metadata"]
            key = (kind, ns, meta["name"])
            if not type_:
                type_ = "MODIFIED" if key in self.objects else "ADDED"
            if type_ == "ADDED":
                meta.update(uid=str(uuid.uuid4()), creationTimestamp=now())
                if ns:
                    meta["namespace"] = ns
            self.rv += 1
            meta["resourceVersion"] = str(self.rv)
            self.objects[key] = obj
            self._emit(kind, type_, obj)
            return copy.deepcopy(obj)

    def _remove(self, kind: str, ns: str, name: str) -> None:
        with self.lock:
            obj = self.objects.pop((kind, ns, name), None)
            if obj is not None:
                self.rv += 1
                obj["metadata"]["resourceVersion"] = str(self.rv)
                self._emit(kind, "DELETED", obj)

    def _get(self, kind: str, ns: str, name: str) -> dict[str, Any]:
        obj = self.objects.get((kind, ns, name))
        if obj is None:
            raise ApiError(404, "NotFound", f'{kind} "{name}" not found', name=name, kind=kind)
        return obj

    def _event(self, pod: dict[str, Any], type_: str, reason: str, message: str) -> None:
        meta = pod["metadata"]
        name = f"{meta['name']}.{uuid.uuid4().hex[:16]}"
        self._store("events", meta["namespace"], {
            "metadata": {"name": name}, "type": type_, "reason": reason, "message": message,
            "involvedObject": {"kind": "Pod", "namespace": meta["namespace"], "name":
                               meta["name"], "uid": meta["uid"], "apiVersion": "v1"},
            "source": {"component": "default-scheduler" if "Scheduling" in reason else
                       "kubelet", "host": NODE},
            "firstTimestamp": now(), "lastTimestamp": now(), "count": 1,
            "reportingComponent": "", "reportingInstance": ""})

    # -- the API ----------------------------------------------------------------------------

    def create(self, kind: str, ns: str, body: dict[str, Any]) -> dict[str, Any]:
        with self.lock:
            name = (body.get("metadata") or {}).get("name", "")
            if not name:
                raise ApiError(422, "Invalid", f"{KINDS[kind]} \"\" is invalid: metadata.name: "
                               "Required value: name or generateName is required", kind=kind)
            if kind != "namespaces":
                space = self.objects.get(("namespaces", "", ns))
                if space is None:
                    raise ApiError(404, "NotFound", f'namespaces "{ns}" not found',
                                   name=ns, kind="namespaces")
                if space["status"]["phase"] == "Terminating":
                    raise ApiError(403, "Forbidden", f"{kind} \"{name}\" is forbidden: unable "
                                   f"to create new content in namespace {ns} because it is "
                                   "being terminated", name=name, kind=kind, causes=[{
                                       "reason": "NamespaceTerminating", "field":
                                       "metadata.namespace", "message":
                                       f"namespace {ns} is being terminated"}])
            if (kind, ns, name) in self.objects:
                raise ApiError(409, "AlreadyExists", f'{kind} "{name}" already exists',
                               name=name, kind=kind)
            obj = {k: v for k, v in copy.deepcopy(body).items() if k not in ("kind",
                                                                             "apiVersion")}
            if kind == "namespaces":
                obj["spec"] = {"finalizers": ["kubernetes"]}
                obj["status"] = {"phase": "Active"}
            if kind == "pods":
                obj["status"] = {"phase": "Pending", "qosClass": "BestEffort"}
            out = self._store(kind, ns, obj, "ADDED")
        if kind == "pods":
            threading.Thread(target=self._schedule, args=(ns, name), daemon=True).start()
        return out

    def patch(self, kind: str, ns: str, name: str, body: Any) -> dict[str, Any]:
        """A JSON merge patch (RFC 7386) of metadata labels and annotations, as
        ``application/merge-patch+json``; a change gives a new resourceVersion, a no-op none."""
        if not isinstance(body, dict) or set(body) - {"metadata"} or \
                set(body.get("metadata") or {}) - {"labels", "annotations"}:
            raise ApiError(422, "Invalid", "this fake API server patches only "
                           "metadata.labels and metadata.annotations")
        with self.lock:
            obj = self._get(kind, ns, name)
            meta, changed = obj["metadata"], False
            for field_, values in body["metadata"].items():
                have = dict(meta.get(field_) or {})
                for key, value in (values or {}).items():
                    if have.get(key) != value:
                        changed = True
                        if value is None:
                            have.pop(key, None)
                        else:
                            have[key] = str(value)
                meta[field_] = have
            return self._store(kind, ns, obj) if changed else copy.deepcopy(obj)

    def delete(self, kind: str, ns: str, name: str, grace: int | None,
               preconditions: Mapping[str, Any] | None = None) -> dict[str, Any]:
        with self.lock:
            obj = self._get(kind, ns, name)
            for field_, key in (("resourceVersion", "resourceVersion"), ("uid", "uid")):
                want = (preconditions or {}).get(field_)
                if want is not None and want != obj["metadata"][key]:
                    raise ApiError(409, "Conflict", f'Operation cannot be fulfilled on {kind} '
                                   f'"{name}": Precondition failed: {key[0].upper() + key[1:]} '
                                   f'in precondition: {want}, {key[0].upper() + key[1:]} in '
                                   f'object meta: {obj["metadata"][key]}', name=name, kind=kind)
            if kind == "namespaces" and obj["status"]["phase"] == "Terminating":
                raise ApiError(409, "Conflict", f'Operation cannot be fulfilled on namespaces '
                               f'"{name}": The system is ensuring all content is removed from '
                               'this namespace.  Upon completion, this namespace will '
                               'automatically be purged by the system.', name=name,
                               kind="namespaces")
            if kind == "namespaces":
                obj["status"]["phase"] = "Terminating"
                obj["metadata"]["deletionTimestamp"] = now()
                self._store(kind, ns, obj)
                threading.Thread(target=self._finalize_namespace, args=(name,),
                                 daemon=True).start()
                return copy.deepcopy(obj)
            if kind != "pods":
                self._remove(kind, ns, name)
                return {"kind": "Status", "apiVersion": "v1", "metadata": {},
                        "status": "Success", "details": {"name": name, "kind": kind,
                                                         "uid": obj["metadata"]["uid"]}}
            if grace is None:
                grace = int(obj["spec"].get("terminationGracePeriodSeconds", 30))
            if not obj["metadata"].get("deletionTimestamp"):
                obj["metadata"].update(deletionTimestamp=now(), deletionGracePeriodSeconds=grace)
                obj = self._store(kind, ns, obj)
            pod = self.kubelet.get((ns, name))
        if pod is None or pod.proc.poll() is not None:
            self._remove("pods", ns, name)
        else:
            self._kill(pod, signal.SIGKILL if grace == 0 else signal.SIGTERM)
            threading.Thread(target=self._reap, args=(ns, name, pod, grace),
                             daemon=True).start()
        return copy.deepcopy(obj)

    def _finalize_namespace(self, name: str) -> None:
        """The namespace controller: delete every pod (they end as pods do), wait for them to
        go, linger ``namespace_linger`` seconds more (a real cluster's controller takes a few
        seconds), then remove the rest and the namespace."""
        for (kind, ns, obj_name) in list(self.objects):
            if ns == name and kind == "pods":
                self.delete(kind, ns, obj_name, 0)
        deadline = time.monotonic() + 30
        while any(k[1] == name for k in self.objects if k[0] == "pods") and \
                time.monotonic() < deadline:
            time.sleep(0.05)
        time.sleep(self.namespace_linger)
        with self.lock:
            for key in [k for k in self.objects if k[1] == name]:
                self._remove(*key)
            self._remove("namespaces", "", name)

    # -- scheduler and kubelet --------------------------------------------------------------

    def _unschedulable(self, spec: dict[str, Any]) -> str:
        selector = spec.get("nodeSelector") or {}
        if any(self.node_labels.get(k) != v for k, v in selector.items()):
            return "0/1 nodes are available: 1 node(s) didn't match Pod's node affinity/selector."
        used: dict[str, float] = {"cpu": 0.0, "memory": 0.0, "nvidia.com/gpu": 0.0}
        for (kind, _, _), o in self.objects.items():
            if kind == "pods" and o["spec"].get("nodeName") and \
                    o["status"]["phase"] in ("Pending", "Running"):
                for r, v in self._requests(o["spec"]).items():
                    used[r] = used.get(r, 0.0) + v
        short = [r for r, v in self._requests(spec).items()
                 if used.get(r, 0.0) + v > self._quantity(r, self.allocatable.get(r, "0"))]
        if short:
            why = ", ".join(f"1 Insufficient {r}" for r in short)
            return f"0/1 nodes are available: {why}. preemption: 0/1 nodes are available: " \
                   "1 No preemption victims found for incoming pod."
        return ""

    @staticmethod
    def _quantity(resource: str, value: str) -> float:
        if resource == "cpu":
            return parse_cpus(value, resource)
        if resource == "memory":
            return float(parse_memory(value, resource))
        return float(value)

    def _requests(self, spec: dict[str, Any]) -> dict[str, float]:
        out: dict[str, float] = {}
        for c in spec["containers"]:
            res = c.get("resources") or {}
            for r, v in {**(res.get("limits") or {}), **(res.get("requests") or {})}.items():
                out[r] = out.get(r, 0.0) + self._quantity(r, str(v))
        return out

    def _update(self, ns: str, name: str, **status: Any) -> dict[str, Any] | None:
        with self.lock:
            obj = self.objects.get(("pods", ns, name))
            if obj is None or obj["metadata"].get("deletionTimestamp"):
                return None
            obj["status"].update(status)
            return self._store("pods", ns, obj)

    def _schedule(self, ns: str, name: str) -> None:
        time.sleep(0.05)
        with self.lock:
            obj = self.objects.get(("pods", ns, name))
            if obj is None:
                return
            why = self._unschedulable(obj["spec"])
            cond = {"type": "PodScheduled", "lastTransitionTime": now(), "lastProbeTime": None}
            if why:
                self._update(ns, name, conditions=[{**cond, "status": "False", "reason":
                                                    "Unschedulable", "message": why}])
                self._event(obj, "Warning", "FailedScheduling", why)
                return
            obj["spec"]["nodeName"] = NODE
            self._update(ns, name, conditions=[{**cond, "status": "True"}], hostIP="127.0.0.1")
            self._event(obj, "Normal", "Scheduled", f"Successfully assigned {ns}/{name} to "
                        f"{NODE}")
        self._start(ns, name)

    def _container_status(self, c: dict[str, Any], state: dict[str, Any],
                          ready: bool = False) -> list[dict[str, Any]]:
        return [{"name": c["name"], "image": c["image"], "imageID": f"fake://{c['image']}",
                 "ready": ready, "restartCount": 0, "started": ready, "state": state}]

    def _start(self, ns: str, name: str) -> None:
        obj = self.objects[("pods", ns, name)]
        c = obj["spec"]["containers"][0]
        if c["image"] not in self.images:
            msg = (f'Failed to pull image "{c["image"]}": rpc error: code = NotFound desc = '
                   f'failed to pull and unpack image "{c["image"]}": not found')
            self._event(obj, "Warning", "Failed", msg)
            self._update(ns, name, containerStatuses=self._container_status(
                c, {"waiting": {"reason": "ErrImagePull", "message": msg}}))
            return
        with self.lock:
            a, b, n = self.ips
            self.ips = (a, b, n % 250 + 1)
            ip = f"127.{a}.{b}.{n}"
            try:
                env = self._env(obj, c, ip)
            except ApiError as exc:
                self._update(ns, name, containerStatuses=self._container_status(c, {"waiting": {
                    "reason": "CreateContainerConfigError", "message": exc.body["message"]}}))
                return
            def expand(a: str) -> str:
                return re.sub(r"\$\((\w+)\)", lambda m: env.get(m[1], m[0]), a)

            argv = [expand(a) for a in [*c.get("command", []), *c.get("args", [])]]
            log = self.folder / f"{ns}_{name}_{obj['metadata']['uid']}.log"
            with open(log, "wb") as out:
                proc = subprocess.Popen(argv, env=env, stdout=out, stderr=subprocess.STDOUT,
                                        cwd=c.get("workingDir") or self.folder,
                                        start_new_session=True)
            pod = self.kubelet[(ns, name)] = Pod(proc, log, name)
            self._event(obj, "Normal", "Started", "Started container " + c["name"])
            running = {"running": {"startedAt": now()}}
            self._update(ns, name, phase="Running", podIP=ip, podIPs=[{"ip": ip}],
                         startTime=now(), containerStatuses=self._container_status(
                             c, running, ready=True))
        code = proc.wait()
        pod.sweep()
        term = {"terminated": {"exitCode": code if code >= 0 else 128 - code,
                               "reason": "Completed" if code == 0 else "Error",
                               "startedAt": running["running"]["startedAt"],
                               "finishedAt": now(), "containerID": f"fake://{proc.pid}"}}
        self._update(ns, name, phase="Succeeded" if code == 0 else "Failed",
                     containerStatuses=self._container_status(c, term))

    def _env(self, obj: dict[str, Any], c: dict[str, Any], ip: str) -> dict[str, str]:
        """The container's environment: the image's, then the pod's (fieldRef, secretKeyRef)."""
        env = {**self.images[c["image"]], "HOSTNAME": obj["metadata"]["name"]}
        fields = {"status.podIP": ip, "metadata.name": obj["metadata"]["name"],
                  "metadata.namespace": obj["metadata"]["namespace"], "spec.nodeName": NODE}
        for e in c.get("env") or []:
            src = e.get("valueFrom") or {}
            if "fieldRef" in src:
                env[e["name"]] = fields[src["fieldRef"]["fieldPath"]]
            elif "secretKeyRef" in src:
                ref = src["secretKeyRef"]
                secret = self.objects.get(("secrets", obj["metadata"]["namespace"], ref["name"]))
                if secret is None:
                    raise ApiError(404, "NotFound", f'secret "{ref["name"]}" not found')
                env[e["name"]] = base64.b64decode(secret["data"][ref["key"]]).decode()
            else:
                env[e["name"]] = e.get("value", "")
        return env

    @staticmethod
    def _kill(pod: Pod, signum: int) -> None:
        try:
            os.killpg(pod.proc.pid, signum)
        except (ProcessLookupError, PermissionError):
            pass

    def _reap(self, ns: str, name: str, pod: Pod, grace: int) -> None:
        try:
            pod.proc.wait(grace)
        except subprocess.TimeoutExpired:
            self._kill(pod, signal.SIGKILL)
            pod.proc.wait()
        pod.sweep()
        time.sleep(0.05)
        with self.lock:
            self.kubelet.pop((ns, name), None)
            self._remove("pods", ns, name)

    def logs(self, ns: str, name: str, tail: int | None) -> str:
        self._get("pods", ns, name)
        pod = self.kubelet.get((ns, name))
        text = pod.log.read_text(errors="replace") if pod else ""
        return "".join(text.splitlines(True)[-tail:]) if tail else text

    # -- HTTP -------------------------------------------------------------------------------

    def _handler(self) -> type[BaseHTTPRequestHandler]:
        from tests.k8s_http import make_handler

        return make_handler(self)
