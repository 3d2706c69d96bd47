"""The receiving side's replies, as values, and the last look at every reply line sent.

- the relay's own fixed replies (``SHUTTING_DOWN``, ``TOO_MANY_CONNECTIONS``, ``SENDER_OK``,
  ``AUTH_LOCKED_OUT``, ...) as :class:`~relay.core.reply.Reply` values;
- :func:`internal_error`: the 451 that names the incident id of a logged traceback;
- :func:`fit_reply`: a reply about to go out through aiosmtpd, made fit to send: aiosmtpd's
  own texts get an enhanced status code (RFC 3463) where they lack one, and nothing the
  client sent (NUL, a bare CR, an undecodable byte), quoted back by aiosmtpd, goes out;
  :func:`as_sent`: a reply as that makes it, for the log line that names it.

Named here once, so that the same refusal reads the same wherever it is given, and tests
and operators can find every reply the relay gives in one place.
"""

from __future__ import annotations

import functools
import re

from relay.core.reply import Reply

SHUTTING_DOWN = Reply(421, "4.3.2 Service shutting down")
TOO_MANY_CONNECTIONS = Reply(421, "4.7.0 Too many connections, try again later")
TOO_MANY_CONNECTIONS_FROM_CLIENT = Reply(
    421, "4.7.0 Too many connections from your address, try again later")
TOO_MANY_AUTH_FAILURES = Reply(421, "4.7.0 Too many authentication failures")
# During a lockout (relay.receive.guard): temporary, the password is not even checked.
AUTH_LOCKED_OUT = Reply(454, "4.7.0 Too many authentication failures, try again later")
# No users: nothing to log in to. 502 (not implemented), so clients do not retry.
AUTH_NOT_AVAILABLE = Reply(502, "5.5.1 AUTH not available: no accounts are configured")
# RFC 4954 6: the client's answer is longer than the mechanism's buffer.
# MAIL FROM and RCPT TO addresses that cannot be used (relay.receive.addresses).
ADDRESS_NOT_UTF8 = Reply(553, "5.6.7 Address is not valid UTF-8")
ADDRESS_NEEDS_SMTPUTF8 = Reply(553, "5.6.7 Non-ASCII address requires the SMTPUTF8 parameter on "
                              "MAIL FROM")
ADDRESS_NOT_NAME_AT_DOMAIN = Reply(553, "5.1.3 Address must be of the form name@domain")
ADDRESS_TOO_LONG = Reply(553, "5.1.3 Address too long")
ADDRESS_CONTROL = Reply(553, "5.1.3 Address contains control characters")
ADDRESS_SPACES = Reply(553, "5.1.3 Address contains spaces")
ADDRESS_BAD_LITERAL = Reply(553, "5.1.3 Invalid address literal")
ADDRESS_BAD_DOMAIN = Reply(553, "5.1.3 Invalid domain")
SENDER_CONTROL = Reply(553, "5.1.7 Sender address contains control characters")
SENDER_TOO_LONG = Reply(553, "5.1.7 Sender address too long")
SENDER_INVALID = Reply(553, "5.1.7 Invalid sender address")

AUTH_LINE_TOO_LONG = Reply(500, "5.5.6 Authentication exchange line is too long")
AUTH_ABORTED = Reply(501, "5.7.0 Authentication aborted")
AUTH_BAD_BASE64 = Reply(501, "5.5.2 Cannot decode base64")
AUTH_BAD_PLAIN = Reply(501, "5.5.2 Cannot split the AUTH PLAIN response")
TLS_NOT_AVAILABLE = Reply(454, "4.7.0 TLS not available")
AUTHENTICATION_REQUIRED = Reply(530, "5.7.0 Authentication required")
SENDER_OK = Reply(250, "2.1.0 Sender OK")
RECIPIENT_OK = Reply(250, "2.1.5 Recipient OK")
TOO_MANY_RECIPIENTS = Reply(452, "4.5.3 Too many recipients")
NEED_RCPT = Reply(503, "5.5.1 Error: need RCPT command")
DATA_SYNTAX = Reply(501, "5.5.4 Syntax: DATA")
START_DATA = Reply(354, "End data with <CR><LF>.<CR><LF>")
NO_BUFFER = Reply(452, "4.3.1 Insufficient system resources (too much mail arriving at "
                       "once); try again later")
STORAGE_FULL = Reply(452, "4.3.1 Insufficient system storage; try again later")
CANNOT_STORE = Reply(451, "4.3.0 Cannot store the message right now; try again later")
INTERNAL_ERROR = Reply(451, "4.3.0 Internal error, try again later")
TOO_BIG = Reply(552, "5.3.4 Message size exceeds fixed maximum message size")
HAS_NUL = Reply(554, "5.6.0 Message contains a NUL byte, which mail may not carry; encode "
                     "binary attachments (base64)")


def relay_denied(client_ip: str) -> Reply:
    return Reply(554, f"5.7.1 Relay access denied for {client_ip}")


def line_too_long(limit: int) -> Reply:
    return Reply(500, f"5.5.2 Line too long (limit {limit} octets)")


def timeout(hostname: str) -> Reply:
    """What a connection is told before a timeout closes it (RFC 5321 4.5.3.2)."""
    return Reply(421, f"4.4.2 {hostname} Error: timeout exceeded")


def internal_error(mid: str) -> Reply:
    return Reply(451, f"4.3.0 Internal error, try again later (id {mid})")


# aiosmtpd's own replies that lack an enhanced status code (RFC 3463); clients and
# operators read the class from it, so they get one here.
ENHANCED_REPLIES = {
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


def _fit_line(line: str) -> str:
    line = _REPLY_UNSAFE.sub("?", line)
    code = line[:3]
    if code[:1] in "45" and line[3:4] in (" ", "-") and not _ENHANCED_CODE.match(line, 4):
        enhanced = _ENHANCED_FOR_CODE.get(code, f"{code[0]}.0.0")
        line = f"{line[:4]}{enhanced} {line[4:]}"
    return line


@functools.lru_cache(maxsize=512)
def fit_reply(status: str) -> str:
    """A reply string (one line, or several joined by CRLF) as it may be sent. Kept for
    the strings seen last: nearly every reply is one of a few, pushed for every message."""
    status = ENHANCED_REPLIES.get(status, status)
    return "\r\n".join(_fit_line(line) for line in status.split("\r\n"))


def as_sent(reply: Reply) -> Reply:
    """``reply`` exactly as :func:`fit_reply` will send it: the one a log line must name,
    not the one before (an upstream's ``500 Line too long`` reaches the client as
    ``500 5.5.2 Line too long``)."""
    lines = fit_reply(reply.as_smtp()).split("\r\n")
    return Reply(reply.code, "\n".join(line[4:] for line in lines))
