"""What the relay does with each SMTP transaction: who may send, through which mailbox,
and how an accepted message is handed on.

The envelope is the truth: recipients come from RCPT TO only (Bcc-only recipients are
delivered, and ``Bcc`` fields removed), the message bytes are kept as received apart from
the line model (relay.receive.data), the header work of relay.accept and one prepended
``Received:`` field.
The message streams to the spool as it arrives; only its header section is held, and the
work on it (limits, charset, sender policy) runs in a worker thread, so that one
pathological message cannot hold up the other clients. Every failure of the relay's own
making becomes a 4xx with the message id, so the client keeps the message and the operator
can find the traceback in the log.
"""

from __future__ import annotations

import asyncio
import errno
import functools
import logging
import time
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

from aiosmtpd.smtp import TLSSetupException

from relay.accept.policy import PolicyRejected, check_envelope_sender
from relay.accept.route import Unroutable
from relay.config import Config
from relay.core.graphsize import too_big_for_graph
from relay.core.log import message_context
from relay.core.message import Outbound, new_message_id
from relay.core.reply import Reply
from relay.receive import replies
from relay.receive.addresses import (
    address_problem,
    in_networks,
    json_user,
    loggable_user,
    path,
    sender_problem,
)
from relay.receive.data import Received
from relay.receive.incoming import Incoming
from relay.receive.session import RelayEnvelope, RelaySession, RelaySMTP
from relay.spool.writer import DataWriter

log = logging.getLogger(__name__)

_RECEIVED_ALLOWANCE = 1024   # bytes: the Received field, with room for a long host name

Submit = Callable[[Outbound], Awaitable[Reply]]
# Where a new message's bytes are written while it arrives (Spool.writer).
OpenWriter = Callable[[str], DataWriter]
_Hook = TypeVar("_Hook", bound=Callable[..., Awaitable[str]])


def _guarded(hook: _Hook) -> _Hook:
    """Turn any exception of a hook into a logged traceback and a 451 with the id."""

    @functools.wraps(hook)
    async def wrapper(self: RelayHandler, server: RelaySMTP, session: RelaySession,
                      envelope: RelayEnvelope, *args: Any) -> str:
        try:
            return await hook(self, server, session, envelope, *args)
        except Exception:
            mid = envelope.id or new_message_id()
            with message_context(mid):
                log.exception("internal error in %s: client=%s", hook.__name__,
                              session.client_ip)
            return replies.internal_error(mid).as_smtp()

    return wrapper  # type: ignore[return-value]


def _upstream_options(options: list[str], size: int, eight_bit: bool) -> list[str]:
    """MAIL FROM parameters to pass on, true to the bytes that will actually be sent.

    SIZE is corrected for the added header (and any rewrite). A legacy app that sends
    8-bit text without declaring BODY=8BITMIME gets it declared, so the upstream does
    not have to guess.
    """
    out = [opt for opt in options if not opt.upper().startswith("SIZE=")]
    if len(out) != len(options):
        out.append(f"SIZE={size}")
    if eight_bit and not any(opt.upper().startswith("BODY=") for opt in out):
        out.append("BODY=8BITMIME")
    return out


def _with_id(reply: Reply, mid: str) -> Reply:
    """The reply for the client, naming the message id unless it already does, exactly
    as it will be sent (:func:`replies.as_sent`): what the log says the client got."""
    if mid not in reply.text:
        text = reply.text.rstrip()
        reply = Reply(reply.code, f"{text}: queued as {mid}" if reply.ok
                      else f"{text} (id {mid})")
    return replies.as_sent(reply)


def _log_orphan(task: asyncio.Task[Reply]) -> None:
    """The outcome of a hand-over whose client did not wait for it."""
    if task.cancelled():
        log.warning("hand-over cancelled; the client was given no reply and will retry")
    elif (exc := task.exception()) is not None:
        log.error("hand-over failed after the client went away", exc_info=exc)
    else:
        log.info("hand-over finished after the client went away: reply=%s", task.result())


