"""The yarn builders against literal bodies; no ResourceManager."""
from __future__ import annotations

import dataclasses
from typing import Any

import pytest

from poolgate.workers.config import build
from poolgate.workers.errors import ConfigError, LaunchRejected
from poolgate.workers.launchers.yarn_builders import (
    YarnOptions,
    build_yarn_app,
    kernel_tag,
    rm_params,
    submitting_user,
)
from poolgate.workers.protocol import LaunchRequest

KID = "3f2a9c1e-8b7d-4e6f-a5b4-c3d2e1f0a9b8"
REPLY = {"POOLGATE_RESPONSE_ADDRESS": "10.0.0.5:40000", "POOLGATE_RESPONSE_KEY": "k",
         "POOLGATE_RESPONSE_TOKEN": "t", "POOLGATE_LAUNCH_ID": "l", "POOLGATE_KERNEL_ID": KID}
ARGV = ("python", "-m", "ipykernel_launcher", "-f", "{connection_file}")
NEW_APP = {"application-id": "application_1700000000000_0007",
           "maximum-resource-capability": {"memory": 8192, "vCores": 4}}
REPLY_ENTRIES = [{"key": k, "value": v} for k, v in REPLY.items()]


def request(env: dict[str, str] | None = None, user: str = "alice", **resources: Any
            ) -> LaunchRequest:
    return LaunchRequest(kernel_id=KID, pool="Hadoop", spec_name="python3-yarn", argv=ARGV,
                         env={"KERNEL_USERNAME": user, **(env or {})} if user else dict(env or {}),
                         spec_env={"SPEC": "1"}, user=user,
                         resources={"resource_dir": "/specs/x", **resources})


def options(**kw: Any) -> YarnOptions:
    return build(YarnOptions, {"rm_address": "http://rm1:8088", **kw}, "pools.y.options")


def test_minimal_body() -> None:
    body = build_yarn_app(request(), NEW_APP, options(), REPLY)
    assert body == {
        "application-id": "application_1700000000000_0007",
        "application-name": f"poolgate-{KID}",
        "queue": "default",
        "application-type": "POOLGATE",
        "application-tags": {"tag": ["poolgate", f"poolgate.kernel_id:{KID}",
                                     "poolgate.pool:hadoop"]},
        "am-container-spec": {
            "commands": {"command": "python3 -m poolgate.kernel_launcher -- python3 -m "
                                    "ipykernel_launcher -f '{connection_file}' "
                                    "1><LOG_DIR>/stdout 2><LOG_DIR>/stderr"},
            "environment": {"entry": [
                {"key": "SPEC", "value": "1"}, {"key": "KERNEL_USERNAME", "value": "alice"},
                {"key": "KERNEL_ID", "value": KID}, *REPLY_ENTRIES,
                {"key": "POOLGATE_YARN_AM", "value": "1"}]},
        },
        "unmanaged-AM": False,
        "max-app-attempts": 1,
        "keep-containers-across-application-attempts": False,
        "resource": {"memory": 1024, "vCores": 1},
    }


