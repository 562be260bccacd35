"""poolgate.lab: a Jupyter Server extension that sends kernel messages to the browser at once.

Jupyter Server (2.21) writes each kernel message to its WebSocket clients with Nagle's
algorithm on: a cell's first message goes out, its second waits until the client has
acknowledged the first, and clients delay that acknowledgement by up to 40 ms. So every cell run
through ``jupyter lab --gateway-url=…`` (or on Jupyter Server's own kernels) took ~45 ms more
than the gateway needs. This extension turns on ``TCP_NODELAY`` for Jupyter Server's kernel
WebSockets, as poolgate's gateway does for its own.

It also makes a gateway's error readable: Jupyter Server's API handlers put an HTTPError's
``log_message`` in the JSON reply without its arguments, so every error its gateway client
raises ("Error from Gateway: [%s] %s. Ensure gateway url is valid ...") reached JupyterLab as
those literal ``%s``, never the gateway's reason (no kernelspec named 'x', a 400's
``env.KERNEL_...`` message, a pool's refusal). :func:`formatted_errors` fills them in.

Installed with poolgate, it is enabled for the Jupyter Server of the same environment
(``jupyter server extension disable poolgate.lab`` turns it off). It imports nothing of poolgate's
dependencies; the README gives the same in six lines of ``jupyter_server_config.py`` for a
JupyterLab installed elsewhere.
"""
from __future__ import annotations

import functools
import importlib
from typing import Any

PATCHED = "_poolgate_nodelay"


def nodelay_on_open(handler_class: type) -> None:
    """Make ``handler_class`` (a tornado WebSocketHandler) turn on TCP_NODELAY when a client
    connects, before its own ``open`` runs. Patching twice is patching once."""
    original = handler_class.open  # type: ignore[attr-defined]
    if getattr(original, PATCHED, False):
        return

    @functools.wraps(original)
    def open(self: Any, *args: Any, **kwargs: Any) -> Any:
        self.set_nodelay(True)
        return original(self, *args, **kwargs)

    setattr(open, PATCHED, True)
    handler_class.open = open  # type: ignore[attr-defined]


def formatted_errors(handler_class: type) -> None:
    """Make ``handler_class`` (Jupyter Server's APIHandler) write an HTTPError's message with
    its arguments filled in, as its own log line has it. Patching twice is patching once."""
    from tornado.web import HTTPError

    class Formatted(HTTPError):
        """The same error, its message already formatted (HTTPError's ``log_message`` is a
        property since tornado 6.5)."""

        def __init__(self, status_code: int, message: str, reason: str | None) -> None:
            super().__init__(status_code, reason=reason)
            self.message = message

        @property
        def log_message(self) -> str:
            return self.message

    original = handler_class.write_error  # type: ignore[attr-defined]
    if getattr(original, PATCHED, False):
        return

    @functools.wraps(original)
    def write_error(self: Any, status_code: int, **kwargs: Any) -> Any:
        _, exc, tb = kwargs.get("exc_info") or (None, None, None)
        raw = getattr(exc, "_log_message", None) or getattr(exc, "log_message", None)
        if isinstance(exc, HTTPError) and exc.args and isinstance(raw, str):
            try:
                done = Formatted(exc.status_code, raw % exc.args, exc.reason)
                kwargs["exc_info"] = (Formatted, done, tb)
            except (TypeError, ValueError):
                pass  # not a format for these arguments: as Jupyter Server writes it
        return original(self, status_code, **kwargs)

    setattr(write_error, PATCHED, True)
    handler_class.write_error = write_error  # type: ignore[attr-defined]


def _jupyter_server_extension_points() -> list[dict[str, str]]:
    return [{"module": "poolgate.lab"}]


#: The handlers that serve kernel WebSockets: Jupyter Server 2's, and the ones Jupyter Server 1
#: used (for gateway kernels, and for its own).
HANDLERS = (("jupyter_server.services.kernels.websocket", "KernelWebsocketHandler"),
            ("jupyter_server.gateway.handlers", "WebSocketChannelsHandler"),
            ("jupyter_server.services.kernels.handlers", "ZMQChannelsHandler"))


def _load_jupyter_server_extension(serverapp: Any) -> None:
    patched = []
    for module, name in HANDLERS:
        try:
            handler_class = getattr(importlib.import_module(module), name)
        except (ImportError, AttributeError):
            continue
        nodelay_on_open(handler_class)
        patched.append(name)
    serverapp.log.info("poolgate.lab: kernel WebSockets send without delay (TCP_NODELAY): %s",
                       ", ".join(patched) or "no handler found")
    try:
        from jupyter_server.base.handlers import APIHandler
    except ImportError:
        return
    formatted_errors(APIHandler)
