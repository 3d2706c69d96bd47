"""What every stage of the relay shares, and nothing that belongs to one stage.

- relay.core.reply: :class:`Reply`, an SMTP reply as a value, ``Reply.parse``;
- relay.core.errors: :class:`RelayError`, the root of the relay's exceptions, and
  :class:`ReplyError`, one that carries the reply a client or the queue should get;
  :func:`find_cause` along an exception's causes;
- relay.core.message: the message's bytes (:class:`Content`), the outbound message and
  its envelope, delivery results;
- relay.core.events: :class:`Hooks`, what the stages report, with no listener assumed;
- relay.core.log: the log format, message ids in every line, secrets scrubbed;
- relay.core.secrets and relay.core.passhash: secret values and local password hashes;
- relay.core.net and relay.core.text: ``host:port`` (IPv6 in brackets) and bounded
  one-line text, written once for every stage;
- relay.core.diskio: the thread the message path's disk work runs on.

Nothing here imports another part of the relay, so every part may import it.
"""
