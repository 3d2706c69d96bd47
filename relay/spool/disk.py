"""The system calls the spool's promises rest on, each made safe against a full disk and a
crash at any moment.

- :func:`write_synced`: create a file with given bytes, fsynced; nothing left on failure;
- :func:`write_all`: write every byte to a descriptor (``os.write`` may write fewer);
- :func:`overwrite`: write over a file's first page in place, when that is as safe as a
  rename (the record of an upstream's 250 on a full disk);
- :func:`fsync_dir`: make a directory's entries (a rename, a new name) durable;
- :func:`unlink_quietly`: remove files that may already be gone;
- :func:`tighten`: take group-write and other access off a directory of ours;
- :func:`filesystem_type`: what a path is on (tmpfs loses the queue at reboot);
- :data:`DIR_MODE`, :data:`FILE_MODE`: the spool is private to the relay's user and group.

The rest of the spool calls these through this module (``disk.fsync_dir(...)``), so that a
test can make any of them fail for the whole spool at once.
"""

from __future__ import annotations

import contextlib
import mmap
import os
from pathlib import Path

# Spool directories are private to the relay's user and group: messages are personal data.
DIR_MODE = 0o750
FILE_MODE = 0o640


def filesystem_type(path: Path) -> str:
    """The type of the filesystem holding ``path`` (from /proc/self/mountinfo; '' if unknown)."""
    target = str(path.resolve())
    best, fstype = "", ""
    try:
        lines = Path("/proc/self/mountinfo").read_text().splitlines()
    except OSError:
        return ""
    for line in lines:
        left, _, right = line.partition(" - ")
        parts = left.split()
        if len(parts) < 5 or not right:
            continue
        mount = parts[4].replace("\\040", " ")
        prefix = mount.rstrip("/") + "/"
        if (target == mount or target.startswith(prefix)) and len(mount) >= len(best):
            best, fstype = mount, right.split()[0]
    return fstype


def tighten(path: Path) -> None:
    """No access for others, and no group write, to a directory of ours (an older version, a
    umask or a volume may have made it more open); a directory someone else owns is left as
    it is (the spool's own check still says whether the relay can use it)."""
    st = path.stat()
    if st.st_uid == os.geteuid() and st.st_mode & 0o7777 & ~DIR_MODE:
        os.chmod(path, st.st_mode & DIR_MODE)


def fsync_dir(path: str | Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        written = os.write(fd, view)
        view = view[written:]


def write_synced(path: str | Path, data: bytes, *, sync: bool = True) -> None:
    """Create ``path`` with ``data`` (fsynced unless ``sync`` is False); on any failure the
    partial file is removed, so a full disk leaves nothing behind to keep it full."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, FILE_MODE)
    try:
        write_all(fd, data)
        if sync:
            os.fsync(fd)
    except BaseException:
        os.close(fd)
        with contextlib.suppress(OSError):
            os.unlink(path)
        raise
    os.close(fd)


def overwrite(path: str | Path, data: bytes) -> bool:
    """Write ``data`` over the file at ``path`` in place; False (nothing done) unless that
    is as safe as the rename it stands in for, against the process dying at any moment.

    It is when it takes one write into the file's first page, within blocks the file has:
    no new disk space is needed, and a single-page write into the page cache is whole or
    not done at all when the process is killed. Whitespace pads ``data`` to the old length
    (JSON allows it), so nothing of the old content is left after it.
    """
    fd = os.open(path, os.O_WRONLY | os.O_CLOEXEC)
    try:
        st = os.fstat(fd)
        data = data.ljust(st.st_size)
        if len(data) > min(mmap.PAGESIZE, st.st_blocks * 512):
            return False
        return os.pwrite(fd, data, 0) == len(data)
    finally:
        os.close(fd)


def unlink_quietly(*paths: str | Path) -> None:
    for path in paths:
        with contextlib.suppress(OSError):
            os.unlink(path)
