"""One message on an open, logged-in upstream session: MAIL, RCPT, DATA and the message.

- :class:`Transaction`: runs it and tells, in :attr:`~Transaction.stage`, how far it got.

Where the upstream offers PIPELINING (Exchange Online does) the commands go in one write
and their replies are read in order (:mod:`relay.deliver.pipelining`): two round trips a
message instead of four. Otherwise each command waits for its reply.

The upstream's replies are passed on as given (:func:`~relay.deliver.failures.
transaction_reply`). With ``require_all`` any refused recipient abandons the message so
the client can retry it whole. A pipelined DATA may already have been answered ``354``
by then, and DATA cannot be taken back with RSET: the connection is dropped instead,
which makes the upstream discard the unfinished message (RFC 5321, 4.1.1.4). A message
is therefore never delivered to part of its recipients unless the caller allowed it.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence

from aiosmtplib import (
    SMTPDataError,
    SMTPException,
    SMTPRecipientRefused,
    SMTPResponse,
    SMTPSenderRefused,
)
from aiosmtplib.email import quote_address
from aiosmtplib.protocol import COMMAND_INJECTION_REGEX

from relay.core.addrspec import is_plain
from relay.core.message import DeliveryResult, Outbound
from relay.core.reply import Reply
from relay.deliver.data import send_body, send_data
from relay.deliver.failures import refusal_for, transaction_reply
from relay.deliver.pipelining import PipeliningProtocol, UpstreamSMTP

log = logging.getLogger(__name__)

# Called with the recipients the upstream accepted, the moment its final reply to DATA
# arrives (see relay.deliver.session.UpstreamSession.send_one).
OnAccepted = Callable[[list[str]], None]

_OK = 250
_WILL_FORWARD = 251
_START_INPUT = 354
_CLOSING = 421


class Transaction:
    """One message on a session; ``stage`` is the step it is at or broke at."""

    def __init__(self, smtp: UpstreamSMTP, msg: Outbound, where: str, timeout: float) -> None:
        self.smtp = smtp
        self.msg = msg
        self.where = where
        self.timeout = timeout
        self.stage = "MAIL FROM"

    async def run(self, require_all: bool, dry_run: bool,
                  on_accepted: OnAccepted | None) -> DeliveryResult:
        """The upstream's verdict; raises what a broken connection raises (aiosmtplib's
        exceptions, OSError), leaving the caller to close the session."""
        options, utf8 = self._mail_options()
        encoding = "utf-8" if utf8 else "ascii"
        protocol = self.smtp.protocol
        if isinstance(protocol, PipeliningProtocol) and self.smtp.supports_extension(
                "pipelining"):
            return await self._pipelined(protocol, options, encoding, require_all,
                                         dry_run, on_accepted)
        return await self._stepwise(options, encoding, require_all, dry_run, on_accepted)

    def _mail_options(self) -> tuple[list[str], bool]:
        """The client's BODY/SMTPUTF8 where the upstream supports them, and our SIZE."""
        smtp, msg = self.smtp, self.msg
        options: list[str] = []
        utf8 = False
        for option in msg.mail_options:
            key, _, value = option.partition("=")
            key, value = key.upper(), value.upper()
            if key == "BODY" and value in ("7BIT", "8BITMIME") \
                    and smtp.supports_extension("8bitmime"):
                options.append(f"BODY={value}")
            elif key == "SMTPUTF8" and not value and smtp.supports_extension("smtputf8"):
                utf8 = True
        addresses = [msg.mail_from, *msg.rcpt_tos]
        if not utf8 and not all(a.isascii() for a in addresses) \
                and smtp.supports_extension("smtputf8"):
            utf8 = True
        if utf8:
            options.append("SMTPUTF8")
        if smtp.supports_extension("size"):
            options.append(f"SIZE={msg.content.size}")
        return options, utf8

    def _verdict(self, code: int, text: str) -> Reply:
        return transaction_reply(code, text, self.where, self.stage)

    # --- pipelined -----------------------------------------------------------------------

    async def _pipelined(self, protocol: PipeliningProtocol, options: list[str],
                         encoding: str, require_all: bool, dry_run: bool,
                         on_accepted: OnAccepted | None) -> DeliveryResult:
        msg = self.msg
        try:
            group = [_command(b"MAIL FROM:", msg.mail_from, encoding, options)]
        except (UnicodeEncodeError, ValueError) as exc:
            return DeliveryResult(_bad_sender(exc, msg.mail_from, self.where))
        sent: list[str] = []
        refused: dict[str, Reply] = {}
        for rcpt in msg.rcpt_tos:
            try:
                group.append(_command(b"RCPT TO:", rcpt, encoding))
            except (UnicodeEncodeError, ValueError) as exc:
                refused[rcpt] = _bad_recipient(exc)
            else:
                sent.append(rcpt)
        if not sent:
            return DeliveryResult(refusal_for(refused, len(msg.rcpt_tos)), [], refused)
        with_data = not dry_run and not (refused and require_all)
        if with_data:
            group.append(b"DATA\r\n")

        protocol.send_group(b"".join(group))
        self.stage = "MAIL FROM"
        sender = await protocol.read_response(self.timeout)
        if sender.code == _CLOSING:
            return self._closed_by(sender)
        self.stage = "RCPT TO"
        accepted: list[str] = []
        for rcpt in sent:
            reply = await protocol.read_response(self.timeout)
            if reply.code == _CLOSING:
                refused[rcpt] = self._verdict(reply.code, reply.message)
                self._drop()
                return DeliveryResult(refused[rcpt], [], refused)
            if reply.code in (_OK, _WILL_FORWARD):
                accepted.append(rcpt)
            else:
                refused[rcpt] = self._verdict(reply.code, reply.message)
        start: SMTPResponse | None = None
        if with_data:
            self.stage = "DATA"
            start = await protocol.read_response(self.timeout)
        started = start is not None and start.code == _START_INPUT

        if sender.code != _OK:
            self.stage = "MAIL FROM"
            if started:
                self._drop()
            return DeliveryResult(self._verdict(sender.code, sender.message))
        if refused and (require_all or not accepted):
            return await self._abandon(refused, started)
        if start is None:  # dry run
            return await self._dry_run(accepted, refused)
        if not started:
            return DeliveryResult(self._verdict(start.code, start.message), [], refused)
        try:
            response = await send_body(self.smtp, msg.content, self.timeout)
        except SMTPDataError as exc:
            return DeliveryResult(self._verdict(exc.code, exc.message), [], refused)
        return self._delivered(response, accepted, refused, on_accepted)

    def _closed_by(self, reply: SMTPResponse) -> DeliveryResult:
        """421: the upstream is closing the session; the rest of the group is moot."""
        self._drop()
        return DeliveryResult(self._verdict(reply.code, reply.message))

    def _drop(self) -> None:
        self.smtp.close()

    # --- one command at a time -----------------------------------------------------------

    async def _stepwise(self, options: list[str], encoding: str, require_all: bool,
                        dry_run: bool, on_accepted: OnAccepted | None) -> DeliveryResult:
        smtp, msg = self.smtp, self.msg
        self.stage = "MAIL FROM"
        try:
            await smtp.mail(msg.mail_from, options=options, encoding=encoding)
        except SMTPSenderRefused as exc:
            return DeliveryResult(self._verdict(exc.code, exc.message))
        except (UnicodeEncodeError, ValueError) as exc:
            return DeliveryResult(_bad_sender(exc, msg.mail_from, self.where))

        self.stage = "RCPT TO"
        accepted: list[str] = []
        refused: dict[str, Reply] = {}
        for rcpt in msg.rcpt_tos:
            try:
                await smtp.rcpt(rcpt, encoding=encoding)
            except SMTPRecipientRefused as exc:
                refused[rcpt] = self._verdict(exc.code, exc.message)
                if not smtp.is_connected:  # 421: the upstream is closing the session
                    self._drop()
                    return DeliveryResult(refused[rcpt], [], refused)
            except (UnicodeEncodeError, ValueError) as exc:
                refused[rcpt] = _bad_recipient(exc)
            else:
                accepted.append(rcpt)

        if refused and (require_all or not accepted):
            return await self._abandon(refused, started=False)
        if dry_run:
            return await self._dry_run(accepted, refused)
        self.stage = "DATA"
        try:
            response = await send_data(smtp, msg.content, self.timeout)
        except SMTPDataError as exc:
            return DeliveryResult(self._verdict(exc.code, exc.message), [], refused)
        return self._delivered(response, accepted, refused, on_accepted)

    # --- endings -------------------------------------------------------------------------

    async def _abandon(self, refused: dict[str, Reply], started: bool) -> DeliveryResult:
        """Recipients were refused and the message is not to go to the rest."""
        if started:
            # DATA was already accepted: only a dropped connection takes it back.
            self._drop()
        else:
            self.stage = "RSET"
            await self._rset()
        return DeliveryResult(refusal_for(refused, len(self.msg.rcpt_tos)), [], refused)

    async def _dry_run(self, accepted: list[str], refused: dict[str, Reply]) -> DeliveryResult:
        self.stage = "RSET"
        await self._rset()
        return DeliveryResult(Reply(250, "2.0.0 Sender and recipients accepted; dry run, "
                                         "RSET instead of DATA: nothing was sent"),
                              accepted, refused)

    async def _rset(self) -> None:
        try:
            await self.smtp.rset()
        except (SMTPException, OSError, TimeoutError):
            self._drop()

    @staticmethod
    def _delivered(response: SMTPResponse, accepted: list[str], refused: dict[str, Reply],
                   on_accepted: OnAccepted | None) -> DeliveryResult:
        if on_accepted is not None:
            try:
                on_accepted(accepted)
            except Exception:
                # The message was delivered: nothing may turn that into a failure (and so
                # into a second delivery on retry).
                log.exception("recording an accepted message failed")
        return DeliveryResult(Reply(response.code, response.message), accepted, refused)


