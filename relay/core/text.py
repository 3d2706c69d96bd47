"""Text made fit for one log line or one reply line.

- :func:`truncate`: ``text`` cut to at most ``limit`` characters, ending in ``...`` when cut;
- :func:`one_line`: ``text`` with every run of whitespace (line breaks too) made one space.

Replies, log lines and status pages quote what others wrote (a client's address, an
upstream's reply, a library's error), which may be long or span lines. One way to bound
and flatten it keeps every stage's output the same shape.
"""

from __future__ import annotations


def truncate(text: str, limit: int) -> str:
    """``text`` if it fits in ``limit`` characters, else its start and ``...`` (``limit``
    characters in all)."""
    return text if len(text) <= limit else text[:limit - 3] + "..."


def one_line(text: str) -> str:
    """``text`` on one line: whitespace runs (CR, LF, tabs) become single spaces, and
    leading and trailing whitespace goes."""
    return " ".join(text.split())
