"""A pooled session lent out for one message, and what the pool keeps per session.

- :class:`Lease`: what :meth:`relay.deliver.pool.SessionPool.session` lends: send through
  it, and the pool can tell afterwards whether the session is fit to be reused
  (:meth:`~Lease.unfit`) and whether a broken one failed before DATA, so that the message
  may go again on a fresh session (:attr:`~Lease.lost_before_data`);
- :class:`PooledSession`: a session in the pool, with its number (for logs), the messages
  sent on it and when it was last used.

After anything but a clean verdict on the message a session is not reused: its protocol
state is unknown, or the upstream asked the relay to back off.
"""

from __future__ import annotations

from dataclasses import dataclass

from relay.core.message import DeliveryResult, Outbound
from relay.deliver.classify import Action, classify
from relay.deliver.session import OnAccepted, UpstreamSession

# Stages at which a broken connection cannot have delivered any part of the message.
_BEFORE_DATA = frozenset({"MAIL FROM", "RCPT TO"})
# Verdicts after which the session is known to be in a clean state and welcome upstream.
_REUSABLE = frozenset({Action.DELIVERED, Action.BOUNCE, Action.TENANT_LIMIT})


@dataclass(eq=False)
class PooledSession:
    """A session in the pool: ``number`` names it in logs."""

    session: UpstreamSession
    number: int
    messages: int = 0
    last_used: float = 0.0


class Lease:
    """A session lent out by :meth:`relay.deliver.pool.SessionPool.session`; send through
    it so the pool can tell afterwards whether the session is fit to be reused."""

    def __init__(self, conn: PooledSession, reused: bool) -> None:
        self.conn = conn
        self.reused = reused
        self.result: DeliveryResult | None = None
        self.lost_before_data = False
        self._discard = False

    @property
    def session(self) -> UpstreamSession:
        return self.conn.session

    @property
    def number(self) -> int:
        """The session's number in this pool, for logs."""
        return self.conn.number

    async def send_one(self, msg: Outbound, *, require_all_recipients: bool = True,
                       on_accepted: OnAccepted | None = None) -> DeliveryResult:
        session = self.conn.session
        self.conn.messages += 1
        self.result = await session.send_one(
            msg, require_all_recipients=require_all_recipients, on_accepted=on_accepted)
        # The connection broke before DATA: nothing was committed upstream, so sending
        # the message again on another session cannot deliver it twice.
        self.lost_before_data = (not session.is_open and session.stage in _BEFORE_DATA
                                 and not self.result.accepted)
        return self.result

    def discard(self) -> None:
        """Close the session on release instead of keeping it."""
        self._discard = True

    def unfit(self) -> str | None:
        """Why the session must not go back to the pool, or None if it may."""
        if self._discard:
            return "discarded"
        if not self.conn.session.is_open:
            return "connection lost or closed by the upstream"
        if self.result is not None and classify(self.result.reply).action not in _REUSABLE:
            return f"after reply {self.result.reply.code}"
        return None
