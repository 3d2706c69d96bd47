"""What is done to a message's header section before it is kept (Postfix's cleanup).

- :func:`prepare_headers`: the header section of one message, checked and made what will
  be sent: sender fields small enough to read safely, 8-bit bytes that are not UTF-8 made
  UTF-8, ``Bcc`` and ``Resent-Bcc`` removed, then the profile's sender policy
  (:mod:`relay.accept.policy`).

CPU-bound and bounded by the receiving side's limits; the caller runs it in a worker
thread so that one pathological message cannot hold up the event loop.
"""

from __future__ import annotations

import re

from relay.accept.headers import RawMessage
from relay.accept.policy import PolicyRejected, PolicyResult, apply_sender_policy
from relay.config import Profile
from relay.core.reply import Reply

# Removed from every message (see prepare_headers); the pattern finds them in the raw
# header section first, so that a message without them costs no search field by field.
BLIND_COPY_FIELDS = ("Bcc", "Resent-Bcc")
_BLIND_COPY = re.compile(rb"^(?:resent-)?bcc[ \t]*:", re.IGNORECASE | re.MULTILINE)


def prepare_headers(profile_name: str, profile: Profile, mail_from: str, section: bytes,
                    max_addresses: int) -> PolicyResult:
    """Everything done to a header section before it is kept; CPU-bound, so a large section
    is worked in a worker thread (relay.receive.incoming). Raises :class:`PolicyRejected`
    with the reply for the client.

    First what makes the section safe to parse (the size and count of sender fields),
    then 8-bit bytes that are not UTF-8 made UTF-8 (:meth:`RawMessage.recode_8bit`), then
    the blind-copy fields go, then the profile's sender policy.

    ``Bcc`` and ``Resent-Bcc`` are removed as Postfix's cleanup removes them: the
    recipients come from the envelope, and a field left in would show every recipient
    (and the mailbox's Sent Items) who was copied in secret.
    """
    msg = RawMessage(section)
    problem = msg.sender_fields_problem(max_addresses)
    if problem is not None:
        raise PolicyRejected(Reply(552, f"5.6.0 Message refused: {problem}"))
    recoded = not section.isascii() and msg.recode_8bit()
    blind = _BLIND_COPY.search(section) is not None and msg.remove(*BLIND_COPY_FIELDS)
    if blind or recoded:
        section = msg.to_bytes()
    return apply_sender_policy(profile_name, profile, mail_from, section)
