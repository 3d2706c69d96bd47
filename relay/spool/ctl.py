"""Operator commands on the spool: ``smtp-oauth-relay queue list|show|retry|hold|release|
delete|flush``, like Postfix's mailq and postsuper.

- :func:`iter_entries`, :func:`summary`, :func:`detail`, :func:`show`: what is queued,
  one message closely; :func:`resolve`: a message id as given, in any case, to the queue's;
- :func:`retry`, :func:`hold`, :func:`release`, :func:`delete`, :func:`flush`: the changes;
- :class:`QueueCommandError`: a command that cannot be carried out, and whether running it
  again may work.

They work whether the relay is running or not: every change follows the spool's protocol
(relay.spool's package docstring), a single rename or unlink of a message's metadata file
that fails, changing nothing, if the relay took the message meanwhile. Messages in active/
(being delivered right now) are left alone, and the commands take the spool's operator
lock, so that two operators cannot interleave either. A running relay picks up retried or
released messages within seconds (immediately after ``systemctl kill -s USR1
smtp-oauth-relay``).
"""

from __future__ import annotations

import contextlib
import datetime as dt
import time
from collections.abc import Callable, Iterator
from typing import Any

from relay.accept.headers import RawMessage
from relay.core.errors import RelayError
from relay.spool.locks import SpoolBusy
from relay.spool.records import Entry, State
from relay.spool.store import Spool

# How long a command waits for another operator's command to finish.
LOCK_WAIT = 10.0
# How much of a message `queue show` reads for its header section (the relay's own limit
# for one is 256 KiB by default): never the whole of a large message.
_HEAD_LIMIT = 1024 * 1024
# How often a lookup is repeated when the message moves between finding and reading it.
_LOOKUPS = 3


class QueueCommandError(RelayError):
    """An operator command that cannot be carried out (message text is for the operator).

    ``temporary``: the message changed while the command ran (the relay took it, or another
    operator's command holds the lock); running the command again may well work.
    """

    def __init__(self, text: str, *, temporary: bool = False) -> None:
        super().__init__(text)
        self.temporary = temporary


def _changed(spool: Spool, mid: str, was: State) -> QueueCommandError:
    """The error for a move that lost the race (the rename found nothing to move)."""
    found = spool.locate(mid)
    now = f"now in {found[0]}" if found else "no longer in the queue"
    return QueueCommandError(f"{mid} changed while the command ran (was in {was}, {now}); "
                             "try again", temporary=True)


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
        "last_reply": None if entry.last_reply is None else str(entry.last_reply),
    }


def detail(state: State, entry: Entry) -> dict[str, Any]:
    """:func:`summary` with what became of each recipient and where the message came from:
    the client, the user, and the envelope sender and From the sender policy replaced when
    it sent the message as the mailbox (null when it replaced nothing)."""
    return summary(state, entry) | {"delivered": entry.delivered,
                                    "failed": {r: str(x) for r, x in entry.failed.items()},
                                    "client": entry.client, "user": entry.user,
                                    "original_sender": entry.return_path,
                                    "original_from": entry.original_from}


def _iso(ts: float) -> str:
    return dt.datetime.fromtimestamp(ts, dt.UTC).isoformat(timespec="seconds")


def show(spool: Spool, mid: str) -> dict[str, Any]:
    state, entry = _locate(spool, mid)
    out = detail(state, entry)
    try:
        out["headers"] = _headers(spool.content(mid).prefix(_HEAD_LIMIT))
    except FileNotFoundError:
        raise _changed(spool, mid, state) from None      # delivered or deleted just now
    return out


def _headers(data: bytes) -> str:
    """The header section, as relay.accept.headers reads it (the one rule for where it ends)."""
    section = RawMessage(data).header_section().decode("utf-8", "replace")
    return section.removesuffix("\n").removesuffix("\r")


def resolve(spool: Spool, mid: str) -> str:
    """The id as the queue has it, for an id given in any case (copied from a log line or
    a bounce, typed by hand); ``mid`` itself when no message has it in any case.

    The relay's own ids are upper case, so that is tried first; the scan is for ids of
    other versions, and runs only when neither form is queued.
    """
    for candidate in (mid, mid.upper()):
        if spool.locate(candidate) is not None:
            return candidate
    wanted = f"{mid}.json".casefold()
    for state in State:
        for name in spool.names(state):
            if name.casefold() == wanted:
                return name.removesuffix(".json")
    return mid


