"""poolgate/spark_kernel.py's pure parts: the init mode, the spark-submit options, lazy names.

Spark itself runs in tests/integration/test_yarn_pool.py (eager, lazy, interrupt)."""
from __future__ import annotations

from typing import Any

import pytest

from poolgate.lazy import lazy_names
from poolgate.spark_kernel import init_mode, submit_args


def test_client_mode_overrides_the_spec_default() -> None:
    assert init_mode({}, "lazy") == "lazy"
    assert init_mode({"KERNEL_SPARK_CONTEXT_INIT_MODE": "Eager "}, "lazy") == "eager"
    assert init_mode({"KERNEL_SPARK_CONTEXT_INIT_MODE": "none"}, "eager") == "none"
    with pytest.raises(ValueError, match="expected one of eager, lazy, none"):
        init_mode({"KERNEL_SPARK_CONTEXT_INIT_MODE": "later"}, "lazy")


def test_extra_options_go_before_pyspark_shell_and_keep_their_quoting() -> None:
    env = {"PYSPARK_SUBMIT_ARGS": "--master local[2] pyspark-shell",
           "KERNEL_EXTRA_SPARK_OPTS": "--conf 'spark.app.note=a b' --driver-memory 1g"}
    assert submit_args(env) == ("--master 'local[2]' --conf 'spark.app.note=a b' "
                                "--driver-memory 1g pyspark-shell")
    assert submit_args({}) == "pyspark-shell"
    assert submit_args({"PYSPARK_SUBMIT_ARGS": "--master yarn"}) == \
        "--master yarn pyspark-shell"


class FakeSession:
    created = 0

    def __init__(self) -> None:
        FakeSession.created += 1
        self.sparkContext = "the context"
        self.version = "4.0"


def test_lazy_names_create_the_session_once_on_first_use() -> None:
    ns: dict[str, Any] = {}
    FakeSession.created = 0

    def create() -> dict[str, Any]:
        session = FakeSession()
        return {"spark": session, "sc": session.sparkContext}

    lazy_names(("spark", "sc"), create, ns)
    with pytest.raises(AttributeError):  # IPython's display probe is not a use
        ns["spark"]._ipython_canary_method_should_not_exist_  # noqa: B018
    assert FakeSession.created == 0
    assert ns["spark"].version == "4.0"
    assert FakeSession.created == 1
    assert isinstance(ns["spark"], FakeSession) and ns["sc"] == "the context"
    assert FakeSession.created == 1
