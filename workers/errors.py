"""The errors poolgate raises on purpose, and how they cross the queue.

::

    GatewayError            anything we raise on purpose; has a stable .code
    ├─ ConfigError          bad queues.yaml or kernelspec; raised at start-up
    ├─ RequestError         bad input from a client (4xx)
    │  ├─ BadRequest          400: a body, env or value we cannot take
    │  ├─ Unauthorized        401: a missing or wrong token
    │  ├─ Forbidden           403: a pool that refuses the spec or user
    │  ├─ UnknownKernelSpec   404
    │  ├─ KernelSpecUnserved  400: its process proxy (YARN, Kubernetes...) has no pool here
    │  ├─ KernelNotFound      404
    │  ├─ SessionNotFound     404
    │  ├─ UnknownPool         404
    │  └─ LimitExceeded       403: a kernel limit is reached
    └─ LaunchError          the kernel could not be started or controlled (5xx)
       ├─ BackendUnavailable  503: the broker, registry or resource manager is down
       ├─ LaunchRejected      500: the launcher tried and failed (with the kernel's stderr)
       ├─ LaunchTimeout       503: the launch did not finish in time (names the queue position)
       └─ ControlTimeout      504: the hosting worker did not answer a control command

Errors cross the queue as data (:func:`to_data`) and are raised again with :func:`from_data`.
"""
from __future__ import annotations

from typing import Any


def cut(value: str, keep: int = 80) -> str:
    """``value`` for an error message, cut to its first ``keep`` characters: a client's
    kilobytes of name or id are not echoed back to it (nor into the log)."""
    return value if len(value) <= keep else f"{value[:keep]}... ({len(value)} characters)"


class GatewayError(Exception):
    """Base of every error we raise on purpose."""

    code = "gateway_error"
    status = 500

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class ConfigError(GatewayError):
    code = "config_error"


class RequestError(GatewayError):
    code = "bad_request"
    status = 400


class BadRequest(RequestError):
    code = "bad_request"


class Unauthorized(RequestError):
    code = "unauthorized"
    status = 401


class Forbidden(RequestError):
    code = "forbidden"
    status = 403


class UnknownKernelSpec(RequestError):
    code = "unknown_kernelspec"
    status = 404


class KernelSpecUnserved(RequestError):
    """A kernelspec whose Enterprise Gateway process proxy no pool serves (a YARN spec with no
    yarn pool): refused rather than run somewhere it was not written for."""

    code = "kernelspec_unserved"
    status = 400


class KernelNotFound(RequestError):
    code = "kernel_not_found"
    status = 404


class SessionNotFound(RequestError):
    code = "session_not_found"
    status = 404


class UnknownPool(RequestError):
    code = "unknown_pool"
    status = 404


class LimitExceeded(RequestError):
    code = "limit_exceeded"
    status = 403


class LaunchError(GatewayError):
    code = "launch_error"
    status = 500


class BackendUnavailable(LaunchError):
    code = "backend_unavailable"
    status = 503


class LaunchRejected(LaunchError):
    code = "launch_rejected"
    status = 500


class LaunchTimeout(LaunchError):
    code = "launch_timeout"
    status = 503


class ControlTimeout(LaunchError):
    code = "control_timeout"
    status = 504


def _subclasses(cls: type[GatewayError]) -> list[type[GatewayError]]:
    out = [cls]
    for sub in cls.__subclasses__():
        out.extend(_subclasses(sub))
    return out


BY_CODE: dict[str, type[GatewayError]] = {c.code: c for c in reversed(_subclasses(GatewayError))}


def to_data(exc: GatewayError) -> dict[str, Any]:
    """Turn an error into JSON-able data that can cross the queue or the registry."""
    return {"ok": False, "error": exc.code, "message": exc.message}


def from_data(data: dict[str, Any]) -> GatewayError:
    """Rebuild the error that :func:`to_data` wrote."""
    cls = BY_CODE.get(str(data.get("error")), GatewayError)
    return cls(str(data.get("message", "")))
