"""Defences against hostile clients: failed-AUTH penalties and refusal logs that hold still.

Pure bookkeeping with an injected clock: nothing here sleeps, logs or touches a socket, so
that the rules can be tested to the second without waiting, and the session decides what
to do with a verdict.

:class:`AuthGuard` counts failed logins per client address and per user name, as Dovecot's
auth penalty and Postfix's anvil do. A limit per connection alone (``max_auth_failures``)
lets a client that reconnects guess without end; counting by address stops one machine,
and counting by user name stops many machines that take turns on one account. Each failure
earns a growing delay before its reply, and ``lockout_after`` failures within ``window``
lock the address (or the user name) out for ``lockout``: AUTH is then refused with a
temporary error without the password being checked, so even the right one does not get
in, and guessing gains nothing.

A lockout by user name must not become a way to lock a legitimate application out: an
address that logged in successfully as that user within ``remember`` is exempt from that
user's lockout (never from its own address's).

Every name tried is counted, whether or not the account exists: locking out only real
accounts would tell an attacker which names exist (``454`` for them, ``535`` for the rest).

Memory is bounded whatever clients send: each table holds at most ``max_entries`` keys and
drops the least recently used first; entries whose window has passed are dropped as soon as
they reach the front. Lockouts live in tables of their own, so that a flood of new
addresses or made-up user names, each failing once, cannot push a lockout out.
"""

from __future__ import annotations

import hashlib
import ipaddress
import time
from collections import OrderedDict, deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal, Protocol

from relay.core.net import parse_ip

Clock = Callable[[], float]

# An IPv6 host picks its own address within its /64 at will (privacy addresses, RFC 8981):
# counting IPv6 failures per address would give it 2**64 fresh starts. Dovecot's auth
# penalty groups IPv6 clients by prefix for the same reason.
_IPV6_PREFIX = 64
# User names longer than this are counted by digest, so that the table's size in bytes is
# bounded too (an AUTH answer may carry a user name of over a kilobyte).
_MAX_USER_KEY = 128
# Per table; a record is a few hundred bytes, so a full table stays in the low megabytes.
DEFAULT_MAX_ENTRIES = 10_000
# One line per client address (and reason) in this many seconds for refused connections.
REFUSAL_LOG_INTERVAL = 60.0
_MAX_REFUSAL_KEYS = 4096

Scope = Literal["client", "user"]


class ThrottleSettings(Protocol):
    """What :class:`AuthGuard` reads (``relay.config.AuthThrottle``)."""

    @property
    def delay(self) -> float: ...
    @property
    def max_delay(self) -> float: ...
    @property
    def lockout_after(self) -> int: ...
    @property
    def window(self) -> float: ...
    @property
    def lockout(self) -> float: ...
    @property
    def remember(self) -> float: ...


def client_key(ip: str) -> str:
    """The key failures of ``ip`` are counted under: the address, or its /64 for IPv6."""
    addr = parse_ip(ip)
    if addr is None:
        return ip
    if isinstance(addr, ipaddress.IPv6Address):
        return str(ipaddress.IPv6Network((addr, _IPV6_PREFIX), strict=False))
    return str(addr)


def user_key(user: str | bytes | None) -> str | None:
    """The key failures of a user name are counted under (None: no name was given)."""
    if user is None:
        return None
    if isinstance(user, bytes):
        user = user.decode("utf-8", errors="backslashreplace")
    if not user:
        return None
    if len(user) > _MAX_USER_KEY:
        return "sha256:" + hashlib.sha256(user.encode("utf-8", "surrogatepass")).hexdigest()
    return user


@dataclass(frozen=True)
class Lockout:
    """A lockout in force: of a client address (or IPv6 /64) or of a user name."""

    scope: Scope
    key: str
    until: float            # clock time at which it ends
    failures: int           # failures in the window that started it


@dataclass(frozen=True)
class Failure:
    """What a recorded failure means: how long to hold the reply, and any new lockouts."""

    delay: float
    failures: int                       # the count the delay was computed from
    lockouts: tuple[Lockout, ...]       # lockouts this failure started (log them once)


class _Counter:
    """Failure times per key within a window, and the lockouts in force."""

    def __init__(self, scope: Scope, max_entries: int) -> None:
        self.scope: Scope = scope
        self._max = max_entries
        # Least recently failed first; each deque holds at most lockout_after times.
        self._failures: OrderedDict[str, deque[float]] = OrderedDict()
        # Oldest first; with one lockout duration for all, also the first to end.
        self._locks: OrderedDict[str, Lockout] = OrderedDict()

    def __len__(self) -> int:
        return len(self._failures) + len(self._locks)

    def prune(self, now: float, window: float) -> None:
        """Drop windows that have passed and lockouts that have ended, from the front."""
        while self._failures:
            key, times = next(iter(self._failures.items()))
            if times and times[-1] > now - window:
                break
            del self._failures[key]
        while self._locks:
            key, lock = next(iter(self._locks.items()))
            if lock.until > now:
                break
            del self._locks[key]

    def locked(self, key: str, now: float) -> Lockout | None:
        lock = self._locks.get(key)
        if lock is None:
            return None
        if lock.until <= now:
            del self._locks[key]
            return None
        return lock

    def add(self, key: str, now: float, settings: ThrottleSettings) -> tuple[int, Lockout | None]:
        """Record a failure; the count in the window, and the lockout it started if any."""
        times = self._failures.pop(key, None)
        if times is None:
            times = deque()
        while times and times[0] <= now - settings.window:
            times.popleft()
        times.append(now)
        while len(times) > settings.lockout_after:
            times.popleft()
        count = len(times)
        if count >= settings.lockout_after:
            lock = Lockout(self.scope, key, now + settings.lockout, count)
            self._locks.pop(key, None)
            self._locks[key] = lock
            while len(self._locks) > self._max:
                self._locks.popitem(last=False)
            # A lockout starts the count afresh: when it ends, lockout_after new failures
            # are needed for the next one.
            return count, lock
        self._failures[key] = times
        while len(self._failures) > self._max:
            self._failures.popitem(last=False)
        return count, None

    def clear(self, key: str) -> None:
        self._failures.pop(key, None)


