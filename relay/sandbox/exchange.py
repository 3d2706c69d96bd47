"""A stand-in for Exchange Online's SMTP submission endpoint (smtp.office365.com:587).

It enforces what the real endpoint enforces, so that a relay passing against it is not
merely passing against a lenient test server: STARTTLS before AUTH and MAIL, XOAUTH2 only
(basic authentication is refused as Exchange now does), a token that must be valid, carry
the ``SMTP.SendAsApp`` role and be granted on the mailbox, and SendAs checked only after
DATA (which is when Exchange reports it). Replies use Exchange's codes and texts.

Tests steer it with :meth:`FakeExchange.fail_next` / :meth:`FakeExchange.drop_next` and read
what it saw (``messages``, ``commands``, ``auth_attempts``, counters). It runs on the
caller's event loop, so tests need no threads. It knows nothing of the fake Entra ID: the
token check is a callable handed in (``FakeEntra.validate_token`` in the sandbox).
"""

from __future__ import annotations

import asyncio
import binascii
import collections
import datetime as dt
import fnmatch
import hmac
import json
import logging
import os
import re
import ssl
import time
from base64 import b64decode
from collections.abc import Callable
from dataclasses import dataclass, field
from email import policy
from email.parser import BytesHeaderParser
from pathlib import Path
from typing import Any, NoReturn

from aiosmtpd.smtp import MISSING, SMTP, Envelope, Session, TLSSetupException

from relay.core.reply import Reply
from relay.oauth.token import SEND_AS_APP
from relay.sandbox.pki import LocalPKI

log = logging.getLogger(__name__)

MAX_MESSAGE_SIZE = 157_286_400  # what Exchange Online advertises in EHLO
STAGES = frozenset({"connect", "ehlo", "auth", "mail", "rcpt", "data"})

TokenValidator = Callable[[str], dict[str, Any]]


@dataclass(frozen=True)
class ReceivedMessage:
    """One message Exchange accepted, as it arrived (``data`` is byte-exact)."""

    mailbox: str
    mail_from: str
    rcpt_tos: list[str]
    data: bytes
    mail_options: list[str] = field(default_factory=list)
    received_at: float = 0.0
    path: Path | None = None


@dataclass(frozen=True)
class AuthAttempt:
    """What a client tried at AUTH; never holds the token."""

    mechanism: str
    initial_response: bool  # True: one-line form ``AUTH XOAUTH2 <base64>``
    mailbox: str | None
    ok: bool
    reply: str


@dataclass
class _Fault:
    stage: str
    reply: Reply | None  # None: drop the connection instead of replying
    remaining: int
    recipient: str | None = None


