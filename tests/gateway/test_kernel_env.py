"""What a kernel-start request's ``env`` may carry (gateway/kernels.py validate_env) and how
KERNEL_LAUNCH_TIMEOUT is read (launch_timeout): the promises, pinned."""
from __future__ import annotations

from typing import Any

import pytest

from poolgate.gateway.kernels import MAX_VALUE, launch_timeout, validate_env
from poolgate.workers.config import PoolConfig
from poolgate.workers.errors import BadRequest

ALLOW = ("ALLOWED_VAR", "PREFIX*", "JUPYTER_IMAGE")


def test_nothing_is_nothing() -> None:
    assert validate_env(None, ALLOW) == {} and validate_env({}, ALLOW) == {}


@pytest.mark.parametrize("raw", [[], "KERNEL_X=1", 3, [("KERNEL_X", "1")]])
def test_env_must_be_an_object(raw: Any) -> None:
    with pytest.raises(BadRequest, match="must be an object"):
        validate_env(raw, ALLOW)


def test_kernel_variables_and_the_allow_list_pass_and_others_are_dropped() -> None:
    raw = {
        "KERNEL_USERNAME": "alice", "KERNEL_": "empty suffix",  # KERNEL_*: always
        "ALLOWED_VAR": "exact",  # an exact name lets that name through...
        "ALLOWED_VAR_SECRET": "x", "ALLOWED_VA": "x", "allowed_var": "x",  # ...and no other
        "PREFIX": "p0", "PREFIX_A": "p1", "PREFIXED": "p2",  # PREFIX*: the names it starts
        "PREFI": "x", "XPREFIX": "x", "prefix_a": "x",  # ...case-sensitive, at the start
        "JUPYTER_IMAGE": "img", "JUPYTER_IMAGE_PULL": "x",
        "PATH": "/evil", "LD_PRELOAD": "/evil.so", "KERNEL": "x", "kernel_x": "x",
    }
    assert validate_env(raw, ALLOW) == {
        "KERNEL_USERNAME": "alice", "KERNEL_": "empty suffix", "ALLOWED_VAR": "exact",
        "PREFIX": "p0", "PREFIX_A": "p1", "PREFIXED": "p2", "JUPYTER_IMAGE": "img"}


def test_without_an_allow_list_only_kernel_variables_pass() -> None:
    assert validate_env({"KERNEL_A": "1", "ALLOWED_VAR": "2", "HOME": "/"}, ()) == {"KERNEL_A": "1"}


def test_a_lone_star_in_the_allow_list_lets_every_valid_name_through() -> None:
    """Pinned as it is: "*" is PREFIX* with an empty prefix (an operator's explicit choice)."""
    assert validate_env({"PATH": "/x", "A": "1"}, ("*",)) == {"PATH": "/x", "A": "1"}


@pytest.mark.parametrize("name", ["KERNEL_X", "ALLOWED_VAR", "DROPPED"])
def test_values_are_limited_to_4096_characters_whatever_the_name(name: str) -> None:
    """Checked before the allow-list: a dropped variable's value is still refused if too long."""
    assert MAX_VALUE == 4096
    ok = validate_env({name: "é" * 4096}, ALLOW)  # characters, not bytes
    assert ok == ({} if name == "DROPPED" else {name: "é" * 4096})
    with pytest.raises(BadRequest, match=f"env.{name}: the value is 4097 characters; at most "
                                         f"4096 are allowed"):
        validate_env({name: "x" * 4097}, ALLOW)


@pytest.mark.parametrize("value", [1, 1.5, True, None, ["a"], {"a": "b"}, b"bytes"])
@pytest.mark.parametrize("name", ["KERNEL_X", "DROPPED"])
def test_values_must_be_strings(name: str, value: Any) -> None:
    with pytest.raises(BadRequest, match=f"env.{name}: expected a string, got "
                                         f"{type(value).__name__}"):
        validate_env({name: value}, ALLOW)


@pytest.mark.parametrize("name", ["", "1KERNEL", "KERNEL-X", "KERNEL X", "KERNEL_X=1",
                                  "KERNEL_É", "KERNEL_X;rm", "$KERNEL", " KERNEL_X", "KERNEL_X ",
                                  "KERNEL_X\0", "\nKERNEL_X", 5, None, ("KERNEL_X",)])
def test_bad_names_are_refused(name: Any) -> None:
    with pytest.raises(BadRequest, match="is not a valid variable name"):
        validate_env({name: "v"}, ALLOW)


def test_a_name_with_a_trailing_newline_is_refused() -> None:
    with pytest.raises(BadRequest, match="is not a valid variable name"):
        validate_env({"KERNEL_X\n": "v"}, ALLOW)


@pytest.mark.parametrize("name", ["_", "_X", "a", "x1", "KERNEL_0"])
def test_valid_names_that_are_not_allowed_are_dropped_not_refused(name: str) -> None:
    assert validate_env({name: "v"}, ("KERNEL_0",)) == ({name: "v"} if name == "KERNEL_0"
                                                        else {})


# -- KERNEL_LAUNCH_TIMEOUT ----------------------------------------------------------------

POOL = PoolConfig(name="p", launcher="fake", launch_timeout=60.0, max_launch_timeout=600.0)


@pytest.mark.parametrize("raw, seconds", [
    (None, 60.0), ("", 60.0),  # absent or empty: the pool's launch_timeout
    ("30", 30.0), ("0.5", 0.5), (" 120 ", 120.0), ("1e2", 100.0),
    ("600", 600.0), ("601", 600.0), ("1e9", 600.0), ("inf", 600.0),  # capped at the maximum
])
def test_launch_timeout_is_the_requested_one_within_the_pools_maximum(raw: str | None,
                                                                      seconds: float) -> None:
    env = {} if raw is None else {"KERNEL_LAUNCH_TIMEOUT": raw}
    assert launch_timeout(env, POOL) == seconds


@pytest.mark.parametrize("raw, match", [
    ("0", "must be > 0"), ("-5", "must be > 0"), ("-inf", "must be > 0"), ("-0", "must be > 0"),
    ("abc", "expected seconds"), ("5s", "expected seconds"), ("1,5", "expected seconds"),
])
def test_a_bad_launch_timeout_is_a_400(raw: str, match: str) -> None:
    with pytest.raises(BadRequest, match=match) as info:
        launch_timeout({"KERNEL_LAUNCH_TIMEOUT": raw}, POOL)
    assert info.value.status == 400


def test_nan_is_a_400_not_a_timeout_of_nan() -> None:
    with pytest.raises(BadRequest):
        launch_timeout({"KERNEL_LAUNCH_TIMEOUT": "nan"}, POOL)
