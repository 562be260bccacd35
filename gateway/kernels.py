"""KernelService: the kernel operations behind the REST routes, in terms of registry and queue.

A launch: validate → QUEUED record → ``kernels.host`` on the pool's queue → wait for RUNNING or
FAILED. Control goes to the hosting worker; the registry's ``target`` records the intent, so a
lost control message only costs time.
"""
from __future__ import annotations

import builtins
import logging
import re
import time
import uuid
from typing import Any

from .. import dask_kernel
from ..workers import logs, resources
from ..workers.config import Config, KernelSpec, PoolConfig
from ..workers.errors import (
    BY_CODE,
    BackendUnavailable,
    BadRequest,
    ControlTimeout,
    Forbidden,
    GatewayError,
    KernelNotFound,
    KernelSpecUnserved,
    LaunchRejected,
    LaunchTimeout,
    LimitExceeded,
    UnknownKernelSpec,
    cut,
)
from ..workers.kernel_socket import KernelSocket
from ..workers.launchers import k8s_builders, spark_builders
from ..workers.protocol import EXECUTION_STATE, KernelStatus, LaunchRequest
from ..workers.reconcile import settle, settle_all
from ..workers.registry import WORKER_TTL, KernelRecord, Registry, now_iso
from . import access
from .auth import User
from .dispatch import Dispatcher
from .events import EventHub

log = logging.getLogger(__name__)
S = KernelStatus
MAX_VALUE = 4096
ENV_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
SECRET_WORDS = ("PASSWORD", "SECRET", "TOKEN", "KEY", "CREDENTIAL")
LAUNCH_GRACE = 5.0  # seconds a launch past its timeout waits for its worker's verdict


def mask_env(env: dict[str, str]) -> dict[str, str]:
    """The env with secret-looking values hidden, for logs."""
    return {k: ("***" if any(w in k.upper() for w in SECRET_WORDS) else v) for k, v in env.items()}


def validate_env(raw: Any, allowlist: tuple[str, ...]) -> dict[str, str]:
    """KERNEL_* and allow-listed variables of a request's ``env``; others are dropped."""
    if raw is None:
        return {}
    if not isinstance(raw, dict):
        raise BadRequest("'env' must be an object of strings")
    env: dict[str, str] = {}
    for key, value in raw.items():
        if not isinstance(key, str) or not ENV_NAME.fullmatch(key):  # no trailing newline
            raise BadRequest(f"env: {key!r} is not a valid variable name")
        if not isinstance(value, str):
            raise BadRequest(f"env.{key}: expected a string, got {type(value).__name__}")
        if "\x00" in value:  # no process environment can hold it: a 400, not a failed launch
            raise BadRequest(f"env.{key}: the value contains a NUL character")
        if len(value) > MAX_VALUE:
            raise BadRequest(f"env.{key}: the value is {len(value)} characters; "
                             f"at most {MAX_VALUE} are allowed")
        allowed = key.startswith("KERNEL_") or any(
            key == a or (a.endswith("*") and key.startswith(a[:-1])) for a in allowlist)
        if allowed:
            env[key] = value
        else:
            log.info("Dropping env %s: not KERNEL_* and not in env_allowlist", key)
    return env


#: Launchers whose remote side puts env values into a shell script: a newline there is refused
#: (README, The API); YARN's NodeManager also turns {{NAME}} into $NAME before bash reads it.
SCRIPTED_ENV = {"ssh": ("\n", "\r"), "yarn": ("\n", "\r", "{{", "}}")}


def check_env_for(env: dict[str, str], pool: PoolConfig) -> None:
    """400 for a value the pool's launcher cannot pass on as written (see SCRIPTED_ENV)."""
    for key, value in env.items():
        for bad in SCRIPTED_ENV.get(pool.launcher, ()):
            if bad in value:
                raise BadRequest(f"env.{key}: pool {pool.name!r} ({pool.launcher}) takes no "
                                 f"{bad!r} in an env value")


def check_kernel_values(env: dict[str, str], spec: KernelSpec, pool: PoolConfig) -> None:
    """400 for KERNEL_* values the kernel or the pool's launcher would refuse later, so that a
    bad value never becomes a failed launch: a Dask kernel's sizes (poolgate.dask_kernel), and
    for a ``submit: spark-submit`` yarn pool the client's spark-submit options and values Spark
    would trim (workers/launchers/spark_builders.py)."""
    if dask_kernel.is_dask_spec(spec.argv, spec.env):
        why = dask_kernel.client_problem(env, spec.env)
        if why:
            raise BadRequest(f"env.{why}")
    if pool.launcher == "yarn" and pool.options.get("submit") == "spark-submit":
        spark_builders.admit(env)


