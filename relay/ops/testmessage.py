"""The one test message the command line sends (``send-test``, ``doctor --send-to``).

Kept in one place so both commands send the same, recognisable text, with the headers
Exchange and the recipient's filters expect of a well-formed message (Date, Message-ID).
"""

from __future__ import annotations

import email.utils
from email.message import EmailMessage


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
