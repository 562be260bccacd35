"""Log setup shared by the gateway and the workers: text or one JSON object per line.

Rule: modules log with their own loggers and lazy ``%s`` arguments; this module only adds
handlers, never at import. Every line carries the kernel id, pool and user it is about when
they are known: bound for the current thread (:func:`bound`, :func:`bind`) by the task that
hosts a kernel and by the gateway request that serves one, or else the first kernel id among
the message's arguments. Secrets are masked on every line: passwords in URLs and the values of
``token=``, ``password=``, ``secret=`` and ``key=`` pairs.
"""
from __future__ import annotations

import contextlib
import contextvars
import json
import logging
import re
import time
from collections.abc import Iterator, Mapping
from typing import Any

FIELDS = ("kernel_id", "pool", "user")
TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
_context: contextvars.ContextVar[dict[str, str]] = contextvars.ContextVar(
    "poolgate_log", default={})  # noqa: B039  # never mutated: bind() sets a new dict
UUID = re.compile(r"^[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}$")
URL_PASSWORD = re.compile(r"(://[^:/@\s]*:)[^@\s]+@")
# A secret-looking name, then its value: after '=' (spaces allowed), after ':' when the name
# is quoted (JSON, a dict's repr) or the value follows at once (token:abc). "SECRET_TOKEN: not
# allowed" is prose, and stays as written.
SECRET_PAIR = re.compile(r"(?i)\b([\w.-]*(?:token|password|passwd|secret|credentials?|api_?key|"
                         r"access_?key|private_?key)|key)"
                         r"(['\"]?\s*=\s*['\"]?|['\"]\s*:\s*['\"]?|:(?=[^\s'\"]))"
                         r"(?!\*\*\*)([^\s'\",}&]+)")


_SHOWN_AS: dict[str, str] = {}  # how kombu prints a broker URL -> how it is logged


def mask(text: str) -> str:
    """``text`` with URL passwords and secret-looking ``name=value`` pairs hidden."""
    for shown, logged in _SHOWN_AS.items():
        text = text.replace(shown, logged)
    return SECRET_PAIR.sub(r"\1\2***", URL_PASSWORD.sub(r"\1***@", text))


def known_url(url: str) -> None:
    """Log the broker URL ``url`` as itself (masked), not as kombu prints it: kombu writes
    ``redis://:**@host`` for a Redis URL that has no password at all."""
    from kombu.connection import Connection

    shown = Connection(url).as_uri()  # type: ignore[no-untyped-call]
    _SHOWN_AS[shown] = URL_PASSWORD.sub(r"\1***@", url)


def bind(**fields: str) -> None:
    """Attach kernel fields to this thread's log lines until :func:`clear`."""
    _context.set({**_context.get(), **{k: v for k, v in fields.items() if v}})


def clear() -> None:
    _context.set({})


@contextlib.contextmanager
def bound(**fields: str) -> Iterator[None]:
    """Attach kernel fields to the log lines written inside the ``with`` block."""
    token = _context.set({**_context.get(), **{k: v for k, v in fields.items() if v}})
    try:
        yield
    finally:
        _context.reset(token)


class KernelFields(logging.Filter):
    """Adds ``kernel_id``, ``pool`` and ``user`` to records, and masks the message."""

    def filter(self, record: logging.LogRecord) -> bool:
        ctx = _context.get()
        for name in FIELDS:
            if not getattr(record, name, None):
                setattr(record, name, ctx.get(name, ""))
        if not record.kernel_id:  # type: ignore[attr-defined]
            args = record.args.values() if isinstance(record.args, Mapping) else record.args or ()
            record.kernel_id = next((a for a in args if isinstance(a, str) and UUID.match(a)), "")
        try:
            message = record.getMessage()
        except Exception:  # a bad format string: let the handler report it as usual
            return True
        record.msg, record.args = mask(message), ()
        return True


class JsonFormatter(logging.Formatter):
    """One JSON object per line: time, level, logger, message, kernel fields, exception."""

    def format(self, record: logging.LogRecord) -> str:
        out: dict[str, Any] = {
            "time": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
            + f".{int(record.msecs):03d}Z",
            "level": record.levelname, "logger": record.name, "message": record.getMessage()}
        for name in FIELDS:
            value = getattr(record, name, "")
            if value:
                out[name] = value
        if record.exc_info:
            out["exception"] = mask(self.formatException(record.exc_info))
        return json.dumps(out, ensure_ascii=False)


def formatter(fmt: str) -> logging.Formatter:
    return JsonFormatter() if fmt == "json" else logging.Formatter(TEXT_FORMAT)


def configure(handler: logging.Handler, fmt: str) -> None:
    """Give one handler poolgate's formatter and filter (idempotent)."""
    handler.setFormatter(formatter(fmt))
    if not any(isinstance(f, KernelFields) for f in handler.filters):
        handler.addFilter(KernelFields())


def setup(level: str, fmt: str = "text") -> None:
    """Log to stderr at ``level``, as text or JSON (called by the poolgate commands)."""
    root = logging.getLogger()
    if not root.handlers:
        root.addHandler(logging.StreamHandler())
    root.setLevel(level.upper())
    for handler in root.handlers:
        configure(handler, fmt)
    if fmt == "json":  # Python's warnings, too, as log lines
        logging.captureWarnings(True)


def for_worker(fmt: str, broker_url: str = "") -> None:
    """Apply the format to the handlers Celery sets up when the worker starts."""
    from celery.signals import after_setup_logger, after_setup_task_logger

    if broker_url:
        known_url(broker_url)
    def _apply(logger: logging.Logger | None = None, **_: Any) -> None:
        for target in (logger, logging.getLogger()):
            for handler in (target.handlers if target is not None else []):
                if fmt == "json":  # text keeps Celery's own format
                    handler.setFormatter(JsonFormatter())
                if not any(isinstance(f, KernelFields) for f in handler.filters):
                    handler.addFilter(KernelFields())

    if fmt == "json":  # Celery's warnings (running as root, say), too, as log lines
        logging.captureWarnings(True)
        say_as_log()
    after_setup_logger.connect(_apply, weak=False)
    after_setup_task_logger.connect(_apply, weak=False)


def say_as_log() -> None:
    """Celery's worker writes a few lines straight to its stdout, past logging ("worker: Warm
    shutdown (MainProcess)", "Hitting Ctrl+C again ..."; celery/apps/worker.py ``safe_say``):
    with JSON logs they become log lines of ``celery.apps.worker``, on the log's stream."""
    import celery.apps.worker as celery_worker

    said = logging.getLogger("celery.apps.worker")

    def say(msg: str, f: Any = None) -> None:
        said.warning("%s", msg.strip())

    celery_worker.safe_say = say
