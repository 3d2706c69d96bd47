"""One message as it streams in: the header work, the Received field, the spool file.

- :class:`Incoming`: the :class:`relay.receive.data.Sink` of one DATA: at the end of the
  header section it runs :func:`relay.accept.cleanup.prepare_headers` (in a worker thread
  when the section is large),
  puts the trace field (Received) before the result, and writes it with the body to the
  spool's :class:`relay.spool.store.DataWriter` as the rest arrives.

A refusal or a disk error is only noted here, since the client is still sending: the rest
is drained, the file discarded, and the reply given after the end of the data.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import functools
import logging
from typing import TYPE_CHECKING

from relay.accept.cleanup import prepare_headers
from relay.accept.policy import PolicyRejected, PolicyResult
from relay.accept.trace import received_header
from relay.core import diskio
from relay.core.log import message_context
from relay.core.reply import Reply
from relay.receive import replies
from relay.spool.writer import DataWriter

if TYPE_CHECKING:
    from relay.receive.session import RelayEnvelope, RelaySession, RelaySMTP

log = logging.getLogger(__name__)

# Header sections up to this size are worked on the event loop itself (see Incoming.headers).
INLINE_HEADERS = 16 * 1024


def _protocol(session: RelaySession) -> str:
    """The ``with`` keyword of the Received field (RFC 3848)."""
    if not session.extended_smtp:
        return "SMTP"
    return "ESMTP" + ("S" if session.encrypted else "") + ("A" if session.authenticated
                                                          else "")


class Incoming:
    """One message as it streams in (the :class:`relay.receive.data.Sink`).

    At the end of the header section the header work runs (in a worker thread if the
    section is large); the result,
    with the Received field before it, is written with the first part of the body. A
    refusal or a disk error is only noted here (the client is still sending): the rest is
    drained, the file discarded, and the reply given after the end of the data. Every
    failure discards the file at once (a full disk is not kept full by our debris).
    """

    def __init__(self, server: RelaySMTP, session: RelaySession, envelope: RelayEnvelope,
                 writer: DataWriter) -> None:
        assert envelope.id is not None
        self.id = envelope.id
        self.writer = writer
        self.policy: PolicyResult | None = None
        self.refusal: Reply | None = None
        self.failure: OSError | None = None
        self._server = server
        self._session = session
        self._envelope = envelope
        self._pending: list[bytes] = []

    @property
    def _stopped(self) -> bool:
        return self.refusal is not None or self.failure is not None

    async def headers(self, section: bytes) -> None:
        server, session, envelope = self._server, self._session, self._envelope
        config = server.settings.config
        assert envelope.profile is not None and envelope.mail_from is not None
        profile = envelope.profile
        # The relay's working time is not the client's: its clocks stop meanwhile.
        server.pause_idle_timer()
        try:
            with message_context(self.id):
                work = functools.partial(
                    prepare_headers, profile, config.profiles[profile], envelope.mail_from,
                    section, config.server.max_header_addresses)
                # A usual header section takes less time on the loop than the trip to a
                # worker thread and back (whose thread also needs the interpreter lock);
                # a large one (up to max_header_size) must not hold the loop up.
                self.policy = policy = (work() if len(section) <= INLINE_HEADERS
                                        else await asyncio.to_thread(work))
                rcpts = envelope.rcpt_tos
                header = received_header(
                    client_helo=session.host_name or "", client_ip=session.client_ip,
                    hostname=config.server.hostname, protocol=_protocol(session),
                    message_id=self.id, recipient=rcpts[0] if len(rcpts) == 1 else None,
                    when=dt.datetime.now(dt.UTC))
            self._pending = [header, policy.data]
        except PolicyRejected as exc:
            self.refusal = exc.reply
        except Exception:
            with message_context(self.id):
                log.exception("internal error reading the header section: client=%s",
                              session.client_ip)
            self.refusal = replies.INTERNAL_ERROR
        finally:
            server.resume_idle_timer(reply_first=False)

    async def body(self, data: bytes) -> None:
        await self._write(data, finish=False)

    async def finish(self, tail: bytes) -> None:
        """The last bytes: written and made durable in one step."""
        await self._write(tail, finish=True)

    async def _write(self, data: bytes, *, finish: bool) -> None:
        if self._stopped:
            return
        parts, self._pending = [*self._pending, data], []
        self._server.pause_idle_timer()
        try:
            await diskio.run(self.writer.write, b"".join(parts), finish=finish)
        except OSError as exc:
            self.failure = exc          # the writer has discarded the file itself
        finally:
            # After the last byte the client only waits for its reply: that comes first.
            self._server.resume_idle_timer(reply_first=finish)

    def discard(self) -> None:
        self.writer.discard()
