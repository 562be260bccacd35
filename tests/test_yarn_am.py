"""poolgate.yarn_am against Hadoop's own RPC server and Credentials (tests/yarn_am_service.py)."""
from __future__ import annotations

import itertools
import socket
import threading
import time
from pathlib import Path

import pytest

from poolgate import yarn_am
from poolgate.yarn_am import AMError, ApplicationMaster, DigestMD5
from tests.yarn_am_service import HadoopAMService, shared_service

_ids = itertools.count(1)


@pytest.fixture(scope="module")
def hadoop() -> HadoopAMService:
    return shared_service()


def attempt() -> str:
    return f"appattempt_{int(time.time() * 1000)}_{next(_ids):04d}_000001"


def am_for(hadoop: HadoopAMService, tmp_path: Path, fmt: str = "writable",
           bad: bool = False, heartbeat: float = 10.0) -> tuple[str, ApplicationMaster]:
    att = attempt()
    tokens = tmp_path / f"container_tokens-{att}"
    hadoop.mint(att, tokens, fmt, bad)
    env = {"CONTAINER_ID": "container_1_0001_01_000001", "HADOOP_TOKEN_FILE_LOCATION":
           str(tokens), "POOLGATE_AM_HEARTBEAT": str(heartbeat)}
    am = ApplicationMaster.from_environment(env)
    assert am is not None
    return att, am


@pytest.mark.parametrize("fmt", ["writable", "protobuf"])
def test_register_heartbeat_finish(hadoop: HadoopAMService, tmp_path: Path, fmt: str) -> None:
    att, am = am_for(hadoop, tmp_path, fmt)
    assert am.token.kind == "YARN_AM_RM_TOKEN"
    assert am.addresses == [("127.0.0.1", hadoop.port)]  # the token's service
    failed, succeeded = hadoop.auth_counts()
    try:
        reg = am.register("node7", 4567, "http://node7:4567/")
        assert (reg.queue, reg.max_memory_mb, reg.max_vcores) == ("default", 8192, 4)
        assert am.allocate(0.5) == 0
        assert am.conn is not None
        am.conn.sock.shutdown(socket.SHUT_RDWR)  # as the server does to an idle connection
        assert am.allocate(0.5) == 0  # on a new connection, the same attempt
        assert am.finish("FAILED", "the kernel exited with status 3")
    finally:
        am.close()
    hadoop.wait_for(lambda e: e.get("attempt") == att and e["event"] == "finish")
    assert hadoop.auth_counts() == (failed, succeeded + 2)  # SASL each time it connected
    seen = [(e["event"], e.get("response_id")) for e in hadoop.of(att)]
    assert seen == [("register", None), ("allocate", "0"), ("allocate", "1"), ("finish", None)]
    reg_event, fin = hadoop.of(att, "register")[0], hadoop.of(att, "finish")[0]
    assert (reg_event["host"], reg_event["rpc_port"], reg_event["tracking_url"]) == (
        "node7", "4567", "http://node7:4567/")
    assert (fin["final_status"], fin["diagnostics"]) == ("FAILED",
                                                         "the kernel exited with status 3")


def test_a_token_with_the_wrong_password_is_refused(hadoop: HadoopAMService,
                                                    tmp_path: Path) -> None:
    att, am = am_for(hadoop, tmp_path, bad=True)
    failed, succeeded = hadoop.auth_counts()
    with pytest.raises(AMError) as info:
        am.register("node7")
    am.close()
    # The server's own words: SASL's DIGEST-MD5 comparison failed; and its own count of it.
    assert "SaslException" in str(info.value) and "DIGEST-MD5" in str(info.value), info.value
    assert hadoop.auth_counts() == (failed + 1, succeeded)
    assert hadoop.of(att) == []


def test_a_revoked_attempt_is_refused_and_reported(hadoop: HadoopAMService,
                                                   tmp_path: Path) -> None:
    att, am = am_for(hadoop, tmp_path)
    hadoop.revoke(att)
    with pytest.raises(AMError) as info:
        am.register("node7")
    am.close()
    assert "InvalidToken" in str(info.value) and att in str(info.value), info.value
    assert hadoop.wait_for(lambda e: e.get("attempt") == att)["event"] == "refused"


def test_calls_out_of_order_get_the_rms_exceptions(hadoop: HadoopAMService,
                                                   tmp_path: Path) -> None:
    _, am = am_for(hadoop, tmp_path)
    try:
        with pytest.raises(AMError, match="ApplicationMasterNotRegisteredException"):
            am.allocate()
        am.register("node7")
        with pytest.raises(AMError, match="InvalidApplicationMasterRequestException.*already"):
            am.register("node7")
    finally:
        am.close()


