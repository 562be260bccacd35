"""One DEALER socket to a kernel's channel, for the few messages poolgate itself sends a kernel
(kernel_info while it starts, a warm kernel's hand-over, shutdown_request, interrupt_request).

The relay of clients' messages does not come here: the gateway speaks ZMTP itself
(gateway/zmtp.py). This is for the occasional request, where libzmq's socket is simplest.
"""
from __future__ import annotations

from types import TracebackType

import zmq

from . import jmsg
from .protocol import ConnectionInfo


class KernelSocket:
    """A DEALER connected to one channel of a kernel; a context manager that closes it."""

    def __init__(self, conn: ConnectionInfo, channel: str = "shell",
                 reconnect_ivl: int | None = None) -> None:
        self.sock: zmq.Socket[bytes] = zmq.Context.instance().socket(zmq.DEALER)
        self.sock.setsockopt(zmq.LINGER, 0)
        if reconnect_ivl is not None:  # ms: a kernel that is starting binds a moment later
            self.sock.setsockopt(zmq.RECONNECT_IVL, reconnect_ivl)
        self.sock.connect(conn.url(channel))
        self.signer = jmsg.Signer(conn.key, conn.signature_scheme)

    def send(self, msg_type: str, content: dict[str, object] | None = None) -> str:
        """Send one Jupyter message; returns its msg_id."""
        msg_id, frames = jmsg.build(self.signer, msg_type, content or {}, jmsg.session_id())
        self.sock.send_multipart(frames)
        return msg_id

    def answered(self, timeout: float) -> bool:
        """Whether a message came within ``timeout`` seconds (it is left to recv)."""
        return bool(self.sock.poll(int(timeout * 1000)))

    def recv(self) -> list[bytes]:
        """The next message's parts (header, parent, metadata, content), buffers dropped."""
        parts, _ = jmsg.split(self.sock.recv_multipart())
        return parts

    def close(self) -> None:
        self.sock.close()

    def __enter__(self) -> KernelSocket:
        return self

    def __exit__(self, kind: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()
