"""One SMTP session with the upstream: connect, STARTTLS, XOAUTH2 login, then messages.

- :class:`UpstreamSession`: one authenticated session that can carry several messages
  (:meth:`~UpstreamSession.send_one`), with :meth:`~UpstreamSession.check` to prove an idle
  one alive and :attr:`~UpstreamSession.stage` to tell where it broke;
- :class:`HasAccessToken`: what it needs of a token (only the access token);
- :data:`OnAccepted` (from :mod:`relay.deliver.transaction`, which runs each message):
  the callback told which recipients the upstream accepted, the moment its reply to DATA
  arrives.

An upstream with ``service: acs`` (Azure Communication Services) is logged in to with
AUTH LOGIN and the app's client secret instead of XOAUTH2 (see relay.oauth.password).

Two rules shape this module. First, the token is only ever sent over TLS that verified
the server: in ``starttls`` mode a server that does not offer STARTTLS gets no AUTH at
all. Second, only the upstream's own verdict on a message may be permanent: its replies
to MAIL, RCPT and DATA are passed on as given (code and text), while everything about the
path there becomes ``451 4.4.x`` (:mod:`relay.deliver.failures`), so that the sending
application keeps the message and tries again. A rejected login is raised as
:class:`~relay.deliver.failures.AuthenticationRejected`, because the caller (not this
module) decides to fetch a new token and retry. :mod:`relay.deliver.pool` keeps sessions
open per mailbox between messages and reopens them when the token changes (SMTP allows
only one AUTH per session).
"""

from __future__ import annotations

import base64
import functools
import hashlib
import logging
import ssl
from typing import Protocol

from aiosmtplib import (
    SMTPException,
    SMTPResponseException,
)

from relay.config import Upstream
from relay.core.log import redact
from relay.core.message import DeliveryResult, Outbound
from relay.core.net import host_port
from relay.core.reply import Reply
from relay.core.secrets import Secret
from relay.core.text import one_line
from relay.deliver.failures import (
    AuthenticationRejected,
    UpstreamUnavailable,
    path_failure,
    session_refusal,
)
from relay.deliver.pipelining import UpstreamSMTP
from relay.deliver.transaction import OnAccepted, Transaction

log = logging.getLogger(__name__)

_QUIT_TIMEOUT = 5.0
_CHECK_TIMEOUT = 10.0


class HasAccessToken(Protocol):
    """What :mod:`relay.oauth.provider` hands out; only the access token is used here."""

    @property
    def access_token(self) -> Secret: ...


def _digest(token: HasAccessToken) -> bytes:
    return _secret_digest(token.access_token)


@functools.lru_cache(maxsize=8)
def _secret_digest(secret: Secret) -> bytes:
    # The pool asks for every message whether a session was logged in with this token;
    # a token is used for an hour, so its digest is made once.
    return hashlib.sha256(secret.reveal().encode()).digest()


