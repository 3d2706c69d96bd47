"""The one test message the command line sends (``send-test``, ``doctor --send-to``).

- :func:`build_test_message`: the message, as CRLF bytes ready for DATA;
- :func:`send_test_message`: send it through one profile with the relay's own deliverer,
  bypassing the queue, and return its id and the upstream's verdict.

Kept in one place so both commands send the same, recognisable text, with the headers
Exchange and the recipient's filters expect of a well-formed message (Date, Message-ID).
"""

from __future__ import annotations

import datetime as dt
import email.utils
from email.message import EmailMessage

from relay.accept.trace import local_received
from relay.config import Config
from relay.core.message import Content, DeliveryResult, Outbound, new_message_id


def build_test_message(sender: str, to: str, subject: str, hostname: str, *,
                       command: str = "send-test") -> bytes:
    """The message as CRLF bytes, ready for DATA; ``command`` names what sent it."""
    msg = EmailMessage()
    msg["From"] = sender
    msg["To"] = to
    msg["Subject"] = subject
    msg["Date"] = email.utils.formatdate(localtime=True)
    msg["Message-ID"] = email.utils.make_msgid(domain=hostname)
    msg.set_content(
        f"This is a test message sent by `smtp-oauth-relay {command}`.\n"
        "If you can read it, the relay's credential, token and mailbox permissions work.\n")
    return msg.as_bytes(policy=msg.policy.clone(linesep="\r\n"))


async def send_test_message(config: Config, profile: str, to: str, *, sender: str | None,
                            subject: str) -> tuple[str, DeliveryResult]:
    """Deliver one test message to ``to`` through ``profile`` (a name in the config),
    from ``sender`` (default: the profile's mailbox); its message id and the result."""
    from relay.deliver.deliverer import Deliverer
    from relay.oauth.registry import Tokens

    mail_from = sender or config.profiles[profile].mailbox
    mid = new_message_id()
    # A trace field with the id this command prints, as every message the relay sends has.
    text = (local_received(hostname=config.server.hostname, message_id=mid,
                           when=dt.datetime.now(dt.UTC))
            + build_test_message(mail_from, to, subject, config.server.hostname))
    msg = Outbound(id=mid, profile=profile, mail_from=mail_from,
                   rcpt_tos=[to], content=Content.from_bytes(text))
    tokens = Tokens(config)
    try:
        result = await Deliverer(config, tokens).deliver(msg)
    finally:
        await tokens.aclose()
    return msg.id, result
