"""Who is asking: an authenticator turns each request into a :class:`User`, or a 401.

Rule: :func:`install` registers :func:`authenticate` as the app's *first* ``before_request``, so
it runs before anything else on every route (the WebSocket handshake, unknown paths and CORS
preflights included) and a request without valid credentials learns nothing: not whether a
kernel id is live, not whether a route exists. ``g.user`` is then the caller.

::

    Authenticator            authenticate(request) -> User, or raise Unauthorized
    ├─ TokenAuthenticator    gateway.auth_token, shared by everyone: the anonymous user, who
    │                        sees everything, as before users existed (no token: no check)
    ├─ HeaderAuthenticator   a user header set by an authenticating reverse proxy, believed
    │                        only from gateway.auth.trusted_proxies
    └─ HubAuthenticator      a JupyterHub API token, whose owner the Hub API names
                             (GET {hub_api_url}/user); answers are kept cache_seconds

What a user may then do (own kernels only, who may start what) is ``gateway/access.py``.
"""
from __future__ import annotations

import abc
import hashlib
import hmac
import ipaddress
import json
import logging
import re
import threading
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from typing import Any

from flask import Flask, Request, Response, g, request

from ..workers.config import AuthConfig, Config
from ..workers.errors import BackendUnavailable, Forbidden, Unauthorized

log = logging.getLogger(__name__)
#: What a user name may look like: it becomes KERNEL_USERNAME, a registry key and a log field.
USER_NAME = re.compile(r"^[\w.@+-]{1,128}$")
#: Routes for operators: an admin, the anonymous user of a shared token, or the metrics token.
OPERATOR_ENDPOINTS = {"pools.list_pools", "pools.get_pool", "metrics.metrics", "dashboard.page"}


@dataclass(frozen=True)
class User:
    """The caller. ``name`` is "" for the anonymous user of a shared token (or of no check)."""

    name: str = ""
    admin: bool = False
    operator: bool = False  # holds the metrics token: may read the operator routes only

    def owns(self, owner: str) -> bool:
        """May this user see and drive a kernel (or session) that ``owner`` started?"""
        return self.admin or owner == self.name


ANONYMOUS = User("", admin=True)
METRICS = User("", operator=True)


def given_token(req: Request) -> str:
    """The token of ``Authorization: token T`` (or ``bearer T``), else of ``?token=T``."""
    scheme, _, value = req.headers.get("Authorization", "").partition(" ")
    if scheme.lower() in ("token", "bearer") and value.strip():
        return value.strip()
    return req.args.get("token", "")


def same(given: str, expected: str) -> bool:
    return hmac.compare_digest(given.encode(), expected.encode())


class Authenticator(abc.ABC):
    """Turns a request into a user. Called by :func:`authenticate` on every request, in any of
    the server's threads; keeps no per-request state."""

    def __init__(self, cfg: AuthConfig) -> None:
        self.cfg = cfg

    @abc.abstractmethod
    def authenticate(self, req: Request) -> User:
        """The caller, or raise :class:`Unauthorized` saying what credentials are expected."""

    def user(self, name: str, admin: bool = False) -> User:
        if not USER_NAME.match(name):
            raise Unauthorized(f"the user name {name[:40]!r} is not one poolgate accepts")
        return User(name, admin=admin or name in self.cfg.admin_users)


class TokenAuthenticator(Authenticator):
    """``gateway.auth_token``: one shared token; everyone holding it is the anonymous user."""

    def __init__(self, cfg: AuthConfig, token: str) -> None:
        super().__init__(cfg)
        self.token = token

    def authenticate(self, req: Request) -> User:
        if self.token and not same(given_token(req), self.token):
            raise Unauthorized("a valid token is required: send 'Authorization: token <T>'")
        return ANONYMOUS


class HeaderAuthenticator(Authenticator):
    """The user named in ``user_header`` by an authenticating reverse proxy; the header is
    believed only from ``trusted_proxies``, since any other client could set it."""

    def __init__(self, cfg: AuthConfig) -> None:
        super().__init__(cfg)
        self.proxies = [ipaddress.ip_network(n, strict=False) for n in cfg.trusted_proxies]

    def authenticate(self, req: Request) -> User:
        try:
            peer = ipaddress.ip_address(req.remote_addr or "")
        except ValueError:
            peer = None
        if peer is None or not any(peer in net for net in self.proxies):
            raise Unauthorized("requests must come through the authenticating proxy")
        name = req.headers.get(self.cfg.user_header, "").strip()
        if not name:
            raise Unauthorized(f"the proxy did not name a user ({self.cfg.user_header})")
        return self.user(name)


