"""The failed-AUTH bookkeeping and the refusal log, on a clock the tests move by hand.

No sockets and no sleeping: every rule of relay/receive/guard.py is checked to the second.
The same rules over real SMTP connections are in tests/test_abuse.py.
"""

from __future__ import annotations

import tracemalloc

from relay.config import AuthThrottle
from relay.receive.guard import AuthGuard, RefusalLog, client_key, user_key


class Clock:
    """A clock that moves only when told to."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


def guard(clock: Clock, max_entries: int = 10_000, **settings: float) -> AuthGuard:
    values = {"delay": 1.0, "max_delay": 8.0, "lockout_after": 5, "window": 600.0,
              "lockout": 300.0, "remember": 3600.0, **settings}
    return AuthGuard(AuthThrottle.model_validate(values), clock=clock,
                     max_entries=max_entries)


def test_defaults_follow_dovecot_and_fail2ban() -> None:
    t = AuthThrottle()
    assert (t.delay, t.max_delay, t.lockout_after, t.window, t.lockout, t.remember) == (
        2.0, 15.0, 5, 600.0, 600.0, 7 * 86400.0)


def test_delay_doubles_up_to_the_maximum() -> None:
    g = guard(Clock(), lockout_after=100)
    delays = [g.failed("192.0.2.1", "alice").delay for _ in range(6)]
    assert delays == [1.0, 2.0, 4.0, 8.0, 8.0, 8.0]
    # A thousand failures later the delay is still the maximum, not an overflow.
    g2 = guard(Clock(), lockout_after=2000)
    for _ in range(1500):
        last = g2.failed("192.0.2.1", None)
    assert last.delay == 8.0


def test_lockout_after_n_failures_in_the_window_then_it_ends() -> None:
    clock = Clock()
    g = guard(clock)
    for i in range(4):
        failure = g.failed("192.0.2.1", f"user{i}")
        assert failure.lockouts == ()
        assert g.lockout("192.0.2.1", "alice") is None
    failure = g.failed("192.0.2.1", "user4")
    [lock] = failure.lockouts
    assert (lock.scope, lock.key, lock.failures, lock.until) == (
        "client", "192.0.2.1", 5, clock.now + 300)
    # Every user name, a real one or not, is refused from that address.
    assert g.lockout("192.0.2.1", "alice") == lock
    assert g.lockout("192.0.2.1", None) == lock
    assert g.lockout("192.0.2.2", "alice") is None          # others are not affected
    clock.advance(299)
    assert g.lockout("192.0.2.1", "alice") == lock
    clock.advance(1)
    assert g.lockout("192.0.2.1", "alice") is None
    # The count started afresh with the lockout: one failure does not lock again.
    assert g.failed("192.0.2.1", "x").lockouts == ()
    assert g.failed("192.0.2.1", "x").delay == 2.0


def test_only_failures_within_the_window_count() -> None:
    clock = Clock()
    g = guard(clock, window=60)
    for _ in range(4):
        g.failed("192.0.2.1", None)
        clock.advance(20)           # the window slides: at most 3 are ever in it
    for _ in range(20):
        assert g.failed("192.0.2.1", None).lockouts == ()
        clock.advance(20)
    assert g.lockout("192.0.2.1", None) is None


def test_success_resets_the_address_but_not_the_user() -> None:
    clock = Clock()
    g = guard(clock)
    for _ in range(4):
        g.failed("192.0.2.1", "alice")
    g.succeeded("192.0.2.1", "bob")
    failure = g.failed("192.0.2.1", "carol")
    assert failure.delay == 1.0 and failure.lockouts == ()
    # Logging in as bob between guesses does not help with alice: her count goes on.
    [lock] = g.failed("192.0.2.1", "alice").lockouts
    assert (lock.scope, lock.key) == ("user", "alice")


def test_user_lockout_spares_the_address_that_logged_in_as_that_user() -> None:
    clock = Clock()
    g = guard(clock)
    g.succeeded("10.0.0.5", "alice")                    # the application's own address
    clock.advance(60)
    for i in range(5):                                  # five attackers, one guess each
        failure = g.failed(f"203.0.113.{i}", "alice")
    [lock] = failure.lockouts
    assert (lock.scope, lock.key) == ("user", "alice")
    assert g.lockout("203.0.113.99", "alice") == lock   # any other address: refused
    assert g.lockout("203.0.113.99", "bob") is None     # other users: not affected
    assert g.lockout("10.0.0.5", "alice") is None       # the application goes on
    # Not exempt from its own address's lockout, though.
    for _ in range(5):
        g.failed("10.0.0.5", "bob")
    assert g.lockout("10.0.0.5", "alice") is not None
    assert g.lockout("10.0.0.5", "alice").scope == "client"   # type: ignore[union-attr]


def test_exemption_ends_after_remember() -> None:
    clock = Clock()
    g = guard(clock, remember=3600, lockout=7200)
    g.succeeded("10.0.0.5", "alice")
    for i in range(5):
        g.failed(f"203.0.113.{i}", "alice")
    assert g.lockout("10.0.0.5", "alice") is None
    clock.advance(3600)
    assert g.lockout("10.0.0.5", "alice") is not None


def test_ipv6_clients_are_counted_by_64_prefix() -> None:
    assert client_key("2001:db8:1:2:aaaa::1") == "2001:db8:1:2::/64"
    assert client_key("192.0.2.7") == "192.0.2.7"
    g = guard(Clock())
    for i in range(5):
        failure = g.failed(f"2001:db8:1:2::{i + 1:x}", None)
    [lock] = failure.lockouts
    assert lock.key == "2001:db8:1:2::/64"
    assert g.lockout("2001:db8:1:2:ffff::9", None) == lock
    assert g.lockout("2001:db8:1:3::1", None) is None


def test_user_keys_are_bounded_in_size() -> None:
    assert user_key(b"alice") == "alice"
    assert user_key(b"") is None and user_key(None) is None
    assert user_key(b"\xff") == "\\xff"
    long = user_key("x" * 5000)
    assert long is not None and long.startswith("sha256:") and len(long) < 100
    assert user_key("x" * 5000) == long and user_key("x" * 4999) != long


def test_flood_of_addresses_and_names_stays_bounded() -> None:
    clock = Clock()
    g = guard(clock, max_entries=1000)
    for _ in range(5):
        g.failed("192.0.2.1", "alice")                  # locks both
    tracemalloc.start()
    try:
        before, _ = tracemalloc.get_traced_memory()
        for i in range(20_000):
            g.failed(f"10.{i >> 16 & 255}.{i >> 8 & 255}.{i & 255}", f"name-{i}-" + "x" * 100)
        after, _ = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    # Two failure tables and the known-logins table, 1000 each at most, plus the locks.
    assert g.entries <= 3 * 1000 + 2
    assert after - before < 5 * 1024 * 1024
    # Neither lockout was pushed out by the flood.
    assert g.lockout("192.0.2.1", "bob") is not None
    assert g.lockout("198.51.100.1", "alice") is not None


def test_tables_empty_themselves_once_windows_pass() -> None:
    clock = Clock()
    g = guard(clock, window=60, lockout=120, remember=600)
    for i in range(100):
        g.failed(f"192.0.2.{i}", f"u{i}")
    g.succeeded("192.0.2.200", "alice")
    for _ in range(5):
        g.failed("192.0.2.250", None)
    # 100 addresses, 100 names, one known login, one lockout (whose count was cleared).
    assert g.entries == 100 + 100 + 1 + 1
    clock.advance(600)
    g.lockout("192.0.2.1", None)                        # any call tidies up
    assert g.entries == 0


def test_reload_keeps_counts_and_applies_new_settings() -> None:
    clock = Clock()
    g = guard(clock)
    for _ in range(3):
        g.failed("192.0.2.1", None)
    g.configure(AuthThrottle(delay=1, max_delay=8, lockout_after=4, window=600,
                             lockout=60))
    [lock] = g.failed("192.0.2.1", None).lockouts
    assert lock.until == clock.now + 60


def test_refusal_log_once_per_interval_with_the_count_held_back() -> None:
    clock = Clock()
    log = RefusalLog(60, clock=clock)
    assert log.hit("a") == 0
    assert [log.hit("a") for _ in range(9)] == [None] * 9
    assert log.hit("b") == 0                            # another key has its own line
    clock.advance(59)
    assert log.hit("a") is None
    clock.advance(1)
    assert log.hit("a") == 10
    clock.advance(60)
    assert log.hit("a") == 0


def test_refusal_log_is_bounded() -> None:
    clock = Clock()
    log = RefusalLog(60, clock=clock, max_keys=500)
    for i in range(100_000):
        log.hit(f"k{i}")
        log.hit(f"k{i}")
    assert len(log) == 500
