"""One client connection: aiosmtpd's SMTP protocol with the relay's rules built in.

aiosmtpd gives the SMTP state machine; this subclass adds what it has no setting for:
asynchronous password checks (its ``_authenticate`` is synchronous, so AUTH PLAIN and
LOGIN are reimplemented), per-connection decisions (AUTH over plaintext only from
loopback, the connection limit, draining for shutdown), an idle timer that counts bytes
rather than commands (so a slow 30 MB upload is not cut off), deadlines per line and per
session (so a client that trickles bytes cannot hold a connection slot for ever), a
``421`` before any timeout close, and enhanced status codes on the replies aiosmtpd sends
without one.

AUTH is not offered at all when no accounts are configured, and failed logins are
penalised across connections by :mod:`relay.receive.guard` (delays, lockouts).
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import collections
import ipaddress
import logging
import re
import ssl
from dataclasses import dataclass
from typing import Any, AnyStr, Protocol

from aiosmtpd.smtp import SMTP, AuthResult, Envelope, Session, syntax

from relay.accept.route import Router
from relay.config import Config, Listener
from relay.core.net import host_port
from relay.receive.data import DataReader, Limits, MemoryBudget
from relay.receive.guard import AuthGuard, Lockout
from relay.receive.passwords import PasswordVerifier

log = logging.getLogger(__name__)


class _UnknownCommandFilter(logging.Filter):
    """aiosmtpd logs the name of an unknown command at WARNING, a level the relay lets
    through. A client out of step sends its AUTH answers as commands (a printer that does
    not wait for the 334s, after AUTH was refused): that name is a password in clear or
    in base64, so the line goes out without it."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.msg == "%r unrecognised: %s" and isinstance(record.args, tuple):
            record.msg, record.args = "%r unrecognised command (not logged)", record.args[:1]
        return True


logging.getLogger("mail.log").addFilter(_UnknownCommandFilter())

SHUTTING_DOWN = "421 4.3.2 Service shutting down"
TOO_MANY_CONNECTIONS = "421 4.7.0 Too many connections, try again later"
TOO_MANY_CONNECTIONS_FROM_CLIENT = ("421 4.7.0 Too many connections from your address, "
                                    "try again later")
TOO_MANY_AUTH_FAILURES = "421 4.7.0 Too many authentication failures"
# During a lockout (relay.receive.guard): temporary, the password is not even checked.
AUTH_LOCKED_OUT = "454 4.7.0 Too many authentication failures, try again later"
# No users: nothing to log in to. 502 (not implemented), so clients do not retry.
AUTH_NOT_AVAILABLE = "502 5.5.1 AUTH not available: no accounts are configured"
# RFC 4954 6: the client's answer is longer than the mechanism's buffer.
AUTH_LINE_TOO_LONG = "500 5.5.6 Authentication exchange line is too long"
# The null reverse-path of bounces and receipts, as carried in envelope.mail_from.
NULL_SENDER = "<>"

# aiosmtpd's own replies that lack an enhanced status code (RFC 3463); clients and
# operators read the class from it, so they get one here.
_ENHANCED_REPLIES = {
    "530 Must issue a STARTTLS command first":
        "530 5.7.0 Must issue a STARTTLS command first",
    "552 Error: message size exceeds fixed maximum message size":
        "552 5.3.4 Message size exceeds fixed maximum message size",
    "500 Command line too long": "500 5.5.2 Command line too long",
    "503 Error: send HELO first": "503 5.5.1 Error: send HELO/EHLO first",
    "503 Error: send EHLO first": "503 5.5.1 Error: send EHLO first",
    "503 Error: need MAIL command": "503 5.5.1 Error: need MAIL command",
    "503 Error: need RCPT command": "503 5.5.1 Error: need RCPT command",
    "503 Error: nested MAIL command": "503 5.5.1 Error: nested MAIL command",
    "503 Already authenticated": "503 5.5.1 Already authenticated",
    "250 OK": "250 2.0.0 OK",
}
# The enhanced code for aiosmtpd's other 4xx and 5xx replies (its syntax errors, and
# replies that quote the client); a code not listed gets the class's "other" code, X.0.0.
_ENHANCED_FOR_CODE = {"500": "5.5.2", "501": "5.5.4", "502": "5.5.1", "503": "5.5.1",
                      "504": "5.5.4", "555": "5.5.4", "454": "4.7.0", "530": "5.7.0",
                      "554": "5.7.0"}
