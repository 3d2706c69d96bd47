"""What the relay does with each SMTP transaction: who may send, through which mailbox,
and how an accepted message is handed on.

The envelope is the truth: recipients come from RCPT TO only (Bcc-only recipients are
delivered), the message bytes are kept as received apart from the line model
(relay.receive.data), the sender policy's rewrite and one prepended ``Received:`` field.
The message streams to the spool as it arrives; only its header section is held, and the
work on it (limits, charset, sender policy) runs in a worker thread, so that one
pathological message cannot hold up the other clients. Every failure of the relay's own
making becomes a 4xx with the message id, so the client keeps the message and the operator
can find the traceback in the log.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import errno
import functools
import ipaddress
import logging
import time
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

from aiosmtpd.smtp import TLSSetupException

from relay.accept.headers import RawMessage, received_header
from relay.accept.policy import (
    PolicyRejected,
    PolicyResult,
    apply_sender_policy,
    check_envelope_sender,
)
from relay.accept.route import Unroutable
from relay.config import Profile
from relay.core.log import message_context
from relay.core.message import Outbound, new_message_id
from relay.core.reply import Reply
from relay.receive.data import Received
from relay.receive.session import (
    NULL_SENDER,
    SHUTTING_DOWN,
    RelayEnvelope,
    RelaySession,
    RelaySMTP,
)
from relay.spool.writer import DataWriter

log = logging.getLogger(__name__)

Submit = Callable[[Outbound], Awaitable[Reply]]
# Where a new message's bytes are written while it arrives (Spool.writer).
OpenWriter = Callable[[str], DataWriter]
STORAGE_FULL = Reply(452, "4.3.1 Insufficient system storage; try again later")
_Hook = TypeVar("_Hook", bound=Callable[..., Awaitable[str]])

_MAX_ADDRESS = 254          # RFC 5321 4.5.3.1.3 path length, less the angle brackets
_MAX_LOCAL_PART = 64


def _path(address: str) -> str:
    """An envelope address for a log line: ``<a@b>``, or ``<>`` for the null sender."""
    return NULL_SENDER if address == NULL_SENDER else f"<{address}>"


def internal_error(mid: str) -> str:
    return f"451 4.3.0 Internal error, try again later (id {mid})"


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
            return internal_error(mid)

    return wrapper  # type: ignore[return-value]


def _encoding_problem(address: str, smtputf8: bool) -> str | None:
    """Why ``address``'s characters cannot travel as they are (RFC 6531), or None."""
    try:
        address.encode("utf-8")
    except UnicodeEncodeError:
        return "553 5.6.7 Address is not valid UTF-8"
    if not address.isascii() and not smtputf8:
        return "553 5.6.7 Non-ASCII address requires the SMTPUTF8 parameter on MAIL FROM"
    return None


def address_problem(address: str, smtputf8: bool) -> str | None:
    """Why ``address`` cannot be a recipient, or None if it can (a mailbox@domain)."""
    if (problem := _encoding_problem(address, smtputf8)) is not None:
        return problem
    raw = address.encode("utf-8")
    local, at, domain = address.rpartition("@")
    if not at or not local or not domain:
        return "553 5.1.3 Address must be of the form name@domain"
    if len(raw) > _MAX_ADDRESS or len(local.encode("utf-8")) > _MAX_LOCAL_PART:
        return "553 5.1.3 Address too long"
    if any(ord(ch) < 32 or ch == "\x7f" for ch in address):
        return "553 5.1.3 Address contains control characters"
    quoted = len(local) >= 2 and local.startswith('"') and local.endswith('"')
    if any(ch.isspace() for ch in (domain if quoted else address)):
        return "553 5.1.3 Address contains spaces"
    if domain.startswith("[") and domain.endswith("]"):
        literal = domain[1:-1].removeprefix("IPv6:")
        try:
            ipaddress.ip_address(literal)
        except ValueError:
            return "553 5.1.3 Invalid address literal"
        return None
    labels = domain.rstrip(".").split(".")
    for label in labels:
        if not label or len(label) > 63 or label.startswith("-") or label.endswith("-"):
            return "553 5.1.3 Invalid domain"
        if not all(ch.isalnum() or ch == "-" for ch in label):
            return "553 5.1.3 Invalid domain"
    return None


def sender_problem(address: str, smtputf8: bool) -> str | None:
    """Why ``address`` cannot be an envelope sender, or None.

    Looser than :func:`address_problem`: cron and other local programs send unqualified
    senders (``root``), and the null sender ``<>`` is a sender too. But a sender travels
    on into the upstream's MAIL FROM, the log and any delivery report, so nothing in it
    may break a line or a field (a CR there once made every report fail).
    """
    if address == NULL_SENDER:
        return None
    if (problem := _encoding_problem(address, smtputf8)) is not None:
        return problem
    raw = address.encode("utf-8")
    if any(ord(ch) < 32 or ch == "\x7f" for ch in address):
        return "553 5.1.7 Sender address contains control characters"
    if len(raw) > _MAX_ADDRESS:
        return "553 5.1.7 Sender address too long"
    if not address or any(ch.isspace() for ch in address.rpartition("@")[2]):
        return "553 5.1.7 Invalid sender address"
    return None


