"""The root of the relay's own exceptions.

- :class:`RelayError`: everything the relay raises on purpose derives from it, so a caller
  can tell the relay's own refusals from a bug;
- :class:`ReplyError`: a refusal that carries the SMTP :class:`~relay.core.reply.Reply` the
  client (or the queue) is to be given.
"""

from __future__ import annotations

from relay.core.reply import Reply


class RelayError(Exception):
    """A condition the relay recognises and explains (bad config, a refused login, ...)."""


class ReplyError(RelayError):
    """A refusal with the reply that says it; ``str()`` is that reply."""

    def __init__(self, reply: Reply) -> None:
        super().__init__(str(reply))
        self.reply = reply
