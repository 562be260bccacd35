"""gateway/auth.py, gateway/access.py and gateway/cors.py as pure pieces: the settings'
checks, tokens from requests, the proxy header's trust, Hub scopes, and who may start what."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import yaml
from flask import Flask

from poolgate.gateway import access, cors
from poolgate.gateway.auth import HeaderAuthenticator, TokenAuthenticator, User, given_token, has_scope
from poolgate.workers.config import AuthConfig, KernelSpec, PoolConfig, load_config
from poolgate.workers.errors import ConfigError, Unauthorized

APP = Flask(__name__)
BASE = {"pools": {"local": {"launcher": "local", "slots": 2}}}


def load(tmp_path: Path, data: dict[str, Any]) -> Any:
    path = tmp_path / "queues.yaml"
    path.write_text(yaml.safe_dump({**BASE, **data}))
    return load_config(path, environ={})


@pytest.mark.parametrize("auth,message", [
    ({"kind": "tokn"}, "gateway.auth.kind: expected one of token, header, jupyterhub, got 'tokn'; "
                       "did you mean 'token'?"),
    ({"kind": "header"}, "gateway.auth.trusted_proxies: the header authenticator needs"),
    ({"kind": "header", "trusted_proxies": ["proxy.local"]},
     "gateway.auth.trusted_proxies: 'proxy.local' is not an address or network"),
    ({"kind": "jupyterhub"}, "gateway.auth.hub_api_url: the jupyterhub authenticator needs"),
    ({"cache_second": 3}, "gateway.auth.cache_second: unknown key; did you mean 'cache_seconds'?"),
    ({"admin_users": {"a": 1}}, "gateway.auth.admin_users: expected a list of strings"),
])
def test_bad_auth_settings_name_path_and_rule(tmp_path: Path, auth: dict[str, Any],
                                              message: str) -> None:
    with pytest.raises(ConfigError) as info:
        load(tmp_path, {"gateway": {"auth": auth}})
    assert message in str(info.value)


def test_auth_settings_load(tmp_path: Path) -> None:
    cfg = load(tmp_path, {"gateway": {"auth": {"kind": "header", "trusted_proxies": ["10.0.0.0/8"],
                                               "admin_users": "ops"}, "allow_origin": "*"}})
    assert cfg.gateway.auth == AuthConfig(kind="header", trusted_proxies=("10.0.0.0/8",),
                                          admin_users=("ops",))
    assert cfg.gateway.allow_origin == "*"
    assert load(tmp_path, {}).gateway.auth.kind == "token"


def test_kernelspec_user_lists_are_checked(tmp_path: Path) -> None:
    spec = tmp_path / "specs" / "x"
    spec.mkdir(parents=True)
    spec.joinpath("kernel.json").write_text(json.dumps({
        "argv": ["python"], "metadata": {"poolgate": {"denied_users": "mallory"}}}))
    with pytest.raises(ConfigError, match="metadata.poolgate.denied_users: expected a list"):
        load(tmp_path, {"kernelspec_dirs": [str(tmp_path / "specs")]})


@pytest.mark.parametrize("headers,query,token", [
    ({"Authorization": "token abc"}, "", "abc"),
    ({"Authorization": "Bearer abc"}, "", "abc"),
    ({"Authorization": "Basic abc"}, "", ""),
    ({}, "token=abc", "abc"),
    ({"Authorization": "token "}, "token=q", "q"),
])
def test_given_token(headers: dict[str, str], query: str, token: str) -> None:
    with APP.test_request_context("/api?" + query, headers=headers):
        from flask import request

        assert given_token(request) == token


def test_token_authenticator() -> None:
    auth = TokenAuthenticator(AuthConfig(), "s3cret")
    with APP.test_request_context("/", headers={"Authorization": "token s3cret"}):
        from flask import request

        assert auth.authenticate(request) == User("", admin=True)
    with APP.test_request_context("/", headers={"Authorization": "token s3cre"}):
        with pytest.raises(Unauthorized):
            auth.authenticate(request)
    with APP.test_request_context("/"):  # no token configured: no check, as before
        assert TokenAuthenticator(AuthConfig(), "").authenticate(request).admin


@pytest.mark.parametrize("peer,name,expected", [
    ("10.1.2.3", "alice", User("alice")),
    ("10.1.2.3", "ops", User("ops", admin=True)),
    ("192.168.0.9", "alice", None),         # not the proxy: the header is not believed
    ("10.1.2.3", "", None),                 # the proxy named nobody
    ("10.1.2.3", "al ice;rm", None),        # not a user name
])
def test_header_authenticator(peer: str, name: str, expected: User | None) -> None:
    auth = HeaderAuthenticator(AuthConfig(kind="header", trusted_proxies=("10.0.0.0/8",),
                                          admin_users=("ops",)))
    with APP.test_request_context("/", headers={"X-Forwarded-User": name},
                                  environ_base={"REMOTE_ADDR": peer}):
        from flask import request

        if expected is None:
            with pytest.raises(Unauthorized):
                auth.authenticate(request)
        else:
            assert auth.authenticate(request) == expected


def test_hub_scopes() -> None:
    want = "access:services!service=poolgate"
    assert has_scope({want}, want) and has_scope({"access:services"}, want)
    assert not has_scope({"access:services!service=other", "read:users"}, want)


def spec(**meta: Any) -> KernelSpec:
    return KernelSpec(name="py", resource_dir="/nowhere", argv=("python",), display_name="py",
                      language="python", env={}, metadata={"poolgate": meta},
                      interrupt_mode="signal", pool="p")


@pytest.mark.parametrize("pool,kspec,user,refused", [
    (PoolConfig("p", "local"), spec(), "alice", None),
    (PoolConfig("p", "local", denied_users=("alice",)), spec(), "alice", "denied_users"),
    (PoolConfig("p", "local", allowed_users=("bob",)), spec(), "alice", "does not serve user"),
    (PoolConfig("p", "local", kernelspecs=("r",)), spec(), "alice", "does not serve kernelspec"),
    (PoolConfig("p", "local"), spec(denied_users=["alice"]), "alice", "metadata.poolgate.denied"),
    (PoolConfig("p", "local"), spec(allowed_users=["bob"]), "alice", "metadata.poolgate.allowed"),
    (PoolConfig("p", "local"), spec(allowed_users=["bob"]), "bob", None),
    (PoolConfig("p", "ssh"), spec(), "root", "root is refused"),
    (PoolConfig("p", "ssh", allowed_users=("root",)), spec(), "root", None),
    (PoolConfig("p", "local"), spec(), "root", None),  # local kernels run as the worker
])
def test_who_may_start_what(pool: PoolConfig, kspec: KernelSpec, user: str,
                            refused: str | None) -> None:
    why = access.refusal(kspec, pool, user)
    assert (why is None) if refused is None else (refused in (why or ""))


def test_owner_and_kernel_username() -> None:
    assert User("alice").owns("alice") and not User("alice").owns("bob")
    assert User("ops", admin=True).owns("bob") and User("", admin=True).owns("bob")
    assert access.as_user({"KERNEL_USERNAME": "bob"}, User("alice")) == {"KERNEL_USERNAME": "alice"}
    assert access.as_user({"KERNEL_USERNAME": "bob"}, User("", admin=True)) == {
        "KERNEL_USERNAME": "bob"}  # the shared token's anonymous user: as sent, as before


def test_origins() -> None:
    assert cors.cross_allowed("https://a.org", "https://a.org https://b.org")
    assert cors.cross_allowed("https://x.org", "*")
    assert not cors.cross_allowed("https://x.org", "") and not cors.cross_allowed("", "*")
    assert cors.same_origin("http://127.0.0.1:8888", "127.0.0.1:8888")
    assert not cors.same_origin("http://evil:8888", "127.0.0.1:8888")


def test_hub_answers_are_kept(monkeypatch: pytest.MonkeyPatch) -> None:
    from poolgate.gateway.auth import HubAuthenticator

    auth = HubAuthenticator(AuthConfig(kind="jupyterhub", hub_api_url="http://hub/hub/api",
                                       cache_seconds=30))
    asked: list[str] = []

    def ask_hub(token: str) -> User:
        asked.append(token)
        if token != "good":
            raise Unauthorized(f"refused {token}")
        return User("alice")

    monkeypatch.setattr(auth, "ask_hub", ask_hub)
    for token in ("good", "good", "bad", "bad"):
        with APP.test_request_context("/", headers={"Authorization": f"token {token}"}):
            from flask import request

            if token == "good":
                assert auth.authenticate(request) == User("alice")
            else:
                with pytest.raises(Unauthorized, match="refused bad"):
                    auth.authenticate(request)
    assert asked == ["good", "bad"]  # once each, refusals included
    assert all("good" not in key for key in auth.cache)  # kept by hash, not in clear
