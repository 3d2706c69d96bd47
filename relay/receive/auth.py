"""AUTH PLAIN and LOGIN for the relay's SMTP sessions, against local accounts.

- :class:`AuthSMTP`: aiosmtpd's SMTP protocol with the relay's AUTH: the password is
  checked off the event loop (:class:`relay.receive.passwords.PasswordVerifier`; aiosmtpd's
  own check is synchronous), nothing the client sent is logged, answer lines are bounded,
  and failures are counted across connections by :mod:`relay.receive.guard` (a growing
  delay, then a lockout during which even the right password is refused).

One log line per failure names the client address: the line fail2ban reads
(deploy/fail2ban/). :class:`relay.receive.session.RelaySMTP` builds on this class.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import logging

from aiosmtpd.smtp import SMTP, AuthResult, syntax

from relay.core.reply import Reply
from relay.receive import replies
from relay.receive.addresses import json_user, loggable_user
from relay.receive.guard import AuthGuard, Lockout
from relay.receive.passwords import PasswordVerifier

log = logging.getLogger(__name__)

# Longest line (with CRLF) accepted as an answer in an AUTH exchange. A PLAIN or LOGIN
# answer is a user name and a password: 1.5 kB once decoded is far beyond any real one
# (2048 is also Postfix's line_length_limit), and anything longer is refused before it
# is decoded or checked.
_MAX_AUTH_LINE = 2048


class AuthSMTP(SMTP):
    """See the module docstring. What it needs of the session is declared below; the
    subclass provides it."""

    client_ip: str
    _accounts: bool
    _auth_failures: int

    @property
    def _guard(self) -> AuthGuard:
        raise NotImplementedError

    @property
    def _verifier(self) -> PasswordVerifier:
        raise NotImplementedError

    @property
    def _max_auth_failures(self) -> int:
        raise NotImplementedError

    def _logged_in(self, user: str) -> None:
        """Note who the client proved to be (the subclass keeps it in its session)."""
        raise NotImplementedError

    async def _push_reply(self, reply: Reply) -> None:
        await self.push(reply.as_smtp())

    # aiosmtpd offers every attribute named auth_* (of this class and of the handler) as a
    # mechanism, and calls these bound methods with itself as an extra first argument.

    @syntax("AUTH <mechanism>")
    async def smtp_AUTH(self, arg: str) -> None:
        if not self._accounts:
            # Without accounts a login can only fail: say why instead of a 535 that sends
            # the operator looking for a wrong password.
            await self._push_reply(replies.AUTH_NOT_AVAILABLE)
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
            await self._push_reply(replies.AUTH_BAD_PLAIN)
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
            await self._push_reply(replies.AUTH_BAD_BASE64)
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
            return await self._failed(mechanism, login, reply=replies.AUTH_LINE_TOO_LONG,
                                      reason="answer line too long")
        blob = line.strip()
        if blob == b"*":
            await self._push_reply(replies.AUTH_ABORTED)
            return AuthResult(success=False, handled=True)
        try:
            return base64.b64decode(blob, validate=True)
        except (binascii.Error, ValueError):
            await self._push_reply(replies.AUTH_BAD_BASE64)
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
        if (lock := self._guard.lockout(self.client_ip, login)) is not None:
            return await self._locked_out(mechanism, login, lock)
        try:
            user = login.decode("utf-8")
        except UnicodeDecodeError:
            return await self._failed(mechanism, login)
        if not user or not await self._verifier.verify(user, password):
            return await self._failed(mechanism, login)
        if (lock := self._guard.lockout(self.client_ip, login)) is not None:
            # Locked while the password was being checked (by this client's attempts on
            # other connections): a lockout ends guessing, a right guess included.
            return await self._locked_out(mechanism, login, lock)
        self._logged_in(user)
        self._guard.succeeded(self.client_ip, user)
        log.info("AUTH %s ok: client=%s user=%s", mechanism, self.client_ip,
                 loggable_user(user), extra=self._fields("auth_ok", login, mechanism))
        return AuthResult(success=True, auth_data=user)

    async def _failed(self, mechanism: str, login: bytes, *, reply: Reply | None = None,
                      reason: str | None = None) -> AuthResult:
        """Count a failed attempt and hold its reply for the penalty delay; the reply is
        ``reply`` or aiosmtpd's 535 5.7.8."""
        guard = self._guard
        if (lock := guard.lockout(self.client_ip, login)) is not None:
            # Locked meanwhile (attempts in parallel): answered like any attempt now.
            return await self._locked_out(mechanism, login, lock)
        self._auth_failures += 1
        failure = guard.failed(self.client_ip, login)
        # One line per failure with the client address, for fail2ban and the like.
        log.warning("AUTH %s failed: client=%s user=%s%s", mechanism, self.client_ip,
                    loggable_user(login), f" reason={reason}" if reason else "",
                    extra=self._fields("auth_failed", login, mechanism,
                                       failures=failure.failures, reason=reason))
        for lock in failure.lockouts:
            self._log_lockout(lock, login)
        # Off the event loop's critical path: only this session waits.
        await asyncio.sleep(failure.delay)
        if self._auth_failures >= self._max_auth_failures:
            log.warning("too many AUTH failures, closing: client=%s user=%s failures=%d",
                        self.client_ip, loggable_user(login), self._auth_failures,
                        extra=self._fields("auth_closed", login, mechanism,
                                           failures=self._auth_failures))
            await self._push_reply(replies.TOO_MANY_AUTH_FAILURES)
            return AuthResult(success=False, handled=True)
        return AuthResult(success=False, handled=False,
                          message=reply.as_smtp() if reply is not None else None)

    def _fields(self, event: str, login: bytes, mechanism: str | None = None,
                **more: object) -> dict[str, object]:
        """The JSON fields of an AUTH line: every one names the client and the user name
        tried (null if none was), as its text does (``client=``, ``user=``)."""
        fields: dict[str, object] = {"event": event, "client": self.client_ip,
                                     "user": json_user(login)}
        if mechanism is not None:
            fields["mechanism"] = mechanism
        return fields | more

    def _log_lockout(self, lock: Lockout, login: bytes) -> None:
        """The one line a lockout gets (attempts refused during it are logged at DEBUG)."""
        duration = self._guard.settings.lockout
        fields = self._fields("auth_lockout", login, scope=lock.scope, key=lock.key,
                              failures=lock.failures, lockout=duration)
        if lock.scope == "client":
            where = f" network={lock.key}" if lock.key != self.client_ip else ""
            log.warning("AUTH lockout of client: client=%s%s user=%s failures=%d lockout=%gs",
                        self.client_ip, where, loggable_user(login), lock.failures,
                        duration, extra=fields)
        else:
            log.warning("AUTH lockout of user: client=%s user=%s failures=%d lockout=%gs",
                        self.client_ip, loggable_user(login), lock.failures, duration,
                        extra=fields)

    async def _locked_out(self, mechanism: str, login: bytes, lock: Lockout) -> AuthResult:
        """Refuse an attempt during a lockout, without looking at its password.

        It counts towards max_auth_failures, so a connection cannot hammer away for ever,
        and waits the base delay, so that hammering is slow.
        """
        self._auth_failures += 1
        log.debug("AUTH %s refused during lockout: client=%s user=%s scope=%s",
                  mechanism, self.client_ip, loggable_user(login), lock.scope,
                  extra=self._fields("auth_locked_out", login, mechanism, scope=lock.scope))
        await asyncio.sleep(self._guard.settings.delay)
        if self._auth_failures >= self._max_auth_failures:
            await self._push_reply(replies.TOO_MANY_AUTH_FAILURES)
            return AuthResult(success=False, handled=True)
        return AuthResult(success=False, handled=False, message=replies.AUTH_LOCKED_OUT.as_smtp())
