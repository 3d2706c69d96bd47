"""``smtp-oauth-relay sendmail``: the relay as ``/usr/sbin/sendmail`` for programs that
call it (cron, PHP's mail(), monitoring tools, shell scripts).

- :func:`main`: sendmail's command line: ``[-t] [-i|-oi] [-f SENDER] [-F NAME]
  [-C CONFIG] [RECIPIENT ...]``, the message on standard input; the exit status is
  sendmail's (sysexits.h).
- :func:`parse`: that command line, as :class:`Options`.

The message goes to the running relay over SMTP, on its first listener, from this
machine (so within the default ``relay_networks``); when nothing listens there it goes
straight into the relay's spool (relay.receive.local), sent when the relay starts. A
user who may not read the relay's config (a web server's) sends to the default listener,
127.0.0.1:2525. Other
sendmail options (``-odi``, ``-oem``, ``-v``, ``-N``, ...) are accepted and have no
effect, as with Postfix's sendmail; ``-bs`` and the queue options are not offered.

Exit status: 0 taken (by the relay, or into its spool), 64 usage, 65 the message cannot
be read, 67 every recipient refused, 69 refused for good, 75 try again later (the
relay or its spool is busy or briefly unavailable), 78 the configuration.
"""

from __future__ import annotations

import email.utils
import getpass
import os
import smtplib
import socket
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO

from relay.accept.headers import field_name
from relay.config import DEFAULT_CONFIG_PATH, Config, ConfigError, Listener, load_config
from relay.core.headerfields import named_addresses, parse_header
from relay.ops.healthcheck import reachable
from relay.receive.local import LocalRefusal, spool_locally
from relay.spool.store import SpoolError

EX_OK, EX_USAGE, EX_DATAERR, EX_NOUSER = 0, 64, 65, 67
EX_UNAVAILABLE, EX_TEMPFAIL, EX_CONFIG = 69, 75, 78
# Where the relay listens unless its config says otherwise (server.listeners' default).
DEFAULT_LISTENER = ("127.0.0.1", Listener().port)

# Options that take an argument and are accepted without effect (sendmail's and Postfix's).
_IGNORED_WITH_ARG = frozenset("BLNRVXhO")
_IGNORED = frozenset("vGUnm")


class Usage(Exception):
    """A command line sendmail would not take."""


@dataclass
class Options:
    recipients: list[str] = field(default_factory=list)
    from_headers: bool = False           # -t
    dots_end: bool = True                # no -i / -oi: a line "." ends the message
    sender: str | None = None            # -f / -r
    full_name: str | None = None         # -F
    config: Path = DEFAULT_CONFIG_PATH   # -C


def parse(argv: list[str]) -> Options:
    """sendmail's flags, as Postfix's sendmail takes them (options before recipients)."""
    opts = Options()
    args = list(argv)
    while args:
        arg = args.pop(0)
        if arg == "--":
            break
        if not arg.startswith("-") or arg == "-":
            args.insert(0, arg)
            break
        flag, rest = arg[1], arg[2:]

        def value(flag: str = flag, rest: str = rest) -> str:
            if rest:
                return rest
            if not args:
                raise Usage(f"option -{flag} requires an argument")
            return args.pop(0)

        if flag == "t":
            opts.from_headers = True
        elif flag == "i" or arg == "-oi":
            opts.dots_end = False
        elif flag in "fr":
            opts.sender = value()
        elif flag == "F":
            opts.full_name = value()
        elif flag == "C":
            opts.config = Path(value())
        elif flag == "b":
            if rest not in ("m", ""):
                raise Usage(f"-b{rest} is not offered: only -bm (read a message from "
                            "standard input), the default")
        elif flag == "o":
            if not rest:
                value()
        elif flag in _IGNORED_WITH_ARG:
            value()
        elif flag in _IGNORED:
            pass
        elif flag == "q":
            raise Usage("-q is not offered: the relay runs its queue itself "
                        "(`smtp-oauth-relay queue flush` retries it now)")
        else:
            raise Usage(f"unknown option {arg}")
    for arg in args:
        opts.recipients += [a for _, a in email.utils.getaddresses([arg]) if a]
    return opts


def read_message(stream: BinaryIO, dots_end: bool) -> bytes:
    """Standard input with CRLF line ends; without -i a line of a single dot ends it."""
    lines: list[bytes] = []
    for raw in stream:
        line = raw.rstrip(b"\r\n")
        if dots_end and line == b".":
            break
        lines.append(line)
    return b"".join(line + b"\r\n" for line in lines)


def complete(data: bytes, sender: str, full_name: str | None) -> tuple[bytes, list[str]]:
    """The message with From and Date where it has none (as Postfix's cleanup adds them),
    and the addresses its To, Cc and Bcc name (for -t)."""
    if not field_name(data):
        data = b"\r\n" + data    # no header section at all (`echo hi | sendmail x@y`)
    header = parse_header(data)
    named = named_addresses(header, ("To", "Cc", "Bcc"))
    added = b""
    if header.get("From") is None:
        added += b"From: " + email.utils.formataddr((full_name or "", sender)).encode() + b"\r\n"
    if header.get("Date") is None:
        added += b"Date: " + email.utils.formatdate(localtime=True).encode() + b"\r\n"
    if not data.startswith(b"\r\n") and b"\r\n\r\n" not in data:
        data += b"\r\n"            # headers only: the empty line that ends them
    return added + data, named


