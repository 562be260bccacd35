"""Placement of kernels on a pool's hosts, kept in the shared registry, never in a process.

Every worker on the pool's queue, and every restart of one, sees the same state::

    pg:ssh:<pool>:placed       hash: kernel id → host name, one entry per kernel holding a place
    pg:ssh:<pool>:next         round-robin pointer: index of the host to try first
    pg:ssh:<pool>:down:<host>  why the host is out of placement; expires after ``down_for``

A warm kernel (``warm-<uuid>``) holds a place like any kernel; handed over, its place moves to
the kernel id it becomes (:meth:`Placement.move`).

A decision (read the counts, skip hosts that are down or full, pick one, book the place,
move the pointer) is one Lua script, so two workers never book the same last place. A place
is released when its kernel is stopped; places of kernels whose record is gone or final
(a worker killed hard) are pruned before each decision.
"""
from __future__ import annotations

import logging
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

import redis

from .registry import PREFIX

log = logging.getLogger(__name__)
KEY_PREFIX = PREFIX + "ssh:"
POLICIES = ("round-robin", "least-loaded", "fixed")
WARM_PREFIX = "warm-"  # the ids of warm kernels (workers/warm.py)

_PLACE = """
local kid, mode, n = ARGV[1], ARGV[2], tonumber(ARGV[3])
local names, maxes, skips, counts, free = {}, {}, {}, {}, {}
for i = 1, n do
  names[i] = ARGV[1 + 3 * i]; maxes[i] = tonumber(ARGV[2 + 3 * i]); skips[i] = ARGV[3 + 3 * i]
  counts[names[i]] = 0
end
local all = redis.call('HGETALL', KEYS[1])
for j = 1, #all, 2 do
  if all[j] ~= kid and counts[all[j + 1]] then counts[all[j + 1]] = counts[all[j + 1]] + 1 end
end
local out = {}
for i = 1, n do
  local state = 'free'
  if skips[i] == '1' then state = 'skipped'
  else
    local down = redis.call('GET', KEYS[2 + i])
    if down then state = 'down: ' .. down
    elseif counts[names[i]] >= maxes[i] then state = 'full' end
  end
  free[i] = (state == 'free')
  out[#out + 1] = names[i]; out[#out + 1] = state; out[#out + 1] = tostring(counts[names[i]])
end
local pick = nil
if mode == 'least-loaded' then
  local best = nil
  for i = 1, n do
    if free[i] then
      local load = counts[names[i]] / maxes[i]
      if best == nil or load < best then best = load; pick = i end
    end
  end
else
  local start = 0
  if mode == 'round-robin' then start = tonumber(redis.call('GET', KEYS[2]) or '0') % n end
  for j = 0, n - 1 do
    local i = (start + j) % n + 1
    if free[i] then pick = i; break end
  end
end
if not pick then return {'', out} end
redis.call('HSET', KEYS[1], kid, names[pick])
if mode == 'round-robin' then redis.call('SET', KEYS[2], pick % n) end
return {names[pick], out}
"""


@dataclass(frozen=True)
class HostState:
    """One host as a decision saw it."""

    name: str
    capacity: int
    kernels: int
    state: str  # free | full | skipped | down: <why>

    def describe(self) -> str:
        if self.state == "full":
            return f"{self.name}: full ({self.kernels} of {self.capacity} kernels)"
        return f"{self.name}: {self.state}"


@dataclass(frozen=True)
class Decision:
    """Where a kernel goes, or why nowhere: each host's state at the time of the decision."""

    host: str | None
    hosts: tuple[HostState, ...] = field(default_factory=tuple)

    @property
    def waiting(self) -> bool:
        """No place now, but every host is up and merely full: a place will free up.

        With a host down the pool has lost capacity that its workers' slots still count, so
        waiting could last until the launch times out: the launch fails now, naming the hosts.
        """
        return self.host is None and all(h.state == "full" for h in self.hosts)

    def why(self) -> str:
        return "; ".join(h.describe() for h in self.hosts)


