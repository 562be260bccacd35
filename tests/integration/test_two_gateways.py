"""Two gateway replicas on one registry, as behind a load balancer without stickiness: a client
session whose WebSocket moves from one replica to the other keeps getting its replies.

Found by tests/integration/test_jupyterlab.py (JupyterLab behind two gateways): Jupyter Server
leaves a kernel WebSocket of a session on one replica while JupyterLab's next one, same
session_id, lands on the other.
"""
from __future__ import annotations

import uuid

import websocket

from tests.client import Channel, Result
from tests.conftest import Stack, free_port

EXECUTE = {"silent": False, "store_history": True, "user_expressions": {}, "allow_stdin": False,
           "stop_on_error": True}


def test_a_session_left_on_one_replica_keeps_no_replies_from_the_other(
        fresh_stack: Stack) -> None:
    """Session S on replica A, its WebSocket closed (A keeps S's channels for a reconnect),
    S reconnected on replica B, kernel restarted: B's next request must get its reply. The
    replica that holds a session's ZMQ identity last gets the kernel's replies (the kernel's
    ROUTER_HANDOVER), and after the restart both A's kept channels and B's reconnect."""
    ga = fresh_stack.gw
    gb = fresh_stack.start_gateway(free_port())
    for attempt in range(3):  # which replica holds the identity last is a race: try again
        kid = ga.start("python3")["id"]
        try:
            session = uuid.uuid4().hex
            a = Channel(ga.base, kid, session=session)
            assert a.execute("1 + 1").result == "2"
            a.close()
            b = Channel(gb.base, kid, session=session)
            assert b.execute("2 + 2").result == "4"
            assert ga.post(f"/api/kernels/{kid}/restart").status_code == 200
            mid = b.send("execute_request", {**EXECUTE, "code": "'after restart'"})
            res = Result()
            try:
                b.collect(mid, 20, into=res)
            except (TimeoutError, websocket.WebSocketTimeoutException):
                pass
            got = [m["msg_type"] for m in res.messages]
            assert res.reply and res.idle, (
                f"try {attempt + 1}: no reply on replica B within 20 s after the restart; "
                f"B's client got {got} for its execute_request")
            assert res.result == "'after restart'"
            b.close()
        finally:
            ga.shutdown(kid)