class UpstreamSession:
    """One SMTP session with the upstream: connect, TLS, EHLO, XOAUTH2, then messages."""

    def __init__(self, upstream: Upstream, helo_name: str, tls_context: ssl.SSLContext) -> None:
        self.upstream = upstream
        self.helo_name = helo_name
        self.where = host_port(upstream.host, upstream.port)
        self._tls = tls_context
        self._smtp: UpstreamSMTP | None = None
        self._stage = "connect"
        self.mailbox: str | None = None
        self._token_digest: bytes | None = None

    @property
    def is_open(self) -> bool:
        return self._smtp is not None and self._smtp.is_connected and self.mailbox is not None

    @property
    def stage(self) -> str:
        """The protocol step the session is at, or was at when it broke: a pool can tell
        a connection lost before DATA (safe to retry elsewhere) from one lost during it."""
        return self._stage

    def authenticated_as(self, mailbox: str, token: HasAccessToken) -> bool:
        """True if this open session was logged in as ``mailbox`` with this very token."""
        return (self.is_open and (self.mailbox or "").lower() == mailbox.lower()
                and self._token_digest == _digest(token))

    # --- opening -------------------------------------------------------------------------

    async def open(self, mailbox: str, token: HasAccessToken) -> None:
        """Connect and log in; raises :class:`UpstreamUnavailable` (4xx reply inside) or
        :class:`AuthenticationRejected`. The session is closed when either is raised."""
        await self.connect()
        await self.login(mailbox, token)

    async def connect(self) -> None:
        """The part of :meth:`open` that needs no token: connect, EHLO and (in starttls
        mode) STARTTLS + EHLO, so a diagnosis can test the path before and apart from the
        login. Raises :class:`UpstreamUnavailable` (closed); :attr:`stage` tells where."""
        if self._smtp is not None:
            raise RuntimeError("session already opened")
        implicit = self.upstream.tls == "implicit"
        smtp = UpstreamSMTP(
            hostname=self.upstream.host, port=self.upstream.port,
            local_hostname=self.helo_name, timeout=self.upstream.timeout,
            use_tls=implicit, start_tls=False, tls_context=self._tls)
        self._smtp = smtp
        try:
            self._stage = "connect"
            await smtp.connect()
            self._stage = "EHLO"
            await smtp.ehlo()
            if not implicit:
                self._stage = "STARTTLS"
                if not smtp.supports_extension("starttls"):
                    raise UpstreamUnavailable(Reply(
                        451, f"4.7.0 Upstream {self.where} does not offer STARTTLS; the relay "
                             "does not send credentials without TLS (is something on the "
                             "path stripping STARTTLS, or does the upstream need "
                             "tls: implicit?)"))
                await smtp.starttls()
                self._stage = "EHLO"
                await smtp.ehlo()
        except BaseException as exc:
            error = self._opening_failed(exc)
            if error is exc:
                raise
            raise error from exc

    async def login(self, mailbox: str, token: HasAccessToken) -> None:
        """XOAUTH2 on a session :meth:`connect` opened; raises like :meth:`open`."""
        smtp = self._smtp
        if smtp is None or self.mailbox is not None:
            raise RuntimeError("login needs a connected session that is not logged in")
        try:
            self._stage = "AUTH"
            await self._authenticate(smtp, mailbox, token)
        except BaseException as exc:
            error = self._opening_failed(exc)
            if error is exc:
                raise
            raise error from exc
        self.mailbox = mailbox
        self._token_digest = _digest(token)

    def _opening_failed(self, exc: BaseException) -> BaseException:
        """Close the half-open session; what :meth:`open` raises instead of ``exc``."""
        self._abort()
        if isinstance(exc, AuthenticationRejected | UpstreamUnavailable) \
                or not isinstance(exc, Exception):
            return exc
        if isinstance(exc, SMTPResponseException) and 400 <= exc.code < 600:
            return UpstreamUnavailable(session_refusal(exc.code, exc.message, self.where,
                                                       self._stage))
        return UpstreamUnavailable(path_failure(exc, self.upstream, self._stage))

    def transport_info(self, key: str) -> object:
        """``get_extra_info(key)`` of the open connection (e.g. ``ssl_object``), or None."""
        smtp = self._smtp
        return smtp.get_transport_info(key) if smtp is not None and smtp.is_connected else None

    async def _authenticate(self, smtp: UpstreamSMTP, mailbox: str,
                            token: HasAccessToken) -> None:
        """SASL XOAUTH2 in the two-step form: the 2-3 kB response goes on its own line,
        not on the AUTH command line (RFC 4954's 512-octet command limit). An ACS
        upstream takes the app's client secret as a password instead (``token`` is then
        that secret, see relay.oauth.password)."""
        if self.upstream.service == "acs":
            await self._login_with_password(smtp, token)
            return
        if "xoauth2" not in smtp.server_auth_methods:
            offered = " ".join(smtp.server_auth_methods).upper() or "none"
            raise UpstreamUnavailable(Reply(
                451, f"4.7.0 Upstream {self.where} does not offer AUTH XOAUTH2 "
                     f"(offers: {offered}); check the upstream host"))
        access = token.access_token.reveal()
        redact(access)
        payload = base64.b64encode(f"user={mailbox}\x01auth=Bearer {access}\x01\x01".encode())
        response = await smtp.execute_command(b"AUTH", b"XOAUTH2")
        challenge = ""
        if response.code == 334:
            response = await smtp.execute_command(payload)
            if response.code == 334:
                # Gmail/Dovecot style: an error challenge first; an empty line gets the verdict.
                challenge = _decode_challenge(response.message)
                response = await smtp.execute_command(b"")
        if response.code == 235:
            return
        text = response.message + (f" (server said: {challenge})" if challenge else "")
        if 400 <= response.code < 500:
            raise UpstreamUnavailable(Reply(response.code, text))
        if 500 <= response.code < 600:
            raise AuthenticationRejected(Reply(response.code, text))
        raise UpstreamUnavailable(Reply(
            451, f"4.4.2 Upstream {self.where} gave an unexpected reply to AUTH: "
                 f"{response.code} {one_line(response.message)}"))

    async def _login_with_password(self, smtp: UpstreamSMTP, token: HasAccessToken) -> None:
        offered = set(smtp.server_auth_methods)
        if not offered & {"login", "plain"}:
            raise UpstreamUnavailable(Reply(
                451, f"4.7.0 Upstream {self.where} does not offer AUTH LOGIN or PLAIN "
                     f"(offers: {' '.join(sorted(offered)).upper() or 'none'})"))
        assert self.upstream.username is not None
        try:
            await _password_login(smtp, self.upstream.username, token.access_token.reveal())
        except SMTPResponseException as exc:
            reply = Reply(exc.code, exc.message)
            if 500 <= exc.code < 600:
                raise AuthenticationRejected(Reply(exc.code, (
                    f"{exc.message} (Azure Communication Services refused the login as "
                    f"{self.upstream.username})"))) from None
            raise UpstreamUnavailable(reply if 400 <= exc.code < 500 else Reply(
                451, f"4.4.2 Upstream {self.where} gave an unexpected reply to AUTH: "
                     f"{exc.code} {one_line(exc.message)}")) from None

    # --- sending -------------------------------------------------------------------------

    async def send_one(self, msg: Outbound, *, require_all_recipients: bool = True,
                       dry_run: bool = False,
                       on_accepted: OnAccepted | None = None) -> DeliveryResult:
        """One transaction. ``accepted`` lists recipients the message was delivered to,
        ``refused`` those the upstream refused at RCPT; the reply applies to the rest.

        With ``require_all_recipients`` any refusal abandons the message (RSET) so the
        client can retry it whole; otherwise it goes to the accepted recipients.
        ``dry_run`` stops before DATA (RSET instead): the upstream's verdict on sender and
        recipients without sending anything, for diagnosis. ``on_accepted`` is called
        with the accepted recipients as soon as the upstream's 250 to DATA is read, before
        this coroutine yields again: a caller that records it there keeps the window in
        which a crash sends the message twice as short as it can be.
        """
        smtp = self._smtp
        if smtp is None or not self.is_open:
            raise RuntimeError("session is not open")
        transaction = Transaction(smtp, msg, self.where, self.upstream.timeout)
        try:
            result = await transaction.run(require_all_recipients, dry_run, on_accepted)
        except BaseException as exc:
            self._stage = transaction.stage
            self._abort()
            if isinstance(exc, SMTPException | OSError | TimeoutError):
                return DeliveryResult(path_failure(exc, self.upstream, self._stage),
                                      authenticated=True)
            raise
        self._stage = transaction.stage
        # Only a logged-in session gets this far (is_open above).
        result.authenticated = True
        return result

    async def check(self) -> bool:
        """RSET an idle session before reusing it; False (and closed) if it fails.

        A connection can die without a word (the upstream's idle timeout, a NAT entry
        expiring); a reply proves it alive, and RSET also clears whatever transaction
        state a previous message may have left behind. The wait is kept short, since a
        healthy server answers RSET at once and a dead path would otherwise hold a message
        for the whole command timeout.
        """
        smtp = self._smtp
        if smtp is None or not self.is_open:
            return False
        self._stage = "RSET"
        try:
            await smtp.rset(timeout=min(self.upstream.timeout, _CHECK_TIMEOUT))
        except (SMTPException, OSError, TimeoutError):
            self._abort()
            return False
        return True

    # --- closing -------------------------------------------------------------------------

    async def close(self) -> None:
        """QUIT politely (briefly), then drop the connection whatever happened."""
        smtp, self._smtp = self._smtp, None
        self.mailbox = None
        if smtp is None:
            return
        try:
            if smtp.is_connected:
                await smtp.quit(timeout=min(self.upstream.timeout, _QUIT_TIMEOUT))
        except (SMTPException, OSError, TimeoutError):
            pass
        finally:
            smtp.close()

    def abort(self) -> None:
        """Drop the connection at once, without QUIT: for a session whose protocol state
        is unknown (an attempt was cancelled mid-command), which must never be reused."""
        self._abort()

    def _abort(self) -> None:
        smtp, self._smtp = self._smtp, None
        self.mailbox = None
        if smtp is not None:
            smtp.close()


async def _password_login(smtp: UpstreamSMTP, username: str, password: str) -> None:
    """AUTH LOGIN, or PLAIN where LOGIN is not offered, as ``username``: one try (unlike
    aiosmtplib's login(), which goes on to the next mechanism after a refusal)."""
    redact(password)
    if "login" in smtp.server_auth_methods:
        await smtp.auth_login(username, password)
    else:
        await smtp.auth_plain(username, password)


def _decode_challenge(message: str) -> str:
    """The readable part of an XOAUTH2 error challenge (base64 JSON), if any."""
    try:
        text = base64.b64decode(message.strip(), validate=True).decode("utf-8")
    except (ValueError, UnicodeDecodeError):
        return ""
    text = one_line(text)
    return text[:300] if text.isprintable() else ""
