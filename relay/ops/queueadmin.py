"""The queue commands as an operator runs them, over :mod:`relay.spool.ctl`.

- :func:`open_spool`: a spool directory (the config's, or the sandbox's), opened for
  operator commands (as the spool's owner when run as root) and closed again afterwards;
  :class:`NoSpool` when the directory is not there, :class:`SpoolUnavailable` when it
  cannot be used;
- :func:`act`: one action (``show``, ``retry``, ``hold``, ``release``, ``delete``, see
  :data:`PER_MESSAGE`) on each of several messages, given by id in any case
  (:func:`relay.spool.ctl.resolve`), an :class:`Outcome` per message as soon as it is
  known.

Run as root (sudo), the commands act as the spool's owner, as ``runuser -u`` would: files
root wrote into the spool would be out of the relay's reach (the unit's UMask=0077). A
message the command could not act on is an outcome, not an exception, so that one wrong
id does not stop the others; ``temporary`` tells a message that merely changed meanwhile
(run the command again) from a mistake that needs the operator (no such message, a
state the command does not work on).
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from relay.core.errors import RelayError
from relay.spool import ctl
from relay.spool.locks import SpoolError
from relay.spool.store import Spool

# The actions that take message ids, and what each does to one message (its line of text).
PER_MESSAGE: dict[str, Callable[[Spool, str], str] | None] = {
    "show": None,                   # a report, not a change: see Outcome.info
    "retry": ctl.retry,
    "hold": ctl.hold,
    "release": ctl.release,
    "delete": ctl.delete,
}


class NoSpool(RelayError):
    """There is no spool at ``spool.directory``: the config names the wrong place."""


class SpoolUnavailable(RelayError):
    """The spool is there but cannot be used (permissions, its owner, the filesystem)."""


@dataclass(frozen=True)
class Outcome:
    """What an action did to one message.

    ``done``: ``text`` is the action's own line (``ID: on hold``) and ``info`` the
    message's details for ``show``; otherwise ``text`` is the reason, and ``temporary``
    says whether trying again may work.
    """

    id: str
    done: bool
    text: str = ""
    info: dict[str, Any] | None = None
    temporary: bool = False


@contextlib.contextmanager
def open_spool(directory: Path, source: str = "spool.directory") -> Iterator[Spool]:
    """The spool at ``directory``, open for operator commands until the block ends;
    ``source`` says where the directory was named, for the error if there is none."""
    spool = Spool(directory)
    if not spool.root.is_dir():
        raise NoSpool(f"no spool at {spool.root} ({source})")
    owner, group = spool.root.stat().st_uid, spool.root.stat().st_gid
    acting_as = ""
    if os.geteuid() == 0 and owner != 0:
        try:
            _become(owner, group)
        except OSError as exc:
            raise SpoolUnavailable(f"cannot act as the spool's owner (uid {owner}): "
                                   f"{exc.strerror or exc}") from exc
        acting_as = f" (acting as the spool's owner, uid {owner})"
    try:
        spool.open(on_tmpfs="warn")
    except SpoolError as exc:
        raise SpoolUnavailable(f"{exc}{acting_as}") from exc
    yield spool


def act(spool: Spool, action: str, ids: Iterable[str]) -> Iterator[Outcome]:
    """Apply ``action`` (a key of :data:`PER_MESSAGE`) to each message of ``ids``."""
    apply = PER_MESSAGE[action]
    for given in ids:
        mid = ctl.resolve(spool, given)
        try:
            if apply is None:
                outcome = Outcome(mid, True, info=ctl.show(spool, mid))
            else:
                outcome = Outcome(mid, True, apply(spool, mid))
        except ctl.QueueCommandError as exc:
            outcome = Outcome(mid, False, str(exc), temporary=exc.temporary)
        except OSError as exc:
            # Not a race ctl knows about (permissions, a missing directory): one line
            # naming the message and the file, not a traceback.
            where = f" ({exc.filename})" if exc.filename else ""
            outcome = Outcome(mid, False, f"{mid}: {exc.strerror or exc}{where}",
                              temporary=isinstance(exc, FileNotFoundError))
        yield outcome


def _become(uid: int, gid: int) -> None:
    """Drop root for good and take on ``uid`` with its primary and supplementary groups
    (``gid`` alone when the uid has no passwd entry, e.g. a container's numeric uid)."""
    import pwd

    try:
        user = pwd.getpwuid(uid)
    except KeyError:
        os.setgroups([])
        os.setgid(gid)
    else:
        os.initgroups(user.pw_name, user.pw_gid)
        os.setgid(user.pw_gid)
    os.setuid(uid)