_ENHANCED_CODE = re.compile(r"[245]\.\d{1,3}\.\d{1,3}( |$)")
# What a reply line may not hold (RFC 5321 4.2: HT and printable text only), nor can:
# aiosmtpd decodes a command's argument with surrogateescape, and quotes it in some replies
# (VRFY), where its 8-bit bytes that are not UTF-8 would fail to encode.
_REPLY_UNSAFE = re.compile(r"[\x00-\x08\x0a-\x1f\x7f\ud800-\udfff]")
# How long a DATA waits for its share of server.buffer_memory before it is refused.
BUFFER_WAIT = 30.0
NO_BUFFER = "452 4.3.1 Insufficient system resources (too much mail arriving at once); " \
    "try again later"

# Longest user name written to the log; the rest is cut so a client cannot flood it.
_MAX_LOGGED_USER = 64
# Longest line (with CRLF) accepted as an answer in an AUTH exchange. A PLAIN or LOGIN
# answer is a user name and a password: 1.5 kB once decoded is far beyond any real one
# (2048 is also Postfix's line_length_limit), and anything longer is refused before it
# is decoded or checked.
_MAX_AUTH_LINE = 2048


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

    def admit(self, session: RelaySMTP) -> str | None:
        """Register ``session``, or return the 421 reply that refuses it (and log it)."""

    def release(self, session: RelaySMTP) -> None: ...


def client_address(peer: Any) -> str:
    """The client's IP as text, with IPv4-mapped IPv6 (``::ffff:a.b.c.d``) unwrapped."""
    host = peer[0] if isinstance(peer, tuple) and peer else peer
    try:
        ip = ipaddress.ip_address(str(host))
    except ValueError:
        return str(host) or "unknown"
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        return str(ip.ipv4_mapped)
    return str(ip)


def is_loopback(ip: str) -> bool:
    try:
        return ipaddress.ip_address(ip).is_loopback
    except ValueError:
        return False


def _json_user(user: bytes) -> str:
    """A user name as a JSON log field: without the quotes of :func:`loggable_user`."""
    return user[:_MAX_LOGGED_USER].decode("utf-8", errors="backslashreplace")


def loggable_user(user: str | bytes) -> str:
    """A user name as it may appear in a log line: escaped, and cut if very long."""
    if isinstance(user, bytes):
        user = user.decode("utf-8", errors="backslashreplace")
    text = repr(user[:_MAX_LOGGED_USER])
    return text + "..." if len(user) > _MAX_LOGGED_USER else text


def _reply_line(line: str) -> str:
    """One reply line made fit to send: aiosmtpd quotes what the client sent in some
    replies, and a client's NUL, bare CR or undecodable byte must not go back out in one;
    and a 4xx or 5xx gets an enhanced status code if it has none (aiosmtpd's own replies
    to bad syntax)."""
    line = _REPLY_UNSAFE.sub("?", line)
    code = line[:3]
    if code[:1] in "45" and line[3:4] in (" ", "-") and not _ENHANCED_CODE.match(line, 4):
        enhanced = _ENHANCED_FOR_CODE.get(code, f"{code[0]}.0.0")
        line = f"{line[:4]}{enhanced} {line[4:]}"
    return line


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