def _command(verb: bytes, address: str, encoding: str, options: Sequence[str] = ()) -> bytes:
    """``MAIL FROM:<a> opts`` or ``RCPT TO:<a>``, as aiosmtplib's mail() and rcpt() write
    them (a plain address without its parser; tests/test_library_contract.py compares);
    ValueError (or UnicodeEncodeError) for what may not go on a command line."""
    path = f"<{address}>" if is_plain(address) else quote_address(address)
    line = b" ".join([verb + path.encode(encoding),
                      *(o.encode("ascii") for o in options)])
    if COMMAND_INJECTION_REGEX.search(line):
        raise ValueError("command contains a control character")
    return line + b"\r\n"


def _bad_sender(exc: Exception, mail_from: str, where: str) -> Reply:
    if isinstance(exc, UnicodeEncodeError):
        return Reply(550, f"5.6.7 Sender <{mail_from}> is not ASCII and upstream {where} "
                          "lacks SMTPUTF8")
    return Reply(501, f"5.1.7 Bad sender address <{mail_from}>")


def _bad_recipient(exc: Exception) -> Reply:
    if isinstance(exc, UnicodeEncodeError):
        return Reply(550, "5.6.7 Address is not ASCII and upstream lacks SMTPUTF8")
    return Reply(501, "5.1.3 Bad recipient address syntax")
