"""A small client of the YARN ResourceManager's REST API (``/ws/v1/cluster``), and its errors.

The rule of this module: every RM call goes through :meth:`RMClient.call`, which tries the
configured RM first and the alternate RM of an HA pair when the first cannot be reached or is a
standby (a standby RM answers REST calls with a redirect to the active one, HTTP 307), and
every RM error is mapped into poolgate's error tree in one place, :func:`rm_errors`.
"""
from __future__ import annotations

import contextlib
import logging
import threading
from collections.abc import Iterator
from typing import Any

from ..errors import BackendUnavailable, ConfigError, LaunchRejected
from .yarn_builders import YarnOptions

log = logging.getLogger(__name__)

APPS = "/ws/v1/cluster/apps"
FINAL = ("FINISHED", "FAILED", "KILLED")


def requests_module() -> Any:
    """requests, or an ImportError that names the extra to install."""
    try:
        import requests
    except ImportError as exc:
        raise ImportError("the yarn launcher needs requests: pip install 'poolgate[yarn]'"
                          ) from exc
    return requests


def spnego_auth() -> Any:
    """A requests auth object for Kerberos (SPNEGO), from requests-gssapi or requests-kerberos."""
    try:
        from requests_gssapi import OPTIONAL, HTTPSPNEGOAuth
        return HTTPSPNEGOAuth(mutual_authentication=OPTIONAL)
    except ImportError:
        pass
    try:
        from requests_kerberos import OPTIONAL as K_OPTIONAL
        from requests_kerberos import HTTPKerberosAuth
        return HTTPKerberosAuth(mutual_authentication=K_OPTIONAL)
    except ImportError:
        raise ConfigError("auth: kerberos needs requests-gssapi (or requests-kerberos): pip "
                          "install 'poolgate[yarn-kerberos]', and a ticket (kinit or a keytab)"
                          ) from None


class RMError(Exception):
    """An RM answer other than success: its status, its RemoteException's class and message."""

    def __init__(self, status: int, exception: str, message: str) -> None:
        super().__init__(f"{status} {exception}: {message}")
        self.status, self.exception, self.message = status, exception, message


@contextlib.contextmanager
def rm_errors(what: str) -> Iterator[None]:
    """Map the RM's errors, and requests', into poolgate's (with the RM's own words)."""
    requests = requests_module()
    try:
        yield
    except RMError as exc:
        if exc.status in (401, 403):
            raise LaunchRejected(f"{what}: the ResourceManager does not let this worker do "
                                 f"that ({exc.exception}: {exc.message})") from exc
        if exc.status >= 500 or exc.status == 307:
            raise BackendUnavailable(f"{what}: the ResourceManager failed ({exc.exception}: "
                                     f"{exc.message})") from exc
        raise LaunchRejected(f"{what}: the ResourceManager refused ({exc.exception}: "
                             f"{exc.message})") from exc
    except requests.exceptions.RequestException as exc:
        raise BackendUnavailable(f"{what}: no ResourceManager answers ({exc})") from exc


def remote_exception(resp: Any) -> RMError:
    """The RMError of a failed response: its ``RemoteException`` JSON, else its text."""
    try:
        data = resp.json().get("RemoteException") or {}
    except ValueError:
        data = {}
    name = str(data.get("exception") or resp.reason or "HTTP error")
    text = str(data.get("message") or resp.text[:300] or "").strip()
    return RMError(resp.status_code, name, text)


class RMClient:
    """requests against one ResourceManager, or an HA pair."""

    def __init__(self, options: YarnOptions) -> None:
        requests = requests_module()
        self.options = options
        self.addresses = list(options.rm_addresses)
        self._lock = threading.Lock()  # launches and polls of one worker share this client
        self.session = requests.Session()
        if options.auth == "kerberos":
            self.session.auth = spnego_auth()
        self.session.verify = options.ca_file or True
        self.session.headers.update({"Accept": "application/json"})

    def close(self) -> None:
        self.session.close()

    def call(self, method: str, path: str, params: dict[str, str] | None = None,
             body: dict[str, Any] | None = None, ok: tuple[int, ...] = (200, 202)) -> Any:
        """The JSON of ``method path`` on the active RM; RMError for an error answer,
        requests' ConnectionError when no RM is reachable or active."""
        requests = requests_module()
        problems: list[str] = []
        with self._lock:
            order = list(self.addresses)
        for address in order:
            try:
                resp = self.session.request(method, address + path, params=params, json=body,
                                            timeout=self.options.api_timeout,
                                            allow_redirects=False)
            except (requests.exceptions.ConnectionError, requests.exceptions.Timeout) as exc:
                problems.append(f"{address}: {exc.__class__.__name__}")
                log.warning("ResourceManager %s unreachable (%s)%s", address, exc,
                            "; trying the next one" if address != order[-1] else "")
                continue
            if resp.is_redirect:  # a standby RM points at the active one
                problems.append(f"{address}: standby (redirects to "
                                f"{resp.headers.get('Location', '?')})")
                log.info("ResourceManager %s is a standby; trying the next one", address)
                continue
            if address != order[0]:  # ask the active one first from now on
                with self._lock:
                    self.addresses = [address, *(a for a in self.addresses if a != address)]
                log.warning("ResourceManager %s is the active one now", address)
            if resp.status_code not in ok:
                raise remote_exception(resp)
            return resp.json() if resp.content else {}
        raise requests.exceptions.ConnectionError(
            "no active ResourceManager: " + "; ".join(problems))

    # -- the calls the launcher makes ----------------------------------------------------------

    def new_application(self, params: dict[str, str]) -> dict[str, Any]:
        data: dict[str, Any] = self.call("POST", f"{APPS}/new-application", params)
        return data

    def submit(self, body: dict[str, Any], params: dict[str, str]) -> None:
        self.call("POST", APPS, params, body)

    def app(self, app_id: str, params: dict[str, str]) -> dict[str, Any] | None:
        """The RM's report on ``app_id`` (state, finalStatus, diagnostics...); None if it
        does not know it."""
        try:
            data = self.call("GET", f"{APPS}/{app_id}", params)
        except RMError as exc:
            if exc.status == 404:
                return None
            raise
        app: dict[str, Any] = data.get("app") or {}
        return app

    def tagged(self, tag: str, params: dict[str, str]) -> list[dict[str, Any]]:
        """The applications that carry ``tag`` and have not ended."""
        states = "NEW,NEW_SAVING,SUBMITTED,ACCEPTED,RUNNING"
        data = self.call("GET", APPS, {**params, "applicationTags": tag, "states": states})
        found = (data.get("apps") or {}).get("app") or []
        return [a for a in found if tag in str(a.get("applicationTags", "")).split(",")]

    def kill(self, app_id: str, params: dict[str, str]) -> str:
        """Ask the RM to kill ``app_id``; its state as the RM answers ("" if unknown)."""
        try:
            data = self.call("PUT", f"{APPS}/{app_id}/state", params, {"state": "KILLED"})
        except RMError as exc:
            if exc.status == 404:
                return ""
            raise
        return str(data.get("state") or "")