class RelayHandler:
    """aiosmtpd handler: the MAIL, RCPT and DATA decisions. Shared by all sessions.

    ``spawn`` starts the hand-over of one message as a task owned by the receiver, so
    that a client that disconnects (or a shutdown) does not cancel a half-done submission;
    ``writer`` gives the spool file a message streams into.
    """

    def __init__(self, spawn: Callable[[Outbound], asyncio.Task[Reply]],
                 writer: OpenWriter) -> None:
        self._spawn = spawn
        self._writer = writer

    @_guarded
    async def handle_MAIL(self, server: RelaySMTP, session: RelaySession,
                          envelope: RelayEnvelope, address: str,
                          mail_options: list[str]) -> str:
        mid = new_message_id()
        with message_context(mid):
            if server.draining:
                return replies.SHUTTING_DOWN.as_smtp()
            config = server.settings.config
            ip = session.client_ip
            if not (session.authenticated
                    or in_networks(ip, config.server.relay_networks)):
                log.warning("relay denied: client=%s sender=%s auth_offered=%s",
                            ip, path(address), server.offers_auth,
                            extra={"event": "refused", "client": ip, "sender": address})
                if server.offers_auth:
                    return replies.AUTHENTICATION_REQUIRED.as_smtp()
                return replies.relay_denied(ip).as_smtp()
            problem = sender_problem(address, envelope.smtp_utf8)
            if problem is not None:
                log.info("sender refused: client=%s reply=%s", ip, problem)
                return problem.as_smtp()
            try:
                profile_name = server.settings.router.select(
                    user=session.user, sender=address, client_ip=ip)
            except Unroutable as exc:
                log.warning("unroutable: client=%s user=%s sender=%s reply=%s",
                            ip, loggable_user(session.user), path(address), exc.reply,
                            extra={"event": "refused", "client": ip,
                                   "user": json_user(session.user),
                                   "sender": address, "reply": str(exc.reply)})
                return exc.reply.as_smtp()
            try:
                check_envelope_sender(profile_name, config.profiles[profile_name], address)
            except PolicyRejected as exc:
                log.warning("sender refused: client=%s user=%s profile=%s sender=%s reply=%s",
                            ip, loggable_user(session.user), profile_name, path(address),
                            exc.reply,
                            extra={"event": "refused", "client": ip,
                                   "user": json_user(session.user),
                                   "profile": profile_name, "sender": address,
                                   "reply": str(exc.reply)})
                return exc.reply.as_smtp()
            envelope.id = mid
            envelope.profile = profile_name
            envelope.mail_from = address
            envelope.mail_options.extend(mail_options)
            log.debug("sender accepted: client=%s sender=%s profile=%s",
                      ip, path(address), profile_name)
            return replies.SENDER_OK.as_smtp()

    @_guarded
    async def handle_RCPT(self, server: RelaySMTP, session: RelaySession,
                          envelope: RelayEnvelope, address: str,
                          rcpt_options: list[str]) -> str:
        with message_context(envelope.id or "-"):
            problem = address_problem(address, envelope.smtp_utf8)
            if problem is not None:
                log.info("recipient refused: client=%s rcpt=<%s> reply=%s",
                         session.client_ip, address, problem)
                return problem.as_smtp()
            folded = address.casefold()
            if any(r.casefold() == folded for r in envelope.rcpt_tos):
                return replies.RECIPIENT_OK.as_smtp()      # once is enough
            limit = server.settings.config.server.max_recipients
            if len(envelope.rcpt_tos) >= limit:
                log.info("too many recipients: client=%s limit=%d", session.client_ip, limit)
                return replies.TOO_MANY_RECIPIENTS.as_smtp()
            envelope.rcpt_tos.append(address)
            envelope.rcpt_options.extend(rcpt_options)
            return replies.RECIPIENT_OK.as_smtp()

    # --- DATA: begin_data, then the sink (_Incoming) as it streams, then end_data -----------

    def begin_data(self, server: RelaySMTP, session: RelaySession,
                   envelope: RelayEnvelope) -> Incoming:
        """Where this transaction's message goes while it streams in (see _Incoming)."""
        mid = envelope.id or new_message_id()
        envelope.id = mid
        return Incoming(server, session, envelope, self._writer(mid))

    async def end_data(self, server: RelaySMTP, session: RelaySession,
                       envelope: RelayEnvelope, incoming: Incoming,
                       received: Received) -> str:
        """The reply to the message: a refusal, or the hand-over's outcome."""
        mid = incoming.id
        with message_context(mid):
            try:
                return await self._end_data(server, session, envelope, incoming, received)
            except Exception:
                incoming.discard()
                log.exception("internal error at the end of DATA: client=%s",
                              session.client_ip)
                return replies.internal_error(mid).as_smtp()

    async def _end_data(self, server: RelaySMTP, session: RelaySession,
                        envelope: RelayEnvelope, incoming: Incoming,
                        received: Received) -> str:
        mid = incoming.id
        refusal = (received.refusal or incoming.refusal
                   or _graph_refusal(server.settings.config, envelope, received.size))
        if refusal is not None:
            incoming.discard()
            refusal = replies.as_sent(refusal)
            log.warning("message refused: client=%s user=%s sender=%s size=%d reply=%s",
                        session.client_ip, loggable_user(session.user),
                        path(envelope.mail_from or ""), received.size, refusal,
                        extra={"event": "refused", "client": session.client_ip,
                               "user": json_user(session.user), "profile": envelope.profile,
                               "sender": envelope.mail_from, "size": received.size,
                               "reply": str(refusal)})
            return refusal.as_smtp()
        if incoming.failure is not None:
            exc = incoming.failure
            log.error("cannot spool the message: %s", exc.strerror or exc)
            if exc.errno in (errno.ENOSPC, errno.EDQUOT):
                return _with_id(replies.STORAGE_FULL, mid).as_smtp()
            return _with_id(replies.CANNOT_STORE, mid).as_smtp()
        policy = incoming.policy
        assert policy is not None and envelope.profile is not None
        config = server.settings.config
        profile_name = envelope.profile
        rcpts = list(envelope.rcpt_tos)
        content = incoming.writer.content()
        # What the sender policy replaced, kept with the message and named in its line:
        # which application sent it, when it is sent as the mailbox.
        original_sender = (envelope.mail_from if policy.mail_from != envelope.mail_from
                           else None)
        outbound = Outbound(
            id=mid, profile=profile_name, mail_from=policy.mail_from, rcpt_tos=rcpts,
            content=content,
            mail_options=_upstream_options(envelope.mail_options, content.size,
                                           received.eight_bit),
            client=session.client_ip, user=session.user,
            mailbox=config.profiles[profile_name].mailbox,
            return_path=original_sender, original_from=policy.original_from,
            synchronous=server.listener.synchronous)
        started = time.monotonic()
        reply = _with_id(await self._submit(server, outbound), mid)
        duration = time.monotonic() - started
        log.info("message: client=%s user=%s profile=%s from=<%s>%s%s rcpts=%d size=%d "
                 "reply=%s (%.2f s)", session.client_ip, loggable_user(session.user),
                 profile_name, policy.mail_from,
                 f" original_sender={path(original_sender)}" if original_sender else "",
                 f" original_from=<{policy.original_from}>" if policy.original_from else "",
                 len(rcpts), content.size, reply, duration,
                 extra={"event": "received", "client": session.client_ip,
                        "user": json_user(session.user), "profile": profile_name,
                        "mailbox": outbound.mailbox, "sender": policy.mail_from,
                        "original_sender": original_sender,
                        "original_from": policy.original_from, "rcpts": len(rcpts),
                        "size": content.size, "reply": str(reply),
                        "duration": round(duration, 3)})
        return reply.as_smtp()

    async def _submit(self, server: RelaySMTP, outbound: Outbound) -> Reply:
        task = self._spawn(outbound)
        server.pause_idle_timer()
        try:
            # Shielded: if this session goes away, the task still finishes (and its
            # outcome is logged by _log_orphan) instead of stopping half-way.
            return await asyncio.shield(task)
        except asyncio.CancelledError:
            log.warning("client %s went away while the message was being handed on; "
                        "finishing it anyway", outbound.client)
            task.add_done_callback(_log_orphan)
            raise
        except Exception:
            log.exception("handing the message on failed: client=%s", outbound.client)
            return replies.INTERNAL_ERROR
        finally:
            server.resume_idle_timer()

    async def handle_exception(self, error: Exception, server: RelaySMTP | None = None
                               ) -> str:
        """Errors outside the hooks (aiosmtpd internals, AUTH I/O): 451, never a traceback
        to the client (aiosmtpd's default reply would quote the exception text)."""
        client = server.client_ip if server is not None else "?"
        if isinstance(error, TLSSetupException):
            log.warning("TLS handshake failed: client=%s error=%s", client,
                        error.__cause__ or error)
            return replies.TLS_NOT_AVAILABLE.as_smtp()
        incident = new_message_id()
        with message_context(incident):
            log.error("internal error in SMTP session: client=%s", client, exc_info=error)
        return replies.internal_error(incident).as_smtp()


def _graph_refusal(config: Config, envelope: RelayEnvelope, size: int) -> Reply | None:
    """A message its Graph profile cannot send and has no SMTP for: refused at DATA, so
    the application hears it now rather than from a bounce."""
    profile = config.profiles.get(envelope.profile or "")
    if profile is None or profile.transport != "graph" or profile.fallback_to_smtp:
        return None
    # The relay's own Received field is added after this; allow for it, so that what
    # passes here is not refused (and bounced) at delivery instead.
    return too_big_for_graph(size + _RECEIVED_ALLOWANCE, list(envelope.rcpt_tos))