class RelaySMTP(SMTP):
    """The SMTP protocol for one connection; see the module docstring."""

    session: RelaySession | None
    envelope: RelayEnvelope | None

    def __init__(self, handler: Any, *, settings: Settings, listener: Listener,
                 gate: Gate, loopback_check: Any = is_loopback) -> None:
        server = settings.config.server
        self.settings = settings
        self.listener = listener
        self.client_ip = ""
        self._gate = gate
        self._loopback_check = loopback_check
        self._implicit_tls = listener.tls == "implicit"
        self._refused = False
        self._auth_failures = 0
        self._accounts = bool(settings.config.users)
        self._timer_paused = False
        self._line_timeout = server.line_timeout
        self._session_timeout = server.session_timeout
        # When the line now arriving began (loop time), or None after a complete line.
        self._line_started: float | None = None
        self._line_handle: asyncio.TimerHandle | None = None
        self._session_handle: asyncio.TimerHandle | None = None
        self._session_started = 0.0
        # Time spent with the clocks paused, and when the current pause began.
        self._paused_total = 0.0
        self._paused_at: float | None = None
        # The session deadline passed while the relay was working: close after its reply.
        self._session_expired = False
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
            loop=asyncio.get_running_loop(),
        )

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
                transport.write(refusal.encode("ascii") + b"\r\n")  # type: ignore[attr-defined]
                transport.close()
                return
            # AUTH over plaintext only from this machine; over TLS from anywhere. A
            # listener that requires STARTTLS does not offer AUTH before it.
            self._auth_require_tls = not self._implicit_tls and (
                bool(self.require_starttls) or not self._loopback_check(self.client_ip))
            log.debug("connection: client=%s listener=%s", self.client_ip,
                      host_port(self.listener.address, self.listener.port))
            # Counted from the first connection_made only: STARTTLS gives no new budget.
            self._session_started = self.loop.time()
            self._session_handle = self.loop.call_later(self._session_timeout,
                                                        self._session_deadline)
        # aiosmtpd drops unread plaintext at STARTTLS: no line is in progress any more.
        self._line_started = None
        super().connection_made(transport)
        # Called again after STARTTLS with a fresh session (RFC 3207 4.2): set it up anew.
        assert self.session is not None
        self.session.client_ip = self.client_ip
        self.session.encrypted = self._implicit_tls or self._tls_protocol is not None

    def connection_lost(self, error: Exception | None) -> None:
        if self._refused:
            return
        self._gate.release(self)
        for handle in (self._line_handle, self._session_handle):
            if handle is not None:
                handle.cancel()
        super().connection_lost(error)

    def eof_received(self) -> bool | None:
        if self._refused:
            return False
        return super().eof_received()

    def data_received(self, data: bytes) -> None:
        if self._refused:
            return
        # Any bytes from the client count as activity, also in the middle of DATA.
        if not self._timer_paused and self._timeout_handle is not None:
            self._reset_timeout()
        self._track_line(data)
        super().data_received(data)

    # --- timeouts --------------------------------------------------------------------------
    # idle_timeout: silence (any byte resets it). line_timeout: one line, once begun, must
    # be complete in this time whatever the pace of its bytes (Postfix's per-record
    # deadline, Exim's smtp_receive_timeout). session_timeout: the whole connection. The
    # relay's own working time (pause_idle_timer) never counts against the client.

    def _track_line(self, data: bytes) -> None:
        """Note when the line being received began, and arm the line deadline for it."""
        if not data:
            return
        if data.endswith(b"\n"):
            self._line_started = None
        elif self._line_started is None or b"\n" in data:
            self._line_started = self.loop.time()
            if self._line_handle is None:
                self._line_handle = self.loop.call_later(self._line_timeout,
                                                         self._line_deadline)

    def _line_deadline(self) -> None:
        # One timer per session, re-armed for the line now in progress rather than
        # cancelled and created for every line of a large DATA.
        self._line_handle = None
        if self._line_started is None or self.transport is None:
            return
        remaining = self._line_started + self._line_timeout - self.loop.time()
        if self._timer_paused or remaining > 0:
            delay = self._line_timeout if self._timer_paused else remaining
            self._line_handle = self.loop.call_later(delay, self._line_deadline)
            return
        self._timed_out("line timeout", logging.WARNING)

    def _session_left(self) -> float:
        """Seconds of the session budget left; time the clocks were paused is free."""
        now = self.loop.time()
        paused = self._paused_total
        if self._paused_at is not None:
            paused += now - self._paused_at
        return self._session_started + self._session_timeout + paused - now

    def _session_deadline(self) -> None:
        self._session_handle = None
        if self.transport is None or self._timer_paused:
            return                                  # resume_idle_timer re-arms it
        left = self._session_left()
        if left > 0:
            self._session_handle = self.loop.call_later(left, self._session_deadline)
            return
        self._timed_out("session timeout", logging.WARNING)

    def _timed_out(self, what: str, level: int) -> None:
        """Say 421 (RFC 5321 4.5.3.2 lets the server close on a timeout) and close."""
        if self.transport is None or self.transport.is_closing():
            return
        log.log(level, "%s: client=%s", what, self.client_ip)
        self._writer.write(f"421 4.4.2 {self.hostname} Error: timeout exceeded\r\n"
                           .encode("ascii", errors="replace"))
        self.transport.close()

    def _timeout_cb(self) -> None:
        if self.transport is None:
            return
        self._timed_out("idle timeout", logging.INFO)
        super()._timeout_cb()

    def pause_idle_timer(self) -> None:
        """Stop the client's clocks while the relay, not the client, is the one working."""
        self._timer_paused = True
        self._paused_at = self.loop.time()
        if self._timeout_handle is not None:
            self._timeout_handle.cancel()

    def resume_idle_timer(self, *, reply_first: bool = True) -> None:
        """Restart the clocks. ``reply_first``: the relay was handing a message over, so
        if the session deadline passed meanwhile, the reply to it still goes out before
        the 421; otherwise (work in the middle of DATA) the deadline takes effect now."""
        now = self.loop.time()
        if self._paused_at is not None:
            self._paused_total += now - self._paused_at
            self._paused_at = None
        self._timer_paused = False
        if self._line_started is not None:
            # A line the client began while waiting for the relay gets a full budget.
            self._line_started = now
        if self.transport is None:
            return
        self._reset_timeout()
        if self._session_handle is None and not self._session_expired:
            left = self._session_left()
            if left > 0 or not reply_first:
                self._session_handle = self.loop.call_later(max(0.0, left),
                                                            self._session_deadline)
            else:
                # Due at the very moment the hand-over began: the reply to the message
                # comes first (cutting it off would make the client send it again),
                # then push() closes.
                self._session_expired = True

    @property
    def idle(self) -> bool:
        """True between transactions, when closing loses nothing the client sent."""
        return self.envelope is None or self.envelope.mail_from is None

    @property
    def handler_task(self) -> asyncio.Task[None] | None:
        return self._handler_coroutine

    def shut(self, reply: str = SHUTTING_DOWN) -> None:
        """Say ``reply`` (a 421) and close, whatever the session is doing."""
        if self._refused or self.transport is None:
            return
        if not self.transport.is_closing():
            log.debug("closing session: client=%s reply=%s", self.client_ip, reply)
            self._writer.write(reply.encode("ascii") + b"\r\n")
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
        # aiosmtpd refuses MAIL FROM:<> (an empty address is a syntax error to it), but
        # apps send receipts and bounces that way. It is carried as "<>", which routing
        # and the sender policy read as the null sender; as a recipient it fails the
        # address check.
        stripped = arg.lstrip()
        if stripped.startswith("<>"):
            return NULL_SENDER, stripped[2:]
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
            status = _ENHANCED_REPLIES.get(status, status)
            # A multi-line reply comes as one string (an upstream's, passed on).
            status = "\r\n".join(_reply_line(line) for line in status.split("\r\n"))
        await super().push(status)
        code = status[:3] if isinstance(status, str) else status[:3].decode("ascii", "replace")
        if code == "421" and self.transport is not None:
            # 421 means the server closes the channel (RFC 5321 3.8).
            self.transport.close()
        elif self._session_expired and not self._timer_paused:
            # The reply to the message handed over when the session deadline passed.
            self._timed_out("session timeout", logging.WARNING)

    async def handle_exception(self, error: Exception) -> str:
        # The handler's version also gets the session, to log the client with the error.
        status: str = await self.event_handler.handle_exception(error, self)
        return status

    # --- DATA ------------------------------------------------------------------------------

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
            await self.push("503 5.5.1 Error: need RCPT command")
            return
        if arg:
            await self.push("501 5.5.4 Syntax: DATA")
            return
        handler = self.event_handler
        limits = Limits.of(self.settings.config.server)
        async with self._gate.budget.share(limits.reservation, wait=BUFFER_WAIT) as granted:
            if not granted:
                log.warning("DATA refused, no buffer memory free: client=%s",
                            self.client_ip)
                await self.push(NO_BUFFER)
                return
            incoming = handler.begin_data(self, self.session, self.envelope)
            await self.push("354 End data with <CR><LF>.<CR><LF>")
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

    # --- AUTH ------------------------------------------------------------------------------
    # aiosmtpd offers every attribute named auth_* (of this class and of the handler) as a
    # mechanism, and calls these bound methods with itself as an extra first argument.

    @syntax("AUTH <mechanism>")
    async def smtp_AUTH(self, arg: str) -> None:
        if not self._accounts:
            # Without accounts a login can only fail: say why instead of a 535 that sends
            # the operator looking for a wrong password.
            await self.push(AUTH_NOT_AVAILABLE)
            return
        await super().smtp_AUTH(arg)

    async def auth_PLAIN(self, _: SMTP, args: list[str]) -> AuthResult:
        if len(args) == 1:
            blob = await self._auth_response("PLAIN", b"")
        else:
            blob = await self._decode_initial(args[1])
        if isinstance(blob, AuthResult):
            return blob
        parts = blob.split(b"\x00")
        if len(parts) != 3:
            await self.push("501 5.5.2 Cannot split the AUTH PLAIN response")
            return AuthResult(success=False, handled=True)
        authzid, login, password = parts
        if authzid and authzid != login:
            # Acting for another identity (RFC 4616 authzid) is nobody's right here.
            return await self._failed("PLAIN", login)
        return await self._check("PLAIN", login, password)

    async def auth_LOGIN(self, _: SMTP, args: list[str]) -> AuthResult:
        if len(args) == 1:
            login = await self._auth_response("LOGIN", b"Username:")
        else:
            login = await self._decode_initial(args[1])
        if isinstance(login, AuthResult):
            return login
        password = await self._auth_response("LOGIN", b"Password:", login)
        if isinstance(password, AuthResult):
            return password
        return await self._check("LOGIN", login, password)

    async def _decode_initial(self, text: str) -> bytes | AuthResult:
        """The initial response of the AUTH command, or the result if it is unusable."""
        if text == "=":                     # RFC 4954: an empty initial response
            return b""
        try:
            return base64.b64decode(text, validate=True)
        except (binascii.Error, ValueError):
            await self.push("501 5.5.2 Cannot decode base64")
            return AuthResult(success=False, handled=True)

    async def _auth_response(self, mechanism: str, challenge: bytes, login: bytes = b""
                             ) -> bytes | AuthResult:
        """Send a 334 challenge and return the decoded answer, or the exchange's result.

        aiosmtpd's ``challenge_auth`` logs an undecodable answer, which may well be a
        password typed in clear; this one logs nothing the client sent. ``login`` (known
        once LOGIN has its user name) is only for the log line of a failure.
        """
        await self.push(b"334 " + base64.b64encode(challenge))
        line = await self._read_auth_line()
        if line is None:
            # A failed attempt like a wrong password: it counts towards
            # max_auth_failures and gets the log line fail2ban reads.
            return await self._failed(mechanism, login, reply=AUTH_LINE_TOO_LONG,
                                      reason="answer line too long")
        blob = line.strip()
        if blob == b"*":
            await self.push("501 5.7.0 Authentication aborted")
            return AuthResult(success=False, handled=True)
        try:
            return base64.b64decode(blob, validate=True)
        except (binascii.Error, ValueError):
            await self.push("501 5.5.2 Cannot decode base64")
            return AuthResult(success=False, handled=True)

    async def _read_auth_line(self) -> bytes | None:
        """One line of the client's, or None if longer than ``_MAX_AUTH_LINE``.

        ``StreamReader.readline`` raises on a line beyond the stream limit and, if its end
        has not arrived yet, leaves the rest to be read as the next command. Like
        aiosmtpd's command loop, this reads and drops an over-long line up to and
        including its LF, so the session stays in step with the client.
        """
        too_long = False
        while True:
            try:
                line = await self._reader.readuntil(b"\n")
            except asyncio.LimitOverrunError as exc:
                await self._reader.read(exc.consumed)       # no LF within the limit
                too_long = True
                continue
            except asyncio.IncompleteReadError as exc:      # EOF: readline's behaviour
                line = exc.partial
            break
        if too_long or len(line) > _MAX_AUTH_LINE:
            return None
        return line

    async def _check(self, mechanism: str, login: bytes, password: bytes) -> AuthResult:
        if (lock := self._gate.guard.lockout(self.client_ip, login)) is not None:
            return await self._locked_out(mechanism, login, lock)
        try:
            user = login.decode("utf-8")
        except UnicodeDecodeError:
            return await self._failed(mechanism, login)
        if not user or not await self.settings.verifier.verify(user, password):
            return await self._failed(mechanism, login)
        if (lock := self._gate.guard.lockout(self.client_ip, login)) is not None:
            # Locked while the password was being checked (by this client's attempts on
            # other connections): a lockout ends guessing, a right guess included.
            return await self._locked_out(mechanism, login, lock)
        assert self.session is not None
        self.session.user = user
        self._gate.guard.succeeded(self.client_ip, user)
        log.info("AUTH %s ok: client=%s user=%s", mechanism, self.client_ip,
                 loggable_user(user))
        return AuthResult(success=True, auth_data=user)

    async def _failed(self, mechanism: str, login: bytes, *, reply: str | None = None,
                      reason: str | None = None) -> AuthResult:
        """Count a failed attempt and hold its reply for the penalty delay; the reply is
        ``reply`` or aiosmtpd's 535 5.7.8."""
        guard = self._gate.guard
        if (lock := guard.lockout(self.client_ip, login)) is not None:
            # Locked meanwhile (attempts in parallel): answered like any attempt now.
            return await self._locked_out(mechanism, login, lock)
        self._auth_failures += 1
        failure = guard.failed(self.client_ip, login)
        # One line per failure with the client address, for fail2ban and the like.
        log.warning("AUTH %s failed: client=%s user=%s%s", mechanism, self.client_ip,
                    loggable_user(login), f" reason={reason}" if reason else "",
                    extra={"event": "auth_failed", "client": self.client_ip,
                           "user": _json_user(login), "failures": failure.failures})
        for lock in failure.lockouts:
            self._log_lockout(lock, login)
        # Off the event loop's critical path: only this session waits.
        await asyncio.sleep(failure.delay)
        if self._auth_failures >= self.settings.config.server.max_auth_failures:
            log.warning("too many AUTH failures, closing: client=%s failures=%d",
                        self.client_ip, self._auth_failures)
            await self.push(TOO_MANY_AUTH_FAILURES)
            return AuthResult(success=False, handled=True)
        return AuthResult(success=False, handled=False, message=reply)

    def _log_lockout(self, lock: Lockout, login: bytes) -> None:
        """The one line a lockout gets (attempts refused during it are logged at DEBUG)."""
        duration = self._gate.guard.settings.lockout
        if lock.scope == "client":
            where = f" network={lock.key}" if lock.key != self.client_ip else ""
            log.warning("AUTH lockout of client: client=%s%s failures=%d lockout=%gs",
                        self.client_ip, where, lock.failures, duration,
                        extra={"event": "auth_lockout", "scope": "client",
                               "client": self.client_ip, "key": lock.key,
                               "failures": lock.failures, "lockout": duration})
        else:
            log.warning("AUTH lockout of user: client=%s user=%s failures=%d lockout=%gs",
                        self.client_ip, loggable_user(login), lock.failures, duration,
                        extra={"event": "auth_lockout", "scope": "user",
                               "client": self.client_ip, "user": _json_user(login),
                               "failures": lock.failures, "lockout": duration})

    async def _locked_out(self, mechanism: str, login: bytes, lock: Lockout) -> AuthResult:
        """Refuse an attempt during a lockout, without looking at its password.

        It counts towards max_auth_failures, so a connection cannot hammer away for ever,
        and waits the base delay, so that hammering is slow.
        """
        self._auth_failures += 1
        log.debug("AUTH %s refused during lockout: client=%s user=%s scope=%s",
                  mechanism, self.client_ip, loggable_user(login), lock.scope)
        await asyncio.sleep(self._gate.guard.settings.delay)
        if self._auth_failures >= self.settings.config.server.max_auth_failures:
            await self.push(TOO_MANY_AUTH_FAILURES)
            return AuthResult(success=False, handled=True)
        return AuthResult(success=False, handled=False, message=AUTH_LOCKED_OUT)
