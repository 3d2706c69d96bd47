"""What the relay does with each SMTP transaction: who may send, through which mailbox,
and how an accepted message is handed on.

The envelope is the truth: recipients come from RCPT TO only (Bcc-only recipients are
delivered), the message bytes are kept as received apart from the sender policy's
rewrite and one prepended ``Received:`` field. Every failure of the relay's own making
becomes a 4xx with the message id, so the client keeps the message and the operator can
find the traceback in the log.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import functools
import ipaddress
import logging
import time
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

from aiosmtpd.smtp import TLSSetupException

from relay.headers import received_header
from relay.log import message_context
from relay.message import Outbound, Reply, new_message_id
from relay.policy import PolicyRejected, apply_sender_policy, check_envelope_sender
from relay.receive.session import (
    NULL_SENDER,
    SHUTTING_DOWN,
    RelayEnvelope,
    RelaySession,
    RelaySMTP,
)
from relay.route import Unroutable

log = logging.getLogger(__name__)

Submit = Callable[[Outbound], Awaitable[Reply]]
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


def address_problem(address: str, smtputf8: bool) -> str | None:
    """Why ``address`` cannot be a recipient, or None if it can (a mailbox@domain)."""
    try:
        raw = address.encode("utf-8")
    except UnicodeEncodeError:
        return "553 5.6.7 Address is not valid UTF-8"
    if not address.isascii() and not smtputf8:
        return "553 5.6.7 Non-ASCII address requires the SMTPUTF8 parameter on MAIL FROM"
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


def _upstream_options(options: list[str], data: bytes) -> list[str]:
    """MAIL FROM parameters to pass on, true to the bytes that will actually be sent.

    SIZE is corrected for the added header (and any rewrite). A legacy app that sends
    8-bit text without declaring BODY=8BITMIME gets it declared, so the upstream does
    not have to guess.
    """
    out = [opt for opt in options if not opt.startswith("SIZE=")]
    if len(out) != len(options):
        out.append(f"SIZE={len(data)}")
    if not data.isascii() and not any(opt.startswith("BODY=") for opt in out):
        out.append("BODY=8BITMIME")
    return out


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
    that a client that disconnects (or a shutdown) does not cancel a half-done submission.
    """

    def __init__(self, spawn: Callable[[Outbound], asyncio.Task[Reply]]) -> None:
        self._spawn = spawn

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
            try:
                address.encode("utf-8")
            except UnicodeEncodeError:
                return "553 5.6.7 Address is not valid UTF-8"
            if not address.isascii() and not envelope.smtp_utf8:
                return ("553 5.6.7 Non-ASCII address requires the SMTPUTF8 parameter "
                        "on MAIL FROM")
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

    @_guarded
    async def handle_DATA(self, server: RelaySMTP, session: RelaySession,
                          envelope: RelayEnvelope) -> str:
        mid = envelope.id or new_message_id()
        envelope.id = mid
        with message_context(mid):
            config = server.settings.config
            assert envelope.profile is not None and envelope.mail_from is not None
            profile_name = envelope.profile
            received = envelope.original_content or b""
            try:
                policy = apply_sender_policy(profile_name, config.profiles[profile_name],
                                             envelope.mail_from, received)
            except PolicyRejected as exc:
                log.warning("message refused by sender policy: client=%s user=%s "
                            "profile=%s sender=%s reply=%s", session.client_ip,
                            session.user, profile_name, _path(envelope.mail_from), exc.reply,
                            extra={"event": "refused", "client": session.client_ip,
                                   "user": session.user, "profile": profile_name,
                                   "sender": envelope.mail_from, "reply": str(exc.reply)})
                return exc.reply.as_smtp()
            rcpts = list(envelope.rcpt_tos)
            header = received_header(
                client_helo=session.host_name or "", client_ip=session.client_ip,
                hostname=config.server.hostname, protocol=_protocol(session),
                message_id=mid, recipient=rcpts[0] if len(rcpts) == 1 else None,
                when=dt.datetime.now(dt.UTC))
            data = header + policy.data
            outbound = Outbound(
                id=mid, profile=profile_name, mail_from=policy.mail_from, rcpt_tos=rcpts,
                data=data, mail_options=_upstream_options(envelope.mail_options, data),
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
                     len(rcpts), len(data), reply, duration,
                     extra={"event": "received", "client": session.client_ip,
                            "user": session.user, "profile": profile_name,
                            "mailbox": outbound.mailbox, "sender": policy.mail_from,
                            "original_sender": policy.original_from, "rcpts": len(rcpts),
                            "size": len(data), "reply": str(reply),
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
