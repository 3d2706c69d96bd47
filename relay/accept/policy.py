"""Per-profile sender policy: what to do when an app sends as an address the mailbox may not.

Exchange Online refuses a message (``SendAsDenied``) when the envelope sender or the From
header is an address the authenticated mailbox has no Send As right for. Legacy apps and
devices often cannot change their From, so each profile picks one of:

- ``keep``: pass everything through and let Exchange decide (the mailbox has the rights);
- ``rewrite``: send as the mailbox, keep the app's display name, and put the app's address
  in ``Reply-To`` so replies still reach it; a ``Sender``, ``Resent-From`` or
  ``Resent-Sender`` naming an address that is not permitted is removed; what was replaced
  is named in the trace fields ``X-Original-Sender`` (the envelope sender) and
  ``X-Original-From`` (the From), so a recipient can tell which application sent it;
- ``reject``: refuse with a 550 that says exactly which setting to change, when the
  envelope sender or any address in ``From``, ``Sender``, ``Resent-From`` or
  ``Resent-Sender`` is not permitted, or when such a field can only be read by guessing
  (an unquoted display name with ``@`` or a comma, which strict readers take apart).

"Permitted" means the mailbox itself or a ``send_as`` glob. Headers are read with the email
package (see :mod:`relay.accept.headers`); only the fields changed here are re-rendered. The policy
sees the header section in its canonical form (relay.receive.data), which is byte for byte
what Exchange will be given, so no field can hide from it behind an odd line break.
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass

from relay.accept.headers import SENDER_FIELDS, Address, HeaderError, ParsedAddresses, RawMessage
from relay.accept.names import clean_display_name
from relay.accept.route import address_matches, normalize_address
from relay.config import Profile
from relay.core.errors import ReplyError
from relay.core.reply import Reply
from relay.core.text import truncate

log = logging.getLogger(__name__)

_UNSAFE_TEXT = re.compile(r"[^\x20-\x7e]")


class PolicyRejected(ReplyError):
    """The profile's policy refuses this sender; ``reply`` is the 550 to give the client."""


# The longest original From kept (log, spool, X-Original-From): a few addresses; the
# spool refuses a record with a longer value.
MAX_ORIGINAL_FROM = 512


@dataclass(frozen=True)
class PolicyResult:
    """What goes upstream.

    ``rewritten`` is true when the envelope sender or any header was changed;
    ``original_from`` holds the From header's address(es) when that header was replaced
    (its text, made safe, when it named no address that could be read).
    """

    mail_from: str
    data: bytes
    rewritten: bool
    original_from: str | None = None


def is_permitted(profile: Profile, address: str) -> bool:
    """The mailbox itself, or an address matching one of the profile's ``send_as`` globs."""
    address = normalize_address(address)
    if not address:
        return False
    return address.lower() == profile.mailbox.lower() or address_matches(address,
                                                                         profile.send_as)


def _safe(text: str, limit: int = 100) -> str:
    # Reply lines are limited to 512 octets (RFC 5321 4.5.3.1.5); client text is bounded.
    text = _UNSAFE_TEXT.sub("?", text)
    return truncate(text, limit)


def _advice(profile_name: str) -> str:
    return f"add it to profiles.{profile_name}.send_as or use sender_policy: rewrite"


def _rejected(text: str) -> PolicyRejected:
    return PolicyRejected(Reply(550, f"5.7.1 {text}"))


def check_envelope_sender(profile_name: str, profile: Profile, mail_from: str) -> None:
    """At MAIL FROM: refuse early what a ``reject`` profile would refuse after DATA anyway."""
    if profile.sender_policy != "reject":
        return
    sender = normalize_address(mail_from)
    if is_permitted(profile, sender):
        return
    where = f"mailbox {profile.mailbox} (profile {profile_name})"
    if not sender:
        raise _rejected(f"The null sender <> is not permitted for {where}; send with "
                        f"MAIL FROM:<{profile.mailbox}> or use sender_policy: rewrite")
    raise _rejected(f"Sender {_safe(sender)} is not permitted for {where}; "
                    f"{_advice(profile_name)}")


def apply_sender_policy(profile_name: str, profile: Profile, mail_from: str,
                        data: bytes) -> PolicyResult:
    """Apply the profile's policy to one message; raises :class:`PolicyRejected`.

    Never raises anything else for a malformed message: a From header that cannot be
    parsed is "not permitted" (rewrite replaces it, reject refuses it with the reason).
    """
    sender = normalize_address(mail_from)
    if profile.sender_policy == "keep":
        # Exchange needs a sender to submit as; a bounce (null sender) goes as the mailbox.
        return PolicyResult(sender or profile.mailbox, data, rewritten=not sender)
    if profile.sender_policy == "reject":
        check_envelope_sender(profile_name, profile, sender)
        _check_senders(profile_name, profile, RawMessage(data))
        return PolicyResult(sender, data, rewritten=False)
    return _rewrite(profile, sender, data)


