"""Operator commands on the spool: ``smtp-oauth-relay queue list|show|retry|hold|release|
delete|flush``, like Postfix's mailq and postsuper.

They work whether the relay is running or not, because every change is one atomic rename
or unlink of a metadata file, and messages in active/ (being delivered right now) are
left alone. A running relay picks up retried or released messages within seconds
(immediately after ``systemctl kill -s USR1 smtp-oauth-relay``).
"""

from __future__ import annotations

import datetime as dt
import time
from collections.abc import Iterator
from typing import Any

from relay.spool import Entry, Spool, State


class QueueCommandError(Exception):
    """An operator command that cannot be carried out (message text is for the operator)."""


def iter_entries(spool: Spool, states: list[State] | None = None,
                 ) -> Iterator[tuple[State, Entry]]:
    for state in states or list(State):
        for name in spool.names(state):
            try:
                yield state, spool.read(state, name)
            except (OSError, ValueError, TypeError):
                continue  # moved away while listing, or unreadable: not ours to report here


def summary(state: State, entry: Entry) -> dict[str, Any]:
    return {
        "id": entry.id, "state": str(state), "profile": entry.profile,
        "from": entry.mail_from, "recipients": entry.rcpt_tos, "size": entry.size,
        "received": _iso(entry.received_at), "attempts": entry.attempts,
        "next_attempt": _iso(entry.next_attempt) if state is State.DEFERRED else None,
        "last_reply": entry.last_reply,
    }


def _iso(ts: float) -> str:
    return dt.datetime.fromtimestamp(ts, dt.UTC).isoformat(timespec="seconds")


def show(spool: Spool, mid: str) -> dict[str, Any]:
    state, entry = _locate(spool, mid)
    out = summary(state, entry) | {"delivered": entry.delivered, "failed": entry.failed,
                                    "client": entry.client, "user": entry.user}
    out["headers"] = _headers(spool.read_data(mid))
    return out


def _headers(data: bytes) -> str:
    end = data.find(b"\r\n\r\n")
    if end < 0:
        end = data.find(b"\n\n")
    return data[: end if end >= 0 else len(data)].decode("utf-8", "replace")


def _locate(spool: Spool, mid: str) -> tuple[State, Entry]:
    found = spool.locate(mid)
    if found is None:
        raise QueueCommandError(f"no message {mid} in the queue")
    state, path = found
    return state, Entry.from_json(path.read_bytes())


def _movable(spool: Spool, mid: str, allowed: tuple[State, ...]) -> tuple[State, Entry]:
    state, entry = _locate(spool, mid)
    if state is State.ACTIVE:
        raise QueueCommandError(f"{mid} is being delivered right now; try again in a moment")
    if state not in allowed:
        raise QueueCommandError(f"{mid} is in {state}; this command works on "
                                + ", ".join(str(s) for s in allowed))
    return state, entry


def retry(spool: Spool, mid: str) -> str:
    """Make a deferred (or failed) message due now."""
    state, entry = _movable(spool, mid, (State.DEFERRED, State.FAILED, State.INCOMING))
    if state is State.INCOMING:
        return f"{mid} is already waiting for its first attempt"
    entry.next_attempt = time.time()
    if state is State.DEFERRED:
        spool.set_due(mid, entry.next_attempt)
        return f"{mid}: will be retried now"
    if state is State.FAILED:
        # A second chance: the failed recipients are tried again, with a fresh lifetime.
        entry.rcpt_tos = list(entry.failed) + [r for r in entry.rcpt_tos if r not in entry.failed]
        entry.failed = {}
        entry.received_at = time.time()
    spool.move(entry, state, State.DEFERRED)
    return f"{mid}: will be retried now"


def hold(spool: Spool, mid: str) -> str:
    state, entry = _movable(spool, mid, (State.INCOMING, State.DEFERRED))
    spool.move(entry, state, State.HOLD)
    return f"{mid}: on hold"


def release(spool: Spool, mid: str) -> str:
    state, entry = _movable(spool, mid, (State.HOLD,))
    entry.next_attempt = time.time()
    spool.move(entry, state, State.DEFERRED)
    return f"{mid}: released"


def delete(spool: Spool, mid: str) -> str:
    state, _ = _movable(spool, mid, (State.INCOMING, State.DEFERRED, State.HOLD, State.FAILED))
    spool.remove(mid, state)
    return f"{mid}: deleted"


def flush(spool: Spool) -> int:
    """Make every deferred message due now; returns how many."""
    return spool.flush_deferred(time.time())