def test_heartbeat_honours_am_shutdown_resync_and_a_lost_registration(hadoop: HadoopAMService,
                                                  tmp_path: Path) -> None:
    att, am = am_for(hadoop, tmp_path, heartbeat=0.1)
    told: list[str] = []
    done = threading.Event()
    try:
        am.register("node7")
        am.start_heartbeat(lambda why: (told.append(why), done.set()))
        hadoop.order(att, "RESYNC")
        hadoop.wait_for(lambda e: e.get("attempt") == att and e.get("command") == "AM_RESYNC")
        # Registered again, and heartbeats go on from response id 0.
        hadoop.wait_for(lambda e: len(hadoop.of(att, "register")) == 2 and e.get(
            "attempt") == att and e["event"] == "allocate" and e["response_id"] == "1"
            and e["t"] > hadoop.of(att, "register")[1]["t"])
        assert told == []
        # An RM that lost the registration (a restart) answers ApplicationMasterNotRegistered:
        # the AM registers again.
        hadoop.command(f"FORGET {att}")
        hadoop.wait_for(lambda e: len(hadoop.of(att, "register")) == 3, timeout=30)
        assert told == []
        hadoop.order(att, "SHUTDOWN")
        assert done.wait(30)
        assert told == ["the ResourceManager told the AM to shut down"]
    finally:
        am.close()


def test_unreachable_scheduler_names_the_address(tmp_path: Path) -> None:
    token = yarn_am.Token("amrm", b"id", b"pw", yarn_am.AMRM_KIND, "127.0.0.1:1")
    am = ApplicationMaster(token, yarn_am.scheduler_addresses(token), timeout=5)
    with pytest.raises(AMError, match="cannot reach the RM's scheduler at 127.0.0.1:1"):
        am.register("node7")


def test_not_a_yarn_container_and_no_amrm_token(tmp_path: Path) -> None:
    assert ApplicationMaster.from_environment({"HADOOP_TOKEN_FILE_LOCATION": "x"}) is None
    empty = tmp_path / "tokens"
    empty.write_bytes(b"HDTS\x00\x00\x00")  # Writable, no tokens, no secrets
    with pytest.raises(AMError, match="hold no YARN_AM_RM_TOKEN"):
        ApplicationMaster.from_environment({"CONTAINER_ID": "c",
                                            "HADOOP_TOKEN_FILE_LOCATION": str(empty)})
    (tmp_path / "junk").write_bytes(b"nope")
    with pytest.raises(AMError, match="not a Hadoop token storage file"):
        yarn_am.amrm_token(str(tmp_path / "junk"))


def test_digest_md5_matches_rfc_2831s_example() -> None:
    d = DigestMD5("chris", "secret", "imap", "elwood.innosoft.com")
    d.cnonce = "OA6MHXh6VqTrRk"
    out = yarn_am.parse_directives(d.respond(
        b'realm="elwood.innosoft.com",nonce="OA6MG9tEQGm2hh",qop="auth",algorithm=md5-sess,'
        b"charset=utf-8"))
    assert out["response"] == "d388dad90d4bbd760a152321f2143af7"
    d.check_rspauth(b"rspauth=ea40f60335c427b5527b84dbabcdfffd")
    with pytest.raises(AMError, match="rspauth does not match"):
        d.check_rspauth(b"rspauth=00000000000000000000000000000000")
    with pytest.raises(AMError, match="auth-conf with rc4 only"):
        d.respond(b'nonce="x",qop="auth-conf",cipher="3des,des",algorithm=md5-sess')


def test_varints_round_trip() -> None:
    for n in (0, 1, 127, 128, 300, 2**31, 2**63 - 1):
        assert yarn_am.read_varint(yarn_am.varint(n), 0) == (n, len(yarn_am.varint(n)))
    assert yarn_am.varint(-33) == bytes.fromhex("dfffffffffffffffff01")
    assert yarn_am.zigzag(-33) == 65 and yarn_am.zigzag(3) == 6
    with pytest.raises(ValueError, match="truncated"):
        yarn_am.read_varint(b"\x80", 0)


@pytest.mark.parametrize("protection", ["integrity", "privacy"])
def test_hadoop_rpc_protection_integrity_and_privacy(tmp_path: Path, protection: str) -> None:
    """A cluster with ``hadoop.rpc.protection`` integrity or privacy: SASL negotiates qop
    auth-int or auth-conf, and every message after it is HMAC-signed (and RC4-sealed) in SASL
    WRAP messages, both ways."""
    hadoop = HadoopAMService(protection).start()
    try:
        att, am = am_for(hadoop, tmp_path)
        try:
            am.register("node7", 4567, "http://node7:4567/")
            assert am.conn is not None and am.conn.layer is not None
            assert am.conn.layer.qop == {"integrity": "auth-int", "privacy": "auth-conf"}[
                protection]
            assert am.conn.layer.cipher == ("rc4" if protection == "privacy" else "")
            for _ in range(3):
                assert am.allocate() == 0
            assert am.finish("SUCCEEDED", "d" * 70_000)
        finally:
            am.close()
        fin = hadoop.wait_for(lambda e: e.get("attempt") == att and e["event"] == "finish")
        assert fin["diagnostics"] == "d" * 4000  # the last 4000 characters, as sent
        assert [e["event"] for e in hadoop.of(att)] == ["register", "allocate", "allocate",
                                                        "allocate", "finish"]
    finally:
        hadoop.close()
