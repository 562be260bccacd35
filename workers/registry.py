"""Kernel records in Redis: the one source of truth shared by gateways and workers.

Keys (prefix ``pg:``)::

    pg:k:<id>          hash: the kernel record (see KernelRecord)
    pg:kernels         set of kernel ids
    pg:q:<pool>        sorted set: launches waiting in the pool's queue, by ticket
    pg:ticket          counter for queue tickets
    pg:sendlock:<pool> held while a launch takes its ticket and is sent (Registry.launch_lock)
    pg:hb:<id>         the supervisor's heartbeat (expires after the pool's heartbeat TTL)
    pg:w:<name>        a worker's heartbeat and capacity (expires)
    pg:gw:<instance>   a gateway's heartbeat (expires after GATEWAY_TTL)
    pg:miss:<what>     when a heartbeat (``hb:<id>``, ``gw:<instance>``) was first found missing
                       (Registry.missing_for; expires after MISSING_WINDOW)
    pg:workers         set of worker names (those whose heartbeat expired are pruned on read)
    pg:live[:pool:<pool>|:user:<user>|:pooluser:<pool>:<user>]
                       sets of the live (not ended) kernels' ids: the kernel limits count them
    pg:ended:user:<user>  set of the user's FAILED kernels' ids (their records expire; pruned
                       on read, and the set expires with its newest member's record): with
                       pg:live:user:<user>, what the user's kernel list reads
    pg:s:<id>          a /api/sessions session (JSON)
    pg:sessions        set of the sessions' ids (pg:sessions:indexed: sessions saved before
                       the set existed were added to it)
    pg:ev:<db>:<id>    pub/sub channel: the kernel's state changes (<db>: pub/sub has no databases)
    pg:keyring         fingerprint of the secret kernel keys are encrypted with (check_keys)

Every status change goes through :meth:`Registry.transition`, a Lua script that checks the
lifecycle table of ``workers/protocol.py`` and publishes the change in one atomic step.
The connection key is always encrypted at rest (``workers/keyring.py``: the configured registry
secrets, or the data folder's generated one).
"""
from __future__ import annotations

import contextlib
import json
import logging
import threading
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit

import redis
from cryptography.fernet import InvalidToken

from . import keyring
from .errors import BackendUnavailable, ConfigError
from .protocol import ConnectionInfo, KernelStatus, sources_of

log = logging.getLogger(__name__)

PREFIX = "pg:"
FAILED_RETENTION = 3600  # seconds a FAILED record stays readable (status: dead)
WORKER_TTL = 10.0  # seconds a worker's heartbeat (pg:w:<name>) lives; workers beat every third
REBUILD_GRACE = 5.0  # after a rebuild, a missing kernel is "not yet" (503) for this long
GATEWAY_TTL = 10.0  # seconds a gateway's heartbeat (pg:gw:<instance>) lives
GATEWAY_BEAT = 2.0  # gateways beat this often
MISSING_WINDOW = 60.0  # a heartbeat found missing this long ago and not since is found anew

_TRANSITION = """
local cur = redis.call('HGET', KEYS[1], 'status')
if not cur then return {0, ''} end
if not string.find(',' .. ARGV[1] .. ',', ',' .. cur .. ',', 1, true) then return {0, cur} end
redis.call('HSET', KEYS[1], 'status', ARGV[2])
for i = 4, #ARGV, 2 do redis.call('HSET', KEYS[1], ARGV[i], ARGV[i + 1]) end
if ARGV[2] == 'STARTING' or ARGV[2] == 'STOPPED' or ARGV[2] == 'FAILED' then
  redis.call('ZREM', KEYS[3], KEYS[4])
end
local event = ARGV[3]
if ARGV[2] == 'STOPPED' or ARGV[2] == 'FAILED' then
  local pool = redis.call('HGET', KEYS[1], 'pool') or ''
  local user = redis.call('HGET', KEYS[1], 'user') or ''
  redis.call('SREM', 'pg:live', KEYS[4])
  redis.call('SREM', 'pg:live:pool:' .. pool, KEYS[4])
  redis.call('SREM', 'pg:live:user:' .. user, KEYS[4])
  redis.call('SREM', 'pg:live:pooluser:' .. pool .. ':' .. user, KEYS[4])
  if ARGV[2] == 'FAILED' then  -- the set lives as long as its newest member (FAILED_RETENTION)
    redis.call('SADD', 'pg:ended:user:' .. user, KEYS[4])
    redis.call('EXPIRE', 'pg:ended:user:' .. user, FAILED_RETENTION)
  end
  -- an ending names its user: the record may be deleted before a listener reads it
  local ev = cjson.decode(event)
  ev['user'] = user
  event = cjson.encode(ev)
end
redis.call('PUBLISH', KEYS[2], event)
return {1, cur}
""".replace("FAILED_RETENTION", str(FAILED_RETENTION))

