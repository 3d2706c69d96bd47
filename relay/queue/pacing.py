"""The governor in the running queue: its limits from the config, the mailbox it paces, and
its windows kept in the spool across restarts.

- :func:`governor_limits`: relay.queue.governor.Limits from ``delivery.mailbox_limits``,
  and :func:`special_limits` for the mailboxes whose upstream has its own (HVE, ACS);
- :func:`mailbox_of`: the mailbox a queued message is sent as (the governor's key);
- :class:`GovernorFile`: loads the governor's windows from ``governor.json`` in the spool
  at start-up and saves them when they changed, at most every 30 s and at stop;
- :data:`GOVERNOR_FILE`: that file's name.

Exchange's 24-hour window does not restart with the relay, and neither does a quota
pause. A crash forgets at most the last 30 s of a mailbox's day, and Exchange's own quota
reply still pauses the mailbox should that matter.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable

from relay.config import Config, MailboxLimits
from relay.queue.governor import Governor, Limits
from relay.spool.facade import AsyncSpool
from relay.spool.records import Entry

log = logging.getLogger(__name__)

GOVERNOR_FILE = "governor.json"
SAVE_EVERY = 30.0


def governor_limits(config: Config) -> Limits:
    return _limits(config.delivery.mailbox_limits)


def special_limits(config: Config) -> dict[str, Limits]:
    """The mailboxes (lower case) whose upstream has limits of its own (HVE, ACS)."""
    out: dict[str, Limits] = {}
    for profile in config.profiles.values():
        if profile.upstream is not None and profile.transport == "smtp":
            own = config.upstreams[profile.upstream].limits
            if own is not None:
                out[profile.mailbox.lower()] = _limits(own)
    return out


def _limits(lim: MailboxLimits) -> Limits:
    return Limits(max_sessions=lim.max_sessions, messages_per_minute=lim.messages_per_minute,
                  recipients_per_day=lim.recipients_per_day,
                  throttle_cooldown=lim.throttle_cooldown)


def mailbox_of(entry: Entry, config: Config) -> str | None:
    """The mailbox ``entry`` is sent as: fixed at acceptance, else (a record of an older
    version) its profile's; None when the profile is gone."""
    if entry.mailbox:
        return entry.mailbox
    profile = config.profiles.get(entry.profile)
    return profile.mailbox if profile else None


class GovernorFile:
    """``governor``'s windows in ``spool``, in the times of ``clock`` (wall-clock seconds,
    which mean the same after a restart)."""

    def __init__(self, governor: Governor, spool: AsyncSpool,
                 clock: Callable[[], float]) -> None:
        self._governor = governor
        self._spool = spool
        self._clock = clock
        self._saved = (0, float("-inf"))        # (governor.changes, clock time) saved

    async def load(self) -> None:
        raw = await self._spool.load_state(GOVERNOR_FILE)
        if raw is None:
            return
        try:
            data = json.loads(raw)
        except ValueError:
            log.warning("%s in the spool is not valid JSON; pacing starts afresh",
                        GOVERNOR_FILE)
            return
        n = self._governor.restore(data, self._clock())
        log.debug("pacing state of %d mailbox(es) restored", n)
        self._saved = (self._governor.changes, self._clock())

    async def save(self, *, force: bool = False) -> None:
        """Save the windows when they changed (at most every 30 s unless ``force``)."""
        changes, saved_at = self._saved
        if self._governor.changes == changes:
            return
        now = self._clock()
        # (A clock set back counts as time passed: the next save is not put off for as
        # long as the clock went back.)
        if not force and 0 <= now - saved_at < SAVE_EVERY:
            return
        self._saved = (self._governor.changes, now)
        data = json.dumps(self._governor.export(now)).encode()
        try:
            await self._spool.save_state(GOVERNOR_FILE, data)
        except OSError as exc:
            log.warning("cannot save the pacing state: %s", exc.strerror or exc)
