"""A message handed over on the machine itself while the relay is not running.

- :func:`spool_locally`: route, clean and trace a message as the SMTP receiver would,
  and put it into the relay's spool (incoming/), durably, from where the relay sends it
  when it starts; returns the queue id. Raises :class:`LocalRefusal` with the reply the
  SMTP receiver would have given, or :class:`relay.spool.store.SpoolError` when the spool
  cannot be used (the relay holds it, or it cannot be written).

``smtp-oauth-relay sendmail`` hands mail to the running relay over SMTP; this is what it
does when nothing answers there, so that a cron job's report or a PHP mail() is not lost
because the relay is stopped. It takes the spool's claim for the moment it writes, as a
starting relay would: the two can never both place and deliver from it.
"""

from __future__ import annotations

import datetime as dt
import time

from relay.accept.cleanup import prepare_headers
from relay.accept.policy import PolicyRejected, check_envelope_sender
from relay.accept.route import Router, Unroutable
from relay.accept.trace import received_header
from relay.config import Config
from relay.core.errors import ReplyError
from relay.core.message import new_message_id
from relay.spool.records import Entry, State
from relay.spool.store import Spool

LOCAL_CLIENT = "127.0.0.1"     # what routing and the trace field see: this machine


class LocalRefusal(ReplyError):
    """The message is refused, with the reply the SMTP receiver would have given."""


def spool_locally(config: Config, sender: str, recipients: list[str], data: bytes, *,
                  helo: str = "localhost") -> str:
    """Place the message (CRLF line ends, header section first) in incoming/."""
    try:
        profile_name = Router(config).select(user=None, sender=sender, client_ip=LOCAL_CLIENT)
        profile = config.profiles[profile_name]
        check_envelope_sender(profile_name, profile, sender)
        # The header section with its lines' CRLFs; the empty line starts the body, as
        # the SMTP receiver splits them (relay.receive.data).
        head, sep, body = data.partition(b"\r\n\r\n")
        section, body = (head + b"\r\n", b"\r\n" + body) if sep else (data, b"")
        policy = prepare_headers(profile_name, profile, sender, section,
                                 config.server.max_header_addresses)
    except (Unroutable, PolicyRejected) as exc:
        raise LocalRefusal(exc.reply) from None
    mid = new_message_id()
    trace = received_header(client_helo=helo, client_ip=LOCAL_CLIENT,
                            hostname=config.server.hostname, protocol="local",
                            message_id=mid,
                            recipient=recipients[0] if len(recipients) == 1 else None,
                            when=dt.datetime.now(dt.UTC))
    content = trace + policy.data + body
    entry = Entry(id=mid, profile=profile_name, mail_from=policy.mail_from,
                  rcpt_tos=list(recipients), size=len(content), received_at=time.time(),
                  mail_options=[] if content.isascii() else ["BODY=8BITMIME"],
                  client=LOCAL_CLIENT, mailbox=profile.mailbox,
                  return_path=sender if policy.mail_from != sender else None,
                  original_from=policy.original_from)
    spool = Spool(config.spool.directory)
    spool.open(on_tmpfs=config.spool.on_tmpfs)
    spool.claim()
    try:
        spool.add(entry, content, State.INCOMING)
        spool.sync_dirs({State.INCOMING})
    finally:
        spool.unclaim()
    return mid
