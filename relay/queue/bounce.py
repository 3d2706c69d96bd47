"""Delivery reports to the sender: whether one is sent, to whom, and queuing it.

- :class:`Bouncer`: :meth:`Bouncer.bounce` queues a DSN (built by relay.queue.dsn) for the
  recipients of a message that failed for good, as ``delivery.bounce`` says: to the
  sender, to the operator, or to nobody; never about a report, an auto-reply or a message
  with a null sender.

As Postfix does, recipients refused for good are reported at once, in one DSN naming only
them, while the others are still retried (relay.queue.attempt decides when). The DSN is
spooled like any message, through the queue's own accept, so it survives a crash and is
delivered with the same retries; it is spooled before the failure it reports is saved,
so a crash in between repeats a report at worst and never loses one.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import logging
from collections.abc import Awaitable, Callable

from relay.accept.headers import RawMessage
from relay.accept.trace import local_received
from relay.config import Config
from relay.core.message import Content, new_message_id
from relay.core.reply import Reply
from relay.queue.dsn import build_dsn, is_auto_reply
from relay.spool.records import Entry

log = logging.getLogger(__name__)


class Bouncer:
    """Queues delivery reports through ``accept`` (the queue's, so the dispatcher leaves a
    report alone until it is spooled and is woken for it then)."""

    def __init__(self, config: Config, accept: Callable[[Entry, bytes], Awaitable[None]],
                 clock: Callable[[], float]) -> None:
        self.config = config
        self._accept = accept
        self._clock = clock

    async def bounce(self, entry: Entry, failed: dict[str, Reply], content: Content,
                     reason: str | None) -> None:
        """Queue a DSN for the ``failed`` recipients, unless that would be a mail loop.

        The DSN's envelope sender is the profile's mailbox, not the null sender RFC 3464
        suggests: Exchange Online accepts submissions only from the authenticated mailbox.
        Loops are still impossible, because a DSN is recognised by its own headers
        (Auto-Submitted, multipart/report) and never bounced in turn, whatever
        delivery.bounce says: with ``operator`` too, a failed DSN would otherwise produce a
        DSN to the operator, which can fail the same way, forever. Like Postfix's double
        bounce, the buck stops with the log (and the message in failed/).

        Raises OSError when the report cannot be spooled (the caller keeps the recipients
        pending, to report them later), anything else when it cannot be built.
        """
        policy = self.config.delivery.bounce
        fields = {"event": "bounce", "profile": entry.profile, "rcpts": len(failed)}
        if policy == "none":
            log.warning("bounce suppressed (delivery.bounce: none) for %s",
                        ", ".join(failed), extra=fields)
            return
        sender = entry.return_path if entry.return_path is not None else entry.mail_from
        limit = self.config.server.max_header_size

        def original() -> tuple[bytes, bool]:
            # In a worker thread: reading and parsing up to 256 KiB of headers.
            headers = RawMessage(content.prefix(limit + 2)).header_section()
            return headers, is_auto_reply(headers)

        headers, auto_reply = await asyncio.to_thread(original)
        if sender in ("", "<>") or auto_reply:
            log.warning("no bounce for message %s (failed: %s): it is itself a delivery "
                        "report or an auto-reply, or has a null sender, and reporting on it "
                        "could loop", entry.id, ", ".join(failed), extra=fields)
            return
        to = sender if policy == "sender" else self.config.delivery.operator
        profile = self.config.profiles.get(entry.profile)
        if profile is None or to is None:
            log.error("no bounce: profile %s is no longer configured", entry.profile)
            return
        upstream = self.config.upstream_for(profile)
        bounce_id = new_message_id()
        # Built in a worker thread: the header section alone may be 256 KiB of work for
        # the email package, and the event loop serves every client meanwhile.
        dsn = await asyncio.to_thread(
            build_dsn,
            reporting_mta=self.config.server.hostname, sender_mailbox=profile.mailbox, to=to,
            original_headers=headers, arrival=entry.received_at,
            failed=failed,
            remote_mta=upstream.host, original_envelope_id="", queue_id=entry.id,
            reason=reason, now=self._clock())
        # Its own trace field, as Postfix gives its bounces: the report's queue id travels
        # with it, for whoever looks for it at Exchange or in the sandbox's mail.
        dsn = local_received(hostname=self.config.server.hostname, message_id=bounce_id,
                             when=dt.datetime.fromtimestamp(self._clock(), dt.UTC)) + dsn
        bounce = Entry(id=bounce_id, profile=entry.profile, mail_from=profile.mailbox,
                       rcpt_tos=[to], size=len(dsn), received_at=self._clock())
        await self._accept(bounce, dsn)
        log.info("bounce %s queued to %s for %d recipient(s)", bounce.id, to, len(failed),
                 extra={**fields, "bounce_id": bounce.id, "mailbox": profile.mailbox})
