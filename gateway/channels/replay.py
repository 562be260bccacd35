"""Cross-gateway replay: a client whose gateway died reconnects through another and gets what
it missed.

Each gateway records, every SEEN_EVERY, what each client got (:func:`seen_of`: the last iopub
message and the requests whose reply came but whose idle did not). A session attached on
another gateway finds that record (``KernelSession.resume``); once it is READY the pump asks the
kernel's supervisor for its replay buffer (:func:`fetch_buffer`) and :func:`replay` sends what
came after, rebuilding the execute_replies the kernel sent to the dead gateway from iopub
(execute_input, error, idle). Cells still running are followed on the live iopub
(:func:`follow_orphan`) and get their rebuilt reply at their idle.
"""
from __future__ import annotations

import json
import logging
import time
import uuid
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from ...workers import jmsg
from .. import wire
from .connection import Connection
from .session import KernelSession

if TYPE_CHECKING:
    from ..kernels import KernelService

log = logging.getLogger(__name__)
REPLAY_WAIT = 3  # seconds a reconnected client's replay waits for the kernel's supervisor...
REPLAY_TRIES = 3  # ...each time it asks


def seen_of(dirty: list[KernelSession]) -> dict[tuple[str, str], dict[str, Any]]:
    """What each of these sessions' clients got, for the registry (Bridge records it every
    SEEN_EVERY, in case this gateway dies: another replays from there)."""
    seen = {}
    for sess in dirty:
        sess.seen_dirty = False
        # list() of a deque is one C call, atomic against the pump; replied is read
        # before last_iopub because an idle leaves replied only after last_iopub moved
        # past it (delivered), so the pair never misses a reply
        replied = list(sess.replied)
        seen[(sess.kid, sess.session_id)] = {"iopub": sess.last_iopub, "replied": replied}
    return seen


def fetch_buffer(service: KernelService, kid: str) -> list[bytes]:
    """Ask the kernel's supervisor for its replay buffer (through the worker's control
    channel; it answers through the registry)."""
    rec = service.registry.get(kid)
    if rec is None or not rec.worker:
        return []
    token = uuid.uuid4().hex
    for _ in range(REPLAY_TRIES):  # the broker may be reconnecting (a restart)
        try:
            service.dispatch.control(rec.worker, kid, f"replay:{token}")
            blobs = service.registry.take_replay(token, REPLAY_WAIT)
        except Exception as exc:
            log.warning("Kernel %s: no replay buffer yet (%s)", kid, exc)
            time.sleep(REPLAY_WAIT)
            continue
        if blobs is not None:
            return blobs
    log.warning("Kernel %s: worker %s sent no replay buffer in %d tries", kid, rec.worker,
                REPLAY_TRIES)
    return []


def replay(conn: Connection, sess: KernelSession, buffered: list[bytes]) -> None:
    """The client was served by a gateway that went away: send what it missed of ``buffered``
    (the supervisor's replay buffer, :func:`fetch_buffer`).

    Output comes from the supervisor's buffer (``replay_buffer``); a reply the kernel sent
    while no gateway listened is rebuilt from the iopub record (execute_input, error, idle).
    """
    seen, sess.resume = sess.resume or {}, None
    msgs = [jmsg.decode_parts(b) for b in buffered]
    heads = [wire.header_of(m) for m in msgs]
    last = seen.get("iopub")
    start = next((i + 1 for i in range(len(heads) - 1, -1, -1)
                  if heads[i].get("msg_id") == last), 0)
    replied = set(seen.get("replied") or ())
    counts: dict[str, int] = {}
    errors: dict[str, dict[str, Any]] = {}
    started: dict[str, dict[str, Any]] = {}  # this session's cells, by request id
    ended: set[str] = set()
    for i, (parts, head) in enumerate(zip(msgs, heads)):
        kind, parent = head.get("msg_type"), parent_of(parts)
        pid = parent.get("msg_id", "")
        # A cell's count and error come from the whole buffer: the client may have had
        # its execute_input before the gateway died, and the reply still needs the count
        # (JupyterLab numbers the cell from it).
        if kind == "execute_input":
            counts[pid] = json.loads(parts[3]).get("execution_count", 0)
            if parent.get("session") == sess.session_id:
                started[pid] = parent
        elif kind == "error":
            errors[pid] = json.loads(parts[3])
        elif kind == "status" and json.loads(parts[3]).get("execution_state") == "idle":
            ended.add(pid)
        if i < start:
            continue
        parts, buffers = parts[:4], parts[4:]
        sess.replayed.add(head.get("msg_id", ""))
        conn.send(wire.to_client("iopub", parts, buffers, conn.protocol, head))
        if (kind == "status" and json.loads(parts[3]).get("execution_state") == "idle"
              and parent.get("msg_type") == "execute_request" and pid not in replied
              and parent.get("session") == sess.session_id):
            conn.send(wire.to_client("shell", *rebuilt_reply(parent, counts.get(pid, 0),
                                                              errors.get(pid)), conn.protocol))
    for pid, parent in started.items():
        if pid not in ended and pid not in replied:
            sess.orphans[pid] = {"parent": parent, "count": counts.get(pid, 0),
                                 "error": errors.get(pid)}
    sess.last_iopub = heads[-1].get("msg_id") if heads else sess.last_iopub
    log.info("Kernel %s: replayed %d messages to session %s", sess.kid,
             len(msgs) - start, sess.session_id)


def follow_orphan(conn: Connection, sess: KernelSession, channel: str, parts: list[bytes],
                  head: dict[str, Any], add: Callable[[wire.Frame, str, dict[str, Any], str], None]
                  ) -> None:
    """Follow a cell a lost gateway sent: its count and error from iopub, and at its idle
    the execute_reply the kernel sent to that gateway, rebuilt (before the idle)."""
    parent = parent_of(parts)
    cell = sess.orphans.get(str(parent.get("msg_id", "")))
    if cell is None:
        return
    pid = str(parent.get("msg_id", ""))
    kind = head.get("msg_type")
    if channel != "iopub":  # its real reply came after all
        del sess.orphans[pid]
    elif kind == "execute_input":
        cell["count"] = json.loads(parts[3]).get("execution_count", 0)
    elif kind == "error":
        cell["error"] = json.loads(parts[3])
    elif kind == "status" and json.loads(parts[3]).get("execution_state") == "idle":
        del sess.orphans[pid]
        reply, bufs = rebuilt_reply(cell["parent"], cell["count"], cell["error"])
        add(wire.to_client("shell", reply, bufs, conn.protocol), "shell", wire.header_of(reply),
            pid)


def parent_of(parts: list[bytes]) -> dict[str, Any]:
    return wire.json_part(parts[1])


def parent_id(parts: list[bytes]) -> str:
    return str(parent_of(parts).get("msg_id", ""))


def rebuilt_reply(parent: dict[str, Any], count: int,
                   error: dict[str, Any] | None) -> tuple[list[bytes], list[bytes]]:
    """An execute_reply for a request whose real reply went to a gateway that died."""
    content: dict[str, Any] = {"status": "error" if error else "ok", "execution_count": count,
                               "user_expressions": {}, "payload": []}
    if error:
        content.update({k: error.get(k) for k in ("ename", "evalue", "traceback")})
    head = jmsg.header("execute_reply", parent.get("session", ""))
    return [jmsg.pack(head), jmsg.pack(parent), jmsg.pack({"poolgate": "rebuilt after a gateway "
                                                            "was lost"}), jmsg.pack(content)], []