def main(argv: list[str] | None = None, stdin: BinaryIO | None = None) -> int:
    try:
        opts = parse(sys.argv[1:] if argv is None else argv)
    except Usage as exc:
        return _fail(EX_USAGE, str(exc))
    config: Config | None = None
    if opts.config.exists() and not os.access(opts.config, os.R_OK):
        # A web server's or a user's program, which may not read the relay's config
        # (root:smtp-oauth-relay 0640): the relay where the config's default puts it.
        hostname = socket.getfqdn()
    else:
        try:
            config = load_config(opts.config, check_secrets=False)
        except ConfigError as exc:
            return _fail(EX_CONFIG, exc.render())
        hostname = config.server.hostname
    sender = opts.sender if opts.sender is not None else f"{_user()}@{hostname}"
    try:
        data = read_message(stdin or sys.stdin.buffer, opts.dots_end)
    except OSError as exc:
        return _fail(EX_DATAERR, f"cannot read the message: {exc.strerror or exc}")
    data, named = complete(data, sender, opts.full_name)
    recipients = list(dict.fromkeys([*opts.recipients, *(named if opts.from_headers else [])]))
    if not recipients:
        return _fail(EX_USAGE, "no recipients: name them, or use -t to take them from the "
                               "message's To, Cc and Bcc")
    return submit(config, sender, recipients, data)


def submit(config: Config | None, sender: str, recipients: list[str], data: bytes) -> int:
    """To the running relay, or into its spool when nothing listens. ``config`` None: it
    could not be read; the relay is looked for where the defaults put it."""
    host, port = _listener(config) if config is not None else DEFAULT_LISTENER
    try:
        return _over_smtp(host, port, sender, recipients, data)
    except ConnectionRefusedError:
        pass
    except (OSError, smtplib.SMTPException) as exc:
        return _fail(EX_TEMPFAIL, f"the relay at {host}:{port} did not take the message: "
                                  f"{exc}; try again later")
    if config is None:
        return _fail(EX_TEMPFAIL, f"the relay is not running at {host}:{port}, and this "
                                  "user may not read its config to find its spool; try "
                                  "again once it runs")
    try:
        mid = spool_locally(config, sender, recipients, data)
    except LocalRefusal as exc:
        return _fail(EX_UNAVAILABLE if exc.reply.permanent else EX_TEMPFAIL, str(exc.reply))
    except SpoolError as exc:
        return _fail(EX_TEMPFAIL, f"the relay is not running at {host}:{port}, and its spool "
                                  f"cannot take the message: {exc}")
    except OSError as exc:
        return _fail(EX_TEMPFAIL, f"the relay is not running at {host}:{port}, and its spool "
                                  f"{config.spool.directory} cannot take the message: "
                                  f"{exc.strerror or exc}")
    print(f"sendmail: the relay is not running; message {mid} is in its spool and goes "
          "out when it starts", file=sys.stderr)
    return EX_OK


def _user() -> str:
    try:
        return getpass.getuser()
    except (OSError, KeyError):        # no login name and no passwd entry (a container)
        return "nobody"


def _listener(config: Config) -> tuple[str, int]:
    """The first plain listener (the first one if all use TLS), as reachable from here."""
    listeners = config.server.listeners
    chosen = next((li for li in listeners if li.tls == "none"), listeners[0])
    return reachable(chosen.address), chosen.port


def _over_smtp(host: str, port: int, sender: str, recipients: list[str],
               data: bytes) -> int:
    with smtplib.SMTP(host, port, local_hostname=socket.getfqdn(), timeout=120) as smtp:
        smtp.ehlo()
        options = [] if data.isascii() else ["BODY=8BITMIME"]
        code, text = smtp.mail(sender, options)
        if code != 250:
            return _refused(code, text, "the sender")
        accepted: list[tuple[str, int, bytes]] = []
        refused: list[tuple[str, int, bytes]] = []
        for rcpt in recipients:
            code, text = smtp.rcpt(rcpt)
            (accepted if code in (250, 251) else refused).append((rcpt, code, text))
        for rcpt, code, text in refused:
            print(f"sendmail: <{rcpt}>: {code} {text.decode(errors='replace')}",
                  file=sys.stderr)
        if not accepted:
            smtp.rset()
            temporary = any(400 <= code < 500 for _, code, _ in refused)
            return EX_TEMPFAIL if temporary else EX_NOUSER
        try:
            code, text = smtp.data(data)
        except smtplib.SMTPDataError as exc:            # DATA itself refused
            code, text = exc.smtp_code, _bytes(exc.smtp_error)
        if code != 250:
            return _refused(code, text, "the message")
    return EX_OK


def _bytes(text: bytes | str) -> bytes:
    return text if isinstance(text, bytes) else text.encode()


def _refused(code: int, text: bytes, what: str) -> int:
    reply = f"{code} {text.decode(errors='replace')}"
    if 400 <= code < 500:
        return _fail(EX_TEMPFAIL, f"the relay refused {what} for now: {reply}")
    return _fail(EX_UNAVAILABLE, f"the relay refused {what}: {reply}")


def _fail(status: int, message: str) -> int:
    print(f"sendmail: {message}", file=sys.stderr)
    return status
