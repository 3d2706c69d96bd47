"""One client connection: aiosmtpd's SMTP protocol with the relay's rules built in.

aiosmtpd gives the SMTP state machine; this subclass adds what it has no setting for:
asynchronous password checks (its ``_authenticate`` is synchronous, so AUTH PLAIN and
LOGIN are reimplemented), per-connection decisions (AUTH over plaintext only from
loopback, the connection limit, draining for shutdown), an idle timer that counts bytes
rather than commands (so a slow 30 MB upload is not cut off), a ``421`` before an idle
close, and enhanced status codes on the replies aiosmtpd sends without one.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import collections
import ipaddress
import logging
import ssl
from dataclasses import dataclass
from typing import Any, AnyStr, Protocol

from aiosmtpd.smtp import SMTP, AuthResult, Envelope, Session

from relay.config import Config, Listener
from relay.passwords import PasswordVerifier
from relay.route import Router

log = logging.getLogger(__name__)

SHUTTING_DOWN = "421 4.3.2 Service shutting down"
TOO_MANY_CONNECTIONS = "421 4.7.0 Too many connections, try again later"
TOO_MANY_AUTH_FAILURES = "421 4.7.0 Too many authentication failures"
# The null reverse-path of bounces and receipts, as carried in envelope.mail_from.
NULL_SENDER = "<>"

# aiosmtpd's own replies that lack an enhanced status code (RFC 3463); clients and
# operators read the class from it, so they get one here.
_ENHANCED_REPLIES = {
    "530 Must issue a STARTTLS command first":
        "530 5.7.0 Must issue a STARTTLS command first",
    "552 Error: message size exceeds fixed maximum message size":
        "552 5.3.4 Message size exceeds fixed maximum message size",
    "552 Error: Too much mail data":
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
_LINE_TOO_LONG = "500 Line too long (see RFC5321 4.5.3.1.6)"
# aiosmtpd's answers to a DATA it refused without calling the handler; logged here, since
# no other line would tell the operator why an app's message was not accepted.
_DATA_REFUSALS = {_LINE_TOO_LONG, "552 Error: Too much mail data",
                  "552 Error: message size exceeds fixed maximum message size"}

# Longest user name written to the log; the rest is cut so a client cannot flood it.
_MAX_LOGGED_USER = 64


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

    def admit(self, session: RelaySMTP) -> str | None:
        """Register ``session``, or return the 421 reply that refuses it."""

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


def loggable_user(user: str | bytes) -> str:
    """A user name as it may appear in a log line: escaped, and cut if very long."""
    if isinstance(user, bytes):
        user = user.decode("utf-8", errors="backslashreplace")
    text = repr(user[:_MAX_LOGGED_USER])
    return text + "..." if len(user) > _MAX_LOGGED_USER else text


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
        self._timer_paused = False
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
                log.warning("connection refused: client=%s reply=%s", self.client_ip, refusal)
                transport.write(refusal.encode("ascii") + b"\r\n")  # type: ignore[attr-defined]
                transport.close()
                return
            # AUTH over plaintext only from this machine; over TLS from anywhere. A
            # listener that requires STARTTLS does not offer AUTH before it.
            self._auth_require_tls = not self._implicit_tls and (
                bool(self.require_starttls) or not self._loopback_check(self.client_ip))
            log.debug("connection: client=%s listener=%s:%d", self.client_ip,
                      self.listener.address, self.listener.port)
        super().connection_made(transport)
        # Called again after STARTTLS with a fresh session (RFC 3207 4.2): set it up anew.
        assert self.session is not None
        self.session.client_ip = self.client_ip
        self.session.encrypted = self._implicit_tls or self._tls_protocol is not None

    def connection_lost(self, error: Exception | None) -> None:
        if self._refused:
            return
        self._gate.release(self)
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
        super().data_received(data)

    def _timeout_cb(self) -> None:
        if self.transport is None:
            return
        if not self.transport.is_closing():
            log.info("idle timeout: client=%s", self.client_ip)
            self._writer.write(f"421 4.4.2 {self.hostname} Error: timeout exceeded\r\n"
                               .encode("ascii", errors="replace"))
        super()._timeout_cb()

    def pause_idle_timer(self) -> None:
        """Stop the idle clock while the relay, not the client, is the one working."""
        self._timer_paused = True
        if self._timeout_handle is not None:
            self._timeout_handle.cancel()

    def resume_idle_timer(self) -> None:
        self._timer_paused = False
        if self.transport is not None:
            self._reset_timeout()

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
        return not self._auth_require_tls or self._tls_protocol is not None

    def _getaddr(self, arg: str) -> tuple[str | None, str | None]:
        # aiosmtpd refuses MAIL FROM:<> (an empty address is a syntax error to it), but
        # apps send receipts and bounces that way. It is carried as "<>", which routing
        # and the sender policy read as the null sender; as a recipient it fails the
        # address check.
        stripped = arg.lstrip()
        if stripped.startswith("<>"):
            return NULL_SENDER, stripped[2:]
        address, rest = super()._getaddr(arg)
        return address, rest

    # --- replies ---------------------------------------------------------------------------

    async def push(self, status: AnyStr) -> None:
        if isinstance(status, str):
            if status in _DATA_REFUSALS:
                log.info("message refused: client=%s reply=%s", self.client_ip, status)
            if status == _LINE_TOO_LONG:
                limit = self.settings.config.server.max_line_length
                status = f"500 5.5.2 Line too long (limit {limit} octets)"
            else:
                status = _ENHANCED_REPLIES.get(status, status)
        await super().push(status)
        code = status[:3] if isinstance(status, str) else status[:3].decode("ascii", "replace")
        if code == "421" and self.transport is not None:
            # 421 means the server closes the channel (RFC 5321 3.8).
            self.transport.close()

    async def handle_exception(self, error: Exception) -> str:
        # The handler's version also gets the session, to log the client with the error.
        status: str = await self.event_handler.handle_exception(error, self)
        return status

    # --- AUTH ------------------------------------------------------------------------------
    # aiosmtpd offers every attribute named auth_* (of this class and of the handler) as a
    # mechanism, and calls these bound methods with itself as an extra first argument.

    async def auth_PLAIN(self, _: SMTP, args: list[str]) -> AuthResult:
        if len(args) == 1:
            blob = await self._auth_response(b"")
            if blob is None:
                return AuthResult(success=False, handled=True)
        else:
            blob = await self._decode_initial(args[1])
            if blob is None:
                return AuthResult(success=False, handled=True)
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
            login = await self._auth_response(b"Username:")
        else:
            login = await self._decode_initial(args[1])
        if login is None:
            return AuthResult(success=False, handled=True)
        password = await self._auth_response(b"Password:")
        if password is None:
            return AuthResult(success=False, handled=True)
        return await self._check("LOGIN", login, password)

    async def _decode_initial(self, text: str) -> bytes | None:
        if text == "=":                     # RFC 4954: an empty initial response
            return b""
        try:
            return base64.b64decode(text, validate=True)
        except (binascii.Error, ValueError):
            await self.push("501 5.5.2 Cannot decode base64")
            return None

    async def _auth_response(self, challenge: bytes) -> bytes | None:
        """Send a 334 challenge and return the decoded answer, or None (already answered).

        aiosmtpd's ``challenge_auth`` logs an undecodable answer, which may well be a
        password typed in clear; this one logs nothing the client sent.
        """
        await self.push(b"334 " + base64.b64encode(challenge))
        line = await self._reader.readline()
        blob = line.strip()
        if blob == b"*":
            await self.push("501 5.7.0 Authentication aborted")
            return None
        try:
            return base64.b64decode(blob, validate=True)
        except (binascii.Error, ValueError):
            await self.push("501 5.5.2 Cannot decode base64")
            return None

    async def _check(self, mechanism: str, login: bytes, password: bytes) -> AuthResult:
        try:
            user = login.decode("utf-8")
        except UnicodeDecodeError:
            return await self._failed(mechanism, login)
        if not user or not await self.settings.verifier.verify(user, password):
            return await self._failed(mechanism, login)
        assert self.session is not None
        self.session.user = user
        log.info("AUTH %s ok: client=%s user=%s", mechanism, self.client_ip,
                 loggable_user(user))
        return AuthResult(success=True, auth_data=user)

    async def _failed(self, mechanism: str, login: bytes) -> AuthResult:
        self._auth_failures += 1
        # One line per failure with the client address, for fail2ban and the like.
        log.warning("AUTH %s failed: client=%s user=%s", mechanism, self.client_ip,
                    loggable_user(login))
        if self._auth_failures >= self.settings.config.server.max_auth_failures:
            log.warning("too many AUTH failures, closing: client=%s failures=%d",
                        self.client_ip, self._auth_failures)
            await self.push(TOO_MANY_AUTH_FAILURES)
            return AuthResult(success=False, handled=True)
        return AuthResult(success=False, handled=False)   # aiosmtpd answers 535 5.7.8
