"""A forked kernel's shell channel forwarded in C until a client asks for a subshell.

ipykernel 7 reads the shell socket in a thread of its own (the "Shell channel" thread), so
that requests for kernel subshells (JEP 91) can go to the subshell's thread while the main
shell runs a cell. Every request and every reply then passes through that thread's Python
event loop: two more wake-ups that take the GIL, per request, in every kernel, whether or
not a client ever makes a subshell. Under parallel load that is where round trips wait
(README "Forked kernels").

Here the thread is ipykernel's own, but until the first subshell request it forwards the
shell socket to the main shell with ``zmq.proxy_steerable``: libzmq's proxy, which runs
without the GIL. The main shell reads and answers on one two-way inproc pair instead of two
one-way ones. When the control thread gets a create, delete or list subshell request, the
proxy stops (its steering socket gets TERMINATE) and the thread runs ipykernel's Python loop
from then on, so subshells work as they do in stock ipykernel, and a cell running in the
main shell meanwhile answers through the same pair. The kernel_info_reply lists "kernel
subshells" throughout: clients (JupyterLab's comms over subshells, its subshell consoles)
see the same kernel.

What the C forwarder cannot do, the pieces around it do:
- a request addressed to a subshell before any exists reaches the main shell, which answers
  with ipykernel's "unknown subshell" error reply (busy, the reply, idle), as the Python
  loop would. ``comm_msg`` and ``comm_close`` are the exception: the main shell handles
  them, where ipykernel's loop would first ask the comm where its replies go (with no
  subshell yet, the main shell, or the unknown one);
- stopping the abort of queued executes (after an error, ``stop_on_error``) posts ipykernel's
  "stop aborting" marker behind what the proxy has forwarded, as its loop would;
- stopping the thread (the kernel's shutdown) ends the proxy before the loop is asked to stop.

Applied by the fork server to lean kernels (option ``lean_execute``, default true) unless the
pool turns subshells off (``subshells: false``), and only to ipykernel versions with the
layout this was written for (7.4 and later 7.x); any other version runs as it is.
Standard library, pyzmq and ipykernel only: the fork server runs with the kernel's Python.
"""
from __future__ import annotations

import threading
from typing import Any


