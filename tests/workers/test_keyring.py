"""workers/keyring.py and the registry's encrypted keys: always encrypted, rotation by a list of
secrets, the generated secret of the data folder, and the settings' checks."""
from __future__ import annotations

import json
import stat
import threading
from pathlib import Path

import pytest
import yaml

from poolgate.workers import keyring
from poolgate.workers.config import load_config
from poolgate.workers.errors import ConfigError
from poolgate.workers.protocol import ConnectionInfo
from poolgate.workers.registry import PREFIX, Registry
from tests.conftest import DB_BASE, REDIS, need_redis

KEY = "0123456789abcdef-the-kernel-hmac-key"


def _conn() -> ConnectionInfo:
    return ConnectionInfo(ip="127.0.0.1", transport="tcp", shell_port=1, iopub_port=2,
                          stdin_port=3, control_port=4, hb_port=5, key=KEY)


def _registry(secret: list[str] | str) -> Registry:
    need_redis()
    return Registry(f"{REDIS}/{DB_BASE + 30}", secret)


@pytest.fixture
def kid() -> str:
    reg = _registry("x")
    reg.r.flushdb()
    reg.r.hset(PREFIX + "k:k1", mapping={"status": "RUNNING", "pool": "local"})
    reg.r.sadd(PREFIX + "kernels", "k1")
    return "k1"


def _stored(reg: Registry, kid: str) -> str:
    return str(json.loads(reg.get_field(kid, "conn") or "{}")["key"])


def test_the_key_is_stored_encrypted_and_read_back(kid: str) -> None:
    reg = _registry("s1")
    reg.set_connection(kid, _conn())
    assert KEY not in _stored(reg, kid) and _stored(reg, kid).startswith("enc:")
    assert reg.connection(kid).key == KEY  # type: ignore[union-attr]


def test_rotation_old_keys_stay_readable_then_rewritten(kid: str) -> None:
    _registry("old").set_connection(kid, _conn())
    rotated = _registry(["new", "old"])
    assert rotated.connection(kid).key == KEY  # type: ignore[union-attr]
    with pytest.raises(ConfigError, match="registry secret this process does not have"):
        _registry("new").connection(kid)  # the old secret is still needed...
    assert rotated.rotate_keys() == 1
    assert _registry("new").connection(kid).key == KEY  # type: ignore[union-attr]  # ...not now
    with pytest.raises(ConfigError):
        _registry("old").connection(kid)


def test_a_key_written_in_clear_by_an_older_poolgate_is_read_and_rotated(kid: str) -> None:
    reg = _registry("s1")
    reg.update(kid, conn={**_conn().to_dict()})
    assert reg.connection(kid).key == KEY  # type: ignore[union-attr]
    reg.rotate_keys()
    assert KEY not in _stored(reg, kid) and reg.connection(kid).key == KEY  # type: ignore[union-attr]


def test_no_secret_uses_the_data_folder_s_generated_one(tmp_path: Path, kid: str,
                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("POOLGATE_DATA_DIR", str(tmp_path / "data"))
    _registry([]).set_connection(kid, _conn())
    path = tmp_path / "data" / "secret"
    assert stat.S_IMODE(path.stat().st_mode) == 0o600 and len(path.read_text()) == 64
    assert KEY not in _stored(_registry([]), kid)
    # another process on this machine with the same folder reads it; the secret itself works
    assert _registry([path.read_text()]).connection(kid).key == KEY  # type: ignore[union-attr]


def test_processes_making_the_secret_at_once_agree(tmp_path: Path) -> None:
    got: list[str] = []
    threads = [threading.Thread(target=lambda: got.append(keyring.local_secret(tmp_path)))
               for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(set(got)) == 1 and [p.name for p in tmp_path.iterdir()] == ["secret"]


def test_a_remote_registry_without_a_secret_is_warned_about(tmp_path: Path,
                                                            monkeypatch: pytest.MonkeyPatch,
                                                            caplog: pytest.LogCaptureFixture) -> None:
    monkeypatch.setenv("POOLGATE_DATA_DIR", str(tmp_path))
    keyring.resolve([], "redis://:pw@redis.example.org:6379/0")
    assert any(r.levelname == "WARNING" and "same secret" in r.getMessage() for r in caplog.records)
    caplog.clear()
    keyring.resolve([], "redis://127.0.0.1:6379/0")
    assert not any(r.levelname == "WARNING" for r in caplog.records)


@pytest.mark.parametrize("raw,env,expected", [
    ("one", "", ("one",)),
    (["new", "old"], "", ("new", "old")),
    (None, "new, old", ("new", "old")),
    (["yaml"], "env", ("env",)),
    (None, "", ()),
])
def test_settings(tmp_path: Path, raw: object, env: str, expected: tuple[str, ...]) -> None:
    path = tmp_path / "queues.yaml"
    path.write_text(yaml.safe_dump({"registry_secret": raw, "pools": {"local": {"launcher": "local"}}}))
    environ = {"POOLGATE_REGISTRY_SECRET": env} if env else {}
    assert load_config(path, environ=environ).registry_secret == expected


def test_a_bad_setting_names_the_rule(tmp_path: Path) -> None:
    path = tmp_path / "queues.yaml"
    path.write_text(yaml.safe_dump({"registry_secret": {"a": 1}, "pools": {"local": {"launcher": "local"}}}))
    with pytest.raises(ConfigError, match="registry_secret: expected a string or a list"):
        load_config(path, environ={})


def test_a_process_with_another_secret_is_told_at_start(kid: str,
                                                         caplog: pytest.LogCaptureFixture) -> None:
    assert _registry("s1").check_keys()  # the first to start marks the registry
    assert _registry(["s1"]).check_keys() and _registry(["s2", "s1"]).check_keys()
    caplog.clear()
    assert not _registry("s2").check_keys()
    assert any(r.levelname == "ERROR" and "same secret" in r.getMessage() for r in caplog.records)
    assert "s1" not in str(_registry("s1").r.get(PREFIX + "keyring"))  # a fingerprint only
    rotating = _registry(["s2", "s1"])
    rotating.rotate_keys()  # the keys, and the mark, are now s2's
    assert _registry("s2").check_keys() and not _registry("s1").check_keys()
