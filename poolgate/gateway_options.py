"""What the gateway's command-line options become, for ``poolgate gateway`` and ``poolgate serve``
alike (poolgate/cli.py, poolgate/serve.py)."""
from __future__ import annotations

import argparse
import socket
from pathlib import Path
from typing import Any

from .workers.errors import BackendUnavailable


def check_port(ip: str, port: int) -> None:
    """Refuse a port another program listens on, before anything says "listening"."""
    family = socket.AF_INET6 if ":" in ip else socket.AF_INET
    with socket.socket(family) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((ip, port))
        except OSError as exc:
            raise BackendUnavailable(f"cannot listen on {ip}:{port}: {exc.strerror or exc}; "
                                     f"another program has it (pass --port)") from None


def gateway_overrides(args: argparse.Namespace) -> dict[str, Any]:
    out: dict[str, Any] = {}
    if args.auth_token is not None:
        out["auth_token"] = args.auth_token
    if args.base_url is not None:
        out["base_url"] = args.base_url
    for key in ("certfile", "keyfile", "client_ca"):
        if getattr(args, key, None):
            out[key] = str(Path(getattr(args, key)).resolve())
    return out
