"""What goes wrong on the way to the upstream, as the replies and exceptions the relay uses.

- :class:`AuthenticationRejected`: the upstream refused the XOAUTH2 login with a 5xx; the
  deliverer (not the session) decides to fetch a new token and retry;
- :class:`UpstreamUnavailable`: no usable session, with the 4xx the client is to be told;
- :func:`path_failure`: a broken path (DNS, connect, TLS, timeout, dropped connection) as
  ``451 4.4.x`` naming host:port, the protocol step and the cause;
- :func:`session_refusal`: the upstream's refusal before any message was offered (its 5xx
  made temporary: it is about the relay's session, not about the message);
- :func:`transaction_reply`: the upstream's verdict on a transaction, passed on as given
  unless it is about the relay's login (530) or not a reply SMTP defines;
- :func:`refusal_for`: one reply for a transaction abandoned because recipients were
  refused.

The rule behind them: only the upstream's own verdict on a message may be permanent.
Everything about the path there becomes a 4xx, so that the sending application (or the
queue) keeps the message and tries again.
"""

from __future__ import annotations

import socket
import ssl

from aiosmtplib import (
    SMTPConnectResponseError,
    SMTPConnectTimeoutError,
    SMTPResponseException,
    SMTPServerDisconnected,
    SMTPTimeoutError,
)

from relay.config import Upstream
from relay.core.errors import ReplyError, find_cause
from relay.core.net import host_port
from relay.core.reply import Reply
from relay.core.text import one_line


class AuthenticationRejected(ReplyError):
    """The upstream refused the XOAUTH2 login with a 5xx (e.g. ``535 5.7.3``)."""

    def __str__(self) -> str:
        reply = self.reply
        return f"upstream rejected the login: {reply}"


class UpstreamUnavailable(ReplyError):
    """No usable session: ``reply`` is what the sending client should be told (4xx)."""


def refusal_for(refused: dict[str, Reply], total: int) -> Reply:
    """One reply for a transaction abandoned because recipients were refused.

    Permanent only if every refusal was permanent, so one temporary refusal makes the
    client retry the whole message; the upstream's own words are kept per recipient.
    """
    permanent = all(r.permanent for r in refused.values())
    first = next(r for r in refused.values() if r.permanent == permanent)
    code = first.code if 400 <= first.code < 600 else (550 if permanent else 450)
    enhanced = first.enhanced or ("5.1.0" if permanent else "4.1.0")
    details = "; ".join(f"<{rcpt}>: {reply}" for rcpt, reply in refused.items())
    return Reply(code, f"{enhanced} Upstream refused {len(refused)} of {total} "
                       f"recipient(s), message not sent: {details}")


def session_refusal(code: int, text: str, where: str, stage: str) -> Reply:
    """A refusal before any message was offered: 4xx as given, 5xx made temporary,
    since it is about the relay's session, not about the message."""
    if 400 <= code < 500:
        return Reply(code, text)
    return Reply(451, f"4.4.1 Upstream {where} refused the session at "
                      f"{stage}: {code} {one_line(text)}")


def transaction_reply(code: int, text: str, where: str, stage: str) -> Reply:
    """The upstream's verdict on the transaction, passed on as given."""
    if code == 530:
        # "not authenticated" mid-session is the relay's fault, never the message's
        return Reply(451, f"4.7.0 Upstream {where} says the relay is not "
                          f"authenticated: {code} {one_line(text)}")
    if 400 <= code < 600:
        return Reply(code, text)
    return Reply(451, f"4.4.2 Upstream {where} gave an unexpected reply at "
                      f"{stage}: {code} {one_line(text)}")


def path_failure(exc: BaseException, upstream: Upstream, stage: str) -> Reply:
    """A 451 naming host:port, the protocol step and the cause of a broken path."""
    where, timeout = host_port(upstream.host, upstream.port), upstream.timeout
    if (cert := find_cause(exc, ssl.SSLCertVerificationError)) is not None:
        detail = cert.verify_message or cert.reason or str(cert)
        if "mismatch" in detail.lower():
            hint = f"the certificate is not valid for {upstream.host}; check the host"
        else:
            hint = ("if the upstream uses a private CA, set upstreams.<name>.ca_file "
                    "to that CA")
        return Reply(451, f"4.4.1 TLS with upstream {where} failed: certificate verify "
                          f"failed ({detail}) - {hint}")
    if (tls := find_cause(exc, ssl.SSLError)) is not None:
        return Reply(451, f"4.4.1 TLS handshake with upstream {where} failed: "
                          f"{tls.reason or tls}")
    if (dns := find_cause(exc, socket.gaierror)) is not None:
        return Reply(451, f"4.4.1 Cannot resolve upstream host {upstream.host}: "
                          f"{dns.strerror or dns}")
    if find_cause(exc, ConnectionRefusedError) is not None:
        return Reply(451, f"4.4.1 Cannot connect to upstream {where}: connection refused")
    if isinstance(exc, SMTPConnectTimeoutError):
        return Reply(451, f"4.4.1 Cannot connect to upstream {where}: no answer within "
                          f"{timeout:g} s")
    if isinstance(exc, SMTPConnectResponseError):
        return session_refusal(exc.code, exc.message, where, stage)
    after = "; the message may or may not have been accepted" if stage == "DATA" else ""
    if isinstance(exc, SMTPTimeoutError | TimeoutError):
        return Reply(451, f"4.4.2 Upstream {where} did not answer within {timeout:g} s "
                          f"during {stage}{after}")
    if isinstance(exc, SMTPServerDisconnected | ConnectionError):
        return Reply(451, f"4.4.2 Upstream {where} closed the connection during "
                          f"{stage}{after}")
    if isinstance(exc, SMTPResponseException):
        return Reply(451, f"4.4.2 Upstream {where} sent an invalid reply during {stage}: "
                          f"{one_line(exc.message)}")
    if isinstance(exc, OSError):
        verb = "Cannot connect to" if stage == "connect" else "Network error with"
        return Reply(451, f"4.4.1 {verb} upstream {where} during {stage}: "
                          f"{exc.strerror or exc.__class__.__name__}")
    return Reply(451, f"4.4.2 Upstream {where} failed during {stage}: "
                      f"{exc.__class__.__name__}: {exc}")
