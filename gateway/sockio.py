"""Socket I/O shared by the protocol code: writing to non-blocking sockets.

The parsers (gateway/framing.py, gateway/zmtp.py's Connection) never touch a socket; what
does (channels.Connection for the client, zmtp.Peer for the kernel) writes with this.
"""
from __future__ import annotations

import socket


def send_some(sock: socket.socket, parts: list[bytes | memoryview]) -> bool:
    """Write ``parts`` to a non-blocking socket until it would block, removing what went out
    (a part cut short stays as the rest of it); True when nothing is left."""
    while parts:
        try:
            sent = sock.sendmsg(parts[:512])
        except (BlockingIOError, InterruptedError):
            return False
        i = 0
        while sent:
            first = len(parts[i])
            if sent >= first:
                sent -= first
                i += 1
            else:
                parts[i] = memoryview(parts[i])[sent:]
                sent = 0
        del parts[:i]  # one deletion per write: a long backlog is not shifted part by part
        while parts and not len(parts[0]):
            del parts[0]
    return True