def forward_shell_in_c() -> bool:
    """Make the kernels this process starts forward their shell channel in C until a
    subshell is asked for; False (nothing changed) where ipykernel's layout differs."""
    try:
        import zmq
        from ipykernel import kernelapp, kernelbase, shellchannel, subshell_manager
        from ipykernel._version import version_info
        from zmq.eventloop.zmqstream import ZMQStream
    except ImportError:
        return False
    stock_thread = shellchannel.ShellChannelThread
    manager_class = subshell_manager.SubshellManager
    kernel_class = kernelbase.Kernel
    needed = {manager_class: ("get_subshell_to_shell_channel_socket",
                              "get_shell_channel_to_subshell_socket", "set_on_recv_callback",
                              "_send_on_shell_channel", "close"),
              kernel_class: ("start", "shell_main", "_abort_queues", "create_subshell_request",
                             "delete_subshell_request", "list_subshell_request",
                             "init_metadata", "finish_metadata", "_publish_status"),
              subshell_manager: ("UnknownSubshellError",), zmq: ("proxy_steerable",)}
    if not (7, 4) <= tuple(version_info[:2]) < (8,) \
            or getattr(kernelapp, "ShellChannelThread", None) is not stock_thread \
            or not all(hasattr(owner, name) for owner, names in needed.items() for name in names):
        return False

    class ThroughStream:
        """Sends on a socket that a ZMQStream of the same thread also reads, through that
        stream and at once: a raw send could take the socket's read edge from the stream
        (ipykernel's comment on ``_send_on_shell_channel``), and a queued one would wait for
        the loop's next turn."""

        def __init__(self, stream: Any) -> None:
            self.stream = stream

        def send_multipart(self, msg: Any, flags: int = 0, copy: bool = True,
                           track: bool = False, **kwargs: Any) -> None:
            self.stream.send_multipart(msg, flags=flags, copy=copy, track=track)
            self.stream.flush(zmq.POLLOUT)

        def send(self, data: Any, flags: int = 0, copy: bool = True, track: bool = False,
                 **kwargs: Any) -> None:
            self.send_multipart([data], flags=flags, copy=copy, track=track)

    class Manager(manager_class):  # type: ignore[misc, valid-type]
        """ipykernel's manager, with the main shell's two one-way pairs used as one two-way
        pair (``_shell_channel_to_main``): the proxy's backend is one socket."""

        main_sender: Any = None
        channel_sender: Any = None
        channel_stream: Any = None

        def set_on_recv_callback(self, on_recv_callback: Any) -> None:
            super().set_on_recv_callback(on_recv_callback)
            self.main_sender = ThroughStream(self._shell_channel_to_main.to_stream)

        def get_subshell_to_shell_channel_socket(self, subshell_id: str | None) -> Any:
            if subshell_id is None:
                return self.main_sender
            return super().get_subshell_to_shell_channel_socket(subshell_id)

        def get_shell_channel_to_subshell_socket(self, subshell_id: str | None) -> Any:
            if subshell_id is None:
                return self.channel_sender
            return super().get_shell_channel_to_subshell_socket(subshell_id)

        def forward_in_python(self) -> None:
            """On the shell channel thread, when its proxy has stopped: read the main
            shell's replies with a stream of the thread's loop, and send it requests
            through that stream."""
            stream = ZMQStream(self._shell_channel_to_main.from_socket,
                               self._shell_channel_io_loop)
            stream.on_recv(self._send_on_shell_channel, copy=False)
            self.channel_stream = stream
            self.channel_sender = ThroughStream(stream)

        def close(self) -> None:
            if self.channel_stream is not None:
                self.channel_stream.close()
            super().close()

    class Thread(stock_thread):  # type: ignore[misc, valid-type]
        """ipykernel's shell channel thread, forwarding in C until told to leave."""

        def __init__(self, context: Any, **kwargs: Any) -> None:
            super().__init__(context, **kwargs)
            self.forwarding = True  # True while the proxy forwards (or is about to)
            self._begin = threading.Event()  # set once the kernel has started (Kernel.start)
            self._lock = threading.Lock()  # guards forwarding, _ops and _steerer
            self._ops: list[str] = []
            address = f"inproc://poolgate-shell-steering-{id(self)}"
            self._steering = context.socket(zmq.PAIR)
            self._steering.bind(address)
            self._steerer = context.socket(zmq.PAIR)
            self._steerer.connect(address)

        @property
        def manager(self) -> Any:
            if self._manager is None:  # type: ignore[has-type]
                assert threading.current_thread() == self.parent_thread
                assert self.shell_stream is not None
                self._manager = Manager(self._zmq_context, self.io_loop, self.shell_stream)
            return self._manager

        def begin(self) -> None:
            """The kernel has started: every stream on the shell socket is set up."""
            self._begin.set()

        def command(self, op: str) -> bool:
            """Stop the proxy to do ``op`` ("abort": post the stop-aborting marker;
            "leave": forward in Python from now on). False where it no longer forwards."""
            with self._lock:
                if not self.forwarding:
                    return False
                self._ops.append(op)
                self._steerer.send(b"TERMINATE")
                return True

        def stop(self) -> None:
            self.command("leave")
            self._begin.set()  # a kernel that never started: run() goes on to its loop
            super().stop()

        def run(self) -> None:
            self._begin.wait()
            try:
                left = self._forward()
            finally:
                with self._lock:
                    self.forwarding = False
                    self._steerer.close()
                self._steering.close()
            if left:
                super().run()

        def _forward(self) -> bool:
            """Forward in C until told to leave; False if the context ended meanwhile."""
            if self._manager is None:  # stopped before the kernel started: nothing to forward
                return True
            manager = self._manager
            backend = manager._shell_channel_to_main.from_socket
            while True:
                try:
                    zmq.proxy_steerable(self.shell_stream.socket, backend, None, self._steering)
                except zmq.ContextTerminated:
                    return False
                with self._lock:
                    ops, self._ops = self._ops, []
                    if "leave" in ops:
                        self.forwarding = False
                if "abort" in ops:  # behind all the proxy forwarded, as ipykernel's loop
                    backend.send(b"stop aborting", copy=False)
                if "leave" in ops:
                    break
            manager.forward_in_python()
            # The proxy read these sockets: what waits on them now has no read edge to wake
            # the loop, so the loop's first turn looks.
            for stream in (self.shell_stream, manager.control_to_shell_channel.to_stream,
                           manager.channel_stream):
                if stream is not None:
                    self.io_loop.add_callback(stream.flush, zmq.POLLIN)
            return True

    def forwarding(kernel: Any) -> Thread | None:
        thread = getattr(kernel, "shell_channel_thread", None)
        return thread if isinstance(thread, Thread) else None

    stock_start = kernel_class.start

    def start(self: Any) -> None:
        stock_start(self)  # type: ignore[no-untyped-call]
        if (thread := forwarding(self)) is not None:
            thread.begin()

    def leaving(handler: Any) -> Any:
        async def subshell_request(self: Any, *args: Any, **kwargs: Any) -> Any:
            if (thread := forwarding(self)) is not None:
                thread.command("leave")
            return await handler(self, *args, **kwargs)
        subshell_request.__name__ = handler.__name__
        subshell_request.__doc__ = handler.__doc__
        return subshell_request

    stock_abort = kernel_class._abort_queues

    def _abort_queues(self: Any, subshell_id: str | None = None) -> None:
        thread = forwarding(self)
        if subshell_id is None and thread is not None:
            self._aborting = True
            if thread.command("abort"):
                self.log.info("Aborting queue")
                return
        stock_abort(self, subshell_id)

    stock_shell_main = kernel_class.shell_main
    unknown = subshell_manager.UnknownSubshellError
    comms = {"comm_msg", "comm_close"}  # ipykernel may route these to the main shell

    async def shell_main(self: Any, subshell_id: str | None, msg: Any) -> None:
        if subshell_id is None and forwarding(self) is not None and self.session is not None:
            try:
                idents, frames = self.session.feed_identities(msg, copy=False)
                # the header is the frame after the signature; look closer only if it names
                # a subshell
                if b'"subshell_id"' in frames[1].bytes:
                    header = self.session.deserialize(frames, content=False, copy=False)
                    named = header["header"].get("subshell_id")
                    if named is not None and header["header"].get("msg_type") not in comms:
                        _unknown_subshell(self, idents, frames, unknown(named))
                        return
            except Exception:  # noqa: BLE001 - a bad message: ipykernel's path logs it
                pass
        await stock_shell_main(self, subshell_id, msg)

    def _unknown_subshell(kernel: Any, idents: Any, frames: Any, err: Any) -> None:
        """ipykernel's reply to a request for a subshell that is not there (busy, an error
        reply, idle), sent by the main shell through its pair."""
        msg = kernel.session.deserialize(frames, content=True, copy=False)
        msg_type = msg["header"]["msg_type"]
        kernel.log.warning("Cannot handle %s %s: %s", msg_type, msg["header"]["msg_id"], err)
        kernel._publish_status("busy", "shell", parent=msg)
        content = {"status": "error", "ename": type(err).__name__, "evalue": str(err),
                   "traceback": []}
        metadata = kernel.finish_metadata(msg, kernel.init_metadata(msg), content)
        metadata.update({"status": "error"})
        sender = kernel.shell_channel_thread.manager.get_subshell_to_shell_channel_socket(None)
        kernel.session.send(sender, msg_type.rsplit("_", 1)[0] + "_reply", metadata=metadata,
                            content=content, parent=msg, ident=idents)
        kernel._publish_status("idle", "shell", parent=msg)

    for name, method in (("start", start), ("shell_main", shell_main),
                         ("_abort_queues", _abort_queues)):
        setattr(kernel_class, name, method)
    for name in ("create_subshell_request", "delete_subshell_request", "list_subshell_request"):
        setattr(kernel_class, name, leaving(getattr(kernel_class, name)))
    setattr(kernelapp, "ShellChannelThread", Thread)  # noqa: B010 - not exported by ipykernel
    return True