class Placement:
    """The placement state of one pool's hosts; safe to share between threads."""

    def __init__(self, r: redis.Redis, pool: str, hosts: Sequence[tuple[str, int]],
                 policy: str = "round-robin") -> None:
        if policy not in POLICIES:
            raise ValueError(f"unknown placement policy {policy!r}")
        self.r = r
        self.pool = pool
        self.hosts = list(hosts)
        self.policy = policy
        self.key = f"{KEY_PREFIX}{pool}:"
        self._place = r.register_script(_PLACE)

    def _down_key(self, host: str) -> str:
        return f"{self.key}down:{host}"

    def place(self, kid: str, exclude: Iterable[str] = ()) -> Decision:
        """Book a place for ``kid`` by the pool's policy; hosts in ``exclude`` are skipped."""
        self.prune()
        return self._decide(kid, self.policy, set(exclude))

    def claim(self, kid: str, host: str) -> Decision:
        """Book a place on ``host`` itself (a restart in place): only if it is up and not full."""
        return self._decide(kid, "fixed", {h for h, _ in self.hosts if h != host})

    def _decide(self, kid: str, mode: str, skip: set[str]) -> Decision:
        args: list[str | int] = [kid, mode, len(self.hosts)]
        for name, cap in self.hosts:
            args += [name, cap, "1" if name in skip else "0"]
        keys = [self.key + "placed", self.key + "next", *(self._down_key(h) for h, _ in self.hosts)]
        chosen, flat = self._place(keys=keys, args=args)
        caps = dict(self.hosts)
        states = tuple(HostState(_s(flat[i]), caps[_s(flat[i])], int(flat[i + 2]), _s(flat[i + 1]))
                       for i in range(0, len(flat), 3))
        return Decision(_s(chosen) or None, states)

    def release(self, kid: str) -> None:
        """Give back ``kid``'s place (idempotent)."""
        self.r.hdel(self.key + "placed", kid)

    def host_of(self, kid: str) -> str | None:
        v = self.r.hget(self.key + "placed", kid)
        return _s(v) if v else None

    def counts(self) -> dict[str, int]:
        """Kernels holding a place on each host."""
        out = {name: 0 for name, _ in self.hosts}
        for v in self.r.hvals(self.key + "placed"):
            name = _s(v)
            if name in out:
                out[name] += 1
        return out

    def move(self, old: str, new: str) -> str | None:
        """Give ``old``'s place to ``new`` (a warm kernel handed over); its host, or None if
        ``old`` held none."""
        host = self.host_of(old)
        if host is None:
            return None
        pipe = self.r.pipeline(transaction=True)
        pipe.hset(self.key + "placed", new, host)
        pipe.hdel(self.key + "placed", old)
        pipe.execute()
        return host

    def mark_down(self, host: str, why: str, seconds: float) -> None:
        """Keep ``host`` out of placement for ``seconds``; ``why`` ends up in error messages."""
        self.r.set(self._down_key(host), why, px=max(1, int(seconds * 1000)))

    def down(self, host: str) -> str | None:
        """Why ``host`` is down, or None when it may take kernels."""
        v = self.r.get(self._down_key(host))
        return _s(v) if v else None

    def mark_up(self, host: str) -> None:
        self.r.delete(self._down_key(host))

    def prune(self) -> int:
        """Release places whose kernel record is gone or final (its worker died hard)."""
        placed = self.r.hkeys(self.key + "placed")
        if not placed:
            return 0
        pipe = self.r.pipeline(transaction=False)
        for kid in placed:
            pipe.hget(PREFIX + "k:" + _s(kid), "status")
        stale = [kid for kid, status in zip(placed, pipe.execute())
                 if status is None or _s(status) in ("STOPPED", "FAILED")]
        if any(_s(kid).startswith(WARM_PREFIX) for kid in stale):
            # A warm kernel has no kernel record: its place is kept while a worker records it
            # (workers/warm.py; a worker's next life stops those a crash left)
            warm = {_s(kid) for key in self.r.scan_iter(PREFIX + "warm:*", count=1000)
                    for kid in self.r.hkeys(key)}
            stale = [kid for kid in stale if _s(kid) not in warm]
        if stale:
            self.r.hdel(self.key + "placed", *stale)
            log.info("Pool %s: released %d places of kernels that are gone", self.pool, len(stale))
        return len(stale)


def _s(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)
