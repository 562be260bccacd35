"""The registry secrets: what encrypts kernels' connection keys at rest.

Rule: a kernel's HMAC key is never written to the registry in clear. ``registry_secret`` (or
``POOLGATE_REGISTRY_SECRET``) is a list of secrets: the first encrypts, every one decrypts
(:class:`cryptography.fernet.MultiFernet`), so a secret is rotated by putting the new one first
and dropping the old one once nothing holds a key written under it (README, Security). With no
secret configured, one is generated once in the data folder (``$POOLGATE_DATA_DIR`` or
``~/.local/share/poolgate``, file ``secret``, mode 0600) and shared by every process that uses
that folder, which is all of ``poolgate serve``; processes on other machines cannot read it,
so a registry that is not on this machine gets a loud warning.
"""
from __future__ import annotations

import base64
import hashlib
import logging
import os
import secrets as random
from collections.abc import Iterable, Mapping
from pathlib import Path

from cryptography.fernet import Fernet, MultiFernet

log = logging.getLogger(__name__)
ENV = "POOLGATE_REGISTRY_SECRET"
_warned: set[str] = set()


def parse(value: object) -> tuple[str, ...]:
    """Secrets from queues.yaml (a string or a list) or the environment (separated by commas
    or spaces); empty entries dropped, order kept."""
    items: Iterable[object] = value if isinstance(value, (list, tuple)) else \
        str(value or "").replace(",", " ").split()
    return tuple(s for s in (str(i).strip() for i in items) if s)


def data_dir(environ: Mapping[str, str] | None = None) -> Path:
    env = os.environ if environ is None else environ
    return Path(env.get("POOLGATE_DATA_DIR") or Path.home() / ".local/share/poolgate")


def local_secret(folder: Path) -> str:
    """The secret kept in ``folder/secret``, made (atomically, 0600) on first use; two processes
    that make it at once get the same one."""
    path = folder / "secret"
    if not path.exists():
        folder.mkdir(parents=True, exist_ok=True, mode=0o700)
        tmp = folder / f".secret.{os.getpid()}.{random.token_hex(4)}"
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(random.token_hex(32))
        try:
            os.link(tmp, path)  # atomic: the first one made wins
        except FileExistsError:
            pass
        finally:
            tmp.unlink()
    return path.read_text().strip()


def _fernet(secret: str) -> Fernet:
    # The secret may be any string: a Fernet key is derived from it (SHA-256, as before lists).
    return Fernet(base64.urlsafe_b64encode(hashlib.sha256(secret.encode()).digest()))


def is_local(url: str) -> bool:
    """Whether the registry URL names this machine (a socket or a loopback address)."""
    from urllib.parse import urlsplit

    parts = urlsplit(url)
    return parts.scheme in ("unix", "redis+socket") or (parts.hostname or "") in (
        "localhost", "127.0.0.1", "::1", "")


def fingerprint(secret: str) -> str:
    """What the registry keeps to tell whether processes share a secret (not the secret)."""
    return hashlib.sha256(b"poolgate registry secret:" + secret.encode()).hexdigest()[:24]


def fernet(secrets: Iterable[str]) -> MultiFernet:
    return MultiFernet([_fernet(s) for s in secrets])


def resolve(configured: Iterable[str], registry_url: str) -> tuple[str, ...]:
    """The configured secrets, or the data folder's generated one."""
    chosen = tuple(configured)
    if not chosen:
        folder = data_dir()
        chosen = (local_secret(folder),)
        if registry_url not in _warned:
            _warned.add(registry_url)
            if is_local(registry_url) and os.environ.get("POOLGATE_SECRET_SAID"):
                pass  # poolgate serve said it once for all its processes
            elif is_local(registry_url):
                log.info("No registry_secret configured: kernel keys are encrypted with the "
                         "secret generated in %s", folder / "secret")
            else:
                log.warning("No registry_secret configured and the registry %s is not on this "
                            "machine: kernel keys are encrypted with %s, which gateways and "
                            "workers on other machines do not have, so they cannot connect to "
                            "kernels started here. Give every process the same secret "
                            "(POOLGATE_REGISTRY_SECRET or registry_secret; README, Security)",
                            registry_url, folder / "secret")
    return chosen
