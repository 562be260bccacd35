"""The whole REST API fuzzed by schemathesis from gateway/openapi.yaml against a real gateway
and worker (issue 21): with the token, no 5xx and no answer that breaks the description, and
no kernel left behind; without it, every operation answers 401 and nothing else.

Cases are generated valid and invalid (schemathesis' positive and negative modes); a kernel or
session id in a path is now and then a live one, so interrupt, restart, delete and the session
routes meet real kernels, not only 404s. Hypothesis' budget per operation bounds the run
(about a minute on 2 cores); shrinking is off, so a failure is reported as generated.
"""
from __future__ import annotations

import uuid
from collections.abc import Iterator
from typing import Any

import pytest
import requests
import schemathesis
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st
from schemathesis import GenerationMode
from schemathesis.checks import (
    content_type_conformance,
    not_a_server_error,
    response_headers_conformance,
    response_schema_conformance,
    status_code_conformance,
)

from tests.conftest import DB_BASE, REDIS, STACKS, Stack, need_redis

TOKEN = "schema-token"
CHECKS = [not_a_server_error, status_code_conformance, content_type_conformance,
          response_schema_conformance, response_headers_conformance]
#: Examples per operation: the ones that start kernels cost a launch each.
BUDGET = {"POST /api/kernels": 10, "POST /api/sessions": 10, "PATCH /api/sessions/{sid}": 10,
          "POST /api/kernels/{kernel_id}/restart": 6}
DEFAULT_BUDGET = 15
SPECS = {"tiny-py": None, "broken": None}  # no tiny pool here; no spec made to fail


@pytest.fixture(scope="module")
def schema_stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    need_redis()
    tag = f"api{uuid.uuid4().hex[:6]}"
    stack = Stack(tmp_path_factory.mktemp("api-schema"), REDIS, db=DB_BASE + 31,
                  pools={"local": {"launcher": "local", "queue": f"{tag}-local", "slots": 8,
                                   "heartbeat_ttl": 3.0, "launch_timeout": 60}},
                  gateway={"auth_token": TOKEN}, specs=SPECS).start()
    STACKS.append(stack)
    yield stack
    STACKS.remove(stack)
    stack.stop()


def _schema(stack: Stack) -> Any:
    r = requests.get(stack.url + "/api/swagger.json", headers=_auth(), timeout=30)
    assert r.status_code == 200, r.text
    return schemathesis.openapi.from_dict(r.json())


def _auth() -> dict[str, str]:
    return {"Authorization": f"token {TOKEN}"}


class Live:
    """A live kernel and session that generated cases may name, made again when a case ends
    them; and everything the cases started, to shut down and count afterwards."""

    def __init__(self, stack: Stack) -> None:
        self.stack = stack
        self.started: set[str] = set()
        self.sessions: set[str] = set()
        self._kid = self._sid = ""

    def kid(self) -> str:
        r = requests.get(f"{self.stack.url}/api/kernels/{self._kid}", headers=_auth(), timeout=30)
        if not self._kid or r.status_code != 200 or r.json()["execution_state"] == "dead":
            self._kid = self.stack.gw.start()["id"]
            self.started.add(self._kid)
        return self._kid

    def sid(self) -> str:
        r = requests.get(f"{self.stack.url}/api/sessions/{self._sid}", headers=_auth(), timeout=30)
        if not self._sid or r.status_code != 200:
            r = requests.post(f"{self.stack.url}/api/sessions", headers=_auth(), timeout=120,
                              json={"path": "fuzz.ipynb", "kernel": {"name": "python3"}})
            assert r.status_code == 201, r.text
            self._sid = r.json()["id"]
            self.sessions.add(self._sid)
            self.started.add(r.json()["kernel"]["id"])
        return self._sid

    def note(self, method: str, path: str, response: requests.Response) -> None:
        """Shut down at once what an answer says was created (the pool's slots are few), and
        remember it, to count it afterwards."""
        if response.status_code not in (200, 201, 202) or method not in ("POST", "PATCH"):
            return
        body = response.json()
        if path == "/api/kernels":
            self.started.add(body["id"])
            self.stack.gw.shutdown(body["id"])
        elif path.startswith("/api/sessions"):
            self.sessions.add(body["id"])
            if body.get("kernel"):
                self.started.add(body["kernel"]["id"])
            if body["id"] != self._sid:
                requests.delete(f"{self.stack.url}/api/sessions/{body['id']}", headers=_auth(),
                                timeout=60)

    def clean(self) -> list[dict[str, Any]]:
        """Delete everything the run made; the kernels still alive after that."""
        for sid in self.sessions:
            requests.delete(f"{self.stack.url}/api/sessions/{sid}", headers=_auth(), timeout=60)
        for kid in self.started:
            self.stack.gw.shutdown(kid)
        return self.stack.live_kernels()