def _in_networks(ip: str, networks: list[ipaddress.IPv4Network | ipaddress.IPv6Network]
                 ) -> bool:
    try:
        addr = ipaddress.ip_address(ip)
    except ValueError:
        return False
    return any(addr in net for net in networks)


def _protocol(session: RelaySession) -> str:
    """The ``with`` keyword of the Received field (RFC 3848)."""
    if not session.extended_smtp:
        return "SMTP"
    return "ESMTP" + ("S" if session.encrypted else "") + ("A" if session.authenticated
                                                          else "")


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


def prepare_headers(profile_name: str, profile: Profile, mail_from: str, section: bytes,
                    max_addresses: int) -> PolicyResult:
    """Everything done to a header section before it is kept; CPU-bound, so it runs in a
    worker thread. Raises :class:`PolicyRejected` with the reply for the client.

    First what makes the section safe to parse (the size and count of sender fields),
    then 8-bit bytes that are not UTF-8 made UTF-8 (relay.accept.headers.RawMessage.recode_8bit),
    then the profile's sender policy.
    """
    msg = RawMessage(section)
    problem = msg.sender_fields_problem(max_addresses)
    if problem is not None:
        raise PolicyRejected(Reply(552, f"5.6.0 Message refused: {problem}"))
    if not section.isascii() and msg.recode_8bit():
        section = msg.to_bytes()
    return apply_sender_policy(profile_name, profile, mail_from, section)


