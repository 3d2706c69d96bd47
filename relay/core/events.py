"""What the stages report as it happens, without knowing who listens.

- :class:`Hooks`: one method per event (a message received, an attempt delivered,
  deferred or bounced, a token fetch failed, a login refused, ...); this base ignores all;
- :data:`NO_HOOKS`: the listener that ignores everything, the default.

The stages (receive, queue, deliver, oauth) call these; :mod:`relay.ops.metrics` and
:mod:`relay.ops.profilehealth` listen. Living here, below every stage, it lets the stages
report without importing what listens, so the dependencies point one way.
"""

from __future__ import annotations

from relay.core.reply import Reply


class Hooks:
    """What the relay reports as it happens. This base ignores everything."""

    def received(self, profile: str, reply: Reply) -> None:
        """A client's message (after DATA) was answered with ``reply``: 2xx once it is in
        the spool (or delivered), 4xx when it could not be stored, 5xx when a waiting
        client was given the upstream's permanent refusal."""

    def delivered(self, profile: str, reply: Reply) -> None:
        """An attempt delivered the message to (some of) its recipients."""

    def deferred(self, profile: str, reply: Reply) -> None:
        """An attempt ended with recipients left for a later retry."""

    def bounced(self, profile: str, reply: Reply) -> None:
        """Recipients failed for good (a delivery report follows, or a waiting client
        was given the permanent reply)."""

    def attempt(self, reply: Reply, seconds: float) -> None:
        """One delivery attempt through the upstream took ``seconds``."""

    def token_error(self, credential: str) -> None:
        """A token fetch for ``credential`` failed."""

    def sign_in_needed(self, profile: str, reason: str) -> None:
        """``profile``'s credential is a user's sign-in that no longer works (revoked,
        expired, never made): only that user can mend it (``reason`` says how)."""

    def login_refused(self, profile: str, mailbox: str, reply: Reply, *,
                      fresh_token: bool) -> None:
        """An attempt for ``profile`` ended with the upstream refusing the relay's login for
        ``mailbox``: a reply the classifier marks as a login problem (535 5.7.3, 5.7.139,
        5.7.30, 430 4.2.0 mailbox logon failure, 530 5.7.57). ``fresh_token``: the login
        was refused again with a freshly fetched token, so the token is not the cause."""

    def logged_in(self, profile: str, mailbox: str, *, delivered: bool) -> None:
        """An attempt for ``profile`` ran on a session whose login the upstream accepted,
        and got no login-problem reply; ``delivered``: the upstream took the message, one
        an application handed over (not a delivery report of the relay's own), for (some
        of) its recipients."""

    def send_as_denied(self, profile: str, mailbox: str, reply: Reply) -> None:
        """The upstream refused a message of ``profile`` because ``mailbox`` may not send
        as its sender (SendAsDenied, 5.7.60)."""


NO_HOOKS = Hooks()