# Admission: check every kernel limit and write the QUEUED record in one atomic step, so
# concurrent starts cannot overshoot a limit. ARGV: id, pool, user, 4 limits (0: none), then
# the record's fields. Returns '' or the limit that refused.
_ADMIT = """
local id, pool, user = ARGV[1], ARGV[2], ARGV[3]
local checks = {
  {'pg:live', tonumber(ARGV[4]), 'the gateway'},
  {'pg:live:pool:' .. pool, tonumber(ARGV[5]), 'pool'},
  {'pg:live:user:' .. user, tonumber(ARGV[6]), 'user'},
  {'pg:live:pooluser:' .. pool .. ':' .. user, tonumber(ARGV[7]), 'pooluser'},
}
for _, c in ipairs(checks) do
  if c[2] > 0 then
    local n = redis.call('SCARD', c[1])
    if n >= c[2] then return c[3] .. ':' .. n .. ':' .. c[2] end
  end
end
local ticket = redis.call('INCR', 'pg:ticket')
for i = 8, #ARGV, 2 do redis.call('HSET', KEYS[1], ARGV[i], ARGV[i + 1]) end
redis.call('HSET', KEYS[1], 'ticket', ticket)
redis.call('SADD', 'pg:kernels', id)
redis.call('ZADD', 'pg:q:' .. pool, ticket, id)
for _, c in ipairs(checks) do redis.call('SADD', c[1], id) end
return ''
"""

_UPDATE = """
if redis.call('EXISTS', KEYS[1]) == 0 then return 0 end
for i = 1, #ARGV, 2 do redis.call('HSET', KEYS[1], ARGV[i], ARGV[i + 1]) end
return 1
"""


_PRUNE_WORKERS = """
for i = 2, #ARGV do
  if redis.call('EXISTS', ARGV[1] .. ARGV[i]) == 0 then redis.call('SREM', KEYS[1], ARGV[i]) end
end
return 1
"""

REDIS_CONNECTIONS = 512  # per process


def redis_url(url: str) -> str:
    """Turn a kombu-style ``redis+socket:///path`` URL into one redis-py understands."""
    if url.startswith("redis+socket://"):
        parts = urlsplit(url)
        return f"unix://{parts.path}" + (f"?{parts.query}" if parts.query else "")
    return url


def now_iso() -> str:
    """The current time as Jupyter Server writes ``last_activity``."""
    t = time.time()
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(t)) + ".%06dZ" % int((t % 1) * 1e6)


@dataclass
class KernelRecord:
    """A kernel as the registry holds it."""

    id: str
    name: str
    pool: str
    status: KernelStatus
    target: str = "RUNNING"
    user: str = ""
    reason: str = ""
    error: str = ""  # the GatewayError code of a failed launch (workers/errors.py)
    worker: str = ""
    host: str = ""
    created: float = 0.0
    last_activity: str = ""
    execution_state: str = "starting"
    generation: int = 0
    ticket: int = 0
    launch_timeout: float = 60.0
    env: dict[str, str] = field(default_factory=dict)
    handle: dict[str, Any] = field(default_factory=dict)
    request: dict[str, Any] = field(default_factory=dict)
    timing: dict[str, float] = field(default_factory=dict)
    connections: int = 0

    _JSON = ("env", "handle", "request", "timing")
    _NUM = {"created": float, "generation": int, "ticket": int, "launch_timeout": float}

    @classmethod
    def from_hash(cls, data: dict[bytes, bytes]) -> KernelRecord:
        d = {k.decode(): v.decode() for k, v in data.items()}
        kw: dict[str, Any] = {}
        for name in cls.__dataclass_fields__:
            if name in d:
                if name in cls._JSON:
                    kw[name] = json.loads(d[name])
                elif name in cls._NUM:
                    kw[name] = cls._NUM[name](d[name])
                elif name != "connections":
                    kw[name] = d[name]
        kw["status"] = KernelStatus(kw["status"])
        return cls(**kw)

    def to_hash(self) -> dict[str, str]:
        out: dict[str, str] = {}
        for name in self.__dataclass_fields__:
            if name in ("connections",):
                continue
            value = getattr(self, name)
            if name in self._JSON:
                out[name] = json.dumps(value)
            elif isinstance(value, KernelStatus):
                out[name] = value.value
            else:
                out[name] = str(value)
        return out