class _Incoming:
    """One message as it streams in (the :class:`relay.receive.data.Sink`).

    At the end of the header section the header work runs in a worker thread; the result,
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
                self.policy = await asyncio.to_thread(
                    prepare_headers, profile, config.profiles[profile], envelope.mail_from,
                    section, config.server.max_header_addresses)
                rcpts = envelope.rcpt_tos
                header = received_header(
                    client_helo=session.host_name or "", client_ip=session.client_ip,
                    hostname=config.server.hostname, protocol=_protocol(session),
                    message_id=self.id, recipient=rcpts[0] if len(rcpts) == 1 else None,
                    when=dt.datetime.now(dt.UTC))
            self._pending = [header, self.policy.data]
        except PolicyRejected as exc:
            self.refusal = exc.reply
        except Exception:
            with message_context(self.id):
                log.exception("internal error reading the header section: client=%s",
                              session.client_ip)
            self.refusal = Reply(451, "4.3.0 Internal error, try again later")
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
            await asyncio.to_thread(self.writer.write, b"".join(parts), finish=finish)
        except OSError as exc:
            self.failure = exc          # the writer has discarded the file itself
        finally:
            # After the last byte the client only waits for its reply: that comes first.
            self._server.resume_idle_timer(reply_first=finish)

    def discard(self) -> None:
        self.writer.discard()


def _with_id(reply: Reply, mid: str) -> str:
    """The reply for the client, naming the message id unless it already does."""
    if mid in reply.text:
        return reply.as_smtp()
    if reply.ok:
        return Reply(reply.code, f"{reply.text.rstrip()}: queued as {mid}").as_smtp()
    return Reply(reply.code, f"{reply.text.rstrip()} (id {mid})").as_smtp()


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
                return SHUTTING_DOWN
            config = server.settings.config
            ip = session.client_ip
            if not (session.authenticated
                    or _in_networks(ip, config.server.relay_networks)):
                log.warning("relay denied: client=%s sender=%s auth_offered=%s",
                            ip, _path(address), server.offers_auth,
                            extra={"event": "refused", "client": ip, "sender": address})
                if server.offers_auth:
                    return "530 5.7.0 Authentication required"
                return f"554 5.7.1 Relay access denied for {ip}"
            problem = sender_problem(address, envelope.smtp_utf8)
            if problem is not None:
                log.info("sender refused: client=%s reply=%s", ip, problem)
                return problem
            try:
                profile_name = server.settings.router.select(
                    user=session.user, sender=address, client_ip=ip)
            except Unroutable as exc:
                log.warning("unroutable: client=%s user=%s sender=%s reply=%s",
                            ip, session.user, _path(address), exc.reply,
                            extra={"event": "refused", "client": ip, "user": session.user,
                                   "sender": address, "reply": str(exc.reply)})
                return exc.reply.as_smtp()
            try:
                check_envelope_sender(profile_name, config.profiles[profile_name], address)
            except PolicyRejected as exc:
                log.warning("sender refused: client=%s user=%s profile=%s sender=%s reply=%s",
                            ip, session.user, profile_name, _path(address), exc.reply,
                            extra={"event": "refused", "client": ip, "user": session.user,
                                   "profile": profile_name, "sender": address,
                                   "reply": str(exc.reply)})
                return exc.reply.as_smtp()
            envelope.id = mid
            envelope.profile = profile_name
            envelope.mail_from = address
            envelope.mail_options.extend(mail_options)
            log.debug("sender accepted: client=%s sender=%s profile=%s",
                      ip, _path(address), profile_name)
            return "250 2.1.0 Sender OK"

    @_guarded
    async def handle_RCPT(self, server: RelaySMTP, session: RelaySession,
                          envelope: RelayEnvelope, address: str,
                          rcpt_options: list[str]) -> str:
        with message_context(envelope.id or "-"):
            problem = address_problem(address, envelope.smtp_utf8)
            if problem is not None:
                log.info("recipient refused: client=%s rcpt=<%s> reply=%s",
                         session.client_ip, address, problem)
                return problem
            folded = address.casefold()
            if any(r.casefold() == folded for r in envelope.rcpt_tos):
                return "250 2.1.5 Recipient OK"     # once is enough
            limit = server.settings.config.server.max_recipients
            if len(envelope.rcpt_tos) >= limit:
                log.info("too many recipients: client=%s limit=%d", session.client_ip, limit)
                return "452 4.5.3 Too many recipients"
            envelope.rcpt_tos.append(address)
            envelope.rcpt_options.extend(rcpt_options)
            return "250 2.1.5 Recipient OK"

    # --- DATA: begin_data, then the sink (_Incoming) as it streams, then end_data -----------

    def begin_data(self, server: RelaySMTP, session: RelaySession,
                   envelope: RelayEnvelope) -> _Incoming:
        """Where this transaction's message goes while it streams in (see _Incoming)."""
        mid = envelope.id or new_message_id()
        envelope.id = mid
        return _Incoming(server, session, envelope, self._writer(mid))

    async def end_data(self, server: RelaySMTP, session: RelaySession,
                       envelope: RelayEnvelope, incoming: _Incoming,
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
                return internal_error(mid)

    async def _end_data(self, server: RelaySMTP, session: RelaySession,
                        envelope: RelayEnvelope, incoming: _Incoming,
                        received: Received) -> str:
        mid = incoming.id
        refusal = received.refusal or (incoming.refusal.as_smtp() if incoming.refusal
                                       else None)
        if refusal is not None:
            incoming.discard()
            last_line = refusal.split("\r\n")[-1]
            log.warning("message refused: client=%s user=%s sender=%s size=%d reply=%s",
                        session.client_ip, session.user, _path(envelope.mail_from or ""),
                        received.size, last_line,
                        extra={"event": "refused", "client": session.client_ip,
                               "user": session.user, "profile": envelope.profile,
                               "sender": envelope.mail_from, "size": received.size,
                               "reply": last_line})
            return refusal
        if incoming.failure is not None:
            exc = incoming.failure
            log.error("cannot spool the message: %s", exc.strerror or exc)
            if exc.errno in (errno.ENOSPC, errno.EDQUOT):
                return _with_id(STORAGE_FULL, mid)
            return _with_id(Reply(451, "4.3.0 Cannot store the message right now; try "
                                       "again later"), mid)
        policy = incoming.policy
        assert policy is not None and envelope.profile is not None
        config = server.settings.config
        profile_name = envelope.profile
        rcpts = list(envelope.rcpt_tos)
        content = incoming.writer.content()
        outbound = Outbound(
            id=mid, profile=profile_name, mail_from=policy.mail_from, rcpt_tos=rcpts,
            content=content,
            mail_options=_upstream_options(envelope.mail_options, content.size,
                                           received.eight_bit),
            client=session.client_ip, user=session.user,
            mailbox=config.profiles[profile_name].mailbox,
            return_path=envelope.mail_from if policy.mail_from != envelope.mail_from
            else None,
            synchronous=server.listener.synchronous)
        started = time.monotonic()
        reply = await self._submit(server, outbound)
        duration = time.monotonic() - started
        log.info("message: client=%s user=%s profile=%s from=<%s>%s rcpts=%d size=%d "
                 "reply=%s (%.2f s)", session.client_ip, session.user or "-",
                 profile_name, policy.mail_from,
                 f" original_from=<{policy.original_from}>" if policy.original_from else "",
                 len(rcpts), content.size, reply, duration,
                 extra={"event": "received", "client": session.client_ip,
                        "user": session.user, "profile": profile_name,
                        "mailbox": outbound.mailbox, "sender": policy.mail_from,
                        "original_sender": policy.original_from, "rcpts": len(rcpts),
                        "size": content.size, "reply": str(reply),
                        "duration": round(duration, 3)})
        return _with_id(reply, mid)

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
            return Reply(451, "4.3.0 Internal error, try again later")
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
            return "454 4.7.0 TLS not available"
        incident = new_message_id()
        with message_context(incident):
            log.error("internal error in SMTP session: client=%s", client, exc_info=error)
        return internal_error(incident)
