"""TLS options of an ``amqps://`` broker URL, spelled as for ``rediss://``.

Rule: one spelling for both brokers. ``rediss://…?ssl_cert_reqs=required&ssl_ca_certs=/ca.pem``
is read by redis-py and kombu as it is; kombu hands an ``amqps://`` URL's ``ssl_*`` parameters
to py-amqp under names it refuses, so :func:`split_amqps` takes them off the URL and returns
them as Celery's ``broker_use_ssl`` in py-amqp's names. Pure: no Celery here.
"""
from __future__ import annotations

import ssl
from typing import Any
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

from .errors import ConfigError

#: URL parameter -> py-amqp's ssl option
NAMES = {"ssl_ca_certs": "ca_certs", "ssl_certfile": "certfile", "ssl_keyfile": "keyfile",
         "ssl_cert_reqs": "cert_reqs"}
REQS = {"required": ssl.CERT_REQUIRED, "optional": ssl.CERT_OPTIONAL, "none": ssl.CERT_NONE}


def split_amqps(url: str) -> tuple[str, dict[str, Any] | None]:
    """``url`` without its ``ssl_*`` parameters, and ``broker_use_ssl`` (None: not amqps, or
    no parameters, where kombu's default applies: verified against the system's CAs)."""
    parts = urlsplit(url)
    if parts.scheme != "amqps" or not parts.query:
        return url, None
    keep: list[tuple[str, str]] = []
    opts: dict[str, Any] = {}
    for name, value in parse_qsl(parts.query, keep_blank_values=True):
        if name not in NAMES:
            keep.append((name, value))
        elif name == "ssl_cert_reqs":
            if value.lower() not in REQS:
                raise ConfigError(f"broker_url: ssl_cert_reqs={value!r}: expected one of "
                                  f"{', '.join(REQS)}")
            opts["cert_reqs"] = REQS[value.lower()]
        else:
            opts[NAMES[name]] = value
    if not opts:
        return url, None
    opts.setdefault("cert_reqs", ssl.CERT_REQUIRED)
    return urlunsplit(parts._replace(query=urlencode(keep))), opts