def _text(value: object) -> str:
    """A Redis reply (bytes, or None for a missing field) as text; "" for None."""
    return value.decode() if isinstance(value, bytes) else str(value or "")


def _encode_fields(fields: dict[str, Any]) -> list[str]:
    flat: list[str] = []
    for key, value in fields.items():
        flat.append(key)
        flat.append(json.dumps(value) if isinstance(value, (dict, list)) else str(value))
    return flat


class Registry:
    """Reads and writes kernel records; safe to share between threads."""

    def __init__(self, url: str, secret: str | Sequence[str] = ()) -> None:
        self.url = url
        # A blocking pool: redis-py's default pool holds 100 connections and fails the 101st
        # call at once; a gateway with 200 kernels' sockets and a worker with 200 supervisors
        # make more calls than that at a time. Past REDIS_CONNECTIONS a call waits.
        pool = redis.BlockingConnectionPool.from_url(
            redis_url(url), health_check_interval=30, max_connections=REDIS_CONNECTIONS,
            timeout=20)
        self.r = redis.Redis(connection_pool=pool)
        # Redis pub/sub ignores database numbers: event channels carry the database, so two
        # clusters sharing one Redis server on different databases never hear each other's
        # kernels (a gateway counted another cluster's launches in its metrics).
        db = int(pool.connection_kwargs.get("db") or 0)
        self.events_prefix = f"{PREFIX}ev:{db}:"
        self._transition = self.r.register_script(_TRANSITION)
        self._update = self.r.register_script(_UPDATE)
        self._admit = self.r.register_script(_ADMIT)
        self._secrets = keyring.resolve(keyring.parse(secret), url)
        self._keys = keyring.fernet(self._secrets)
        self._prune_workers = self.r.register_script(_PRUNE_WORKERS)
        self._send_locks: dict[str, threading.Lock] = {}

    # -- records --------------------------------------------------------------------------

    @contextlib.contextmanager
    def launch_lock(self, pool: str) -> Iterator[None]:
        """Held while a launch takes its ticket and is sent to the broker, so that tickets and
        the broker's queue agree on the order. Held for a broker round trip; it expires after
        10 s should its holder die meanwhile.

        The threads of one process queue for it on a lock of their own first: the Redis lock is
        taken by polling (SET NX every 2 ms), and 50 concurrent launches on one gateway polling
        it sent the registry some 25,000 commands a second, slowing the holder until launches
        gave up (issue 24). Now only one thread per process polls."""
        deadline = time.monotonic() + 30
        local = self._send_locks.setdefault(pool, threading.Lock())
        if not local.acquire(timeout=30):
            raise BackendUnavailable(f"pool {pool!r}: could not take a place in its queue within "
                                     f"30s (launches on this gateway are backed up); try again")
        try:
            lock = self.r.lock(f"{PREFIX}sendlock:{pool}", timeout=10, sleep=0.002,
                               blocking_timeout=max(0.1, deadline - time.monotonic()))
            if not lock.acquire():
                raise BackendUnavailable(f"pool {pool!r}: could not take a place in its queue "
                                         f"within 30s (the registry is overloaded); try again")
            try:
                yield
            finally:
                try:
                    lock.release()
                except redis.exceptions.LockError:  # expired meanwhile: another holder has it
                    log.warning("Pool %s: the launch lock expired while held", pool)
        finally:
            local.release()

    def create(self, rec: KernelRecord, limits: tuple[int, int, int, int] = (0, 0, 0, 0)) -> str:
        """Write a new QUEUED record and queue it, unless a kernel limit refuses it.

        ``limits``: live kernels at most overall, in the pool, per user, per user in the pool
        (0: no limit). Returns '' when admitted, else ``"<which>:<count>:<limit>"``.
        """
        refused = self._admit(keys=[PREFIX + "k:" + rec.id],
                              args=[rec.id, rec.pool, rec.user, *limits, *_encode_fields(rec.to_hash())])
        return refused.decode() if isinstance(refused, bytes) else str(refused or "")

    def restore(self, rec: KernelRecord) -> None:
        """Write a record again that the registry lost (it keeps nothing on disk)."""
        pipe = self.r.pipeline()
        pipe.hset(PREFIX + "k:" + rec.id, mapping=rec.to_hash())  # type: ignore[arg-type]
        pipe.sadd(PREFIX + "kernels", rec.id)
        for key in self._live_keys(rec.pool, rec.user):
            pipe.sadd(key, rec.id)
        pipe.execute()

    @staticmethod
    def _live_keys(pool: str, user: str) -> list[str]:
        return [PREFIX + "live", PREFIX + "live:pool:" + pool, PREFIX + "live:user:" + user,
                PREFIX + "live:pooluser:" + pool + ":" + user]

    # -- the registry's own life ----------------------------------------------------------

    def epoch(self) -> dict[str, Any] | None:
        """When this registry's data began; None if it lost everything (a restarted Redis)."""
        raw = self.r.get(PREFIX + "epoch")
        return json.loads(raw) if raw else None

    def mark_epoch(self, rebuilt: bool = False) -> bool:
        """Start an epoch if none is set (``rebuilt``: after a loss); True if this call set it."""
        value = json.dumps({"time": time.time(), "rebuilt": rebuilt})
        return bool(self.r.set(PREFIX + "epoch", value, nx=True))

    def rebuilding(self) -> bool:
        """True while records may still be missing after the registry lost its data."""
        epoch = self.epoch()
        if epoch is None:
            return True
        return bool(epoch.get("rebuilt")) and time.time() - float(epoch["time"]) < REBUILD_GRACE

    def get(self, kid: str) -> KernelRecord | None:
        data = self.r.hgetall(PREFIX + "k:" + kid)
        if not data or b"status" not in data:
            return None
        rec = KernelRecord.from_hash(data)  # type: ignore[arg-type]
        rec.connections = int(self.r.hlen(PREFIX + "c:" + kid))
        return rec

    def ids(self) -> list[str]:
        return sorted(m.decode() for m in self.r.smembers(PREFIX + "kernels"))  # type: ignore[union-attr]

    def all(self, owner: str | None = None) -> list[KernelRecord]:
        """Every record (only ``owner``'s when given: their live and failed kernels, read
        from their own sets, not from every kernel's), in creation order; drops ids whose
        record has gone."""
        if owner is None:
            ids = self.ids()
        else:
            owned = self.r.sunion([PREFIX + "live:user:" + owner, PREFIX + "ended:user:" + owner])
            ids = sorted(m.decode() for m in owned)  # type: ignore[union-attr]
        found = self.records(ids)
        for kid in set(ids) - found.keys():
            self.r.srem(PREFIX + "kernels", kid)
            if owner is not None:
                self.r.srem(PREFIX + "ended:user:" + owner, kid)
        return sorted(found.values(), key=lambda r: r.created)

    def records(self, ids: Sequence[str]) -> dict[str, KernelRecord]:
        """The records of ``ids`` that exist, in one round trip."""
        pipe = self.r.pipeline(transaction=False)
        for kid in ids:
            pipe.hgetall(PREFIX + "k:" + kid)
            pipe.hlen(PREFIX + "c:" + kid)
        raw = pipe.execute()
        out = {}
        for i, kid in enumerate(ids):
            data, conns = raw[2 * i], raw[2 * i + 1]
            if data and b"status" in data:
                out[kid] = rec = KernelRecord.from_hash(data)
                rec.connections = int(conns)
        return out

    def transition(self, kid: str, new: KernelStatus, pool: str = "",
                   note: dict[str, Any] | None = None, **fields: Any) -> tuple[bool, str]:
        """Move ``kid`` to ``new`` if the lifecycle allows it from its current state.

        Returns (done, previous status); previous is '' when the record does not exist.
        The change is published on the kernel's event channel in the same step, with
        ``note`` (event-only details, not stored: who asked for a restart, say).
        """
        allowed = ",".join(s.value for s in sources_of(new))
        event = json.dumps({"id": kid, "status": new.value, "pool": pool, **(note or {}),
                            **{k: v for k, v in fields.items() if k in ("reason", "generation")}})
        ok, prev = self._transition(
            keys=[PREFIX + "k:" + kid, self.events_prefix + kid, PREFIX + "q:" + pool, kid],
            args=[allowed, new.value, event, *_encode_fields(fields)],
        )
        return bool(ok), prev.decode() if isinstance(prev, bytes) else str(prev)

    def update(self, kid: str, **fields: Any) -> bool:
        """Set fields of an existing record; returns False if it is gone."""
        return bool(self._update(keys=[PREFIX + "k:" + kid], args=_encode_fields(fields)))

    def get_field(self, kid: str, name: str) -> str | None:
        v = self.r.hget(PREFIX + "k:" + kid, name)
        return v.decode() if isinstance(v, bytes) else None

    def delete(self, kid: str, pool: str = "", reason: str = "") -> None:
        """Remove a record and everything keyed by it, and tell listeners.

        A tombstone remembers the deletion for a while, so a supervisor can tell a kernel
        that was shut down from a record a restarted (empty) Redis lost.
        """
        pool_user = self.r.hmget(PREFIX + "k:" + kid, ["pool", "user"])
        pool = pool or _text(pool_user[0])
        user = _text(pool_user[1])
        pipe = self.r.pipeline()
        pipe.delete(PREFIX + "k:" + kid, PREFIX + "hb:" + kid, PREFIX + "c:" + kid,
                    PREFIX + "miss:hb:" + kid)
        pipe.set(PREFIX + "gone:" + kid, reason or "shut down", ex=FAILED_RETENTION)
        pipe.srem(PREFIX + "kernels", kid)
        for key in self._live_keys(pool, user):
            pipe.srem(key, kid)
        pipe.srem(PREFIX + "ended:user:" + user, kid)
        if pool:
            pipe.zrem(PREFIX + "q:" + pool, kid)
        pipe.publish(self.events_prefix + kid, json.dumps({"id": kid, "status": "DELETED"}))
        pipe.execute()

    def expire_failed(self, kid: str) -> None:
        """Keep a FAILED record readable for a while, then let it go."""
        self.r.expire(PREFIX + "k:" + kid, FAILED_RETENTION)

    def publish(self, kid: str, event: dict[str, Any]) -> None:
        self.r.publish(self.events_prefix + kid, json.dumps({"id": kid, **event}))

    # -- connection info ------------------------------------------------------------------

    def set_connection(self, kid: str, conn: ConnectionInfo, **fields: Any) -> bool:
        data = conn.to_dict()
        data["key"] = "enc:" + self._keys.encrypt(conn.key.encode()).decode()
        return self.update(kid, conn=data, **fields)

    def connection(self, kid: str) -> ConnectionInfo | None:
        raw = self.get_field(kid, "conn")
        if not raw:
            return None
        data = json.loads(raw)
        key = str(data.get("key", ""))
        if key.startswith("enc:"):  # else a key written in clear by an older poolgate
            try:
                data["key"] = self._keys.decrypt(key[4:].encode()).decode()
            except InvalidToken:
                raise ConfigError(
                    f"kernel {kid}: its key was encrypted with a registry secret this process "
                    "does not have; give every gateway and worker the same registry_secret "
                    "list (README, Security)") from None
        return ConnectionInfo.from_dict(data)

    def check_keys(self) -> bool:
        """Whether this process holds the secret the registry's kernel keys are written with
        (the first process to ask marks it); an ERROR saying what to do when it does not.
        Gateways and workers call it at start."""
        mine = [keyring.fingerprint(s) for s in self._secrets]
        self.r.set(PREFIX + "keyring", mine[0], nx=True)
        marked = (self.r.get(PREFIX + "keyring") or b"").decode()  # type: ignore[union-attr]
        if marked in mine:
            return True
        log.error("This process's registry secret is not the one kernel keys in %s are encrypted "
                  "with: it cannot connect to kernels that other gateways and workers start, "
                  "nor they to its kernels. Give every gateway and worker the same secret "
                  "(POOLGATE_REGISTRY_SECRET or registry_secret; README, Security)", self.url)
        return False

    def rotate_keys(self) -> int:
        """Encrypt every stored connection key again with the first registry secret, so the
        older secrets can be dropped; returns how many keys were rewritten."""
        count = 0
        for kid in self.ids():
            raw = self.get_field(kid, "conn")
            data = json.loads(raw) if raw else {}
            key = str(data.get("key", ""))
            if not key:
                continue
            token = self._keys.rotate(key[4:].encode()) if key.startswith("enc:") else \
                self._keys.encrypt(key.encode())
            data["key"] = "enc:" + token.decode()
            count += bool(self.update(kid, conn=data))
        self.r.set(PREFIX + "keyring", keyring.fingerprint(self._secrets[0]))
        return count

    # -- queue positions ------------------------------------------------------------------

    def queue_position(self, pool: str, kid: str) -> int | None:
        """1 for the next launch to be taken, None when not waiting."""
        return self.queue_positions([(pool, kid)])[0]

    def queue_positions(self, launches: Sequence[tuple[str, str]]) -> list[int | None]:
        """queue_position of each (pool, id), in one round trip."""
        pipe = self.r.pipeline(transaction=False)
        for pool, kid in launches:
            pipe.zrank(PREFIX + "q:" + pool, kid)
        return [None if rank is None else int(rank) + 1 for rank in pipe.execute()]

    def waiting(self, pool: str) -> int:
        return int(self.r.zcard(PREFIX + "q:" + pool))

    def queued(self, pool: str) -> list[str]:
        """The ids of the launches waiting in the pool's queue, the next one first."""
        members = self.r.zrange(PREFIX + "q:" + pool, 0, -1)
        return [m.decode() for m in members]  # type: ignore[union-attr]

    # -- warm kernels ---------------------------------------------------------------------

    def record_warm(self, worker: str, kid: str, handle: dict[str, Any]) -> None:
        data = dict(handle)
        if data.get("connection"):
            data["connection"] = {**data["connection"], "key": ""}
        self.r.hset(PREFIX + "warm:" + worker, kid, json.dumps(data))

    def forget_warm(self, worker: str, kid: str) -> None:
        self.r.hdel(PREFIX + "warm:" + worker, kid)

    def warm_of(self, worker: str) -> dict[str, dict[str, Any]]:
        raw = self.r.hgetall(PREFIX + "warm:" + worker)
        return {k.decode(): json.loads(v) for k, v in raw.items()}  # type: ignore[union-attr]

    # -- the replay buffer (iopub kept by the supervisor, handed to a gateway on request) --

    def hand_replay(self, token: str, blobs: list[bytes], ttl: float) -> None:
        """A supervisor hands its replay buffer to the gateway that asked with ``token``."""
        key = PREFIX + "replay:" + token
        pipe = self.r.pipeline(transaction=False)
        pipe.delete(key)
        for i in range(0, len(blobs), 256):
            pipe.rpush(key, *blobs[i:i + 256])
        pipe.expire(key, int(ttl))
        pipe.rpush(key + ":n", len(blobs))
        pipe.expire(key + ":n", int(ttl))
        pipe.execute()

    def take_replay(self, token: str, timeout: float) -> list[bytes] | None:
        """Wait for the replay handed over for ``token``; None if none came in time."""
        key = PREFIX + "replay:" + token
        try:
            if self.r.blpop([key + ":n"], timeout=max(1, int(timeout))) is None:
                return None
        except redis.TimeoutError:  # the client's socket timeout can end the wait first
            return None
        pipe = self.r.pipeline(transaction=False)
        pipe.lrange(key, 0, -1)
        pipe.delete(key, key + ":n")
        return list(pipe.execute()[0])

    def mark_seen_many(self, seen: dict[tuple[str, str], dict[str, Any]], ttl: float) -> None:
        """What a gateway last delivered to client sessions, by (kernel, session): for a
        replay by another gateway."""
        pipe = self.r.pipeline(transaction=False)
        for (kid, session), value in seen.items():
            pipe.set(PREFIX + "seen:" + kid + ":" + session, json.dumps(value),
                     ex=max(1, int(ttl)))
        pipe.execute()

    def seen(self, kid: str, session: str) -> dict[str, Any] | None:
        raw = self.r.get(PREFIX + "seen:" + kid + ":" + session)
        return json.loads(raw) if raw else None

    # -- heartbeats and connections -------------------------------------------------------

    def heartbeat(self, kid: str, worker: str, ttl: float) -> None:
        self.r.set(PREFIX + "hb:" + kid, worker, px=int(ttl * 1000))

    def heartbeats(self, beats: dict[str, float], worker: str) -> None:
        """Refresh the heartbeats of many kernels (id → TTL) in one round trip."""
        pipe = self.r.pipeline(transaction=False)
        for kid, ttl in beats.items():
            pipe.set(PREFIX + "hb:" + kid, worker, px=int(ttl * 1000))
        pipe.execute()

    def deleted(self, kid: str) -> str | None:
        """Why the record was deleted on purpose; None if not (or lost with the registry)."""
        raw = self.r.get(PREFIX + "gone:" + kid)
        return raw.decode() if isinstance(raw, bytes) else None

    def status_and_target(self, kid: str) -> tuple[str | None, str | None]:
        status, target = self.r.hmget(PREFIX + "k:" + kid, ["status", "target"])
        return (_text(status) or None, _text(target) or None)

    def liveness(self, kid: str) -> tuple[str | None, bool]:
        """(status, whether its heartbeat is alive), in one round trip: what a gateway asks
        every few seconds for each kernel a client is connected to."""
        pipe = self.r.pipeline(transaction=False)
        pipe.hget(PREFIX + "k:" + kid, "status")
        pipe.exists(PREFIX + "hb:" + kid)
        status, beating = pipe.execute()
        return (status.decode() if isinstance(status, bytes) else None), bool(beating)

    def heartbeat_alive(self, kid: str) -> bool:
        return bool(self.r.exists(PREFIX + "hb:" + kid))

    def gateway_heartbeat(self, instance: str, ttl: float = GATEWAY_TTL) -> None:
        self.r.set(PREFIX + "gw:" + instance, "1", px=int(ttl * 1000))

    def missing_for(self, what: str) -> float:
        """Seconds since a heartbeat (``hb:<id>``, ``gw:<instance>``) that is missing now was
        first found missing: 0.0 the first time. Asked only when it is missing.

        An expired heartbeat alone does not prove its writer gone: when the whole machine (or
        Redis's) was paused past the TTL (a VM suspended or migrated, a laptop asleep), every
        heartbeat expires at once the moment Redis runs again, and the writers beat again only
        a beat later. So a checker confirms a missing heartbeat on a later look, once its
        writer has had its chance (``workers/reconcile.py``). The first finding is kept for
        MISSING_WINDOW seconds: a heartbeat that came back and went again within that time is
        confirmed at once."""
        key, now = PREFIX + "miss:" + what, time.time()
        pipe = self.r.pipeline(transaction=True)
        pipe.set(key, repr(now), nx=True, px=int(MISSING_WINDOW * 1000))
        pipe.get(key)
        _, first = pipe.execute()
        return max(0.0, now - float(first)) if first else 0.0

    def live_gateways(self) -> set[str]:
        return {k.decode()[len(PREFIX) + 3:] for k in self.r.scan_iter(PREFIX + "gw:*", count=500)}

    def drop_connections(self, kid: str, keep: set[str],
                         holders: list[bytes] | None = None) -> int:
        """Forget the connections held by gateways not in ``keep`` (they went away);
        ``holders``: the connection entries already read (connection_holders)."""
        if holders is None:
            holders = self.r.hkeys(PREFIX + "c:" + kid)  # type: ignore[assignment]
        stale = [f for f in holders or () if f.decode().split(":", 1)[0] not in keep]
        return int(self.r.hdel(PREFIX + "c:" + kid, *stale)) if stale else 0

    def beating(self, kids: list[str]) -> set[str]:
        """Those of ``kids`` whose heartbeat is alive, in one round trip."""
        pipe = self.r.pipeline(transaction=False)
        for kid in kids:
            pipe.exists(PREFIX + "hb:" + kid)
        return {kid for kid, alive in zip(kids, pipe.execute()) if alive}

    def connection_holders(self, kids: list[str]) -> dict[str, list[bytes]]:
        """Each kernel's connection entries (``<gateway>:<session>``), in one round trip."""
        pipe = self.r.pipeline(transaction=False)
        for kid in kids:
            pipe.hkeys(PREFIX + "c:" + kid)
        return dict(zip(kids, pipe.execute()))

    def connection_count(self, kid: str) -> int:
        return int(self.r.hlen(PREFIX + "c:" + kid))

    def connections(self, kid: str) -> dict[str, float]:
        """The open WebSockets of a kernel, ``<gateway instance>:<session id>`` -> since when."""
        raw: dict[bytes, bytes] = self.r.hgetall(PREFIX + "c:" + kid)  # type: ignore[assignment]
        return {k.decode(): float(v) for k, v in raw.items()}

    def add_connection(self, kid: str, conn_id: str) -> None:
        self.r.hset(PREFIX + "c:" + kid, conn_id, str(time.time()))

    def remove_connection(self, kid: str, conn_id: str) -> None:
        self.r.hdel(PREFIX + "c:" + kid, conn_id)

    def worker_heartbeat(self, name: str, info: dict[str, Any], ttl: float) -> None:
        pipe = self.r.pipeline(transaction=False)
        pipe.set(PREFIX + "w:" + name, json.dumps(info), px=int(ttl * 1000))
        pipe.sadd(PREFIX + "workers", name)
        pipe.execute()

    def workers(self) -> list[dict[str, Any]]:
        """The live workers' heartbeats. Read by every launch: from the set of worker names
        (a SCAN for ``pg:w:*`` walked the whole keyspace, some 120 calls a launch at 10,000
        kernels, issue 24); names whose heartbeat expired are dropped from the set."""
        names = sorted(n.decode() for n in self.r.smembers(PREFIX + "workers"))  # type: ignore[union-attr]
        if not names:
            return []
        values = self.r.mget([PREFIX + "w:" + n for n in names])
        gone = [n for n, v in zip(names, values) if v is None]
        if gone:  # atomic with a beat that came meanwhile: its SET comes before its SADD
            self._prune_workers(keys=[PREFIX + "workers"], args=[PREFIX + "w:", *gone])
        return [json.loads(v) for v in values if v]

    def worker_gone(self, name: str) -> None:
        self.r.delete(PREFIX + "w:" + name)
        self.r.srem(PREFIX + "workers", name)

    # -- sessions (/api/sessions) ---------------------------------------------------------

    def save_session(self, sid: str, data: dict[str, Any]) -> None:
        pipe = self.r.pipeline()
        pipe.set(PREFIX + "s:" + sid, json.dumps(data))
        pipe.sadd(PREFIX + "sessions", sid)
        pipe.execute()

    def session(self, sid: str) -> dict[str, Any] | None:
        raw = self.r.get(PREFIX + "s:" + sid)
        return json.loads(raw) if raw else None

    def sessions(self) -> list[dict[str, Any]]:
        """Every session, from the set of their ids (a SCAN for ``pg:s:*`` walked the whole
        keyspace, issue 24). Sessions saved before the set existed are added to it once."""
        if not self.r.exists(PREFIX + "sessions:indexed"):
            for key in self.r.scan_iter(PREFIX + "s:*", count=500):
                self.r.sadd(PREFIX + "sessions", key.decode()[len(PREFIX) + 2:])
            self.r.set(PREFIX + "sessions:indexed", "1")
        sids = sorted(m.decode() for m in self.r.smembers(PREFIX + "sessions"))  # type: ignore[union-attr]
        if not sids:
            return []
        values = self.r.mget([PREFIX + "s:" + sid for sid in sids])
        return [json.loads(v) for v in values if v]

    def delete_session(self, sid: str) -> None:
        pipe = self.r.pipeline()
        pipe.delete(PREFIX + "s:" + sid)
        pipe.srem(PREFIX + "sessions", sid)
        pipe.execute()

    def pubsub(self) -> redis.client.PubSub:
        return self.r.pubsub(ignore_subscribe_messages=True)

    def ping(self) -> bool:
        return bool(self.r.ping())