def _locate(spool: Spool, mid: str) -> tuple[State, Entry]:
    # The relay may move the message between finding and reading it (deferred -> active,
    # say): then look again, a few times, rather than fail on a message that is there.
    for _ in range(_LOOKUPS):
        found = spool.locate(mid)
        if found is None:
            raise QueueCommandError(f"no message {mid} in the queue")
        state, path = found
        try:
            return state, spool.read(state, path.name)
        except FileNotFoundError:
            continue
        except (OSError, ValueError, TypeError) as exc:
            raise QueueCommandError(f"{mid}: cannot read {state}/{path.name}: {exc}") from None
    raise QueueCommandError(f"{mid} keeps changing state; try again", temporary=True)


def _movable(spool: Spool, mid: str, allowed: tuple[State, ...]) -> tuple[State, Entry]:
    state, entry = _locate(spool, mid)
    if state is State.ACTIVE:
        raise QueueCommandError(f"{mid} is being delivered right now; try again in a moment")
    if state not in allowed:
        raise QueueCommandError(f"{mid} is in {state}; this command works on "
                                + ", ".join(str(s) for s in allowed))
    return state, entry


@contextlib.contextmanager
def _operator(spool: Spool) -> Iterator[None]:
    """The operator lock for one command on one message; busy becomes a clear error."""
    with contextlib.ExitStack() as stack:
        try:
            stack.enter_context(spool.operator_lock(LOCK_WAIT))
        except SpoolBusy as exc:
            raise QueueCommandError(str(exc), temporary=True) from None
        yield


def _apply(spool: Spool, mid: str, state: State, change: Callable[[], object]) -> None:
    """Make one change to the spool; if the relay took the message first, say so."""
    try:
        change()
    except FileNotFoundError:
        raise _changed(spool, mid, state) from None


def retry(spool: Spool, mid: str) -> str:
    """Make a deferred (or failed) message due now."""
    with _operator(spool):
        state, entry = _movable(spool, mid, (State.DEFERRED, State.FAILED, State.INCOMING))
        if state is State.INCOMING:
            return f"{mid} is already waiting for its first attempt"
        now = time.time()
        if state is State.DEFERRED:
            _apply(spool, mid, state, lambda: spool.set_due(mid, now))
            return f"{mid}: will be retried now"
        # A second chance: the failed recipients are tried again, with a fresh lifetime.
        # failed/ is ours under the lock, so the new content may be written there first.
        entry.rcpt_tos = list(entry.failed) + [r for r in entry.rcpt_tos if r not in entry.failed]
        entry.failed = {}
        entry.received_at = entry.next_attempt = now
        _apply(spool, mid, state, lambda: spool.move(entry, state, State.DEFERRED))
        return f"{mid}: will be retried now"


def hold(spool: Spool, mid: str) -> str:
    with _operator(spool):
        state, entry = _movable(spool, mid, (State.INCOMING, State.DEFERRED))
        # No rewrite: incoming/ and deferred/ are shared with the relay, and the file as it
        # is (with the attempts the relay recorded) is what a release must bring back.
        _apply(spool, mid, state, lambda: spool.move(entry, state, State.HOLD, rewrite=False))
        return f"{mid}: on hold"


def release(spool: Spool, mid: str) -> str:
    with _operator(spool):
        state, entry = _movable(spool, mid, (State.HOLD,))
        entry.next_attempt = time.time()      # becomes the file's mtime: due now
        _apply(spool, mid, state,
               lambda: spool.move(entry, state, State.DEFERRED, rewrite=False))
        return f"{mid}: released"


def delete(spool: Spool, mid: str) -> str:
    with _operator(spool):
        state, _ = _movable(spool, mid, (State.INCOMING, State.DEFERRED, State.HOLD,
                                         State.FAILED))
        # remove() unlinks the metadata first and only then the data: if the relay has
        # just taken the message into active/, the unlink fails and the data stays.
        _apply(spool, mid, state, lambda: spool.remove(mid, state))
        return f"{mid}: deleted"


def flush(spool: Spool) -> list[str]:
    """Make every deferred message due now; returns their ids."""
    with _operator(spool):
        return spool.flush_deferred_ids(time.time())
