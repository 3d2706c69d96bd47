"""Whether each mailbox profile can deliver, judged from what its delivery attempts saw.

A relay can have every listener bound, a writable spool and a token for every credential
and still deliver nothing for a profile: Exchange refuses the login because the mailbox
permission was never granted (``535 5.7.3``), SMTP AUTH is disabled for the mailbox
(``5.7.139``), or every message is refused because the mailbox may not send as the
application's sender (``SendAsDenied``). Those are setup problems an operator must fix,
and mail only piles up until then, so /readyz and a metric report them per profile.

Nothing here contacts Exchange: readiness reports what delivery attempts observed (a probe
that logged in would count against the mailbox's 3 sessions and could itself be what is
refused). The deliverer reports through :class:`relay.core.events.Hooks`; this class keeps,
per configured profile only, the current streak of each kind of refusal:

* **Login refused** (replies the classifier marks ``Problem.LOGIN``): a login that
  Exchange refused again with a freshly fetched token is definitive at once - the relay
  has already ruled out a stale token. Other login-problem replies (``430 4.2.0 mailbox
  logon failure``, ``530 5.7.57`` on a session that had logged in) come without that
  second try, and one of them may be a passing fault, so it takes
  :data:`LOGIN_REFUSALS` attempts in a row. Cleared by the next attempt that runs on a
  session whose login the upstream accepted.
* **SendAsDenied** (``Problem.SEND_AS``): one message with a From the mailbox may not
  use says little about the profile - one application with a wrong sender - so it takes
  :data:`SEND_AS_DENIALS` messages of the profile in a row, without a message delivered
  in between. Cleared by the next message the upstream accepts (one an application
  handed over: the relay's own delivery reports are sent as the mailbox itself, which
  proves nothing about the applications' senders). Messages that neither
  were delivered nor were refused SendAs (an unknown recipient, a network failure) leave
  the count as it is: they say nothing about sending as the sender.

State is in memory: a restart starts every profile ready, and the next attempts (deferred
messages are retried) tell again. A reload forgets removed profiles and starts afresh
those whose mailbox, credential, upstream or sender settings changed, since the old
observations were about a different setup; unchanged profiles keep theirs.
"""

from __future__ import annotations

import datetime as dt
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass

from relay.config import Config, Profile
from relay.core.log import scrub
from relay.core.reply import Reply
from relay.core.text import truncate
from relay.deliver.classify import classify

log = logging.getLogger(__name__)

# Login-problem replies in a row (no fresh token tried) after which a profile is not ready.
LOGIN_REFUSALS = 2
# Messages in a row refused SendAsDenied after which a profile is not ready.
SEND_AS_DENIALS = 3
# An upstream reply shown in /readyz is cut to this many characters.
_MAX_REPLY = 300


@dataclass
class _Streak:
    """Consecutive refusals of one kind, and the latest one (what the operator sees)."""

    count: int
    definitive: bool        # a refusal in the streak came after a fresh token
    mailbox: str
    reply: str
    explanation: str
    since: float            # wall clock of the streak's first refusal
    last: float


@dataclass
class _State:
    setup: tuple[object, ...]            # what a reload compares (see _setup)
    login: _Streak | None = None
    send_as: _Streak | None = None
    last_login: float | None = None      # wall clock of the last accepted login
    last_delivery: float | None = None
    sign_in: str | None = None           # why the user's sign-in must be made again


@dataclass(frozen=True)
class ProfileStatus:
    """One profile's readiness and a one-line reason, as /readyz shows it."""

    profile: str
    ready: bool
    detail: str


def _setup(config: Config, profile: Profile) -> tuple[object, ...]:
    """What the observations of a profile depend on: a change starts it afresh."""
    return (profile.mailbox.lower(), profile.credential, profile.sender_policy,
            tuple(profile.send_as), config.credentials.get(profile.credential),
            config.upstream_for(profile))


def _shown(reply: Reply) -> str:
    """The upstream's reply as one printable line, bounded, with no secret in it."""
    text = "".join(c if c.isprintable() else "?" for c in scrub(str(reply)))
    return truncate(text, _MAX_REPLY)