def launch_timeout(env: dict[str, str], pool: PoolConfig) -> float:
    raw = env.get("KERNEL_LAUNCH_TIMEOUT")
    if not raw:
        return pool.launch_timeout
    try:
        value = float(raw)
    except ValueError:
        raise BadRequest(f"env.KERNEL_LAUNCH_TIMEOUT: expected seconds, got {raw!r}") from None
    if not value > 0:  # nan too (inf is capped below)
        raise BadRequest("env.KERNEL_LAUNCH_TIMEOUT: must be > 0")
    return min(value, pool.max_launch_timeout)


class KernelService:
    """Start, read, control and stop kernels on behalf of the REST and WebSocket routes."""

    def __init__(self, config: Config, registry: Registry, dispatcher: Dispatcher,
                 events: EventHub) -> None:
        self.config = config
        self.registry = registry
        self.dispatch = dispatcher
        self.events = events

    # -- reading --------------------------------------------------------------------------

    def spec(self, name: object) -> KernelSpec:
        if name is not None and not isinstance(name, str):  # a body's "name": [..] is a 400
            raise BadRequest(f"'name' must be a kernelspec's name (a string), got "
                             f"{type(name).__name__}")
        name = name or self.config.default_kernelspec
        spec = self.config.kernelspecs.get(name)
        if spec is None:
            raise UnknownKernelSpec(f"no kernelspec named {cut(name)!r}; GET /api/kernelspecs lists "
                                    f"the ones this gateway serves")
        return spec

    def record(self, kid: str) -> KernelRecord:
        rec = self.registry.get(kid)
        rec = self.check_alive(rec) if rec is not None else None
        if rec is None:
            self.missing(kid)
        assert rec is not None
        return rec

    def missing(self, kid: str) -> None:
        """Raise the right error for a kernel the registry does not have.

        404 with the reason when it was shut down, culled or never existed; 503 while a
        registry that lost its data (a restarted Redis) is being rebuilt by the supervisors,
        so that Jupyter Server does not drop live kernels as culled.
        """
        why = self.registry.deleted(kid)
        if why:
            raise KernelNotFound(f"kernel {kid} not found: it ended ({why})")
        if self.registry.rebuilding():
            raise BackendUnavailable(f"kernel {kid} is not in the registry yet: the registry lost "
                                     f"its data and its workers are writing it again; retry in a "
                                     f"few seconds")
        raise KernelNotFound(f"kernel {cut(kid)} not found")

    def check_alive(self, rec: KernelRecord) -> KernelRecord | None:
        """The record as it really is (``workers/reconcile.py``): a kernel whose supervisor
        stopped beating is dead, with the reason; a launch queued past its timeout is withdrawn."""
        now, withdrawn = settle(self.registry, rec, self.config.pools)
        if withdrawn:
            self.dispatch.revoke(rec.id)
        return now

    def model(self, rec: KernelRecord, positions: dict[str, int | None] | None = None
              ) -> dict[str, Any]:
        """The Jupyter kernel model, plus poolgate's own details under ``poolgate``;
        ``positions``: queued launches' places in their queues, when already read."""
        state = rec.execution_state if rec.status is S.RUNNING else EXECUTION_STATE[rec.status]
        extra: dict[str, Any] = {"pool": rec.pool, "status": rec.status.value,
                                 "worker": rec.worker, "host": rec.host}
        if rec.reason:
            extra["reason"] = rec.reason
        if rec.status is S.QUEUED:
            extra["queue_position"] = (positions.get(rec.id) if positions is not None
                                       else self.registry.queue_position(rec.pool, rec.id))
        if rec.timing:
            extra["timing"] = rec.timing
        extra.update(resources.shown(rec.request, rec.handle))  # the GPUs it got, its limits
        return {"id": rec.id, "name": rec.name, "last_activity": rec.last_activity,
                "execution_state": state, "connections": rec.connections, "poolgate": extra}

    def list(self, user: User | None = None) -> list[dict[str, Any]]:
        """The kernels ``user`` may see (all without one), each as check_alive finds it."""
        owner = None if user is None or user.admin else user.name  # a user's: their own sets
        records = [r for r in self.registry.all(owner) if user is None or user.owns(r.user)]
        return list(self.models(records).values())

    def models(self, records: builtins.list[KernelRecord]) -> dict[str, dict[str, Any]]:
        """The models of ``records`` (by id) as check_alive finds them, those still there: in
        round trips that do not grow with the records (one each for all their heartbeats and
        all queued launches' places)."""
        live = []
        for rec, now, withdrawn in settle_all(self.registry, records, self.config.pools):
            if withdrawn:
                self.dispatch.revoke(rec.id)
            if now is not None:
                live.append(now)
        queued = [(r.pool, r.id) for r in live if r.status is S.QUEUED]
        positions = dict(zip((kid for _, kid in queued), self.registry.queue_positions(queued)))
        return {r.id: self.model(r, positions) for r in live}

    def workers_of(self, pool: str) -> builtins.list[dict[str, Any]]:  # list: the method above
        """The live workers of a pool, from their heartbeats."""
        return [w for w in self.registry.workers() if pool in w.get("pools", ())]

    def served(self, pool: PoolConfig) -> bool:
        """Whether a launch on ``pool`` can be taken: it has a live worker, or it waits for
        one (``wait_for_workers``)."""
        if pool.wait_for_workers or self.workers_of(pool.name):
            return True
        # A registry that lost its data (a Redis restarted empty) less than a heartbeat ago has
        # not heard every worker again yet: queue rather than refuse.
        epoch = self.registry.epoch()
        return epoch is None or bool(epoch.get("rebuilt")) and \
            time.time() - float(epoch["time"]) < WORKER_TTL

    # -- starting -------------------------------------------------------------------------

    def start(self, body: dict[str, Any], caller: User | None = None) -> dict[str, Any]:
        spec = self.spec(body.get("name"))
        if spec.unserved:
            raise KernelSpecUnserved(spec.unserved)
        pool = self.config.pools[spec.pool]
        env = validate_env(body.get("env"), self.config.env_allowlist)
        env = access.as_user(env, caller) if caller else env  # the caller owns it, not the body
        check_env_for(env, pool)
        check_kernel_values(env, spec, pool)
        user = env.get("KERNEL_USERNAME", "")
        self._admit(spec, pool, user)
        asked = resources.admit(pool, spec, env)  # 400 past the pool's per-kernel limits
        if pool.launcher == "kubernetes":  # a namespace it may not have: 400, not a failed pod
            why = k8s_builders.admit(pool, env, user)
            if why:
                raise BadRequest(f"env.{why}" if why.startswith("KERNEL_") else why)
        if not self.served(pool):
            raise BackendUnavailable(
                f"no worker serves pool {pool.name!r} (queue {pool.queue!r}): start one with "
                f"'poolgate worker --pool {pool.name}', or set pools.{pool.name}.wait_for_workers:"
                f" true to queue launches until one comes")
        timeout = launch_timeout(env, pool)
        kid = self._kernel_id(env)
        req = LaunchRequest(kernel_id=kid, pool=pool.name, spec_name=spec.name, argv=spec.argv,
                            env=env, spec_env=dict(spec.env), user=user,
                            working_dir=env.get("KERNEL_WORKING_DIR", ""), launch_timeout=timeout,
                            resources={**spec.resources, **asked, "resource_dir": spec.resource_dir},
                            interrupt_mode=spec.interrupt_mode)
        t0 = time.time()
        rec = KernelRecord(id=kid, name=spec.name, pool=pool.name, status=S.QUEUED, user=user,
                           created=t0, last_activity=now_iso(), launch_timeout=timeout,
                           env={}, request=req.to_dict(), timing={"queued": t0})
        logs.bind(kernel_id=kid, pool=pool.name, user=user)  # this request's log lines
        log.info("Kernel %s (%s) queued on pool %s for %s, env %s", kid, spec.name, pool.name,
                 user or "anonymous", mask_env(env))
        with self.events.waiter(kid) as waiter:
            # The place in line (the ticket) and the send to the broker are one step per pool,
            # across gateways: the order /api/pools shows is the order workers take launches.
            with self.registry.launch_lock(pool.name):
                refused = self.registry.create(rec, limits=(
                    self.config.max_kernels, pool.max_kernels, self.config.max_kernels_per_user,
                    pool.max_kernels_per_user))
                if refused:
                    raise self._refusal(refused, pool, user)
                try:
                    self.dispatch.launch(kid, pool, spec.name, user, expires=timeout)
                except GatewayError:
                    self.registry.transition(kid, S.FAILED, pool=pool.name,
                                             reason="broker unreachable")
                    self.registry.delete(kid, pool.name)
                    raise
            if body.get("wait") is False:  # the client follows the launch itself
                return self.model(self.registry.get(kid) or rec)
            return self._wait_started(waiter, kid, pool, timeout, t0)

    def _kernel_id(self, env: dict[str, str]) -> str:
        wanted = env.get("KERNEL_ID")
        if not wanted:
            return str(uuid.uuid4())
        try:
            kid = str(uuid.UUID(wanted))
        except ValueError:
            raise BadRequest(f"env.KERNEL_ID: {wanted!r} is not a UUID") from None
        if self.registry.get(kid) is not None:
            raise BadRequest(f"env.KERNEL_ID: kernel {kid} already exists")
        return kid

    def _admit(self, spec: KernelSpec, pool: PoolConfig, user: str) -> None:
        why = access.refusal(spec, pool, user)  # gateway/access.py: allow and deny lists, root
        if why:
            raise Forbidden(why)

    @staticmethod
    def _refusal(refused: str, pool: PoolConfig, user: str) -> LimitExceeded:
        which, count, limit = refused.split(":")
        who = user or "anonymous"
        text = {"the gateway": f"this gateway already runs {count} kernels (max_kernels: {limit})",
                "pool": f"pool {pool.name!r} already has {count} kernels (max_kernels: {limit})",
                "user": f"user {who!r} already has {count} kernels (max_kernels_per_user: {limit})",
                "pooluser": f"user {who!r} already has {count} kernels in pool {pool.name!r} "
                            f"(pools.{pool.name}.max_kernels_per_user: {limit})"}[which]
        log.info("Launch refused: %s", text)
        return LimitExceeded(text + "; shut one down or ask an operator to raise the limit")

    def _wait_started(self, waiter: Any, kid: str, pool: PoolConfig, timeout: float,
                      t0: float) -> dict[str, Any]:
        deadline = end = t0 + timeout
        while True:
            event = waiter.next(min(0.5, end - time.time()))
            status = event.get("status") if event else None
            if status in (None, "RUNNING", "FAILED", "DELETED", "STOPPED"):
                rec = self.registry.get(kid)
                if rec is None:
                    raise LaunchRejected(f"kernel {kid} was shut down while it was starting")
                if rec.status is S.RUNNING:
                    return self.model(rec)
                if rec.status is S.FAILED:  # the client never had this kernel: forget it
                    self.registry.delete(kid, pool.name)
                    raise BY_CODE.get(rec.error, LaunchRejected)(
                        f"kernel {kid} failed to start on pool {pool.name}: {rec.reason}")
                if rec.status is S.STARTING and end == deadline:
                    # A worker is placing it and gives up at the same deadline (workers/
                    # supervisor.py): its reason is worth a moment more than a bare timeout.
                    end = deadline + LAUNCH_GRACE
            if time.time() >= end:
                self._withdraw(kid, pool, timeout)

    def _withdraw(self, kid: str, pool: PoolConfig, timeout: float) -> None:
        position = self.registry.queue_position(pool.name, kid)
        ok, prev = self.registry.transition(kid, S.STOPPED, pool=pool.name,
                                            reason="launch timed out in the queue")
        if ok:
            self.registry.delete(kid, pool.name)
            self.dispatch.revoke(kid)
            raise LaunchTimeout(
                f"kernel {kid} waited {timeout:.0f}s in the queue of pool {pool.name!r} and was "
                f"withdrawn: {(position or 1) - 1} launches were ahead of it; "
                + self._why_waiting(pool))
        self.registry.update(kid, target="STOPPED")
        raise LaunchTimeout(f"kernel {kid} did not finish starting on pool {pool.name!r} within "
                            f"{timeout:.0f}s (it was {prev}); it is being stopped. Raise "
                            f"KERNEL_LAUNCH_TIMEOUT (up to {pool.max_launch_timeout:.0f}s).")

    def _why_waiting(self, pool: PoolConfig) -> str:
        """What kept a withdrawn launch waiting, and what to do about it."""
        ws = self.workers_of(pool.name)
        more = f"raise KERNEL_LAUNCH_TIMEOUT (up to {pool.max_launch_timeout:.0f}s) or add workers"
        if not ws:
            return (f"no worker serves the pool: start one with 'poolgate worker --pool "
                    f"{pool.name}'")
        if all(pool.name in w.get("draining", ()) for w in ws):
            return (f"its {len(ws)} worker{'s are' if len(ws) > 1 else ' is'} draining and take "
                    f"no launches: 'poolgate drain {pool.name} --resume' undoes that, or add "
                    f"workers")
        slots, used = sum(int(w.get("slots", 0)) for w in ws), sum(int(w.get("used", 0)) for w in ws)
        return (f"the pool has {len(ws)} live worker{'s' if len(ws) > 1 else ''} with {slots} "
                f"slots ({used} in use); {more}.")

    # -- control --------------------------------------------------------------------------

    def _running(self, kid: str, action: str) -> KernelRecord:
        rec = self.record(kid)
        if rec.status is not S.RUNNING:
            raise BadRequest(f"cannot {action} kernel {kid}: it is {rec.status.value.lower()}"
                             + (f" ({rec.reason})" if rec.reason else ""))
        return rec

    def interrupt(self, kid: str) -> None:
        rec = self._running(kid, "interrupt")
        if self.config.kernelspecs.get(rec.name) and self.spec(rec.name).interrupt_mode == "message":
            self._control_message(kid, "interrupt_request")
            return
        self.dispatch.control(rec.worker, kid, "interrupt")

    def _control_message(self, kid: str, msg_type: str) -> None:
        conn = self.registry.connection(kid)
        if conn is None:
            raise KernelNotFound(f"kernel {kid} has no connection info")
        with KernelSocket(conn, "control") as sock:
            sock.send(msg_type)
            if not sock.answered(self.config.gateway.control_timeout):
                raise ControlTimeout(f"kernel {kid} did not answer {msg_type}")

    def restart(self, kid: str) -> dict[str, Any]:
        rec = self._running(kid, "restart")
        timeout = max(rec.launch_timeout, self.config.gateway.control_timeout)
        with self.events.waiter(kid) as waiter:
            self.dispatch.control(rec.worker, kid, "restart")
            deadline = time.time() + timeout
            while time.time() < deadline:
                waiter.next(min(0.5, deadline - time.time()))
                now = self.registry.get(kid)
                now = self.check_alive(now) if now is not None else None  # its worker may be gone
                if now is None:
                    raise KernelNotFound(f"kernel {kid} was shut down during its restart")
                if now.status is S.RUNNING and now.generation > rec.generation:
                    return self.model(now)
                if now.status is S.FAILED:
                    raise LaunchRejected(f"kernel {kid} failed to restart: {now.reason}")
        raise LaunchTimeout(f"kernel {kid} did not restart within {timeout:.0f}s")

    def shutdown(self, kid: str) -> None:
        """Stop a kernel; idempotent for a kernel that is already going or gone (404 after)."""
        rec = self.registry.get(kid)
        if rec is None:
            self.missing(kid)
        assert rec is not None
        if rec.status is S.QUEUED:
            ok, _ = self.registry.transition(kid, S.STOPPED, pool=rec.pool, reason="shut down")
            if ok:
                self.registry.delete(kid, rec.pool)
                self.dispatch.revoke(kid)
                return
            rec = self.registry.get(kid) or rec
        if not rec.status.live:
            self.registry.delete(kid, rec.pool)
            return
        with self.events.waiter(kid) as waiter:
            self.registry.update(kid, target="STOPPED")
            checked = self.check_alive(rec)
            if checked is None:
                return
            if checked.status is S.FAILED:
                self.registry.delete(kid, checked.pool)
                return
            if rec.worker:
                try:
                    self.dispatch.control(rec.worker, kid, "stop")
                except GatewayError as exc:
                    log.info("Kernel %s: stop command not delivered (%s); the supervisor will "
                             "see the target", kid, exc.message)
            deadline = time.time() + self.config.gateway.control_timeout
            while time.time() < deadline:
                waiter.next(min(0.5, deadline - time.time()))
                now = self.registry.get(kid)
                if now is None:
                    return
                if now.status is S.FAILED:
                    self.registry.delete(kid, now.pool)
                    return
                self.check_alive(now)
        log.warning("Kernel %s: still stopping after %.0fs; its supervisor will finish the job",
                    kid, self.config.gateway.control_timeout)

