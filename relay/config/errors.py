"""What is wrong with a configuration, said with the key it is about.

- :class:`ConfigError`: the configuration cannot be used; it carries every problem found
  as (key path, message) pairs and renders them one a line, ``source: path: message``
  (``profiles.sales.credential: unknown credential 'main2' (known: main)``);
- :func:`key_path`: a key path as ``server.listeners.0.port``;
- :func:`known`: `` (known: main, sales)``, the names there are, for a message about a name
  that is not one of them (in the config, or on the command line).

Every problem is reported at once, not only the first, so that one edit fixes them all.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from typing import Any

from relay.core.errors import RelayError


class ConfigError(RelayError):
    """The configuration cannot be used; ``problems`` lists (key path, message) pairs."""

    def __init__(self, source: str, problems: list[tuple[str, str]]) -> None:
        self.source = source
        self.problems = problems
        super().__init__(self.render())

    def render(self) -> str:
        lines = [f"{self.source}: {path}: {msg}" if path else f"{self.source}: {msg}"
                 for path, msg in self.problems]
        return "\n".join(lines)


def key_path(loc: Iterable[Any]) -> str:
    """A key path as ``server.listeners.0.port``; a key that would not show (empty, or with
    blanks, quotes or control characters) is written as a JSON string."""
    return ".".join(_key(str(p)) for p in loc)


def _key(part: str) -> str:
    if part and part.isprintable() and not any(c in part for c in " \"'"):
        return part
    return json.dumps(part)


def known(names: Iterable[str]) -> str:
    """`` (known: a, b)``, or `` (none defined)``."""
    listed = ", ".join(sorted(names))
    return f" (known: {listed})" if listed else " (none defined)"