class FakeExchange:
    """Exchange Online's submission endpoint on 127.0.0.1, with STARTTLS from ``pki``."""

    def __init__(self, pki: LocalPKI, validate_token: TokenValidator, *,
                 maildir: Path | None = None, hostname: str = "fake-exchange.local",
                 starttls: bool = True, pipelining: bool = True) -> None:
        self.pki = pki
        self.hostname = hostname
        self.maildir = maildir
        self.offer_starttls = starttls  # False simulates a STARTTLS-stripping middlebox
        self.offer_pipelining = pipelining  # RFC 2920, which Exchange Online offers
        # Azure Communication Services Email instead of Exchange: AUTH LOGIN/PLAIN with
        # these usernames and passwords (the app's client secret), and no XOAUTH2.
        self.password_logins: dict[str, str] | None = None
        # False: the app is authorised by RBAC for Applications (New-ManagementRoleAssignment
        # -Role 'Application SMTP.SendAsApp'), so tokens without that role are accepted.
        self.require_send_as_role = True
        self._validate = validate_token
        self._grants: set[str] | None = None
        self._send_as: dict[str, list[str]] = collections.defaultdict(list)
        self._faults: list[_Fault] = []
        self._server: asyncio.Server | None = None
        self._connections: set[_ExchangeSMTP] = set()
        self._seq = 0
        self.host = "127.0.0.1"
        self.port = 0
        self.messages: list[ReceivedMessage] = []
        self.commands: list[str] = []  # command lines seen; AUTH payloads replaced
        # Commands that arrived with the next one already behind them (pipelined).
        self.pipelined_commands = 0
        self.auth_attempts: list[AuthAttempt] = []
        self.sessions = 0
        self.max_concurrent_sessions = 0  # high-water mark of open connections
        self.auth_ok = 0
        self.auth_failed = 0
        # Exchange's per-mailbox limits, when enforce_limits() is called; what they refused.
        self.limits: tuple[int, int] | None = None     # (sessions, messages per minute)
        self.limit_refusals = 0
        self._logged_in: collections.Counter[str] = collections.Counter()
        self._submitted: dict[str, collections.deque[float]] = {}
        self.tls_context = self._server_tls_context(pki)

    @staticmethod
    def _server_tls_context(pki: LocalPKI) -> ssl.SSLContext:
        ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        ctx.minimum_version = ssl.TLSVersion.TLSv1_2
        ctx.load_cert_chain(pki.cert_file, pki.key_file)
        return ctx

    # --- lifecycle -----------------------------------------------------------------------

    async def start(self) -> None:
        loop = asyncio.get_running_loop()
        self._server = await loop.create_server(
            lambda: _ExchangeSMTP(self, loop), host="127.0.0.1", port=0)
        self.host, self.port = self._server.sockets[0].getsockname()[:2]
        log.info("fake Exchange Online listening on %s:%d", self.host, self.port)

    async def stop(self) -> None:
        server, self._server = self._server, None
        if server is None:
            return
        server.close()
        await self.disconnect_all()
        await server.wait_closed()

    async def disconnect_all(self) -> None:
        """Cut every open connection from the server's side, as Exchange's idle timeout
        or a network failure would; the listener stays up."""
        tasks = []
        for conn in list(self._connections):
            tasks.extend(conn.abort())
        if tasks:
            await asyncio.gather(*tasks, return_exceptions=True)

    async def __aenter__(self) -> FakeExchange:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    @property
    def open_sessions(self) -> int:
        """Connections open right now; Exchange counts idle ones against its limit too."""
        return len(self._connections)

    # --- configuration -------------------------------------------------------------------

    def grant(self, mailbox: str) -> None:
        """Allow the app on ``mailbox``; after the first call only granted mailboxes work
        (as after ``Add-MailboxPermission``)."""
        if self._grants is None:
            self._grants = set()
        self._grants.add(mailbox.lower())

    def allow_send_as(self, mailbox: str, address_or_pattern: str) -> None:
        """Let ``mailbox`` send as an address or a glob such as ``*@contoso.com`` (or
        ``@contoso.com``), as after ``Add-RecipientPermission``."""
        pattern = address_or_pattern.lower()
        pattern = "*" + pattern if pattern.startswith("@") else pattern
        granted = self._send_as[mailbox.lower()]
        if pattern not in granted:              # granted again by a reload: nothing new
            granted.append(pattern)

    def enforce_limits(self, sessions: int = 3, per_minute: int = 30) -> None:
        """Refuse what goes over a mailbox's limits, as Exchange Online does for SMTP AUTH:
        a login beyond ``sessions`` open sessions of the mailbox, and a message beyond
        ``per_minute`` in any 60 s, each with 432 4.3.2 (counted in ``limit_refusals``)."""
        self.limits = (sessions, per_minute)

    def _over_sessions(self, mailbox: str) -> bool:
        if self.limits is None or self._logged_in[mailbox] < self.limits[0]:
            self._logged_in[mailbox] += 1
            return False
        self.limit_refusals += 1
        return True

    def _over_rate(self, mailbox: str) -> bool:
        if self.limits is None:
            return False
        now = time.monotonic()
        sent = self._submitted.setdefault(mailbox, collections.deque())
        while sent and sent[0] <= now - 60.0:
            sent.popleft()
        if len(sent) >= self.limits[1]:
            self.limit_refusals += 1
            return True
        sent.append(now)
        return False

    def fail_next(self, stage: str, code: int, text: str, count: int = 1,
                  recipient: str | None = None) -> None:
        """Answer the next ``count`` events at ``stage`` with ``code text``.

        ``data`` replies after the message was received (as Exchange's end-of-data
        rejections do); ``recipient`` limits a ``rcpt`` fault to that address. An ``auth``
        fault with code 334 answers the payload with a challenge (Gmail's JSON error
        style) and then 535 after the client's (empty) response.
        """
        self._add_fault(stage, Reply(code, text), count, recipient)

    def drop_next(self, stage: str, count: int = 1) -> None:
        """Close the connection abruptly at ``stage``; ``data`` drops after the first
        line of the message, ``auth`` after the client sent its credentials."""
        self._add_fault(stage, None, count, None)

    def _add_fault(self, stage: str, reply: Reply | None, count: int,
                   recipient: str | None) -> None:
        if stage not in STAGES:
            raise ValueError(f"unknown stage {stage!r} (one of {', '.join(sorted(STAGES))})")
        if count < 1:
            raise ValueError("count must be at least 1")
        self._faults.append(_Fault(stage, reply, count, recipient and recipient.lower()))

    def _take_fault(self, stage: str, recipient: str | None = None) -> _Fault | None:
        for fault in self._faults:
            if fault.stage != stage:
                continue
            if fault.recipient is not None and fault.recipient != (recipient or "").lower():
                continue
            fault.remaining -= 1
            if fault.remaining <= 0:
                self._faults.remove(fault)
            return fault
        return None

    # --- decisions -----------------------------------------------------------------------

    def _check_login(self, payload: bytes) -> tuple[str | None, str | None]:
        """Return (mailbox, None) for a good XOAUTH2 payload, else (mailbox, reason)."""
        try:
            text = payload.decode("utf-8")
        except UnicodeDecodeError:
            return None, "payload is not UTF-8"
        fields = dict(part.partition("=")[::2] for part in text.split("\x01") if part)
        mailbox = fields.get("user") or None
        auth = fields.get("auth", "")
        if not mailbox or not auth.startswith("Bearer ") or not text.endswith("\x01\x01"):
            return mailbox, "malformed XOAUTH2 payload"
        token = auth[len("Bearer "):]
        try:
            claims = self._validate(token)
        except Exception as exc:
            reason = " ".join(str(exc).replace(token, "[token]").split())[:200]
            return mailbox, reason or exc.__class__.__name__
        if "scp" in claims:     # a user's delegated token: SMTP.Send, as that user only
            if "SMTP.Send" not in str(claims["scp"]).split():
                return mailbox, "delegated token without SMTP.Send"
            if str(claims.get("upn", "")).lower() != mailbox.lower():
                return mailbox, f"delegated token of {claims.get('upn')}, not {mailbox}"
            return mailbox, None
        roles = claims.get("roles") or []
        if SEND_AS_APP not in roles and self.require_send_as_role:
            return mailbox, f"token has no {SEND_AS_APP} role"
        if self._grants is not None and mailbox.lower() not in self._grants:
            return mailbox, f"app has no permission on mailbox {mailbox}"
        return mailbox, None

    def _may_send_as(self, mailbox: str, address: str) -> bool:
        address = address.lower()
        if not address or address == mailbox.lower():
            return True
        return any(fnmatch.fnmatchcase(address, pattern)
                   for pattern in self._send_as.get(mailbox.lower(), ()))

    def _send_as_denied(self, mailbox: str, mail_from: str, data: bytes) -> str | None:
        """The first sender address (envelope, then header From) the mailbox may not use."""
        if not self._may_send_as(mailbox, mail_from):
            return mail_from
        headers = BytesHeaderParser(policy=policy.default).parsebytes(data)
        for value in headers.get_all("From", []):
            for addr in getattr(value, "addresses", ()):
                if addr.addr_spec and not self._may_send_as(mailbox, addr.addr_spec):
                    return addr.addr_spec
        return None

    async def _store(self, mailbox: str, envelope: Envelope) -> ReceivedMessage:
        self._seq += 1
        now = time.time()
        data = bytes(envelope.original_content or b"")
        path = None
        if self.maildir is not None:
            # Named by arrival time and the relay's queue id, so that a file is found from
            # the relay's log and the names sort by arrival across any number of runs.
            queue_id = relay_queue_id(data)
            stamp = dt.datetime.fromtimestamp(now, dt.UTC).strftime("%Y%m%dT%H%M%S.%fZ")
            path = self.maildir / f"{stamp}-{queue_id or 'noqueue'}.eml"
            n = 1
            while path.exists():        # the same microsecond: not over another message
                n += 1
                path = self.maildir / f"{stamp}-{queue_id or 'noqueue'}-{n}.eml"
            sidecar = {
                "mailbox": mailbox, "mail_from": envelope.mail_from,
                "rcpt_tos": list(envelope.rcpt_tos), "mail_options": envelope.mail_options,
                "received_at": dt.datetime.fromtimestamp(now, dt.UTC).isoformat(),
                "size": len(data), "eml": path.name, "queue_id": queue_id,
            }
            await asyncio.to_thread(_write_pair, path, data,
                                    json.dumps(sidecar, indent=2).encode())
        record = ReceivedMessage(mailbox, envelope.mail_from or "", list(envelope.rcpt_tos),
                                 data, list(envelope.mail_options), now, path)
        self.messages.append(record)
        return record