def _when(t: float) -> str:
    return dt.datetime.fromtimestamp(t, dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def _ago(now: float, t: float) -> str:
    seconds = max(0.0, now - t)
    if seconds < 120:
        return f"{seconds:.0f} s ago"
    if seconds < 7200:
        return f"{seconds / 60:.0f} min ago"
    return f"{seconds / 3600:.1f} h ago"


class ProfileHealth:
    """Per-profile readiness from delivery outcomes; see the module docstring."""

    def __init__(self, clock: Callable[[], float] = time.time) -> None:
        self._clock = clock
        self._profiles: dict[str, _State] = {}

    def __contains__(self, profile: object) -> bool:
        return profile in self._profiles

    def configure(self, config: Config) -> None:
        """Track exactly ``config``'s profiles (at start and after each reload)."""
        profiles: dict[str, _State] = {}
        for name, profile in config.profiles.items():
            setup = _setup(config, profile)
            old = self._profiles.get(name)
            if old is not None and old.setup == setup:
                profiles[name] = old
            else:
                if old is not None and not self._ready(old):
                    log.info("profile %s: its settings changed; readiness starts afresh",
                             name, extra={"profile": name})
                profiles[name] = _State(setup)
        self._profiles = profiles

    # --- observations (from relay.core.events.Hooks) ----------------------------------------------

    def login_refused(self, profile: str, mailbox: str, reply: Reply, *,
                      fresh_token: bool) -> None:
        """An attempt ended with a login-problem reply; ``fresh_token``: it was the
        refusal of a freshly fetched token (definitive)."""
        state = self._profiles.get(profile)
        if state is None:
            return
        was_ready = self._ready(state)
        state.login = self._extend(state.login, mailbox, reply, definitive=fresh_token)
        self._transition(profile, state, was_ready)

    def sign_in_needed(self, profile: str, reason: str) -> None:
        """The profile's delegated sign-in no longer works: not ready until a login with
        a new one is accepted."""
        state = self._profiles.get(profile)
        if state is None:
            return
        was_ready = self._ready(state)
        state.sign_in = reason
        self._transition(profile, state, was_ready)

    def logged_in(self, profile: str, mailbox: str, *, delivered: bool) -> None:
        """An attempt ran on a session whose login was accepted, with no login-problem
        reply; ``delivered``: the upstream also took the message."""
        state = self._profiles.get(profile)
        if state is not None and state.sign_in is not None:
            was_ready = self._ready(state)
            state.sign_in = None
            self._transition(profile, state, was_ready)
        if state is None:
            return
        was_ready = self._ready(state)
        now = self._clock()
        state.last_login = now
        state.login = None
        if delivered:
            state.last_delivery = now
            state.send_as = None
        self._transition(profile, state, was_ready)

    def send_as_denied(self, profile: str, mailbox: str, reply: Reply) -> None:
        """The upstream refused a message because the mailbox may not send as its sender."""
        state = self._profiles.get(profile)
        if state is None:
            return
        was_ready = self._ready(state)
        state.send_as = self._extend(state.send_as, mailbox, reply, definitive=False)
        self._transition(profile, state, was_ready)

    def _extend(self, streak: _Streak | None, mailbox: str, reply: Reply, *,
                definitive: bool) -> _Streak:
        now = self._clock()
        explanation = classify(reply).explanation
        if streak is None:
            return _Streak(1, definitive, mailbox, _shown(reply), explanation, now, now)
        streak.count += 1
        streak.definitive = streak.definitive or definitive
        streak.mailbox, streak.reply, streak.explanation = mailbox, _shown(reply), explanation
        streak.last = now
        return streak

    # --- judgement ------------------------------------------------------------------------

    @staticmethod
    def _login_fails(state: _State) -> bool:
        login = state.login
        return login is not None and (login.definitive or login.count >= LOGIN_REFUSALS)

    @staticmethod
    def _send_as_fails(state: _State) -> bool:
        return state.send_as is not None and state.send_as.count >= SEND_AS_DENIALS

    def _ready(self, state: _State) -> bool:
        return not (self._login_fails(state) or self._send_as_fails(state)
                    or state.sign_in is not None)

    def ready(self, profile: str) -> bool:
        """False while a configured profile has a problem; unknown profiles are ready."""
        state = self._profiles.get(profile)
        return state is None or self._ready(state)

    def _transition(self, profile: str, state: _State, was_ready: bool) -> None:
        """One log line when a profile's readiness changes, not one per attempt."""
        ready = self._ready(state)
        if ready == was_ready:
            return
        if ready:
            log.info("profile %s is ready again: %s", profile, self._ok_detail(state),
                     extra={"profile": profile})
        else:
            log.error("profile %s is not ready: %s", profile, "; ".join(self._problems(state)),
                      extra={"profile": profile})

    def statuses(self) -> list[ProfileStatus]:
        """Every configured profile, in the config's order."""
        out = []
        for name, state in self._profiles.items():
            problems = self._problems(state)
            if problems:
                out.append(ProfileStatus(name, False, "; ".join(problems)))
            else:
                out.append(ProfileStatus(name, True, self._ok_detail(state)))
        return out

    def _problems(self, state: _State) -> list[str]:
        out = [f"no token: {state.sign_in}"] if state.sign_in is not None else []
        login, send_as = state.login, state.send_as
        if login is not None and self._login_fails(state):
            fresh = ", also with a freshly fetched token" if login.definitive else ""
            out.append(f"the upstream refused the login for {login.mailbox}{fresh} "
                       f"({login.count} attempt(s) since {_when(login.since)}): "
                       f"{login.reply} - {login.explanation}. Ready again once a login "
                       f"succeeds (deferred mail is retried; `smtp-oauth-relay queue flush` "
                       f"retries it now)")
        if send_as is not None and self._send_as_fails(state):
            out.append(f"{send_as.count} messages in a row refused because {send_as.mailbox} "
                       f"may not send as their sender (since {_when(send_as.since)}): "
                       f"{send_as.reply} - {send_as.explanation}. Ready again once a message "
                       f"of the profile is delivered, or after a reload that changes its "
                       f"sender settings")
        return out

    def _ok_detail(self, state: _State) -> str:
        now = self._clock()
        parts = [f"upstream login accepted {_ago(now, state.last_login)}"
                 if state.last_login is not None else "no upstream login since the start"]
        if state.login is not None:
            parts.append(f"{state.login.count} refused login(s) in a row (not ready at "
                         f"{LOGIN_REFUSALS}): {state.login.reply}")
        if state.send_as is not None:
            parts.append(f"{state.send_as.count} message(s) in a row refused SendAsDenied "
                         f"(not ready at {SEND_AS_DENIALS})")
        return "; ".join(parts)
