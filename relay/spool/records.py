"""What the spool keeps of a message besides its bytes: its state and its metadata record.

- :class:`State`: the queue a message is in, which is the directory its metadata file is in
  (incoming, active, deferred, hold, failed);
- :class:`Entry`: one message's metadata file, the message's envelope
  (:class:`relay.core.message.Envelope`, shared with what delivery sends) and its delivery
  history, its replies as :class:`relay.core.reply.Reply` values; :meth:`Entry.to_json`
  writes the file, :meth:`Entry.from_json` reads and validates it.

The file is one flat JSON object. Its keys and their order are those of every version
so far (:data:`KEYS`), so files written by this version and by older ones read the same
in both; keys a newer version adds are ignored. Keys added since (:data:`LATER_KEYS`) are
written after those, and only when they hold something, so that a record without them
is written as every version writes it, and read by every version. Replies are written in
their one-line form (``"550 5.1.1 User unknown"``), which an operator reads with ``cat``
and ``jq``, and read back as values. A file another version wrote, a disk error or an
operator's editor damaged is refused as a whole (ValueError, with the reason),
so the queue sets it aside in corrupt/ instead of tripping over it on every scan.
"""

from __future__ import annotations

import enum
import json
import math
import re
from dataclasses import dataclass, field
from typing import Annotated, Any

from pydantic import PlainValidator, TypeAdapter

from relay.core.message import Envelope
from relay.core.reply import Reply


def _reply(value: Any) -> Reply:
    if isinstance(value, Reply):
        return value
    if isinstance(value, str):
        return Reply.parse(value)
    raise ValueError("a reply must be a string")


# A reply as the file holds it: its one-line text, read back as a Reply.
StoredReply = Annotated[Reply, PlainValidator(_reply)]


class State(enum.StrEnum):
    INCOMING = "incoming"
    ACTIVE = "active"
    DEFERRED = "deferred"
    HOLD = "hold"
    FAILED = "failed"


# The metadata file's keys, in the order they are written.
KEYS = ("id", "profile", "mail_from", "rcpt_tos", "size", "received_at", "mail_options",
        "client", "user", "return_path", "mailbox", "attempts", "next_attempt",
        "last_reply", "delivered", "failed")
# Keys of later versions, written after KEYS when not null; older versions ignore them.
LATER_KEYS = ("original_from",)
# A message id as the relay makes them (relay.core.message.new_message_id), with room for
# ids of other versions; nothing that could name another directory.
_ID = re.compile(r"^[0-9A-Za-z_-]{1,64}$")
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")


@dataclass(kw_only=True)
class Entry(Envelope):
    """Everything the relay knows about one spooled message except its bytes."""

    size: int
    received_at: float
    attempts: int = 0
    next_attempt: float = 0.0
    last_reply: StoredReply | None = None
    delivered: list[str] = field(default_factory=list)
    failed: dict[str, StoredReply] = field(default_factory=dict)   # for good, and why

    def to_json(self) -> bytes:
        # The attributes as they are (dataclasses.asdict would deep-copy every list and
        # turn each Reply into a dict, only for json.dumps to read them once).
        out = {key: getattr(self, key) for key in KEYS}
        out["last_reply"] = None if self.last_reply is None else str(self.last_reply)
        out["failed"] = {rcpt: str(reply) for rcpt, reply in self.failed.items()}
        out.update((key, value) for key in LATER_KEYS
                   if (value := getattr(self, key)) is not None)
        return json.dumps(out, separators=(",", ":")).encode()

    @classmethod
    def from_json(cls, raw: bytes, name: str | None = None) -> Entry:
        """Parse and validate a metadata file; ValueError (with the reason) if it is not one.

        Types are checked by a schema (a string where a list belongs, ``"attempts": "x"``),
        then what the types cannot say: the id is the file's, there is a recipient, times
        are real numbers, addresses hold no control characters. Unknown keys are ignored,
        so a file written by a newer version is still read.
        """
        entry = _ENTRY.validate_json(raw)
        problem = entry._problem(name)
        if problem is not None:
            raise ValueError(problem)
        return entry

    def _problem(self, name: str | None) -> str | None:
        if not _ID.match(self.id):
            return f"id {self.id[:80]!r} is not a message id"
        if name is not None and name != f"{self.id}.json":
            return f"id {self.id!r} does not match the file name {name!r}"
        if not self.rcpt_tos:
            return "no recipients"
        if not self.profile:
            return "no profile"
        for address in (self.mail_from, *self.rcpt_tos, *self.delivered, *self.failed,
                        self.return_path or "", self.mailbox or "", self.original_from or ""):
            if _CONTROL.search(address) or len(address) > 1000:
                return f"address {address[:80]!r} is not usable"
        if min(self.size, self.attempts) < 0:
            return "negative size or attempts"
        if not all(math.isfinite(t) for t in (self.received_at, self.next_attempt)):
            return "a time is not a finite number"
        return None

    @property
    def pending(self) -> list[str]:
        """The recipients still to be tried: neither delivered nor failed for good."""
        return [r for r in self.rcpt_tos if r not in self.delivered and r not in self.failed]


_ENTRY = TypeAdapter(Entry)