def _fuzz(stack: Stack, op: Any, call: Any, examples: int) -> None:
    modes = [op.as_strategy(GenerationMode.POSITIVE)]
    try:
        modes.append(op.as_strategy(GenerationMode.NEGATIVE))
    except Exception:  # noqa: BLE001 (schemathesis: nothing in this operation can be made invalid)
        pass

    @settings(max_examples=examples, deadline=None, database=None,
              phases=[Phase.explicit, Phase.generate], suppress_health_check=list(HealthCheck))
    @given(case=st.one_of(modes), live=st.booleans())
    def run(case: Any, live: bool) -> None:
        call(case, live)

    run()


def _operations(stack: Stack) -> list[Any]:
    return [result.ok() for result in _schema(stack).get_all_operations()]


def test_fuzz_with_the_token(schema_stack: Stack) -> None:
    live = Live(schema_stack)
    failures: list[str] = []

    def call(case: Any, use_live: bool) -> None:
        case.headers = {k: v for k, v in (case.headers or {}).items() if k.lower() != "authorization"}
        case.query = {k: v for k, v in (case.query or {}).items() if k != "token"}
        if use_live and "kernel_id" in (case.path_parameters or {}):
            case.path_parameters["kernel_id"] = live.kid()
        if use_live and "sid" in (case.path_parameters or {}):
            case.path_parameters["sid"] = live.sid()
        response = case.call(base_url=schema_stack.url, headers=_auth(), timeout=180)
        live.note(case.method.upper(), case.formatted_path, response)
        case.validate_response(response, checks=CHECKS)

    try:
        for op in _operations(schema_stack):
            label = f"{op.method.upper()} {op.path}"
            try:
                _fuzz(schema_stack, op, call, BUDGET.get(label, DEFAULT_BUDGET))
            except Exception as exc:  # noqa: BLE001 (collected: every operation runs)
                failures.append(f"{label}: {exc}")
    finally:
        left = live.clean()
    assert not failures, "\n\n".join(f[:1500] for f in failures)
    assert left == [], "kernels left behind"
    assert live.started, "no case reached a kernel"


def test_fuzz_without_credentials_is_401_everywhere(schema_stack: Stack) -> None:
    before = len(schema_stack.gw.kernels())
    seen: set[str] = set()

    def call(case: Any, use_live: bool) -> None:
        case.headers = {k: v for k, v in (case.headers or {}).items()
                        if not (k.lower() == "authorization" and TOKEN in str(v))}
        case.query = {k: v for k, v in (case.query or {}).items() if v != TOKEN}
        response = case.call(base_url=schema_stack.url, timeout=60)
        if response.status_code == 414:  # a request line over 4,094 bytes: refused before the
            # API reads it, credentials or not (README, "API"); not an answer about them
            assert response.json()["reason"] == "uri_too_long", response.text
            return
        assert response.status_code == 401, (case.method, case.formatted_path, response.text)
        assert response.json()["reason"] == "unauthorized"
        assert set(response.json()) == {"reason", "message"}
        seen.add(f"{case.method.upper()} {case.path}")

    for op in _operations(schema_stack):
        _fuzz(schema_stack, op, call, 5)
    assert len(seen) == len(_operations(schema_stack))
    assert len(schema_stack.gw.kernels()) == before
