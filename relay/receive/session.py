"""One client connection: aiosmtpd's SMTP protocol with the relay's rules built in.

- :class:`RelaySMTP`: the protocol of one connection;
- :class:`Settings`: what a new session gets (config, router, verifier, TLS), swapped as
  one piece on reload;
- :class:`Gate`: what the receiver gives every session (admission, shared limits);
- :class:`RelaySession`, :class:`RelayEnvelope`: aiosmtpd's session and envelope plus who
  the client is and what was decided at MAIL FROM.

aiosmtpd gives the SMTP state machine; the relay adds what it has no setting for:
asynchronous password checks (:mod:`relay.receive.auth`), per-connection decisions (AUTH
over plaintext only from loopback, the connection limits, draining for shutdown), an idle
timer that counts bytes rather than commands (so a slow 30 MB upload is not cut off),
deadlines per line and per session (:mod:`relay.receive.clocks`), a ``421`` before any
timeout close, DATA streamed to the spool (:mod:`relay.receive.data`), and enhanced status
codes on the replies aiosmtpd sends without one (:mod:`relay.receive.replies`). What it
relies on inside aiosmtpd is checked by tests/test_library_contract.py.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import re
import ssl
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, AnyStr, Protocol

from aiosmtpd.smtp import SMTP, Envelope, Session, syntax

from relay.accept.route import Router
from relay.config import Config, Listener
from relay.core.addrspec import PLAIN_DOMAIN, PLAIN_LOCAL
from relay.core.net import host_port
from relay.core.reply import Reply
from relay.receive import replies
from relay.receive.addresses import NULL_SENDER, client_address, is_loopback
from relay.receive.auth import AuthSMTP
from relay.receive.budget import MemoryBudget
from relay.receive.clocks import Clocks
from relay.receive.data import DataReader, Limits
from relay.receive.guard import AuthGuard
from relay.receive.idletimer import LazyIdleTimer
from relay.receive.passwords import PasswordVerifier
from relay.receive.setuponce import CommandTable
from relay.receive.setuponce import install as _setup_once

log = logging.getLogger(__name__)

# How long a DATA waits for its share of server.buffer_memory before it is refused.
BUFFER_WAIT = 30.0


_setup_once()

# <local@domain> with a dot-atom local part and a domain of plain labels (RFC 5321 4.1.2),
# then the parameters: anything else (quoting, literals, comments, UTF-8) goes the long way.
_PLAIN_PATH = re.compile(rf"<(?P<address>{PLAIN_LOCAL}@{PLAIN_DOMAIN})>[ \t]*(?P<rest>.*)",
                         re.DOTALL)



@dataclass(frozen=True)
class Settings:
    """Everything a new session needs, swapped as one piece on reload.

    A session keeps the settings it started with, so a reload never changes the rules
    in the middle of a transaction.
    """

    config: Config
    router: Router
    verifier: PasswordVerifier
    tls: ssl.SSLContext | None


class Gate(Protocol):
    """Admission of connections, owned by the receiver (shared by all listeners)."""

    @property
    def draining(self) -> bool: ...

    @property
    def budget(self) -> MemoryBudget:
        """Memory for message data, shared by all sessions (see relay.receive.data)."""

    @property
    def guard(self) -> AuthGuard:
        """Failed-AUTH counters shared by all sessions."""

    def admit(self, session: RelaySMTP) -> Reply | None:
        """Register ``session``, or return the 421 reply that refuses it (and log it)."""

    def release(self, session: RelaySMTP) -> None: ...


class RelaySession(Session):
    """aiosmtpd's session plus who the client is and what it proved."""

    # A plain attribute shadows aiosmtpd's deprecated ``login_data`` property, which
    # logs a warning on every successful AUTH.
    login_data: Any = None

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        super().__init__(loop)
        self.client_ip = ""
        self.user: str | None = None
        self.encrypted = False


class RelayEnvelope(Envelope):
    """aiosmtpd's envelope plus the message id and the profile chosen at MAIL FROM."""

    def __init__(self) -> None:
        super().__init__()
        self.id: str | None = None
        self.profile: str | None = None