class HubAuthenticator(Authenticator):
    """A JupyterHub API token (a single-user server's ``JUPYTERHUB_API_TOKEN``, or a user's
    own): the Hub names its owner at ``GET {hub_api_url}/user`` (JupyterHub >= 2). A Hub admin
    is a poolgate admin. Answers are kept ``cache_seconds``, so a token revoked in the Hub stops
    working here within that time."""

    MAX_CACHED = 10000

    def __init__(self, cfg: AuthConfig) -> None:
        super().__init__(cfg)
        self.url = cfg.hub_api_url.rstrip("/") + "/user"
        self.cache: dict[str, tuple[float, User | str]] = {}  # str: why the Hub refused it
        self.lock = threading.Lock()

    def authenticate(self, req: Request) -> User:
        token = given_token(req)
        if not token:
            raise Unauthorized("a JupyterHub API token is required: send "
                               "'Authorization: token <JUPYTERHUB_API_TOKEN>'")
        key = hashlib.sha256(token.encode()).hexdigest()  # no token kept in memory in clear
        now = time.monotonic()
        with self.lock:
            hit = self.cache.get(key)
        if hit is not None and hit[0] > now:
            if isinstance(hit[1], str):
                raise Unauthorized(hit[1])
            return hit[1]
        try:
            user = self.ask_hub(token)
        except Unauthorized as exc:  # kept too: made-up tokens in a flood do not each reach the Hub
            self._keep(key, exc.message, now)
            raise
        self._keep(key, user, now)
        return user

    def _keep(self, key: str, user: User | str, now: float) -> None:
        with self.lock:
            if len(self.cache) >= self.MAX_CACHED:
                self.cache = {k: v for k, v in self.cache.items() if v[0] > now}
                if len(self.cache) >= self.MAX_CACHED:
                    self.cache.clear()
            self.cache[key] = (now + self.cfg.cache_seconds, user)

    def ask_hub(self, token: str) -> User:
        """The token's owner, as the Hub says; 401 when the Hub refuses the token."""
        req = urllib.request.Request(self.url, headers={"Authorization": f"token {token}"})
        try:
            with urllib.request.urlopen(req, timeout=10) as resp:
                model: dict[str, Any] = json.loads(resp.read())
        except urllib.error.HTTPError as exc:
            if exc.code in (401, 403, 404):
                raise Unauthorized("JupyterHub did not accept the token") from None
            raise BackendUnavailable(f"the JupyterHub API ({self.url}) answered {exc.code}; "
                                     f"try again shortly") from None
        except (OSError, ValueError) as exc:
            log.warning("JupyterHub API %s unreachable: %s", self.url, exc)
            raise BackendUnavailable(f"the JupyterHub API ({self.url}) did not answer; try "
                                     f"again shortly") from None
        if model.get("kind", "user") != "user" or not isinstance(model.get("name"), str):
            raise Unauthorized("the token does not belong to a JupyterHub user")
        held = set(model.get("scopes") or ())
        missing = [s for s in self.cfg.hub_scopes if not has_scope(held, s)]
        if missing:
            raise Unauthorized(f"the JupyterHub token lacks the scopes {', '.join(missing)}")
        return self.user(model["name"], admin=bool(model.get("admin")))


def has_scope(held: set[str], scope: str) -> bool:
    """Does a token holding ``held`` (the Hub's expanded scopes) have ``scope``? An unfiltered
    scope (``access:services``) covers its filtered forms (``access:services!service=x``)."""
    return scope in held or scope.split("!", 1)[0] in held


def make_authenticator(config: Config) -> Authenticator:
    """The authenticator ``gateway.auth.kind`` names."""
    cfg = config.gateway.auth
    if cfg.kind != "token" and config.gateway.auth_token:
        log.warning("gateway.auth_token is not checked: gateway.auth.kind is %s", cfg.kind)
    if cfg.kind == "header":
        return HeaderAuthenticator(cfg)
    if cfg.kind == "jupyterhub":
        return HubAuthenticator(cfg)
    if not config.gateway.auth_token:
        log.warning("No authentication: anyone who reaches this gateway runs code; set "
                    "gateway.auth_token or gateway.auth (README, Security)")
    return TokenAuthenticator(cfg, config.gateway.auth_token)


def install(app: Flask, config: Config) -> None:
    """Register :func:`authenticate` first, and the CORS headers on every response. Called by
    ``create_app`` before any blueprint or other ``before_request`` is registered."""
    from . import cors

    app.extensions["poolgate.auth"] = make_authenticator(config)
    app.before_request(authenticate)
    cors.install(app, config.gateway.allow_origin)

    @app.after_request
    def _challenge(resp: Response) -> Response:
        if resp.status_code == 401:  # RFC 9110: a 401 names the scheme it wants
            resp.headers["WWW-Authenticate"] = 'Bearer realm="poolgate"'
        return resp


def authenticate() -> Any:
    """Set ``g.user``, or answer 401; operator routes also need an admin or the metrics token."""
    from flask import current_app

    from . import cors

    if request.method == "OPTIONS":  # a CORS preflight carries no credentials, and gets no data
        return cors.preflight()
    authenticator: Authenticator = current_app.extensions["poolgate.auth"]
    metrics_token = authenticator.cfg.metrics_token
    if (request.endpoint in OPERATOR_ENDPOINTS and metrics_token
            and same(given_token(request), metrics_token)):
        g.user = METRICS
        return None
    try:
        g.user = authenticator.authenticate(request)
    except Unauthorized as exc:  # one line per refusal, for audits and fail2ban
        log.info("Refused %s %s from %s: %s", request.method, request.path,
                 request.remote_addr, exc.message)
        raise
    if request.endpoint in OPERATOR_ENDPOINTS and not (g.user.admin or g.user.operator):
        raise Forbidden("this page is for operators: an admin (gateway.auth.admin_users) or "
                        "the metrics token")
    cors.check_websocket_origin()
    return None


def current_user() -> User:
    """The caller of this request (set by :func:`authenticate`; fails closed without it)."""
    user = g.get("user")
    if not isinstance(user, User):
        raise Unauthorized("this request was not authenticated")
    return user
