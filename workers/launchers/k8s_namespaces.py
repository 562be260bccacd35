"""kubernetes launcher: the per-user namespaces (``per_user_namespace: true``), made by a
kernel's launch and removed by the stop of the last kernel in them.

The rule of this module: a launch and the last kernel's clean-up may run at once, on any
workers of the pool, with no lock between them; the API server's own concurrency control keeps
them apart. A launch creates its Secret, then claims the namespace (a patch that gives it a new
resourceVersion), then creates its pod; the clean-up reads the namespace, finds no kernel's pod
or Secret in it, and deletes it only if its resourceVersion is still the one it read (delete
preconditions). So either the clean-up sees the Secret, or its delete fails (409) on the claim,
or the namespace was already Terminating when the launch claimed it, and the launch waits for it
to go and makes it again. Nothing can be created in a Terminating namespace (403 Forbidden).
"""
from __future__ import annotations

import logging
import time
from typing import TYPE_CHECKING, Any

from ..errors import LaunchRejected
from ..protocol import LaunchRequest
from .k8s_builders import MANAGED_LABEL, build_namespace, build_network_policy

if TYPE_CHECKING:
    from .k8s_builders import KubernetesOptions

log = logging.getLogger(__name__)

#: The annotation a launch sets on a per-user namespace (a new resourceVersion: see _claim).
CLAIM_ANNOTATION = "poolgate.last-launch"


def client_package() -> Any:
    """The kubernetes client package (the launcher imported it already, with a clear error)."""
    import kubernetes

    return kubernetes


def is_status(exc: BaseException, *codes: int) -> bool:
    """Whether ``exc`` is an API answer with one of these HTTP status codes."""
    return int(getattr(exc, "status", 0) or 0) in codes


class UserNamespaces:
    """The namespace half of KubernetesLauncher (a mixin: it uses the launcher's ``client``,
    the CoreV1Api, and its ``options``)."""

    client: Any
    options: KubernetesOptions

    def _phase(self, name: str) -> str:
        """A namespace's phase: Active, Terminating, or Gone (404)."""
        try:
            got = self.client.read_namespace(name)
        except client_package().client.ApiException as exc:
            if is_status(exc, 404):
                return "Gone"
            raise
        return "Terminating" if got.metadata.deletion_timestamp else \
            str(got.status.phase or "Active")

    def _ensure_namespace(self, name: str, req: LaunchRequest, deadline: float) -> None:
        """Create the user's namespace, or find it Active. One being deleted (its last kernel
        just stopped) is waited out first: nothing can be created in a Terminating namespace."""
        k8s = client_package()
        waited = False
        while True:
            try:
                self.client.create_namespace(build_namespace(name, req))
                log.info("Kernel %s: namespace %s created", req.kernel_id, name)
                self._protect(name)
                return
            except k8s.client.ApiException as exc:
                if not is_status(exc, 409):
                    raise
            phase = self._phase(name)
            if phase == "Active":
                return
            if phase == "Terminating":
                if not waited:
                    log.info("Kernel %s: namespace %s is being deleted; waiting to make it "
                             "again", req.kernel_id, name)
                waited = True
                self._wait_out(name, deadline)

    def _protect(self, name: str) -> None:
        """Give a namespace just made its NetworkPolicy (``network_policy_namespace``): only
        poolgate's gateways and workers may connect to its kernel pods."""
        if not self.options.network_policy_namespace:
            return
        networking = client_package().client.NetworkingV1Api(self.client.api_client)
        networking.create_namespaced_network_policy(
            name, build_network_policy(name, self.options))

    def _wait_out(self, name: str, deadline: float) -> None:
        """Wait a moment for a namespace being deleted, or give up at ``deadline``."""
        if time.monotonic() > deadline:
            raise LaunchRejected(f"namespace {name} is still being deleted after "
                                 f"{self.options.api_timeout:.0f}s (api_timeout); its kernel "
                                 "cannot start there until it is gone")
        time.sleep(0.2)

    def _claim(self, name: str, req: LaunchRequest) -> bool:
        """Mark the user's namespace as getting a kernel; False where it is being deleted.

        The patch gives the namespace a new resourceVersion, so a cleanup that found it empty
        before and deletes it only if unchanged (:meth:`_remove_namespace_if_empty`) is refused.
        """
        body = {"metadata": {"annotations": {CLAIM_ANNOTATION: f"{time.time():.6f} "
                                                               f"{req.kernel_id}"}}}
        got = self.client.patch_namespace(name, body,
                                          _content_type="application/merge-patch+json")
        return not got.metadata.deletion_timestamp

    def _create_in_user_namespace(self, name: str, req: LaunchRequest, secret: dict[str, Any],
                                  pod: dict[str, Any]) -> None:
        """The kernel's Secret, a claim, then its pod, in a namespace poolgate removes once
        empty, which may be going away at this moment.

        The Secret comes first, so a cleanup that looks for kernels after it sees one; the
        claim comes next, so a cleanup that looked before it is refused its delete. Where the
        namespace went Terminating anyway (403 Forbidden on create, or the claim says so), it is
        waited out, made again, and the steps repeated, until ``api_timeout``.
        """
        k8s = client_package()
        deadline = time.monotonic() + self.options.api_timeout
        while True:
            self._ensure_namespace(name, req, deadline)
            try:
                self.client.create_namespaced_secret(name, secret)
                if self._claim(name, req):
                    self.client.create_namespaced_pod(name, pod)
                    return
            except k8s.client.ApiException as exc:
                if not is_status(exc, 403, 404) or self._phase(name) == "Active":
                    raise  # RBAC, not a namespace going away
            log.info("Kernel %s: namespace %s was deleted during the launch; making it again",
                     req.kernel_id, name)
            self._wait_out(name, deadline)

    def _remove_namespace_if_empty(self, name: str) -> None:
        """Delete a per-user namespace poolgate made once no kernel's pod or Secret is in it,
        on the condition that it is unchanged since it was found empty (a launch's claim
        changes it: the delete then fails its precondition with 409, and the namespace stays)."""
        k8s = client_package()
        try:
            found = self.client.read_namespace(name)
        except k8s.client.ApiException as exc:
            if is_status(exc, 404):
                return
            raise
        if found.metadata.deletion_timestamp:
            return
        selector = f"{MANAGED_LABEL}=true"
        if self.client.list_namespaced_pod(name, label_selector=selector).items or \
                self.client.list_namespaced_secret(name, label_selector=selector).items:
            return
        unchanged = k8s.client.V1DeleteOptions(preconditions=k8s.client.V1Preconditions(
            resource_version=found.metadata.resource_version))
        try:
            self.client.delete_namespace(name, body=unchanged)
        except k8s.client.ApiException as exc:
            if is_status(exc, 409):
                log.info("Namespace %s: a kernel is being launched into it; kept", name)
                return
            if is_status(exc, 404):
                return
            raise
        log.info("Namespace %s: no kernel left, deleted", name)
