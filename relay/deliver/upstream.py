"""One upstream (Exchange Online, or another XOAUTH2 server): its TLS context, and one
message delivered in a session of its own.

- :class:`UpstreamClient`: holds what every session with the upstream shares (the TLS
  context, built once), opens :class:`~relay.deliver.session.UpstreamSession` objects, and
  writes the one log line per delivery attempt;
- :func:`build_tls_context`: verification against the upstream's ``ca_file`` only, or the
  system trust store, TLS 1.2 at least.

The session itself (connect, STARTTLS, XOAUTH2, the transaction) is
:mod:`relay.deliver.session`; what its failures become is :mod:`relay.deliver.failures`;
:mod:`relay.deliver.pool` keeps sessions open per mailbox between messages.
"""

from __future__ import annotations

import logging
import ssl
import time
from pathlib import Path

from relay.config import Upstream
from relay.core.message import DeliveryResult, Outbound
from relay.core.net import host_port
from relay.core.reply import Reply
from relay.deliver.failures import AuthenticationRejected, UpstreamUnavailable
from relay.deliver.session import HasAccessToken, UpstreamSession

log = logging.getLogger(__name__)


def build_tls_context(ca_file: Path | None) -> ssl.SSLContext:
    """Verify the upstream against ``ca_file`` only, or else the system trust store."""
    try:
        ctx = ssl.create_default_context(
            ssl.Purpose.SERVER_AUTH, cafile=str(ca_file) if ca_file else None)
    except (OSError, ssl.SSLError) as exc:
        raise ValueError(f"cannot load CA file {ca_file}: "
                         f"{getattr(exc, 'strerror', None) or exc}") from None
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.check_hostname = True
    ctx.verify_mode = ssl.CERT_REQUIRED
    return ctx


class UpstreamClient:
    """Delivers messages to one upstream; the TLS context is built once, here."""

    def __init__(self, upstream: Upstream, helo_name: str) -> None:
        self.upstream = upstream
        self.helo_name = helo_name
        self.where = host_port(upstream.host, upstream.port)
        self.tls_context = build_tls_context(upstream.ca_file)

    def session(self) -> UpstreamSession:
        return UpstreamSession(self.upstream, self.helo_name, self.tls_context)

    async def send(self, msg: Outbound, mailbox: str, token: HasAccessToken, *,
                   require_all_recipients: bool = True) -> DeliveryResult:
        """Deliver ``msg`` as ``mailbox`` in a session of its own.

        Raises :class:`AuthenticationRejected` when the login is refused; every other
        outcome, including infrastructure failures (as 451), is the returned result.
        """
        started = time.monotonic()
        session = self.session()
        try:
            try:
                await session.open(mailbox, token)
            except UpstreamUnavailable as exc:
                result = DeliveryResult(exc.reply)
            except AuthenticationRejected as exc:
                self.log_delivery(msg, mailbox, exc.reply, started, "login refused")
                raise
            else:
                result = await session.send_one(
                    msg, require_all_recipients=require_all_recipients)
        finally:
            await session.close()
        note = f"{len(result.refused)} refused" if result.refused else ""
        self.log_delivery(msg, mailbox, result.reply, started, note)
        return result

    def log_delivery(self, msg: Outbound, mailbox: str, reply: Reply, started: float,
                     note: str = "") -> None:
        """The upstream session's line per attempt, whichever way the session was obtained.

        A message the upstream took whole is logged at debug: the queue's attempt line
        (relay.queue.report) says the same at info, and a second line per delivered
        message cost 3 % of the relay's CPU. What the upstream refused, it says at
        warning, and a partial refusal at info, with the endpoint's own words."""
        level = logging.WARNING if not reply.ok else logging.INFO if note else logging.DEBUG
        if not log.isEnabledFor(level):
            return
        log.log(level, "upstream %s mailbox=%s rcpts=%d reply=%s%s (%.2f s)",
                 self.where, mailbox, len(msg.rcpt_tos), reply,
                 f" [{note}]" if note else "", time.monotonic() - started)
