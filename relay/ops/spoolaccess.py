"""Whether the relay will be able to write its spool, found before it starts.

- :func:`spool_access`: what stands in the way (each problem a sentence with its fix) and,
  when run as root, a note that says for whom the spool was checked.

``smtp-oauth-relay check`` runs it (also as systemd's ExecStartPre=, as the service's own
user), so that a spool the relay cannot write is named by ``check``, not by a relay that
fails at start. The user who runs the check is checked with access(2), which knows ACLs
and read-only mounts. Root may write anywhere, so for root what matters is the user the
relay will run as: the spool's owner, when the directory exists and is not root's, checked
by its permission bits (files root left in a spool it does not own are out of the relay's
reach); otherwise root cannot know that user, and the note says what was checked.
"""

from __future__ import annotations

import os
import pwd
from pathlib import Path

from relay.spool.store import DIRS


def _who(uid: int) -> str:
    """``smtp-oauth-relay (uid 998)``, or ``uid 998`` for a uid without a passwd entry."""
    try:
        return f"{pwd.getpwuid(uid).pw_name} (uid {uid})"
    except KeyError:
        return f"uid {uid}"


def _user(uid: int) -> str:
    """The name ``chown`` takes: the user's, else the number."""
    try:
        return pwd.getpwuid(uid).pw_name
    except KeyError:
        return str(uid)


def spool_access(directory: Path) -> tuple[list[str], str | None]:
    """(problems, note) for the spool at ``directory``, as the relay would use it."""
    existing = directory
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        return [f"{existing} is not a directory"], None
    euid = os.geteuid()
    me = _who(euid)
    if existing != directory:
        if os.access(existing, os.W_OK | os.X_OK):
            return [], _root_note(directory) if euid == 0 else None
        return [f"{directory} does not exist and {me}, who runs this check, cannot create "
                f"it in {existing}: create it for the user the relay runs as (install -d "
                f"-m 0700 -o USER {directory}; under systemd, StateDirectory= does), or set "
                "spool.directory"], None
    paths = [directory, *(p for name in DIRS if (p := directory / name).is_dir())]
    problems = [f"{path} is not writable by {me}, who runs this check: the user the relay "
                f"runs as must own it (chown -R USER {directory})"
                for path in paths if not os.access(path, os.W_OK | os.X_OK)]
    owner = directory.stat().st_uid
    if euid != 0 or problems:
        return problems, None
    if owner == 0:
        return [], _root_note(directory)
    for path in paths:
        st = path.stat()
        if st.st_uid != owner:
            problems.append(f"{path} belongs to {_who(st.st_uid)}, not to the spool's owner "
                            f"{_who(owner)}: the relay cannot write there (chown -R "
                            f"{_user(owner)} {directory})")
        elif st.st_mode & 0o300 != 0o300:
            problems.append(f"{path} is not writable by the spool's owner {_who(owner)} "
                            f"(mode {st.st_mode & 0o777:o}): chmod u+rwx {path}")
    return problems, (f"spool.directory {directory} was checked for its owner "
                      f"{_who(owner)}, the user the relay runs as (this check runs as root)")


def _root_note(directory: Path) -> str:
    return (f"spool.directory {directory} was checked as root, who may write anywhere; the "
            "user the relay runs as must be able to write it too (under systemd, "
            "StateDirectory= sees to it; or run check as that user)")
