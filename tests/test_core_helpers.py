"""The small helpers in relay/core that every stage shares: host:port, bounded text, the
walk along an exception's causes, the disk threads."""

from __future__ import annotations

import asyncio
import ssl

import pytest

from relay.core.errors import causes, find_cause
from relay.core.net import host_port
from relay.core.text import one_line, truncate


def test_host_port_brackets_ipv6_only() -> None:
    assert host_port("127.0.0.1", 2525) == "127.0.0.1:2525"
    assert host_port("smtp.office365.com", 587) == "smtp.office365.com:587"
    assert host_port("::1", 2525) == "[::1]:2525"
    assert host_port("2001:db8::25", 587) == "[2001:db8::25]:587"


def test_truncate_keeps_the_limit_including_the_ellipsis() -> None:
    assert truncate("short", 10) == "short"
    assert truncate("x" * 10, 10) == "x" * 10
    assert truncate("x" * 11, 10) == "xxxxxxx..."
    assert len(truncate("y" * 500, 120)) == 120


def test_one_line() -> None:
    assert one_line("  550 5.1.1\r\n  unknown\tuser \n") == "550 5.1.1 unknown user"
    assert one_line("") == ""


def _chained() -> BaseException:
    try:
        try:
            raise ssl.SSLCertVerificationError("certificate verify failed")
        except ssl.SSLError as inner:
            raise ConnectionError("connection failed") from inner
    except ConnectionError:
        try:
            raise RuntimeError("wrapped")  # implicit chaining: __context__
        except RuntimeError as outer:
            return outer
    raise AssertionError("unreachable")


def test_causes_follow_cause_then_context() -> None:
    outer = _chained()
    kinds = [type(e) for e in causes(outer)]
    assert kinds == [RuntimeError, ConnectionError, ssl.SSLCertVerificationError]
    assert isinstance(find_cause(outer, ssl.SSLError), ssl.SSLCertVerificationError)
    assert find_cause(outer, KeyError) is None


def test_causes_stop_at_a_loop() -> None:
    a, b = ValueError("a"), ValueError("b")
    a.__cause__, b.__cause__ = b, a
    assert list(causes(a)) == [a, b]


async def test_disk_work_runs_on_its_own_thread_with_the_callers_context() -> None:
    import contextvars
    import threading

    from relay.core import diskio

    var: contextvars.ContextVar[str] = contextvars.ContextVar("var", default="unset")
    var.set("message 1")
    where = await diskio.run(lambda: (threading.current_thread().name, var.get()))
    assert where[0].startswith("disk") and where[1] == "message 1"
    with pytest.raises(FileNotFoundError):
        await diskio.run(open, "/nonexistent/relay-test")


async def test_more_disk_threads_work_side_by_side() -> None:
    import threading

    from relay.core import diskio

    both = threading.Barrier(2, timeout=5)
    diskio.configure(2)
    try:
        # Each call waits for the other: this finishes only if they run at once.
        await asyncio.gather(diskio.run(both.wait), diskio.run(both.wait))
    finally:
        diskio.configure(1)
    assert await diskio.run(lambda: threading.current_thread().name.startswith("disk"))
