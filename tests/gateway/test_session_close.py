"""A dropped session's wake-up pipe (gateway/channels/session.py): a wake that comes after the
session was closed writes nowhere. The pipe's numbers are free again by then, and the next
socket the gateway opens (a kernel connection) may get them: a stray byte there corrupts the
kernel's ZMTP stream (seen as "a frame of 4995653274531031343 bytes" under session churn)."""
from __future__ import annotations

import os
import threading

from poolgate.gateway.channels.session import KernelSession


def test_a_wake_after_close_does_not_write_to_whatever_took_the_pipes_numbers() -> None:
    sess = KernelSession("k", "s")
    old = {sess._r, sess._w}
    sess.close()
    r, w = os.pipe()  # the lowest free numbers: the closed pipe's
    try:
        assert {r, w} == old  # the numbers were taken again, as a kernel connection would
        os.set_blocking(r, False)
        sess.wake()  # e.g. a kernel event for a session picked just before it was dropped
        try:
            stray = os.read(r, 16)
        except BlockingIOError:
            stray = b""
        assert stray == b""
    finally:
        os.close(r)
        os.close(w)


def test_wakes_racing_a_close_never_reach_a_reused_number() -> None:
    stray = b""
    for _ in range(200):
        sess = KernelSession("k", "s")
        go = threading.Event()

        def waker(s: KernelSession = sess) -> None:
            go.wait()
            for _ in range(50):
                s.wake()

        t = threading.Thread(target=waker)
        t.start()
        go.set()
        sess.close()
        r, w = os.pipe()
        t.join()
        os.set_blocking(r, False)
        try:
            stray += os.read(r, 64)
        except BlockingIOError:
            pass
        os.close(r)
        os.close(w)
    assert stray == b""


def test_a_second_close_does_not_close_whatever_took_the_pipes_numbers() -> None:
    """A session can be dropped twice (its pump's end and the reaper); the second close must
    not close the numbers again: by then they may be a client's socket or a kernel's."""
    sess = KernelSession("k", "s")
    sess.close()
    r, w = os.pipe()  # the closed pipe's numbers, taken again
    try:
        sess.close()
        os.write(w, b"still mine")
        assert os.read(r, 64) == b"still mine"
    finally:
        os.close(r)
        os.close(w)
