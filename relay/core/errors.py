"""The root of the relay's own exceptions, and the walk along an exception's causes.

- :class:`RelayError`: everything the relay raises on purpose derives from it, so a caller
  can tell the relay's own refusals from a bug;
- :class:`ReplyError`: a refusal that carries the SMTP :class:`~relay.core.reply.Reply` the
  client (or the queue) is to be given;
- :func:`causes` and :func:`find_cause`: an exception and what it was raised from or while
  handling, for explaining a library's wrapped error by the one underneath (a certificate
  failure inside a connection error, a discovery reply inside msal's ValueError).
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import TypeVar

from relay.core.reply import Reply


class RelayError(Exception):
    """A condition the relay recognises and explains (bad config, a refused login, ...)."""


class ReplyError(RelayError):
    """A refusal with the reply that says it; ``str()`` is that reply."""

    def __init__(self, reply: Reply) -> None:
        super().__init__(str(reply))
        self.reply = reply


_E = TypeVar("_E", bound=BaseException)


def causes(exc: BaseException) -> Iterator[BaseException]:
    """``exc``, then its ``__cause__`` (or else ``__context__``), and so on; each once."""
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        yield current
        current = current.__cause__ or current.__context__


def find_cause(exc: BaseException, kind: type[_E]) -> _E | None:
    """The first exception of ``kind`` among :func:`causes` of ``exc``, or None."""
    return next((e for e in causes(exc) if isinstance(e, kind)), None)