class AuthGuard:
    """Failed-AUTH counters per client address and per user name; see the module docstring.

    One instance serves every listener and outlives configuration reloads
    (:meth:`configure`), so neither a reconnect nor a SIGHUP wipes a count.
    """

    def __init__(self, settings: ThrottleSettings, *, clock: Clock = time.monotonic,
                 max_entries: int = DEFAULT_MAX_ENTRIES) -> None:
        self._settings = settings
        self._clock = clock
        self._max = max_entries
        self._clients = _Counter("client", max_entries)
        self._users = _Counter("user", max_entries)
        # (user key, client key) -> time of the last successful login, oldest first.
        self._known: OrderedDict[tuple[str, str], float] = OrderedDict()

    @property
    def settings(self) -> ThrottleSettings:
        return self._settings

    def configure(self, settings: ThrottleSettings) -> None:
        """Use new settings (reload); counts, lockouts and known logins are kept."""
        self._settings = settings

    @property
    def entries(self) -> int:
        """Keys held in all tables together (the memory bound's measure)."""
        return len(self._clients) + len(self._users) + len(self._known)

    def _now(self) -> float:
        now = self._clock()
        s = self._settings
        self._clients.prune(now, s.window)
        self._users.prune(now, s.window)
        while self._known:
            pair, when = next(iter(self._known.items()))
            if when > now - s.remember:
                break
            del self._known[pair]
        return now

    def _exempt(self, client: str, user: str, now: float) -> bool:
        """True if ``client`` logged in as ``user`` recently (exempt from its lockout)."""
        when = self._known.get((user, client))
        return when is not None and when > now - self._settings.remember

    def lockout(self, ip: str, user: str | bytes | None) -> Lockout | None:
        """The lockout that refuses this attempt, or None if it may be checked."""
        now = self._now()
        client = client_key(ip)
        if (lock := self._clients.locked(client, now)) is not None:
            return lock
        name = user_key(user)
        if name is None or self._exempt(client, name, now):
            return None
        return self._users.locked(name, now)

    def failed(self, ip: str, user: str | bytes | None) -> Failure:
        """Record a failed attempt; how long to delay its reply and what it locked."""
        now = self._now()
        s = self._settings
        client = client_key(ip)
        count, client_lock = self._clients.add(client, now, s)
        locks = [client_lock] if client_lock is not None else []
        name = user_key(user)
        if name is not None:
            # Counted also for an exempt address: a stale password somewhere shows up
            # here as well. The lockout it may start does not apply to that address.
            user_count, user_lock = self._users.add(name, now, s)
            if user_lock is not None:
                locks.append(user_lock)
            if not self._exempt(client, name, now):
                count = max(count, user_count)
        delay = min(s.max_delay, s.delay * 2.0 ** min(count - 1, 62))
        return Failure(delay=delay, failures=count, lockouts=tuple(locks))

    def succeeded(self, ip: str, user: str) -> None:
        """A login worked: the address starts afresh and is known for this user."""
        now = self._now()
        client = client_key(ip)
        self._clients.clear(client)
        name = user_key(user)
        if name is None:
            return
        pair = (name, client)
        self._known.pop(pair, None)
        self._known[pair] = now
        while len(self._known) > self._max:
            self._known.popitem(last=False)


class RefusalLog:
    """Which refusals to log: one line per key per interval, with the count held back.

    A client that opens connections in a loop would otherwise write a line for each one;
    with this, the log shows that it happens and how often, in at most one line a minute
    per client. Bounded like :class:`AuthGuard`: at most ``max_keys`` keys, oldest dropped.
    """

    def __init__(self, interval: float = REFUSAL_LOG_INTERVAL, *,
                 clock: Clock = time.monotonic, max_keys: int = _MAX_REFUSAL_KEYS) -> None:
        self._interval = interval
        self._clock = clock
        self._max = max_keys
        # key -> [time of the last line, refusals held back since], oldest line first.
        self._seen: OrderedDict[str, list[float]] = OrderedDict()

    def __len__(self) -> int:
        return len(self._seen)

    def hit(self, key: str) -> int | None:
        """None: do not log this one. Else log it, with this many held back since the last."""
        now = self._clock()
        entry = self._seen.get(key)
        if entry is not None and now - entry[0] < self._interval:
            entry[1] += 1
            return None
        held = int(entry[1]) if entry is not None else 0
        self._seen.pop(key, None)
        self._seen[key] = [now, 0]
        # Entries past their interval with nothing held back say nothing any more.
        while self._seen:
            first, (when, count) = next(iter(self._seen.items()))
            if first == key or now - when < self._interval or count:
                break
            del self._seen[first]
        while len(self._seen) > self._max:
            self._seen.popitem(last=False)
        return held