def _check_senders(profile_name: str, profile: Profile, msg: RawMessage) -> None:
    """Every address in every sender field must be permitted, and there must be a From.

    A field only the lenient fallback can read (``Sales @ HQ <a@b>``, ``x@y <a@b>``) is
    refused too: ``reject`` passes the message on unchanged, and a strict reader takes
    another address from it (``x@y``) than the one checked here.
    """
    where = f"mailbox {profile.mailbox} (profile {profile_name})"
    for name in SENDER_FIELDS:
        try:
            parsed = msg.parse_addresses(name)
        except HeaderError as exc:
            raise _rejected(f"{_safe(str(exc))}, so it cannot be checked against {where}; "
                            f"fix the {name} header or use sender_policy: rewrite") from None
        addresses = parsed.addresses
        if parsed.salvaged:
            raise _rejected(f"The {name} header is ambiguous (a display name with special "
                            "characters such as @ or a comma must be quoted), so it cannot "
                            f"be checked against {where}; quote the display name or use "
                            "sender_policy: rewrite")
        if name == "From" and not addresses:
            raise _rejected(f"The message has no From address; {where} needs one it is "
                            "permitted to send as; add a From header or use "
                            "sender_policy: rewrite")
        for addr in addresses:
            if not is_permitted(profile, addr.addr_spec):
                raise _rejected(f"{name} address {_safe(addr.addr_spec)} is not permitted "
                                f"for {where}; {_advice(profile_name)}")


def _rewrite(profile: Profile, sender: str, data: bytes) -> PolicyResult:
    mailbox = profile.mailbox
    upstream_sender = sender if is_permitted(profile, sender) else mailbox
    msg = RawMessage(data)
    try:
        parsed = msg.parse_addresses("From")
        originals, salvaged = parsed.addresses, parsed.salvaged
        from_ok = bool(originals) and all(is_permitted(profile, a.addr_spec) for a in originals)
    except HeaderError as exc:
        log.info("From header unusable (%s); sending as %s", exc, mailbox)
        originals, salvaged, from_ok = [], False, False

    original_from: str | None = None
    if not from_ok:
        original_from = _original_from(msg, originals)
        name = next((a.display_name for a in originals if a.display_name), "")
        msg.set("From", _mailbox_address(mailbox, clean_display_name(name)))
        replies = [a for a in originals if a.username and a.domain
                   and a.addr_spec.lower() != mailbox.lower()]
        if replies and "Reply-To" not in msg:
            msg.set("Reply-To", [Address(username=a.username, domain=a.domain)
                                 for a in replies])
    elif salvaged or any(raw[4:5] != b":" for raw in msg.raw_fields("From")):
        # Permitted, but only readable by the lenient fallback, or written "From :" (the
        # obsolete syntax, which the email package takes for an mbox "From " line and
        # skips): write it out the way Exchange (and everyone else) will read it as intended.
        msg.set("From", [Address(display_name=clean_display_name(a.display_name),
                                 username=a.username, domain=a.domain) for a in originals])

    for name in SENDER_FIELDS[1:]:
        # Exchange checks Send As against these too: one the mailbox may not use goes, and
        # one only the lenient fallback could read is written out as it was read (a strict
        # reader would take another address from it).
        if name not in msg:
            continue
        permitted = _permitted(profile, msg, name)
        if permitted is None:
            msg.remove(name)
        elif permitted.salvaged:
            msg.set(name, [Address(display_name=clean_display_name(a.display_name),
                                   username=a.username, domain=a.domain)
                           for a in permitted.addresses])
    if from_ok and len(originals) > 1 and "Sender" not in msg:
        # RFC 5322 requires a Sender when From lists several mailboxes.
        msg.set("Sender", _mailbox_address(mailbox, ""))
    # Trace fields, at the top like Received: who the message was from before the
    # rewrite. Only text the relay has checked goes in (an envelope sender has no control
    # characters and at most 254 octets; the original From is addresses, or text made
    # safe), and a field of the client's by the same name goes: it would not be believed.
    original_sender = None if upstream_sender == sender else sender or "<>"
    for name, value in (("X-Original-From", original_from),
                        ("X-Original-Sender", original_sender)):
        if value is not None:
            msg.remove(name)
            msg.prepend(msg.render(name, value))

    changed = msg.changed or upstream_sender != sender
    if changed:
        log.debug("sender policy rewrite: envelope %s -> %s, From %s", sender or "<>",
                  upstream_sender, "rewritten" if msg.changed else "kept")
    return PolicyResult(upstream_sender, msg.to_bytes() if msg.changed else data,
                        rewritten=changed, original_from=original_from)


def _original_from(msg: RawMessage, originals: list[Address]) -> str | None:
    """What the From said, for the log, the spool and X-Original-From: its addresses, or,
    if none could be read (``From: root (Cron Daemon)``), its text made safe; bounded."""
    if originals:
        text = ", ".join(a.addr_spec for a in originals)
    else:
        raws = (raw.split(b":", 1)[1] for raw in msg.raw_fields("From"))
        text = clean_display_name(" ".join(
            raw.decode("utf-8", "surrogateescape") for raw in raws))
    return truncate(text, MAX_ORIGINAL_FROM) or None


def _permitted(profile: Profile, msg: RawMessage, name: str) -> ParsedAddresses | None:
    """The addresses of the ``name`` fields if there are some and all are permitted."""
    try:
        parsed = msg.parse_addresses(name)
    except HeaderError:
        return None
    addresses = parsed.addresses
    if addresses and all(is_permitted(profile, a.addr_spec) for a in addresses):
        return parsed
    return None


def _mailbox_address(mailbox: str, display_name: str) -> Address:
    username, _, domain = mailbox.rpartition("@")
    return Address(display_name=display_name, username=username, domain=domain)