def test_resources_queue_env_and_impersonation() -> None:
    opts = options(queue="jupyter", memory_mb=2048, vcores=2, auth="simple", user="svc",
                   impersonation=True, env={"POOL": "p", "SPEC": "pool's"},
                   application_type="JUPYTER", kernel_launcher="/opt/py/bin/python -m "
                   "poolgate.kernel_launcher --ready-timeout 60", python="/opt/py/bin/python")
    req = request({"KERNEL_USERNAME": "mallory", "POOLGATE_RESPONSE_KEY": "forged"},
                  user="bob", memory=3 * 2**30 + 1, cpus=1.5)
    req = dataclasses.replace(req, working_dir="/home/bob/work dir")
    user = submitting_user(req, opts)
    body = build_yarn_app(req, NEW_APP, opts, REPLY, user)
    assert user == "bob"  # the caller the gateway authenticated, not what the env claims
    assert rm_params(opts, user) == {"user.name": "svc", "doAs": "bob"}
    assert body["queue"] == "jupyter" and body["application-type"] == "JUPYTER"
    assert body["resource"] == {"memory": 3073, "vCores": 2}  # rounded up, never less
    assert body["am-container-spec"]["commands"]["command"] == (
        "cd '/home/bob/work dir' && /opt/py/bin/python -m poolgate.kernel_launcher "
        "--ready-timeout 60 -- /opt/py/bin/python -m ipykernel_launcher -f "
        "'{connection_file}' 1><LOG_DIR>/stdout 2><LOG_DIR>/stderr")
    assert body["am-container-spec"]["environment"] == {"entry": [
        {"key": "POOL", "value": "p"}, {"key": "SPEC", "value": "1"},
        {"key": "KERNEL_USERNAME", "value": "bob"}, {"key": "POOLGATE_RESPONSE_KEY", "value": "k"},
        {"key": "KERNEL_ID", "value": KID}, {"key": "POOLGATE_RESPONSE_ADDRESS",
                                            "value": "10.0.0.5:40000"},
        {"key": "POOLGATE_RESPONSE_TOKEN", "value": "t"}, {"key": "POOLGATE_LAUNCH_ID",
                                                         "value": "l"},
        {"key": "POOLGATE_KERNEL_ID", "value": KID}, {"key": "POOLGATE_YARN_AM", "value": "1"}]}


def test_user_params_per_auth() -> None:
    assert rm_params(options()) == {}
    assert submitting_user(request(), options()) == ""  # auth none: the RM's static user
    assert rm_params(options(auth="simple")) == {"user.name": "poolgate"}
    assert submitting_user(request(), options(auth="simple")) == "poolgate"
    kerb = options(auth="kerberos", impersonation=True)
    assert rm_params(kerb, "alice") == {"doAs": "alice"}
    with pytest.raises(LaunchRejected, match="has no KERNEL_USERNAME"):
        submitting_user(request(user=""), kerb)
    with pytest.raises(LaunchRejected, match="KERNEL_USERNAME='a b' is not a user name"):
        submitting_user(request(user="a b"), kerb)


def test_larger_than_the_cluster_is_refused() -> None:
    with pytest.raises(LaunchRejected, match="asks for 16384 MB, and the cluster's largest "
                                             "container has 8192 MB"):
        build_yarn_app(request(memory=16 * 2**30), NEW_APP, options(), REPLY)
    with pytest.raises(LaunchRejected, match="asks for 5 vcores"):
        build_yarn_app(request(cpus=5), NEW_APP, options(), REPLY)


def test_tag_is_lowercase_and_bounded() -> None:
    assert kernel_tag("ABC") == "poolgate.kernel_id:abc"
    assert len(kernel_tag("x" * 200)) == 100


@pytest.mark.parametrize("data,message", [
    ({"rm_address": ""}, "rm_address: expected http(s)://host:port of a ResourceManager"),
    ({"rm_address": "rm1:8088"}, "rm_address: expected http(s)://host:port"),
    ({"alternate_rm_address": "ftp://x"}, "alternate_rm_address: expected http(s)://"),
    ({"auth": "ldap"}, "auth: expected one of none, simple, kerberos, got 'ldap'"),
    ({"impersonation": True}, "impersonation: needs auth simple or kerberos"),
    ({"queue": "a queue"}, "queue: expected a queue name"),
    ({"memory_mb": 0}, "memory_mb: expected an integer >= 1, got 0"),
    ({"vcores": "two"}, 'vcores: expected an integer, got "two"'),
    ({"auth": "simple", "user": ""}, "user: expected a user name"),
    ({"rm_adress": "x"}, "rm_adress: unknown key; did you mean 'rm_address'?"),
])
def test_options_name_path_and_rule(data: dict[str, Any], message: str) -> None:
    with pytest.raises(ConfigError) as info:
        build(YarnOptions, {"rm_address": "http://rm1:8088", **data}, "pools.y.options")
    assert message in str(info.value)
    assert str(info.value).startswith("pools.y.options.")


def test_rm_addresses_active_first() -> None:
    assert options(alternate_rm_address="https://rm2:8090/").rm_addresses == (
        "http://rm1:8088", "https://rm2:8090")