# The trace field relay.accept.trace writes: "... by HOST (smtp-oauth-relay) [with PROTO]
# id QUEUEID ...", possibly folded.
_RELAY_TRACE = re.compile(rb"\(smtp-oauth-relay\)(?:\s+with\s+\S+)?\s+id\s+([0-9A-Za-z_-]{1,64})")


def relay_queue_id(data: bytes) -> str | None:
    """The queue id in the message's topmost Received field, if the relay wrote that one
    (the last hop before Exchange); None otherwise."""
    head = data.split(b"\r\n\r\n", 1)[0]
    fields = re.split(rb"\r\n(?![ \t])", head)
    top = next((f for f in fields if f[:9].lower() == b"received:"), None)
    match = _RELAY_TRACE.search(top) if top is not None else None
    return match.group(1).decode() if match else None


def _write_atomic(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "wb") as f:
        f.write(data)
    os.replace(tmp, path)


def _write_pair(eml: Path, data: bytes, sidecar: bytes) -> None:
    """The envelope first, so that every visible .eml already has its .json beside it."""
    eml.parent.mkdir(parents=True, exist_ok=True)
    _write_atomic(eml.with_suffix(".json"), sidecar)
    _write_atomic(eml, data)


class _Handler:
    """aiosmtpd hooks: end-of-data is where Exchange decides SendAs and stores mail."""

    def __init__(self, fake: FakeExchange) -> None:
        self.fake = fake

    async def handle_DATA(self, server: _ExchangeSMTP, session: Session,
                          envelope: Envelope) -> str:
        fault, server.data_fault = server.data_fault, None
        if fault is not None and fault.reply is not None:
            return fault.reply.as_smtp()
        mailbox = str(session.auth_data)
        if self.fake._over_rate(mailbox.lower()):
            return "432 4.3.2 STOREDRV.ClientSubmit; sender thread limit exceeded"
        denied = self.fake._send_as_denied(mailbox, envelope.mail_from or "",
                                           bytes(envelope.original_content or b""))
        if denied is not None:
            return (f"554 5.2.252 SendAsDenied; {mailbox} not allowed to send as {denied}; "
                    "STOREDRV.Submission.Exception:SendAsDeniedException."
                    "MapiExceptionSendAsDenied")
        record = await self.fake._store(mailbox, envelope)
        return (f"250 2.0.0 OK <{int(record.received_at * 1000)}.{self.fake._seq}"
                f"@{self.fake.hostname}> Queued mail for delivery")

    async def handle_exception(self, error: Exception) -> str:
        if isinstance(error, TLSSetupException):  # the client refused our certificate
            log.debug("fake Exchange: TLS handshake failed")
        else:
            log.warning("fake Exchange session error", exc_info=error)
        return "451 4.3.0 Temporary server error. Please try again later"


