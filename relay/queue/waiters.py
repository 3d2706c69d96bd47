"""The answer to a client that waits for the first delivery attempt (synchronous mode).

- :class:`OutcomeState`, :class:`Outcome`: what one attempt did to a message (delivered,
  partly delivered, deferred, failed) and the upstream's reply;
- :func:`wait_for_answer`: the client's wait: the attempt's answer, or None when the wait
  ran out (the message stays queued: the client is told so);
- :func:`answer`: give a still-waiting client its answer for an outcome;
- :func:`permanent_reply`: the 5xx a waiting client gets when nobody could be reached;
- :data:`SETTLE_WAIT`: how long an answered client waits for the spool to agree.

A listener or profile may let clients wait (``synchronous``) so that an application sees
Exchange's verdict itself. The one source of truth for "the client is still waiting" is
a future that is not done: the attempt answers through it, and when the wait ends without
an answer it is cancelled, after which the client has been told 250 and the attempt
reports failures by DSN like any other. Both sides check and complete it without an
await in between, so they cannot both win.
"""

from __future__ import annotations

import asyncio
import enum
import logging
from dataclasses import dataclass
from typing import Any

from relay.core.message import DeliveryResult
from relay.core.reply import Reply
from relay.deliver.classify import classify
from relay.spool.records import Entry

log = logging.getLogger(__name__)

# How long an answered synchronous client waits for the spool to agree with its answer.
SETTLE_WAIT = 5.0

Waiter = asyncio.Future[Reply]


class OutcomeState(enum.StrEnum):
    DELIVERED = "delivered"     # to every recipient
    PARTIAL = "partial"         # to some; the others were refused for good
    DEFERRED = "deferred"       # recipients are left for a later attempt
    FAILED = "failed"           # to nobody, for good (or the message cannot be sent)


@dataclass(frozen=True)
class Outcome:
    """What one attempt did to a message (for a client waiting in synchronous mode)."""

    state: OutcomeState
    reply: Reply


async def wait_for_answer(waiter: Waiter, attempt: asyncio.Task[Any], wait: float,
                          mid: str) -> Reply | None:
    """Wait up to ``wait`` seconds for ``attempt`` to answer through ``waiter``; None if it
    did not (the wait ran out, or the attempt crashed before answering)."""
    try:
        await asyncio.wait((waiter, attempt), timeout=wait,
                           return_when=asyncio.FIRST_COMPLETED)
    finally:
        # Also when this coroutine is cancelled: nobody is left to hear a 5xx.
        if not waiter.done():
            waiter.cancel()
    if not waiter.cancelled():
        # Answered: the attempt only finishes its spool update (a refused message is
        # being removed). Wait for that, so that the reply goes out once the spool
        # agrees with it (asyncio.wait never cancels the task, even if this is) -
        # but not for ever: a disk that refuses the update must not hang the client.
        await asyncio.wait((attempt,), timeout=SETTLE_WAIT)
        return waiter.result()
    if attempt.done() and not attempt.cancelled() and (exc := attempt.exception()) is not None:
        # A bug, not a verdict: the message is safe in the spool, so it is queued.
        log.error("attempt for %s crashed before answering: %r", mid, exc)
    return None


def answer(waiter: Waiter | None, mid: str, outcome: Outcome) -> None:
    """Tell a client still waiting for the first attempt what became of it."""
    if waiter is None or waiter.done():
        return
    if outcome.state is OutcomeState.FAILED:
        reply = outcome.reply
    elif outcome.state is OutcomeState.DELIVERED:
        reply = Reply(250, f"2.0.0 Ok: delivered as {mid}")
    elif outcome.state is OutcomeState.PARTIAL:
        reply = Reply(250, f"2.0.0 Ok: delivered as {mid} to some recipients; "
                           "the others were refused for good")
    else:
        reply = Reply(250, f"2.0.0 Ok: queued as {mid}")
    waiter.set_result(reply)


def permanent_reply(entry: Entry, result: DeliveryResult) -> Reply:
    """The 5xx for a waiting client: the upstream's reply, then what it means if known."""
    reply = result.reply if result.reply.permanent else next(iter(entry.failed.values()))
    hint = classify(reply).hint
    if not hint:
        return reply
    # A continuation line, so the upstream's own line stays as it was (apps and people
    # search for it) and no line gets near SMTP's 512-octet limit; RFC 2034 wants the
    # enhanced code on every line.
    status = reply.enhanced or f"{reply.code // 100}.0.0"
    return Reply(reply.code, f"{reply.text.rstrip()}\n{status} {hint}")