# aiosmtpd types its command table as a dict; CommandTable's is a read-only mapping,
# which is all aiosmtpd does with it (tests/test_library_contract.py).
class RelaySMTP(LazyIdleTimer, CommandTable, AuthSMTP):  # type: ignore[misc]
    """The SMTP protocol for one connection; see the module docstring."""

    session: RelaySession | None
    envelope: RelayEnvelope | None

    def __init__(self, handler: Any, *, settings: Settings, listener: Listener,
                 gate: Gate, loopback_check: Callable[[str], bool] = is_loopback) -> None:
        server = settings.config.server
        self.settings = settings
        self.listener = listener
        self.client_ip = ""
        self._gate = gate
        self._loopback_check = loopback_check
        self._implicit_tls = listener.tls == "implicit"
        self._refused, self._auth_failures = False, 0
        self._held: list[str] = []          # the lines of a multi-line reply so far
        self._accounts = bool(settings.config.users)
        loop = asyncio.get_running_loop()
        self._clocks = Clocks(loop, line_timeout=server.line_timeout,
                              session_timeout=server.session_timeout,
                              expire=self._expired, alive=lambda: self.transport is not None)
        # Both are read by SMTP.__init__: the limit sizes the StreamReader, and the
        # class-level dict of command sizes would otherwise be shared (and grown by
        # every EHLO) across all connections.
        self.line_length_limit = server.max_line_length + 1   # + a stuffed leading dot
        self.command_size_limits = collections.defaultdict(lambda: SMTP.command_size_limit)
        starttls = listener.tls == "starttls" and settings.tls is not None
        super().__init__(
            handler,
            data_size_limit=server.max_message_size,
            enable_SMTPUTF8=True,
            decode_data=False,
            hostname=server.hostname,
            ident="ESMTP ready",
            tls_context=settings.tls if starttls else None,
            require_starttls=starttls and listener.require_tls,
            timeout=server.idle_timeout,
            auth_require_tls=True,
            loop=loop,
        )

    # What AuthSMTP needs of the session.

    @property
    def _guard(self) -> AuthGuard:
        return self._gate.guard

    @property
    def _verifier(self) -> PasswordVerifier:
        return self.settings.verifier

    @property
    def _max_auth_failures(self) -> int:
        return self.settings.config.server.max_auth_failures

    def _logged_in(self, user: str) -> None:
        assert self.session is not None
        self.session.user = user

    # --- connection life cycle -----------------------------------------------------------

    def _create_session(self) -> RelaySession:
        return RelaySession(self.loop)

    def _create_envelope(self) -> RelayEnvelope:
        return RelayEnvelope()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        first = self.transport is None and self._original_transport is None
        if first:
            self.client_ip = client_address(transport.get_extra_info("peername"))
            refusal = self._gate.admit(self)
            if refusal is not None:
                # No session: no banner, no handler task, nothing to clean up later.
                self._refused = True
                transport.write(  # type: ignore[attr-defined]
                    refusal.as_smtp().encode("ascii") + b"\r\n")
                transport.close()
                return
            # AUTH over plaintext only from this machine; over TLS from anywhere. A
            # listener that requires STARTTLS does not offer AUTH before it.
            self._auth_require_tls = not self._implicit_tls and (
                bool(self.require_starttls) or not self._loopback_check(self.client_ip))
            log.debug("connection: client=%s listener=%s", self.client_ip,
                      host_port(self.listener.address, self.listener.port))
            self._clocks.start()
        self._clocks.new_stream()
        super().connection_made(transport)
        # Called again after STARTTLS with a fresh session (RFC 3207 4.2): set it up anew.
        assert self.session is not None
        self.session.client_ip = self.client_ip
        self.session.encrypted = self._implicit_tls or self._tls_protocol is not None

    def connection_lost(self, error: Exception | None) -> None:
        if self._refused:
            return
        self._gate.release(self)
        self._clocks.close()
        super().connection_lost(error)

    def eof_received(self) -> bool | None:
        if self._refused:
            return False
        return super().eof_received()

    def data_received(self, data: bytes) -> None:
        if self._refused:
            return
        # Any bytes from the client count as activity, also in the middle of DATA.
        if not self._clocks.paused and self._timeout_handle is not None:
            self._reset_timeout()
        self._clocks.track(data)
        super().data_received(data)

    # --- timeouts: aiosmtpd's idle timer, and the deadlines of relay.receive.clocks -----

    def _expired(self, what: str) -> None:
        self._timed_out(what, logging.WARNING)

    def _timed_out(self, what: str, level: int) -> None:
        """Say 421 (RFC 5321 4.5.3.2 lets the server close on a timeout) and close."""
        if self.transport is None or self.transport.is_closing():
            return
        log.log(level, "%s: client=%s", what, self.client_ip)
        self._writer.write(replies.timeout(self.hostname).as_smtp()
                           .encode("ascii", errors="replace") + b"\r\n")
        self.transport.close()

    def _timeout_cb(self) -> None:
        if self.transport is None:
            return
        self._timed_out("idle timeout", logging.INFO)
        super()._timeout_cb()

    def pause_idle_timer(self) -> None:
        """Stop the client's clocks while the relay, not the client, is the one working."""
        self._clocks.pause()
        if self._timeout_handle is not None:
            self._timeout_handle.cancel()

    def resume_idle_timer(self, *, reply_first: bool = True) -> None:
        """Restart the clocks; ``reply_first``: see :meth:`Clocks.resume`."""
        self._clocks.resume(reply_first=reply_first)
        if self.transport is not None:
            self._reset_timeout()

    @property
    def idle(self) -> bool:
        """True between transactions, when closing loses nothing the client sent."""
        return self.envelope is None or self.envelope.mail_from is None

    @property
    def handler_task(self) -> asyncio.Task[None] | None:
        return self._handler_coroutine

    def shut(self, reply: Reply = replies.SHUTTING_DOWN) -> None:
        """Say ``reply`` (a 421) and close, whatever the session is doing."""
        if self._refused or self.transport is None:
            return
        if not self.transport.is_closing():
            log.debug("closing session: client=%s reply=%s", self.client_ip, reply)
            self._writer.write(reply.as_smtp().encode("ascii") + b"\r\n")
            self.transport.close()
        if self._handler_coroutine is not None:
            self._handler_coroutine.cancel()

    @property
    def draining(self) -> bool:
        return self._gate.draining

    @property
    def offers_auth(self) -> bool:
        return self._accounts and (not self._auth_require_tls
                                   or self._tls_protocol is not None)

    def _getaddr(self, arg: str) -> tuple[str | None, str | None]:
        # aiosmtpd refuses MAIL FROM:<>, which apps send receipts and bounces with. It is
        # carried as "<>", the null sender to routing and the sender policy (and a failed
        # address check as a recipient).
        stripped = arg.lstrip()
        if stripped.startswith("<>"):
            return NULL_SENDER, stripped[2:]
        if (m := _PLAIN_PATH.match(arg)) is not None and not m["rest"].startswith("("):
            # What nearly every client sends, read without the email package's parser
            # (aiosmtpd's way costs a class definition and a token tree per address).
            # The result is the same: tests/test_library_contract.py compares the two.
            local = m["address"].rpartition("@")[0]
            if self.local_part_limit and len(local) > self.local_part_limit:
                return None, None
            return m["address"], m["rest"]
        try:
            address, rest = super()._getaddr(arg)
        except (IndexError, ValueError):
            # The email package's address parser, which aiosmtpd uses, fails this way on
            # some input (``VRFY \0@``) instead of with the HeaderParseError aiosmtpd
            # expects: a syntax error like any other.
            return None, None
        return address, rest

    # --- replies ---------------------------------------------------------------------------

    async def push(self, status: AnyStr) -> None:
        if isinstance(status, str):
            if not self._accounts and status.startswith("250-AUTH "):
                return                  # aiosmtpd's EHLO line; there are no accounts
            status = replies.fit_reply(status)
            if status.rpartition("\r\n")[2][3:4] == "-":
                # aiosmtpd pushes EHLO's reply a line at a time: one write and TCP
                # segment each, unless held back to leave with the last line.
                self._held.append(status)
                return
            if self._held:
                status, self._held = "\r\n".join([*self._held, status]), []
        await super().push(status)
        code = status[:3] if isinstance(status, str) else status[:3].decode("ascii", "replace")
        if code == "421" and self.transport is not None:
            # 421 means the server closes the channel (RFC 5321 3.8).
            self.transport.close()
        elif self._clocks.expired and not self._clocks.paused:
            # The reply to the message handed over when the session deadline passed.
            self._timed_out("session timeout", logging.WARNING)

    async def handle_exception(self, error: Exception) -> str:
        # The handler's version also gets the session, to log the client with the error.
        status: str = await self.event_handler.handle_exception(error, self)
        return status

    # --- DATA ------------------------------------------------------------------------------

    @syntax("DATA")      # aiosmtpd's own, which HELP reads
    async def smtp_DATA(self, arg: str) -> None:
        """DATA streamed to the spool (relay.receive.data) instead of aiosmtpd's version,
        which collects the whole message in memory before its handler sees it.

        The message's share of ``server.buffer_memory`` is taken before the 354 and given
        back once the last byte is written; the reply comes after the hand-over.
        """
        if await self.check_helo_needed():
            return
        if await self.check_auth_needed("DATA"):
            return
        assert self.session is not None and self.envelope is not None
        if not self.envelope.rcpt_tos:
            await self._push_reply(replies.NEED_RCPT)
            return
        if arg:
            await self._push_reply(replies.DATA_SYNTAX)
            return
        handler = self.event_handler
        limits = Limits.of(self.settings.config.server)
        async with self._gate.budget.share(limits.reservation, wait=BUFFER_WAIT) as granted:
            if not granted:
                log.warning("DATA refused, no buffer memory free: client=%s",
                            self.client_ip)
                await self._push_reply(replies.NO_BUFFER)
                return
            incoming = handler.begin_data(self, self.session, self.envelope)
            await self._push_reply(replies.START_DATA)
            try:
                received = await DataReader(limits).read(self._reader, incoming)
                if received.refusal is None:
                    await incoming.finish(received.tail)
            except BaseException:
                incoming.discard()          # cancelled, or the connection broke
                raise
        status = await handler.end_data(self, self.session, self.envelope, incoming,
                                        received)
        self._set_post_data_state()
        await self.push(status)