class _ExchangeSMTP(SMTP):
    """One connection. Long lines are allowed: the XOAUTH2 line is 2-3 kB and Exchange
    takes long message lines; the limit only guards memory."""

    line_length_limit = 1 << 20

    def __init__(self, fake: FakeExchange, loop: asyncio.AbstractEventLoop) -> None:
        super().__init__(
            _Handler(fake), hostname=fake.hostname,
            ident="Microsoft ESMTP MAIL Service ready (smtp-oauth-relay sandbox)",
            tls_context=fake.tls_context if fake.offer_starttls else None,
            data_size_limit=MAX_MESSAGE_SIZE, enable_SMTPUTF8=True, decode_data=False,
            timeout=300, loop=loop)
        # aiosmtpd keeps these limits in a dict shared by all its servers; ours is private.
        self.command_size_limits = collections.defaultdict(
            lambda: SMTP.command_size_limit, {"AUTH": 16384, "MAIL": 1024, "RCPT": 1024})
        self.fake = fake
        self.data_fault: _Fault | None = None
        self._counted_as: str | None = None   # the mailbox whose session count this holds

    # --- connection ----------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        super().connection_made(transport)
        self.fake._connections.add(self)
        self.fake.max_concurrent_sessions = max(self.fake.max_concurrent_sessions,
                                                len(self.fake._connections))

    def connection_lost(self, error: Exception | None) -> None:
        self.fake._connections.discard(self)
        if self._counted_as is not None:
            self.fake._logged_in[self._counted_as] -= 1
            self._counted_as = None
        super().connection_lost(error)

    def abort(self) -> list[asyncio.Task[None]]:
        """Cut the connection now (as a network failure would); returns tasks to await."""
        for transport in (self._original_transport, self.transport):
            if transport is not None:
                transport.abort()  # type: ignore[attr-defined]
        task = self._handler_coroutine
        if task is not None and not task.done():
            task.cancel()
            return [task]
        return []

    def _drop(self) -> NoReturn:
        """Cut the connection from inside a command: stop reading, even what is buffered."""
        for transport in (self._original_transport, self.transport):
            if transport is not None:
                transport.abort()  # type: ignore[attr-defined]
        raise asyncio.CancelledError

    async def _handle_client(self) -> None:
        self.fake.sessions += 1
        fault = self.fake._take_fault("connect")
        if fault is not None:
            if fault.reply is None:
                self._drop()
            await self.push(fault.reply.as_smtp())
            assert self.transport is not None
            self.transport.close()
            return
        await super()._handle_client()

    def _record(self, line: str) -> None:
        self.fake.commands.append(line)
        reader = self._reader
        if reader is not None and reader._buffer:  # type: ignore[attr-defined]
            self.fake.pipelined_commands += 1

    def _tls_active(self) -> bool:
        return self._tls_protocol is not None

    async def _apply(self, fault: _Fault | None) -> bool:
        """Carry out a fault; True when the command must not be handled further."""
        if fault is None:
            return False
        if fault.reply is None:
            self._drop()
        await self.push(fault.reply.as_smtp())
        return True

    # --- commands ------------------------------------------------------------------------

    async def smtp_EHLO(self, hostname: str) -> None:
        self._record(f"EHLO {hostname or ''}".strip())
        if not hostname:
            await self.push("501 5.5.4 Invalid domain name")
            return
        if await self._apply(self.fake._take_fault("ehlo")):
            return
        self._set_rset_state()
        assert self.session is not None
        self.session.extended_smtp = True
        self.session.host_name = hostname
        peer = self.session.peer[0] if self.session.peer else "unknown"
        lines = [f"{self.hostname} Hello [{peer}]", f"SIZE {MAX_MESSAGE_SIZE}"]
        if self.fake.offer_pipelining:
            lines.append("PIPELINING")
        if self._tls_active():
            lines.append("AUTH LOGIN XOAUTH2" if self.fake.password_logins is None
                         else "AUTH LOGIN PLAIN")
        elif self.tls_context is not None:
            lines.append("STARTTLS")
        lines += ["8BITMIME", "SMTPUTF8"]
        await self.push(Reply(250, "\n".join(lines)).as_smtp())

    async def smtp_HELO(self, hostname: str) -> None:
        self._record(f"HELO {hostname or ''}".strip())
        await super().smtp_HELO(hostname)

    async def smtp_STARTTLS(self, arg: str) -> None:
        self._record("STARTTLS")
        if self._tls_active():
            await self.push("503 5.5.1 TLS already active")
            return
        await super().smtp_STARTTLS(arg)

    async def smtp_RSET(self, arg: str) -> None:
        self._record("RSET")
        await super().smtp_RSET(arg)

    async def smtp_QUIT(self, arg: str) -> None:
        self._record("QUIT")
        await super().smtp_QUIT(arg)

    async def smtp_AUTH(self, arg: str) -> None:
        mechanism, _, initial = (arg or "").strip().partition(" ")
        mechanism = mechanism.upper()
        initial = initial.strip()
        self._record(f"AUTH {mechanism}" + (" <initial-response>" if initial else ""))
        assert self.session is not None
        if not self.session.host_name:
            await self.push("503 5.5.2 Send hello first")
        elif not self._tls_active():
            await self.push("530 5.7.0 Must issue a STARTTLS command first")
        elif self.session.authenticated:
            await self.push("503 5.5.2 Already authenticated")
        elif mechanism == "XOAUTH2":
            await self._auth_xoauth2(initial)
        elif mechanism in ("LOGIN", "PLAIN"):
            await self._auth_basic(mechanism, initial)
        else:
            await self.push("504 5.7.4 Unrecognized authentication type")

    async def _read_response(self, initial: str, challenge: bytes) -> bytes | None:
        """The client's SASL response: the initial response, or the line after a 334."""
        if initial:
            try:
                return b64decode(initial, validate=True)
            except (binascii.Error, ValueError):
                await self.push("501 5.5.2 Cannot Decode response")
                return None
        response = await self.challenge_auth(challenge, encode_to_b64=False)
        return None if response is MISSING else response

    def _auth_done(self, mechanism: str, initial: bool, mailbox: str | None,
                   reply: str) -> None:
        ok = reply.startswith("235")
        if ok:
            self.fake.auth_ok += 1
        else:
            self.fake.auth_failed += 1
        self.fake.auth_attempts.append(AuthAttempt(mechanism, initial, mailbox, ok, reply))

    async def _auth_xoauth2(self, initial: str) -> None:
        payload = await self._read_response(initial, b"")
        if payload is None:
            self._auth_done("XOAUTH2", bool(initial), None, "501")
            return
        fault = self.fake._take_fault("auth")
        if fault is not None and fault.reply is None:
            self._drop()
        if fault is not None and fault.reply is not None:
            reply = fault.reply.as_smtp()
            if fault.reply.code == 334:
                await self.push(reply)
                assert self._reader is not None
                answer = await self._reader.readline()
                self._record("<empty line>" if not answer.strip() else "<non-empty line>")
                reply = f"535 5.7.3 Authentication unsuccessful [{self.hostname}]"
            self._auth_done("XOAUTH2", bool(initial), None, reply)
            await self.push(reply)
            return
        mailbox, problem = self.fake._check_login(payload)
        if problem is not None:
            reply = f"535 5.7.3 Authentication unsuccessful [{self.hostname}: {problem}]"
            log.info("fake Exchange refused XOAUTH2 for %s: %s", mailbox, problem)
        elif mailbox is not None and self.fake._over_sessions(mailbox.lower()):
            reply = "432 4.3.2 Concurrent connections limit exceeded"
        else:
            self._counted_as = mailbox.lower() if mailbox is not None else None
            assert self.session is not None
            self.session.authenticated = True
            # aiosmtpd declares auth_data as None-only; it holds what the login proved.
            self.session.auth_data = mailbox  # type: ignore[assignment]
            reply = "235 2.7.0 Authentication successful"
        self._auth_done("XOAUTH2", bool(initial), mailbox, reply)
        await self.push(reply)

    async def _auth_basic(self, mechanism: str, initial: str) -> None:
        """Collect the credentials as a real server would; Exchange then refuses them,
        ACS (``password_logins``) checks them."""
        user = password = None
        if mechanism == "LOGIN":
            user = await self._read_response(initial, b"VXNlcm5hbWU6")  # "Username:"
            if user is not None:
                password = await self._read_response("", b"UGFzc3dvcmQ6")  # "Password:"
        else:
            plain = await self._read_response(initial, b"")
            if plain is not None and plain.count(b"\0") == 2:
                _, user, password = plain.split(b"\0")
        logins = self.fake.password_logins
        if logins is None:
            reply = ("535 5.7.139 Authentication unsuccessful, basic authentication is "
                     f"disabled. [{self.hostname}]")
            self._auth_done(mechanism, bool(initial), None, reply)
            await self.push(reply)
            return
        name = (user or b"").decode("utf-8", "replace")
        given = (password or b"").decode("utf-8", "replace")
        if name in logins and hmac.compare_digest(logins[name].encode(), given.encode()):
            assert self.session is not None
            self.session.authenticated = True
            self.session.auth_data = name  # type: ignore[assignment]
            reply = "235 2.7.0 Authentication successful"
        else:
            reply = "535 5.7.3 Authentication unsuccessful"
        self._auth_done(mechanism, bool(initial), name or None, reply)
        await self.push(reply)

    async def _check_transaction(self) -> bool:
        """Exchange's order of refusals for MAIL/RCPT/DATA; True when refused."""
        assert self.session is not None
        if not self._tls_active():
            await self.push("530 5.7.0 Must issue a STARTTLS command first")
            return True
        if not self.session.authenticated:
            await self.push("530 5.7.57 Client not authenticated to send mail")
            return True
        return False

    async def smtp_MAIL(self, arg: str | None) -> None:
        self._record(f"MAIL {arg or ''}".strip())
        if await self._check_transaction():
            return
        if await self._apply(self.fake._take_fault("mail")):
            return
        await super().smtp_MAIL(arg)

    async def smtp_RCPT(self, arg: str | None) -> None:
        self._record(f"RCPT {arg or ''}".strip())
        if await self._check_transaction():
            return
        assert self.envelope is not None
        if self.envelope.mail_from is not None:
            rest = self._strip_command_keyword("TO:", arg or "")
            address = self._getaddr(rest)[0] if rest is not None else None
            if await self._apply(self.fake._take_fault("rcpt", address)):
                return
        await super().smtp_RCPT(arg)

    async def smtp_DATA(self, arg: str) -> None:
        self._record("DATA")
        if await self._check_transaction():
            return
        assert self.envelope is not None
        if self.envelope.rcpt_tos and not arg:
            fault = self.fake._take_fault("data")
            if fault is not None and fault.reply is None:
                await self.push("354 Start mail input; end with <CRLF>.<CRLF>")
                assert self._reader is not None
                await self._reader.readuntil(b"\r\n")
                self._drop()
            self.data_fault = fault
        await super().smtp_DATA(arg)
